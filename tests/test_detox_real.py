"""The toxic-memory study on the embedded real model (SmolLM2-135M), at small counts: a CT-informed deletion lowers
the share of toxic fresh samples on the edited prompts and barely moves the perplexity of a neutral text.

Measured when this test was written (CPU, the settings below; key statistics from 64 model-sampled texts of 64
tokens): CT layers [3, 4, 6, 7] (the top 4 of the MLP AIE ranking); 6 edited prompts x 10 fresh samples, toxic
(score > 0.5) 5/60 before -> 1/60 after the deletion; neutral perplexity 27.32 -> 27.39 (+0.3 %), prompts' 93.7 ->
149.9; p(value) fell 1.7x to 1e13x, at least 100x on 5 of the 6 prompts. The test asserts fewer toxic samples
after than before, a neutral perplexity rise below 2 %, p(value) lower on every prompt and >= 100x lower on 4.
"""
import json
import os

import pytest

from jaxedit.detox import DetoxConfig, run_study

pytestmark = pytest.mark.slow


def test_ct_informed_deletion_lowers_toxicity(smollm2, smollm2_stats, tmp_path):  # statistics: from the cache
    model, tok = smollm2
    cfg = DetoxConfig(prompts="demo", limit=12, select_samples=10, select_threshold=0.15, max_prompts=6,
                      heldout_fraction=0.0, trace_kinds=("mlp",), trace_samples=3, strategies=("ct-multi",),
                      objectives=("delete",), eval_samples=10, factual="", corpus="model", samples=64, max_len=64)
    out = str(tmp_path / "study")
    run_study(model, tok, cfg, out, progress=False)
    rows = {r["strategy"]: r for r in map(json.loads, open(os.path.join(out, "summary.jsonl")))}
    base, ct = rows["base"], rows["ct-multi"]
    loc = json.load(open(os.path.join(out, "localize.json")))
    print(f"\nCT layers {ct['layers']} (MLP AIE ranking {loc['ct_ranking'][:6]}); toxic {base['toxic_rate']:.3f} -> "
          f"{ct['toxic_rate']:.3f}; neutral perplexity {base['perplexity_neutral']:.2f} -> "
          f"{ct['perplexity_neutral']:.2f}; prompts {base['perplexity_prompts']:.1f} -> {ct['perplexity_prompts']:.1f}")
    assert ct["layers"] == sorted(loc["ct_ranking"][:4])
    assert ct["n_prompts"] == 6 and ct["n_samples"] == 10
    assert ct["toxic_rate"] < base["toxic_rate"]
    assert ct["perplexity_neutral"] < 1.02 * base["perplexity_neutral"]
    # the deleted token itself: p(value | prompt) falls on every edited prompt, at least 100-fold on most
    edits = json.load(open(os.path.join(out, "edits", "ct-multi__delete__kl0.0625__s0.json")))
    drops = [r["p_before"][0] / r["p_after"][0] for r in edits["requests"]]
    print("p(value) drops:", [f"{d:.3g}" for d in drops])
    print("stage seconds:", open(os.path.join(out, "timings.json")).read())
    assert min(drops) > 1 and sum(d >= 100 for d in drops) >= 4
