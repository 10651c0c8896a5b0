"""Causal tracing on the embedded SmolLM2 model: ROME's picture on real facts."""
import numpy as np
import pytest

from jaxedit.locate.tracing import trace_batch

REQS = [{"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower"},
        {"prompt": "The Colosseum is located in the city of", "subject": "The Colosseum"}]


@pytest.fixture(scope="module")
def traces(smollm2):
    model, tok = smollm2
    return trace_batch(model, REQS, tokenizer=tok, kinds=("hidden",), batch_size=2, bucket=1)


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
    # in SmolLM2 the early site is "iffel" (the end of the name), not " Tower": checked against transformers too
    assert int(np.argmax(r.ie[0:4].max(1))) == 2


@pytest.mark.slow
def test_colosseum_last_subject_token_carries_the_fact(traces):
    """The classic result: among the subject's tokens, the largest hidden-state IE is at its last token."""
    r = traces[1]["hidden"]
    assert r.answer == " Rome" and r.high_score > 0.6 and r.low_score < 0.05
    s, e = r.span
    assert int(np.argmax(r.ie[s:e].max(1))) == e - s - 1
    assert r.ie[e - 1].max() > 0.3
