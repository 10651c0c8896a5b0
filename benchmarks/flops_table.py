"""FLOP counts of the real-shape workload of docs/scaling.md (benchmarks/bench_scale.py's steps) per model shape,
and the accelerator time they imply on H100s: an estimate from stated peak rates and an assumed achieved fraction,
not a measurement. Only the configurations are read (jaxedit.planning's named shapes); no weights.

    python benchmarks/flops_table.py
    python benchmarks/flops_table.py --models gpt2-xl,llama-3-8b --mfu 0.3 --linalg-frac 0.05

The counts reuse jaxedit's own: ``calibration.block_flops`` / ``forward_flops`` (a block's and a forward's
matmuls), ``tracing.row_flops`` / ``row_groups`` / ``window_layers`` (the packed tracing grid) and
``detox.estimate.stage_flops`` (the localize stage); the workload sizes are ``planning.settings_of``'s defaults and
the edits' steps ``memit.hparams_for``'s presets. Each count is split by how it runs on a GPU:

* ``model``: matmuls in the weights' dtype (TF32 for float32 weights under JAX's default precision, or bfloat16);
* ``f32``: float32 matmuls at the default precision whatever the weights (TF32): the solve's products, AlphaEdit's
  products with P;
* ``highest``: float32 at ``Precision.HIGHEST`` (the statistics' k k^T sums): plain FP32;
* ``linalg``: the LU solve (cuSOLVER, float32): FP32 peak at a lower fraction;
* ``host``: AlphaEdit's float64 eigendecomposition and projector, on the host CPU: in the FLOP total, not in the
  accelerator's time (a column of its own).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxedit.batching import rows_within  # noqa: E402
from jaxedit.calibration import block_flops, forward_flops  # noqa: E402
from jaxedit.detox.config import DetoxConfig  # noqa: E402
from jaxedit.detox.estimate import stage_flops  # noqa: E402
from jaxedit.edit.memit import hparams_for  # noqa: E402
from jaxedit.locate.tracing import SPLIT_FLOPS, packed_bytes, row_flops, row_groups, window_layers  # noqa: E402
from jaxedit.planning import DEVICES, HEADROOM, param_bytes, resolve_config, settings_of  # noqa: E402

SHAPES = ("gpt2-xl", "llama-3.2-1b", "llama-2-7b", "llama-3-8b", "llama-2-13b", "llama-3-70b")
STEPS = ("trace", "saliency", "stats", "edit", "alphaedit", "localize")
PEAK = {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}  # H100 SXM dense peaks, FLOP/s (FP64 tensor core: 67e12)
HBM = 3.35e12  # H100 SXM memory bandwidth, bytes/s
GPU_BUDGET = DEVICES["h100-80g"] / 4  # tracing's chunk budget on an accelerator (planning: device memory / 4)
STATS_TEXTS, LOCALIZE_PROMPTS, PROMPT_TOKENS, DETOX_PROMPT_TOKENS = 1000, 4, 10, 12
# MEMIT's key rows (ending at the key token, rounded up to 16: memit.batch_shape) and objective positions (the
# longest target's tokens; 4 assumed)
KEY_TOKENS, OBJECTIVE_TOKENS = 16, 4


def blocks(cfg, tokens, keys, layers):
    """Matmul FLOPs of ``layers`` blocks over ``tokens`` tokens, each attending to ``keys`` keys."""
    return float(tokens) * layers * block_flops(cfg, keys)


def head(cfg, positions):
    """The LM head at ``positions`` positions (2 x d x vocab each), as forward_flops counts it."""
    return positions * 2.0 * cfg.d_model * cfg.vocab_size


def counts(**kw):
    return {k: float(kw.get(k, 0.0)) for k in ("model", "f32", "highest", "linalg", "host")}


def gpu_layers_per_step(cfg, S, T, groups, budget=GPU_BUDGET):
    """tracing.auto_layers_per_step as on an accelerator (a step of >= 5e10 FLOPs, within the memory budget)."""
    P = max(sum(T - t for t in g) for g in groups)
    g = max(1, min(cfg.n_layers, math.ceil(5e10 / (S * P * row_flops(cfg, T + P)))))
    return min(g, rows_within(budget, max(packed_bytes(cfg, S, T, P), 1)))


def trace_flops(cfg, T=10, S=10, kinds=("hidden", "mlp", "attn"), window=10, layers_per_step=None,
                budget=GPU_BUDGET):
    """One prompt's trace grid (tracing.trace_grid, method "shared"): the clean run and S corrupted runs (logits at
    the last token; once per kind when the grid is split kind by kind, as trace_batch does above SPLIT_FLOPS); per
    kind and distinct restore window, steps of ``layers_per_step`` restore layers (default: the accelerator's rule)
    run blocks from the step's first start to L - 2 over the P packed positions of each row group (keys: T cached +
    P packed), the last block at the rows' last tokens only (keys/values still at all P), and the LM head there;
    "attn" adds the restored token's MLP at its window's first block."""
    L, d = cfg.n_layers, cfg.d_model
    qkv = 2.0 * d * cfg.head_dim * (cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = 2.0 * d * cfg.d_ff * (3 if cfg.family == "llama" else 2)
    groups = row_groups(T, S, cfg, budget, 0)
    G0 = layers_per_step or gpu_layers_per_step(cfg, S, T, groups, budget)
    split = S * L * T * (T + 1) / 2 * row_flops(cfg, 2 * T) > SPLIT_FLOPS
    base = (1 + S) * blocks(cfg, T, T, L) + head(cfg, 1 + S)
    total = base * (len(kinds) if split else 1)
    for kind in kinds:
        if kind == "hidden":
            starts = [l + 1 for l in range(L)]
        else:  # one column per distinct clipped window; its packed run starts a block after the window's first
            spans = sorted({(w.start, w.stop) for w in (window_layers(l, window, L) for l in range(L))})
            starts = [a + 1 for a, _ in spans]
        G = min(G0, len(starts))
        starts += [starts[-1]] * (-len(starts) % G)
        for rows in groups:
            P, Q = sum(T - t for t in rows), len(rows)
            row, last = row_flops(cfg, T + P), P * qkv + Q * (row_flops(cfg, T + P) - qkv)
            for i in range(0, len(starts), G):
                run = max(0, L - 1 - min(starts[i:i + G]))
                total += G * S * (run * P * row + last + head(cfg, Q) + (Q * mlp if kind == "attn" else 0))
    return total


def stats_flops(cfg, layers, texts=STATS_TEXTS, length=128):
    """The key-statistics pass (edit.stats.accumulate): full blocks up to the last statistics layer over every
    token (no LM head), and per statistics layer and token the d_ff x d_ff outer product k k^T (HIGHEST)."""
    n = float(texts) * length
    return counts(model=blocks(cfg, n, length, layers[-1] + 1), highest=len(layers) * n * 2.0 * cfg.d_ff ** 2)


def edit_flops(cfg, s, alphaedit=False):
    """One request (memit.edit_batch; statistics from the cache): the context prefixes sampled (5 x a 10-token
    forward); z rows (6 contexts + the KL prompt, z_tokens each) up to the z layer and their keys/values after it;
    per step (hparams_for's v_num_grad_steps, plus the delta = 0 pass) the blocks after the z layer over the window
    from the key token (z_tokens / 2 positions, keys z_tokens + window) and the LM head at 4 objective positions,
    forward x 2 (the backward to delta needs input gradients only: the weights are not differentiated); per edited
    layer the key rows (6 x 16 tokens) up to the z layer and the solve (lambda C + K K^T)^-1 K R^T: LU 2/3 f^3 and
    two triangular solves, K K^T, the residual check and X R^T; the before/after evaluation (2 forwards of the
    prompt). AlphaEdit adds per layer, on the host in float64 (``host``: not in the accelerator's time), the
    eigendecomposition of C (9 f^3: symmetric QR with eigenvectors, Golub & Van Loan 8.3; divide and conquer does
    fewer) and the projector U U^T (2 f^3); on the device P A (2 f^3) and P K, and the keys again on the edited
    model (C_p)."""
    hp = hparams_for(cfg)
    f, d, n, layers = cfg.d_ff, cfg.d_model, s["requests"], s["layers"]
    L, R, Tz, W, C = layers[-1], s["z_rows"] + 1, s["z_tokens"], s["z_tokens"] // 2, len(hp.context_prefixes) + 1
    later = cfg.n_layers - L - 1
    step = blocks(cfg, R * W, Tz + W, later) + head(cfg, R * OBJECTIVE_TOKENS)
    keys = blocks(cfg, C * KEY_TOKENS, KEY_TOKENS, L + 1)
    model = (len(hp.context_prefixes) * forward_flops(cfg, hp.context_length) + blocks(cfg, R * Tz, Tz, L + 1)
             + blocks(cfg, R * Tz, Tz, later) + (1 + 2 * hp.v_num_grad_steps) * step + len(layers) * keys
             + 2 * (blocks(cfg, PROMPT_TOKENS, PROMPT_TOKENS, cfg.n_layers) + head(cfg, 1)))
    f32 = len(layers) * (4.0 * f * f * n + 2.0 * f * n * d)
    linalg = len(layers) * (2 / 3 * f ** 3 + 2.0 * f * f * n)
    if alphaedit:
        model += len(layers) * keys
        f32 += len(layers) * (2.0 * f ** 3 + 4.0 * f * f * n)
        return counts(model=model, f32=f32, linalg=linalg, host=len(layers) * 11.0 * f ** 3)
    return counts(model=model, f32=f32, linalg=linalg)


def step_counts(cfg) -> dict:
    s = settings_of(cfg, {})
    localize = stage_flops(DetoxConfig(), cfg, "localize", {"prompt_tokens": DETOX_PROMPT_TOKENS})[1]
    return {"trace": counts(model=trace_flops(cfg, s["trace_tokens"], s["samples"], s["kinds"])),
            "saliency": counts(model=3 * forward_flops(cfg, s["saliency_tokens"])),  # forward + weight gradients
            "stats": stats_flops(cfg, s["layers"], STATS_TEXTS, s["stats_len"]),
            "edit": edit_flops(cfg, s), "alphaedit": edit_flops(cfg, s, alphaedit=True),
            "localize": counts(model=LOCALIZE_PROMPTS * localize)}


def seconds(c, dtype, mfu, linalg_frac, devices=1, replicate_linalg=False):
    """Accelerator time of counts ``c``: the matmuls at ``mfu`` x their peak, split over ``devices``; the LU at FP32
    peak x ``linalg_frac``, split too unless ``replicate_linalg`` (jaxedit solves on every device); ``host`` not
    counted."""
    mm = (c["model"] / (PEAK["bf16" if dtype == "bfloat16" else "tf32"] * mfu) + c["f32"] / (PEAK["tf32"] * mfu)
          + c["highest"] / (PEAK["fp32"] * mfu))
    la = c["linalg"] / (PEAK["fp32"] * linalg_frac)
    return mm / devices + (la if replicate_linalg else la / devices)


def fmt_time(t):
    return (f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.1f} s" if t < 90 else f"{t / 60:.1f} min" if t < 5400
            else f"{t / 3600:.1f} h")


def fmt_tflop(x):
    x /= 1e12
    return "—" if x == 0 else f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.3f}" if x >= 0.001 else f"{x:.1e}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(SHAPES), help="named shapes (jaxedit.planning), comma-separated")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed fraction of the matmul peaks achieved")
    ap.add_argument("--linalg-frac", type=float, default=0.1, help="assumed fraction of FP32 peak for the LU solve")
    a = ap.parse_args()
    usable = HEADROOM * DEVICES["h100-80g"]
    print(f"Assumptions (estimate, not measured): H100 SXM dense peaks {PEAK['bf16'] / 1e12:.0f} TFLOP/s bf16, "
          f"{PEAK['tf32'] / 1e12:.0f} TF32 (JAX's default float32 matmul precision on NVIDIA GPUs), "
          f"{PEAK['fp32'] / 1e12:.0f} plain FP32 (also FP64 tensor core); matmuls reach --mfu {a.mfu} of their peak "
          f"(float32 weights: TF32; the statistics' k k^T sums run at HIGHEST: FP32); the LU solve (float32 "
          f"cuSOLVER) reaches --linalg-frac {a.linalg_frac} of FP32 peak; AlphaEdit's eigendecomposition runs on the "
          f"host in float64 (its own column, not in the times). 8 H100s: the work split evenly, and with the solve "
          f"replicated on every device as jaxedit runs it. Workload: "
          f"planning.settings_of's defaults; {STATS_TEXTS} statistics texts; localize on {LOCALIZE_PROMPTS} prompts "
          f"of {DETOX_PROMPT_TOKENS} tokens. Compile, loading and host work are not counted.\n")
    print("| step | model | TFLOP | of which LU | of which host float64 eigh | 1 H100, float32 (TF32) | 1 H100, "
          "bfloat16 | 8 H100, float32, even split | 8 H100, float32, solve replicated |")
    print("|---|---|---|---|---|---|---|---|---|")
    table = {}
    for name in a.models.split(","):
        _, cfg = resolve_config(name)
        table[name] = (cfg, step_counts(cfg))
    for step in STEPS:
        for name, (cfg, per) in table.items():
            c = per[step]
            need = 2 if step == "saliency" else 1  # saliency's gradient is as large as the weights
            mark = {dt: "" if need * param_bytes(cfg, dt, {"data": 1, "model": 1})[0] <= usable else " †"
                    for dt in ("float32", "bfloat16")}
            t = lambda dt, n=1, rep=False: fmt_time(seconds(c, dt, a.mfu, a.linalg_frac, n, rep))  # noqa: E731
            print(f"| {step} | {name} | {fmt_tflop(sum(c.values()))} | {fmt_tflop(c['linalg'])} | "
                  f"{fmt_tflop(c['host'])} | "
                  f"{t('float32')}{mark['float32']} | {t('bfloat16')}{mark['bfloat16']} | {t('float32', 8)} | "
                  f"{t('float32', 8, True)} |")
    print(f"\n†: the weights (x2 for saliency) exceed one H100's usable {usable / 2**30:.1f} GiB: arithmetic only "
          f"(`jaxedit plan` says which mesh fits).")
    reads = {n: fmt_time(3 * param_bytes(cfg, "float32", {"data": 1, "model": 1})[0] / HBM) for n, (cfg, _) in
             table.items()}
    print("Few-token steps are bound by reading the weights, not by FLOPs: saliency's forward + backward reads and "
          f"writes about 3 x the float32 weights, {HBM / 1e12:.2f} TB/s HBM3: " + ", ".join(
              f"{n} {t}" for n, t in reads.items()) + " (the table's saliency and edit times are lower bounds).")
    if "gpt2-xl" in table:
        tr = sum(table["gpt2-xl"][1]["trace"].values())
        print(f"Measured on the 2-core CPU (docs/scaling.md): GPT-2-XL's trace ran over 10 min without finishing "
              f"and its statistics did not finish; the trace's {tr / 1e12:.1f} TFLOP at the idle probe's 158.7 "
              f"GFLOP/s (jaxedit/calibration.py) would take {fmt_time(tr / 158.7e9)}.")


if __name__ == "__main__":
    main()
