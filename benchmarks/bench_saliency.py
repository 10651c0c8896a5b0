"""Tracing versus saliency on the same prompts: cost and agreement of the per-layer profiles.

    python benchmarks/bench_saliency.py [--model smollm2] [--prompts jaxedit/data/facts.jsonl] [--out bench_out]

Cost: wall time per prompt of the mlp-kind trace (over all prompts, batched), the three-kind and the hidden-only
trace (first prompt, after a warm-up call), saliency (all prompts, one call) and attribution patching (first
prompt, after a warm-up call); model FLOPs per prompt estimated from the shape (matmuls only). Agreement: Spearman
correlation between the per-layer AIE profile of the mlp kind (at the span's last token, and the max over
tokens) and the per-layer saliency profile (whole block and mlp_out), and the overlap of their top-1/3/5 layer
sets, per prompt and aggregated. Writes a markdown table and a plot of the mean profiles to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jaxedit
from bench_trace import layer_flops, shared_flops
from jaxedit.locate.attribution import attribution_patching
from jaxedit.locate.saliency import saliency_batch
from jaxedit.locate.trace_files import read_requests
from jaxedit.locate.tracing import trace_batch


def overlap(a, b, k):
    return len(set(np.argsort(-a, kind="stable")[:k]) & set(np.argsort(-b, kind="stable")[:k])) / k


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", default=os.path.join(os.path.dirname(__file__), "..", "jaxedit", "data", "facts.jsonl"))
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--samples", type=int, default=10)
    args = ap.parse_args()
    model, tok = jaxedit.load(args.model)
    reqs = [r for _, r in read_requests(args.prompts)]
    n = len(reqs)

    t = time.perf_counter()
    sal_per, sal_mean = saliency_batch(model, [{"prompt": r["prompt"]} for r in reqs], tokenizer=tok)
    t_sal = time.perf_counter() - t
    t = time.perf_counter()
    traces = trace_batch(model, reqs, tokenizer=tok, kinds=("mlp",), samples=args.samples)
    t_mlp = time.perf_counter() - t
    def timed(fn):
        fn()  # compile
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    first = reqs[0]
    t_three = timed(lambda: trace_batch(model, [first], tokenizer=tok, samples=args.samples, bucket=1))
    t_hidden = timed(lambda: trace_batch(model, [first], tokenizer=tok, samples=args.samples, bucket=1,
                                         kinds=("hidden",)))
    t_attr = timed(lambda: attribution_patching(model, first["prompt"], span=first["subject"], tokenizer=tok,
                                                samples=args.samples))
    c = model.config
    T = len(tok(first["prompt"])["input_ids"])
    fwd = T * (c.n_layers * layer_flops(c, 1, T) + 2 * c.d_model * c.vocab_size)  # one row, all positions
    flops = {"three": shared_flops(c, T, args.samples, ("hidden", "mlp", "attn"), 10),
             "hidden": shared_flops(c, T, args.samples, ("hidden",), 10),
             "saliency": 3 * fwd,  # forward + backward ~ 3 forwards
             "attribution": fwd + 3 * args.samples * fwd}

    rows = []
    for r, s in zip(traces, sal_per):
        tr = r["mlp"]
        last = tr.ie[tr.span[1] - 1]
        mx = tr.ie.max(0)
        rows.append({"last": last, "max": mx, "block": s.layer, "mlp_out": s.modules["mlp_out"]})
    lines = [f"# Tracing vs saliency: {args.model}, {n} prompts ({os.path.basename(args.prompts)}), "
             f"{args.samples} samples", "",
             "## Cost", "",
             "| method | s / prompt | ratio to saliency | model GFLOP / prompt |", "|---|---|---|---|",
             f"| trace, three kinds (first prompt) | {t_three:.2f} | {t_three / (t_sal / n):.0f}x | "
             f"{flops['three'] / 1e9:.0f} |",
             f"| trace, hidden only (first prompt) | {t_hidden:.2f} | {t_hidden / (t_sal / n):.0f}x | "
             f"{flops['hidden'] / 1e9:.0f} |",
             f"| trace, mlp kind ({n} prompts, batched, with compilation) | {t_mlp / n:.2f} | {t_mlp / t_sal:.0f}x | |",
             f"| attribution patching, three kinds (first prompt) | {t_attr:.3f} | {t_attr / (t_sal / n):.1f}x | "
             f"{flops['attribution'] / 1e9:.1f} |",
             f"| saliency ({n} prompts, one call, with compilation) | {t_sal / n:.3f} | 1x | "
             f"{flops['saliency'] / 1e9:.2f} |",
             f"", f"FLOP ratio three-kind trace / saliency: {flops['three'] / flops['saliency']:.0f}x", "",
             "## Agreement of per-layer profiles (mean over prompts; Spearman rho, top-k overlap)", "",
             "| trace profile | saliency profile | rho | top-1 | top-3 | top-5 |", "|---|---|---|---|---|---|"]
    for tp in ("last", "max"):
        for sp in ("block", "mlp_out"):
            rho = [spearmanr(r[tp], r[sp]).statistic for r in rows]
            ov = [[overlap(r[tp], r[sp], k) for r in rows] for k in (1, 3, 5)]
            agg_rho = spearmanr(np.mean([r[tp] for r in rows], 0), np.mean([r[sp] for r in rows], 0)).statistic
            lines.append(f"| mlp AIE at {'last subject token' if tp == 'last' else 'max over tokens'} | {sp} | "
                         f"{np.nanmean(rho):.3f} (of the means: {agg_rho:.3f}) | "
                         + " | ".join(f"{np.mean(o):.2f}" for o in ov) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tracing_vs_saliency.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "tracing_vs_saliency.json"), "w") as f:
        json.dump([{k: v.tolist() for k, v in r.items()} for r in rows], f)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), constrained_layout=True)
    for tp, lab in (("last", "mlp AIE, last subject token"), ("max", "mlp AIE, max over tokens")):
        axes[0].plot(np.mean([r[tp] for r in rows], 0), label=lab)
    axes[0].set_title("causal tracing (mean over prompts)")
    for sp in ("block", "mlp_out"):
        axes[1].plot(np.mean([r[sp] for r in rows], 0), label=f"saliency, {sp}")
    axes[1].set_title("saliency (mean over prompts)")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.legend(fontsize=7)
    fig.savefig(os.path.join(args.out, "tracing_vs_saliency.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
