"""Causal tracing on the embedded SmolLM2 model: ROME's picture on real facts."""
import numpy as np
import pytest
import torch

from jaxedit.locate.tracing import trace_batch
from conftest import offset_span
from reference_torch import torch_scores

SAMPLES = 3
REQS = [{"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower"},
        {"prompt": "The Colosseum is located in the city of", "subject": "The Colosseum"}]


@pytest.fixture(scope="module")
def traces(smollm2):
    model, tok = smollm2
    # 3 noise samples instead of the default 10: the same picture at a third of the cost (the fixture: 68 CPU-seconds
    # with 5 samples, 43 with 3; with 3 / 5 samples the Eiffel Tower's early-site IE 0.44 / 0.39, late site 0.74 /
    # 0.73, the largest IE between them 0.19 / 0.16, the Colosseum's last subject token 0.42 / 0.48); the noise is
    # the same draw's first 3 rows
    return trace_batch(model, REQS, tokenizer=tok, kinds=("hidden",), samples=SAMPLES, batch_size=2, bucket=1)


@pytest.mark.slow
def test_eiffel_tower_high_and_low(traces):
    r = traces[0]["hidden"]
    assert r.answer == " Paris"
    assert r.high_score == pytest.approx(0.70, abs=0.03)
    assert r.low_score < 0.1 * r.high_score
    assert r.tokens[:4] == ["The", " E", "iffel", " Tower"] and r.span == (0, 4)
    # two sites: the subject in early layers, the last token in late layers
    L = r.scores.shape[1]
    assert r.ie[0:4, : L // 2].max() > 0.3
    assert r.ie[-1, 2 * L // 3:].max() > 0.5
    assert r.ie[4:-1].max() < 0.25  # the tokens in between carry little
    # in SmolLM2 the early site is "iffel" (the end of the name), not " Tower": checked against transformers in
    # test_eiffel_tower_against_transformers
    assert int(np.argmax(r.ie[0:4].max(1))) == 2


@pytest.mark.slow
def test_eiffel_tower_against_transformers(traces, smollm2, hf_gguf):
    """The numbers above from transformers' own GGUF model with the same noise (3 x the std of the embeddings of
    both requests' subject tokens there, RandomState(1), 3 samples): clean and corrupted p(" Paris") and the
    restorations of "iffel" and " Tower" at layer 3."""
    _, tok = smollm2
    r = traces[0]["hidden"]
    req = REQS[0]
    ids = tok(req["prompt"])["input_ids"]
    s, e = offset_span(tok, req["prompt"], req["subject"])
    assert list(r.input_ids) == ids and r.span == (s, e)
    emb = hf_gguf.get_input_embeddings().weight.detach().double().numpy()
    subjects = []
    for q in REQS:
        a, b = offset_span(tok, q["prompt"], q["subject"])
        subjects.append(emb[tok(q["prompt"])["input_ids"][a:b]])
    level = 3 * np.concatenate(subjects).std(ddof=1)
    noise = level * np.random.RandomState(1).randn(SAMPLES, e - s, emb.shape[1])
    with torch.no_grad():
        assert r.answer_id == int(hf_gguf(torch.tensor([ids])).logits[0, -1].argmax())
    cells = [(2, 3), (3, 3)]
    scores, low, high = torch_scores(hf_gguf, ids, (s, e), noise, r.answer_id, cells=cells)
    assert r.noise_level == pytest.approx(level, rel=1e-5)
    assert r.high_score == pytest.approx(high, abs=2e-3) and r.low_score == pytest.approx(low, abs=2e-3)
    for t, l in cells:
        assert r.scores[t, l] == pytest.approx(scores[(t, l)], abs=5e-3), (t, l)
    # "iffel", not " Tower" (measured with 3 samples: restoring "iffel" at layer 3 adds 0.254, " Tower" less than 0.05)
    assert scores[(2, 3)] - low > 0.2 and scores[(3, 3)] - low < 0.05


@pytest.mark.slow
def test_colosseum_last_subject_token_carries_the_fact(traces):
    """The classic result: among the subject's tokens, the largest hidden-state IE is at its last token."""
    r = traces[1]["hidden"]
    assert r.answer == " Rome" and r.high_score > 0.6 and r.low_score < 0.05
    s, e = r.span
    assert int(np.argmax(r.ie[s:e].max(1))) == e - s - 1
    assert r.ie[e - 1].max() > 0.3
