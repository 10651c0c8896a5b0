"""Causal tracing against an independent per-cell loop: the reference's structure (one corrupted forward with a
clean row 0 per cell, torch forward hooks on the HF model; tests/reference_torch.py)."""
import numpy as np
import pytest
import torch

import jaxedit
from jaxedit import JaxeditError
from jaxedit.locate.tracing import draw_noise, find_token_range, trace, trace_batch
from conftest import offset_span
from tiny_models import build_hf_model
from reference_torch import torch_scores, torch_trace

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"


def sharpen(hf, scale=6.0):
    """Random tiny models predict near-uniformly; scale the head so probabilities carry signal."""
    with torch.no_grad():
        head = hf.get_output_embeddings()
        head.weight.mul_(scale)
    return hf


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa-untied"])
def tiny(request, tmp_path_factory, tokenizer):
    hf = sharpen(build_hf_model(request.param, seed=5, init_std=0.15), 2.0)
    d = tmp_path_factory.mktemp("trace-" + request.param)
    hf.save_pretrained(d)
    tokenizer.save_pretrained(d)
    model, tok = jaxedit.load(str(d))
    return hf, model, tok


SLOW = pytest.mark.slow
# the other model family's runs of the checks below (tests/conftest.py: SLOW_CASES): the fast tier keeps GPT-2's
# shared grid, restoration identities, seeded noise and "s3" level, and LLaMA's dense grid and "s0.5" level
SLOW_CASES = {"test_grid_equals_naive_torch_loop[llama-gqa-untied-shared-2-3]",
              "test_grid_equals_naive_torch_loop[gpt2-dense-None-3]",
              "test_restoration_identities[llama-gqa-untied-shared]",
              "test_seeded_noise_equals_explicit_reference_draw[llama-gqa-untied]",
              "test_s3_noise_is_three_embedding_stds[llama-gqa-untied-3]",
              "test_s3_noise_is_three_embedding_stds[gpt2-0.5]"}


# with 3 layers, window 3 is clipped at both the first and the last layer and every window differs; window 4 gives
# layers 1 and 2 the same window (0..2), which the shared grid computes once. The fast tier runs two of the five
# (GPT-2 the shared grid two layers a step, LLaMA the dense one: SLOW_CASES above).
@pytest.mark.parametrize("method, layers_per_step, window",
                         [pytest.param("shared", 1, 3, marks=SLOW), ("shared", 2, 3),
                          pytest.param("shared", 3, 3, marks=SLOW), pytest.param("shared", 2, 4, marks=SLOW),
                          ("dense", None, 3)])
def test_grid_equals_naive_torch_loop(tiny, method, layers_per_step, window):
    hf, model, tok = tiny
    ids = tok(PROMPT)["input_ids"]
    span = find_token_range(tok, ids, SUBJECT)
    S = 3
    noise = draw_noise(S, span[1] - span[0], model.config.d_model, level=0.5)
    res = trace(model, input_ids=ids, span=span, samples=S, noise=noise, window=window, method=method,
                layers_per_step=layers_per_step)
    for kind in ("hidden", "mlp", "attn"):
        r = res[kind]
        ref, low, high = torch_trace(hf, ids, span, noise, r.answer_id, kind, window)
        assert r.answer_id == int(hf(torch.tensor([ids])).logits[0, -1].argmax())
        assert abs(r.high_score - high) < 1e-5 and abs(r.low_score - low) < 1e-5
        assert r.scores.shape == (len(ids), model.config.n_layers)
        assert np.abs(r.scores - ref).max() < 1e-5, (kind, np.abs(r.scores - ref).max())
        assert np.ptp(ref) > 1e-3  # the grid has signal: a wrong cell could not pass unnoticed


@pytest.mark.parametrize("method", ["shared", pytest.param("dense", marks=SLOW)])
def test_restoration_identities(tiny, method):
    """Restoring the last token's final state gives the clean probability; restoring a token before the span,
    which the noise never reached, changes nothing."""
    _, model, tok = tiny
    res = trace(model, PROMPT, span=SUBJECT, tokenizer=tok, samples=4, kinds=("hidden", "mlp"), method=method)
    r = res["hidden"]
    s, _ = r.span
    assert s >= 1
    assert abs(r.scores[-1, -1] - r.high_score) < 1e-6
    np.testing.assert_allclose(r.scores[:s], r.low_score, atol=1e-6)
    np.testing.assert_allclose(res["mlp"].scores[:s], r.low_score, atol=1e-6)
    assert r.high_score != pytest.approx(r.low_score, abs=1e-4)


def test_seeded_noise_equals_explicit_reference_draw(tiny):
    _, model, tok = tiny
    ids = tok(PROMPT)["input_ids"]
    s, e = find_token_range(tok, ids, SUBJECT)
    level = 0.7
    explicit = level * np.random.RandomState(1).randn(5, e - s, model.config.d_model)
    a = trace(model, input_ids=ids, span=(s, e), samples=5, noise=explicit, kinds=("hidden",))["hidden"]
    b = trace(model, input_ids=ids, span=(s, e), samples=5, noise=level, kinds=("hidden",))["hidden"]
    np.testing.assert_array_equal(a.scores, b.scores)
    c = trace(model, input_ids=ids, span=(s, e), samples=5, noise=level, seed=2, kinds=("hidden",))["hidden"]
    assert np.abs(c.scores - b.scores).max() > 0


@pytest.mark.slow
def test_batch_of_different_lengths_equals_one_by_one(tiny):
    _, model, tok = tiny
    reqs = [{"prompt": PROMPT, "subject": SUBJECT},
            {"prompt": "Miles Davis plays the", "subject": "Miles Davis"},
            {"prompt": "The Space Needle is in", "subject": "Space Needle", "target": " Seattle"},
            {"prompt": "Beats Music is owned by", "subject": "Beats Music"}]
    batch = trace_batch(model, reqs, tokenizer=tok, samples=3, noise=0.5, kinds=("hidden", "attn"), batch_size=3)
    for req, got in zip(reqs, batch):
        one = trace(model, req["prompt"], span=req["subject"], target=req.get("target"), tokenizer=tok, samples=3,
                    noise=0.5, kinds=("hidden", "attn"))
        for k in ("hidden", "attn"):
            assert got[k].answer_id == one[k].answer_id
            assert got[k].scores.shape == one[k].scores.shape
            np.testing.assert_allclose(got[k].scores, one[k].scores, atol=1e-6)
            assert got[k].low_score == pytest.approx(one[k].low_score, abs=1e-6)
    # a given target replaces the argmax: its first token is the answer
    assert batch[2]["hidden"].answer_id == tok(" Seattle", add_special_tokens=False)["input_ids"][0]


@pytest.mark.parametrize("k", [3, 0.5])
def test_s3_noise_is_three_embedding_stds(tiny, k):
    """noise "s<k>" (default "s3"): the noise actually added is k x the std of the token embeddings of the batch's
    spans (all of them together), drawn as RandomState(seed).randn(samples, span_len, d): the corrupted runs'
    p(answer) equals torch's with that noise, spans and level computed here independently (offset mapping, the HF
    embedding matrix). k = 0.5 corrupts partly, where a wrong scale shows most."""
    hf, model, tok = tiny
    reqs = [{"prompt": PROMPT, "subject": SUBJECT},
            {"prompt": "Miles Davis plays the", "subject": "Miles Davis"},
            {"prompt": "The Space Needle is in", "subject": "Space Needle", "target": " Seattle"},
            {"prompt": "Beats Music is owned by", "subject": "Beats Music"}]
    # the call of test_batch_of_different_lengths_equals_one_by_one but for the noise: the same compiled grid
    got = trace_batch(model, reqs, tokenizer=tok, samples=3, noise=f"s{k}", kinds=("hidden", "attn"), batch_size=3)
    spans = [offset_span(tok, r["prompt"], r["subject"]) for r in reqs]
    ids = [tok(r["prompt"])["input_ids"] for r in reqs]
    emb = hf.get_input_embeddings().weight.detach().double().numpy()
    level = k * np.concatenate([emb[i[s:e]] for i, (s, e) in zip(ids, spans)]).std(ddof=1)
    for req, i, (s, e), res in zip(reqs, ids, spans, got):
        r = res["hidden"]
        assert r.span == (s, e) and r.noise_level == pytest.approx(level, rel=1e-6)
        with torch.no_grad():
            clean = hf(torch.tensor([i])).logits[0, -1]
        answer = tok(req["target"])["input_ids"][0] if "target" in req else int(clean.argmax())
        assert r.answer_id == answer
        noise = level * np.random.RandomState(1).randn(3, e - s, model.config.d_model)
        _, low, high = torch_scores(hf, i, (s, e), noise, answer)
        tol = dict(rel=1e-3, abs=1e-7)
        assert r.high_score == pytest.approx(high, **tol) and r.low_score == pytest.approx(low, **tol)
        # the check can tell: noise at k (not k x std) corrupts differently
        _, low_k, _ = torch_scores(hf, i, (s, e), k * noise / level, answer)
        assert low_k != pytest.approx(low, rel=1e-2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=PROMPT, span="Louvre"), "does not occur"),
    (dict(prompt="   ", span="x"), "empty prompt"),
    (dict(prompt=PROMPT, span=SUBJECT, kinds=("hidden", "ffn")), "unknown kind 'ffn'"),
    (dict(prompt=PROMPT, span=SUBJECT, samples=0), "samples must be >= 1"),
    (dict(prompt=PROMPT, span=(3, 99)), "not a token range"),
    (dict(prompt=PROMPT, span=SUBJECT, noise="loud"), "bad noise"),
    (dict(prompt=PROMPT * 20, span=SUBJECT), "longer than the model's context"),
])
def test_bad_input_errors(tiny, kwargs, message):
    _, model, tok = tiny
    with pytest.raises(JaxeditError, match=message):
        trace(model, tokenizer=tok, **kwargs)


@pytest.mark.slow
def test_memory_chunking_does_not_change_the_grid(tiny):
    """A small memory budget splits the token-rows into several packed groups, one restore layer per step."""
    from jaxedit.locate.tracing import packed_bytes, row_groups

    _, model, tok = tiny
    kw = dict(span=SUBJECT, tokenizer=tok, samples=3, noise=0.5, kinds=("hidden", "attn"), window=3)
    T = len(tok(PROMPT)["input_ids"])
    budget = packed_bytes(model.config, 3, T, T * (T + 1) // 2) / 8
    assert len(row_groups(T, 3, model.config, budget)) >= 3
    a = trace(model, PROMPT, **kw)
    b = trace(model, PROMPT, memory_budget=budget, **kw)
    for k in ("hidden", "attn"):
        np.testing.assert_allclose(a[k].scores, b[k].scores, atol=1e-6)
