"""Cached sampling against the transformers model in torch (a full forward per new token) on tiny models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxedit
from jaxedit import JaxeditError
from jaxedit.generate import generate, generate_ids, nucleus_mask, sample


def _torch_next_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([list(ids)])).logits[0, -1].double().numpy()


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-untied"])
def test_greedy_matches_full_forward_loop(tiny_dirs, tokenizer, name):
    """generate_ids (teacher-forced scan) against the transformers model in torch, one full forward per token."""
    model, _ = jaxedit.load(tiny_dirs[name][0])
    hf = tiny_dirs[name][1]
    prompts = [tokenizer("The Eiffel Tower")["input_ids"], tokenizer("Miles")["input_ids"]]
    out = generate_ids(model, prompts, 6, top_k=1)
    for p, o in zip(prompts, out):
        ids = list(p)
        for _ in range(6):
            ids.append(int(_torch_next_logits(hf, ids).argmax()))
        assert o == ids


def test_sampling_is_seeded_and_respects_top_k(tiny_dirs, tokenizer):
    model, _ = jaxedit.load(tiny_dirs["llama-mha-tied"][0])
    p = [tokenizer("The")["input_ids"]] * 4
    a = generate_ids(model, p, 5, top_k=3, seed=7)
    assert a == generate_ids(model, p, 5, top_k=3, seed=7)
    assert len({tuple(x) for x in a}) > 1  # different rows sample differently
    # every sampled token is among the 3 most likely at its position
    for row in a:
        for t in range(1, 6):
            logits = np.asarray(jaxedit.forward(model, np.array([row[:t]])).logits[0, -1])
            assert row[t] in np.argsort(-logits)[:3]
    texts = generate(model, tokenizer, ["The", "Miles"], 4, seed=1)
    assert texts[0].startswith("The") and texts[1].startswith("Miles")


def test_generate_is_generate_ids_decoded(tiny_dirs, tokenizer):
    """generate() tokenizes as the tokenizer does by default (BOS first with a tokenizer that adds it), passes its
    options (defaults: top-5, seed 0, temperature 1) to generate_ids and decodes without special tokens."""
    from tiny_models import bos_tokenizer

    model, _ = jaxedit.load(tiny_dirs["llama-mha-tied"][0])
    prompts = ["The", "Miles Davis", "", "The Eiffel Tower is in", "Paris", "Apple", "music", "Seattle"]
    bos = bos_tokenizer(tokenizer)
    for tok in (tokenizer, bos):
        ids = [list(tok(p)["input_ids"]) or [0] for p in prompts]
        decoded = lambda out: [tok.decode(o, skip_special_tokens=True) for o in out]  # noqa: E731
        want = decoded(generate_ids(model, ids, 8, top_k=5, seed=0, temperature=1.0))
        assert generate(model, tok, prompts, 8) == want
        opts = dict(top_k=2, seed=3, temperature=0.5)
        assert generate(model, tok, prompts, 8, **opts) == decoded(generate_ids(model, ids, 8, **opts))
    assert bos("The")["input_ids"][0] == bos.bos_token_id
    assert generate(model, bos, prompts, 8) != generate(model, tokenizer, prompts, 8)  # BOS changes the samples


def test_generate_errors(tiny_dirs):
    model, _ = jaxedit.load(tiny_dirs["gpt2"][0])
    with pytest.raises(JaxeditError):
        generate_ids(model, [[]], 3)
    with pytest.raises(JaxeditError):
        generate_ids(model, [[1, 2]], 100)  # beyond 64 positions


# ---- the batched sampler (prefill + cache, left-padded length buckets, nucleus) ----
# References: the transformers model in torch, one full forward per new token.

# LLaMA: the full suite
@pytest.mark.parametrize("name", ["gpt2", pytest.param("llama-gqa-untied", marks=pytest.mark.slow)])
def test_sample_greedy_matches_torch_loop_across_buckets(tiny_dirs, tokenizer, name):
    model, _ = jaxedit.load(tiny_dirs[name][0])
    hf = tiny_dirs[name][1]
    prompts = [tokenizer(t)["input_ids"] for t in ("The Eiffel Tower is located in the city of", "Miles",
                                                  "Beats Music is owned by", "The")]
    out = sample(model, prompts, 5, samples=2, greedy=True, bucket=4, max_batch=2)
    for p, rows in zip(prompts, out):
        ids = list(p)
        for _ in range(5):
            ids.append(int(_torch_next_logits(hf, ids).argmax()))
        assert rows[0] == rows[1] == ids[len(p):]


def test_nucleus_mask_equals_sorted_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 300)) * np.array([0.1, 1, 3, 8, 20, 0])[:, None]  # the last row: all tied
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1))
    for top_p in (0.05, 0.5, 0.9, 0.999):
        got = np.asarray(nucleus_mask(jnp.asarray(probs), top_p))
        for r in range(len(probs)):
            order = np.argsort(-probs[r].astype(np.float64), kind="stable")
            before = np.cumsum(probs[r][order].astype(np.float64)) - probs[r][order]
            want = np.zeros(probs.shape[1], bool)
            want[order[before < top_p]] = True
            last = probs[r][want].min()
            missing, extra = want & ~got[r], got[r] & ~want
            # float32 vs float64 sums may disagree on the boundary token; tokens tied with the last kept one are
            # all kept (a sort keeps an arbitrary part of them)
            assert missing.sum() <= 1
            assert (probs[r][extra] != last).sum() <= 1


def test_nucleus_mask_at_exact_boundaries():
    """Where the float32 sums that decide it are exact (dyadic probabilities) the nucleus is decided exactly: a token
    whose more likely tokens' mass equals top_p is out, and so is a token one float32 step below the last kept one."""
    below = lambda x: float(np.nextafter(np.float32(x), np.float32(0)))
    cases = [([0.0625, 0.5, 0.125, 0.25, 0.0625], (0.25, 0.5, 0.6, 0.75, 0.875, 0.9375, 1.0)),
             ([0.5, below(0.5), 0.0, 0.0, 0.0], (0.25, 0.5, 0.75)),  # (0.5 + below(0.5) rounds to 1 in float32)
             ([0.25, 0.5, below(0.25), 0.0, 0.0], (0.25, 0.5, 0.6, 0.75))]
    rows = np.array([row for row, _ in cases], np.float32)
    for top_p in sorted({t for _, ts in cases for t in ts}):
        got = np.asarray(nucleus_mask(jnp.asarray(rows), top_p))
        for r, (_, ts) in enumerate(cases):
            if top_p in ts:  # the definition, in exact float64 sums
                probs = rows[r].astype(np.float64)
                want = np.array([probs[probs > p].sum() < top_p for p in probs])
                assert (got[r] == want).all(), (top_p, r, got[r], want)


def test_sample_respects_the_nucleus_and_is_seeded(tiny_dirs, tokenizer):
    model, _ = jaxedit.load(tiny_dirs["llama-mha-tied"][0])
    hf = tiny_dirs["llama-mha-tied"][1]
    prompts = [tokenizer("The")["input_ids"], tokenizer("Miles Davis plays")["input_ids"]]
    a = sample(model, prompts, 4, samples=3, top_p=0.5, seed=3)
    assert a == sample(model, prompts, 4, samples=3, top_p=0.5, seed=3, max_batch=1)  # batching does not matter
    assert a != sample(model, prompts, 4, samples=3, top_p=0.5, seed=4)
    for p, rows in zip(prompts, a):
        for row in rows:
            for t in range(len(row)):
                logits = _torch_next_logits(hf, list(p) + row[:t])
                pr = np.exp(logits - logits.max())
                pr /= pr.sum()
                order = np.argsort(-pr)
                nucleus = order[:int(np.searchsorted(np.cumsum(pr[order]), 0.5) + 1)]
                assert row[t] in nucleus
    tiny = sample(model, prompts, 4, samples=3, top_p=1e-6, seed=5)  # a nucleus of one token: greedy
    for p, rows in zip(prompts, tiny):
        ids = list(p)
        for _ in range(4):
            ids.append(int(_torch_next_logits(hf, ids).argmax()))
        assert rows == [ids[len(p):]] * 3


def test_sample_errors(tiny_dirs):
    model, _ = jaxedit.load(tiny_dirs["gpt2"][0])
    for kw in (dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0), dict(temperature=0.0)):
        with pytest.raises(JaxeditError):
            sample(model, [[1, 2]], 3, **kw)
    with pytest.raises(JaxeditError):
        sample(model, [[]], 3)
    with pytest.raises(JaxeditError):
        sample(model, [[1, 2]], 70)


# ---- the sampler's distribution: a chi-square goodness-of-fit test of the first sampled token ----

@pytest.fixture(scope="module")
def peaked_llama(tmp_path_factory, tokenizer):
    """A tiny LLaMA with init std 0.3: next-token distributions far from uniform (at "Miles Davis plays" the most
    likely token has p = 0.07, 0.13 at temperature 0.7), so temperature, top-k and top-p change them visibly."""
    from tiny_models import build_hf_model

    hf = build_hf_model("llama-mha-tied", seed=1, init_std=0.3)
    d = tmp_path_factory.mktemp("peaked-llama")
    hf.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return jaxedit.load(str(d))[0], hf


def reference_probs(logits, temperature, top_k=None, top_p=None):
    """float64 numpy: softmax(logits / temperature) restricted to the k largest, then to the nucleus (the tokens
    whose more likely tokens' mass is below top_p, in decreasing order), renormalized."""
    z = np.asarray(logits, np.float64) / temperature
    if top_k is not None:
        z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p is not None:
        order = np.argsort(-p)
        before = np.cumsum(p[order]) - p[order]
        keep = np.zeros(len(p), bool)
        keep[order[before < top_p]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


def chi2_pvalue(counts, probs, min_expected=5.0):
    """Pearson's chi-square test of ``counts`` against ``probs``: the tokens expected at least ``min_expected``
    times are bins of their own, the others one pooled bin (merged into the smallest bin when the pool itself is
    expected fewer times). 0 when a token of probability 0 was drawn. The p-value: the upper regularized gamma
    function (torch), Q(dof / 2, stat / 2)."""
    counts, probs = np.asarray(counts, np.float64), np.asarray(probs, np.float64)
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = counts.sum() * probs
    own = expected >= min_expected
    obs, exp = list(counts[own]), list(expected[own])
    pool_o, pool_e = counts[~own & (probs > 0)].sum(), expected[~own & (probs > 0)].sum()
    if pool_e >= min_expected:
        obs.append(pool_o)
        exp.append(pool_e)
    elif pool_e > 0:
        i = int(np.argmin(exp))
        obs[i] += pool_o
        exp[i] += pool_e
    obs, exp = np.array(obs), np.array(exp)
    stat = float(((obs - exp) ** 2 / exp).sum())
    return float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


SAMPLES = 1024  # sample() derives each row's key on the host (about 1 ms a row here): enough for the power below
ALPHA = 1e-4  # the seed is fixed, so the test is deterministic; 1e-4 leaves room for another JAX's random bits


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(temperature=0.7, top_p=0.8),
                                dict(temperature=0.5, top_k=12)], ids=["temperature", "top_p", "top_k"])
def test_first_token_distribution_chi_square(peaked_llama, tokenizer, kw):
    """1024 first tokens sampled after one prompt (one batch) against the distribution computed in float64 from the
    torch model's logits: the p-value must be above 1e-4. The test's power, on the same draws: the distribution at
    temperature 1 (the filter otherwise alike) and the distribution without the top-p / top-k filter must give
    p-values below 1e-20, so a sampler that ignored the temperature or the filter fails. Measured (p-value; at
    temperature 1; without the filter): temperature 0.7: 0.66; 4e-34; top-p 0.8: 0.46; 3e-65; 7e-38; top-k 12 at
    temperature 0.5: 0.70; 6e-44; 1e-53."""
    model, hf = peaked_llama
    prompt = tokenizer("Miles Davis plays")["input_ids"]
    draws = sample(model, [prompt], 1, samples=SAMPLES, seed=11, max_batch=SAMPLES, **kw)[0]
    counts = np.bincount([row[0] for row in draws], minlength=model.config.vocab_size)
    assert counts.sum() == SAMPLES
    logits = _torch_next_logits(hf, prompt)
    want = reference_probs(logits, **kw)
    if "top_p" in kw:  # the nucleus is not decided by float32 rounding: no prefix mass within 1e-3 of top_p
        p = reference_probs(logits, kw["temperature"])
        prefix = np.cumsum(np.sort(p)[::-1])
        assert np.abs(prefix - kw["top_p"]).min() > 1e-3
    support = want > 0
    assert counts[~support].sum() == 0
    assert 0 < support.sum() < model.config.vocab_size or len(kw) == 1
    wrong = [reference_probs(logits, **dict(kw, temperature=1.0))]
    if len(kw) > 1:
        wrong.append(reference_probs(logits, kw["temperature"]))  # the filter left out
    assert chi2_pvalue(counts, want) > ALPHA
    for w in wrong:
        assert chi2_pvalue(counts, w) < 1e-20


def test_sample_stops_at_stop_ids(tiny_dirs, tokenizer):
    """Greedy continuations cut before the first of ``stop_ids``, against a hand-run loop: the torch model's argmax,
    one full forward at a time, stopped when the token is a stop id. The stop ids: the 3rd greedy token of the
    second prompt and the 1st of the fourth (this model repeats tokens: rows are cut mid-way, at once, or not at
    all). The shapes of the greedy test above: its compile is reused."""
    model, _ = jaxedit.load(tiny_dirs["gpt2"][0])
    hf = tiny_dirs["gpt2"][1]
    prompts = [tokenizer(t)["input_ids"] for t in ("The Eiffel Tower is located in the city of", "Miles",
                                                  "Beats Music is owned by", "The")]
    greedy = []
    for p in prompts:
        ids = list(p)
        for _ in range(5):
            ids.append(int(_torch_next_logits(hf, ids).argmax()))
        greedy.append(ids[len(p):])
    stop = [greedy[1][2], greedy[3][0]]

    def hand_loop(p):
        ids = list(p)
        while len(ids) - len(p) < 5:
            t = int(_torch_next_logits(hf, ids).argmax())
            if t in stop:
                break
            ids.append(t)
        return ids[len(p):]

    want = [hand_loop(p) for p in prompts]
    lengths = [len(w) for w in want]
    assert 0 < lengths[1] < 5 and lengths[3] == 0 and 5 in lengths  # cut mid-way, at once, not at all
    out = sample(model, prompts, 5, samples=2, greedy=True, bucket=4, max_batch=2, stop_ids=stop)
    for rows, w in zip(out, want):
        assert rows == [w, w]
