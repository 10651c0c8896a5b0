"""Causal-tracing benchmark: jaxedit's one-call grid vs a per-cell JAX loop vs a per-cell PyTorch loop.

The per-cell loops have the reference's structure: one batched forward (1 clean + S noisy rows) per (token, layer)
cell and per kind, logits at every position. jaxedit's grid shares the work that cannot change (see
jaxedit/locate/tracing.py) and runs all cells of a prompt in one jit call. Random weights at the named shape.

    python benchmarks/bench_trace.py --shape gpt2-small --tokens 9 --torch
    python benchmarks/bench_trace.py --shape gpt2-xl --batch 64        # on a GPU

Prints a markdown table. Times exclude compilation (reported separately).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxedit
from jaxedit.config import ModelConfig
from jaxedit.forward import Interventions, apply
from jaxedit.locate.tracing import draw_noise, trace_batch, window_layers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

SHAPES = {
    "micro": dict(family="gpt2", n_layers=4, d_model=32, n_heads=4, n_kv_heads=4, head_dim=8, d_ff=128,
                  vocab_size=128, max_positions=128, norm_eps=1e-5, tie_embeddings=True),
    "tiny": dict(family="gpt2", n_layers=4, d_model=64, n_heads=4, n_kv_heads=4, head_dim=16, d_ff=256,
                 vocab_size=512, max_positions=128, norm_eps=1e-5, tie_embeddings=True),
    "gpt2-small": dict(family="gpt2", n_layers=12, d_model=768, n_heads=12, n_kv_heads=12, head_dim=64, d_ff=3072,
                       vocab_size=50257, max_positions=1024, norm_eps=1e-5, tie_embeddings=True),
    "gpt2-xl": dict(family="gpt2", n_layers=48, d_model=1600, n_heads=25, n_kv_heads=25, head_dim=64, d_ff=6400,
                    vocab_size=50257, max_positions=1024, norm_eps=1e-5, tie_embeddings=True),
    "llama-7b": dict(family="llama", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, head_dim=128,
                     d_ff=11008, vocab_size=32000, max_positions=4096, norm_eps=1e-5, tie_embeddings=False,
                     activation="silu"),
    "smollm2": dict(family="llama", n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, d_ff=1536,
                    vocab_size=49152, max_positions=8192, norm_eps=1e-5, tie_embeddings=True, activation="silu",
                    rope_theta=100000.0),
}


def layer_flops(c: ModelConfig, rows: int, keys: int) -> float:
    """Matmul FLOPs of one block for ``rows`` query tokens attending to ``keys`` keys."""
    hd = c.head_dim
    proj = 2 * rows * c.d_model * hd * (2 * c.n_heads + 2 * c.n_kv_heads)
    mlp = 2 * rows * c.d_model * c.d_ff * (3 if c.family == "llama" else 2)
    att = 2 * 2 * rows * keys * c.n_heads * hd
    return proj + mlp + att


def reference_flops(c: ModelConfig, T: int, S: int, kinds) -> float:
    """Per-cell structure: (S + 1) rows x T tokens through all layers and the LM head, per cell and kind."""
    per_fwd = (S + 1) * (c.n_layers * layer_flops(c, T, T) / 1 + 2 * T * c.d_model * c.vocab_size)
    return len(kinds) * (2 + c.n_layers * T) * per_fwd


def shared_flops(c: ModelConfig, T: int, S: int, kinds, window: int, first: int = 0) -> float:
    """jaxedit's grid (jaxedit/locate/tracing.py): per kind and distinct restoration window, the packed token-rows from the
    first changed block on, the last block and the LM head only at each row's last token."""
    L, hd = c.n_layers, c.head_dim
    R = T - first  # token-rows computed
    P = sum(T - t for t in range(first, T))  # packed positions
    qkv = 2 * c.d_model * hd * (c.n_heads + 2 * c.n_kv_heads)
    mlp = 2 * c.d_model * c.d_ff * (3 if c.family == "llama" else 2)
    head = 2 * c.d_model * c.vocab_size
    total = (1 + S) * (L * layer_flops(c, T, T) + head)  # the clean and the corrupted runs
    for kind in kinds:
        if kind == "hidden":
            starts = [l + 1 for l in range(L)]
        else:
            windows = sorted({(max(0, l - window // 2), min(L, l + window - window // 2)) for l in range(L)})
            starts = [s + 1 for s, _ in windows]
            total += S * R * (mlp if kind == "attn" else 0) * len(windows)  # the window's first block, one token
        for start in starts:
            total += S * sum(layer_flops(c, P, T + P) for _ in range(start, L - 1))
            if start <= L - 1:  # the last block: keys/values at every position, the rest at the last tokens
                total += S * (P * qkv + layer_flops(c, R, T + P) - R * qkv)
            total += S * R * head
    return total


def timeit(fn, repeat):
    fn()  # warm-up / compile
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def jax_cell_loop(model, ids, span, noise, kinds, window):
    """One jitted forward per cell (compiled once; masks are inputs). Returns seconds for all cells."""
    c = model.config
    params = jaxedit.params_of(model)
    S, T, L = noise.shape[0], len(ids), c.n_layers
    rows = jnp.asarray(np.repeat(np.asarray(ids)[None], S + 1, 0))
    emask = np.zeros((S + 1, T), bool)
    emask[1:, span[0]:span[1]] = True
    evals = np.zeros((S + 1, T, c.d_model), np.float32)
    evals[1:, span[0]:span[1]] = noise
    clean = jaxedit.forward(model, ids[None], capture=("hidden", "attn", "mlp"))

    @jax.jit
    def cell_fn(params, clean, restore_h, restore_a, restore_m):  # weights as arguments, not folded constants
        iv = Interventions(embed_mask=emask, embed_values=evals, restore_hidden=restore_h, clean_hidden=clean.hidden,
                           restore_attn=restore_a, clean_attn=clean.attn, restore_mlp=restore_m, clean_mlp=clean.mlp)
        return jax.nn.softmax(apply(c, params, rows, interventions=iv).logits[1:, -1]).mean(0)

    cell = lambda *masks: cell_fn(params, clean, *masks)

    off = np.zeros((S + 1, L, T), bool)
    masks = []
    for kind in kinds:
        for t in range(T):
            for l in range(L):
                m = off.copy()
                m[1:, list([l] if kind == "hidden" else window_layers(l, window, L)), t] = True
                masks.append({"hidden": (m, off, off), "attn": (off, m, off), "mlp": (off, off, m)}[kind])
    cell(*masks[0]).block_until_ready()
    t0 = time.perf_counter()
    for m in masks:
        out = cell(*m)
    out.block_until_ready()
    return time.perf_counter() - t0


def torch_cell_loop(c: ModelConfig, ids, span, noise, kinds, window):
    """The reference's structure in PyTorch (tests/reference_torch.py) over a HF model of the same shape."""
    import transformers
    from reference_torch import torch_trace

    if c.family == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=c.n_layers, n_embd=c.d_model, n_head=c.n_heads, n_inner=c.d_ff, vocab_size=c.vocab_size,
            n_positions=c.max_positions)).eval()
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_hidden_layers=c.n_layers, hidden_size=c.d_model, num_attention_heads=c.n_heads,
            num_key_value_heads=c.n_kv_heads, intermediate_size=c.d_ff, vocab_size=c.vocab_size)).eval()
    t0 = time.perf_counter()
    for kind in kinds:
        torch_trace(hf, ids, span, noise, 0, kind, window)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=9)
    ap.add_argument("--span", default="0,3", help="corrupted token range START,END")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--kinds", default="hidden,mlp,attn")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=0, help="also time a batch of this many prompts")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per jit call in the batch timing")
    ap.add_argument("--jax-loop", action="store_true", help="time the per-cell JAX loop")
    ap.add_argument("--torch", action="store_true", help="time the per-cell PyTorch loop")
    ap.add_argument("--torch-kinds", default=None, help="kinds for the torch loop (default: --kinds)")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    c = ModelConfig(**SHAPES[args.shape])
    kinds = tuple(args.kinds.split(","))
    model = jaxedit.create_model(c, args.dtype, seed=0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, c.vocab_size, args.tokens).astype(np.int32)
    span = tuple(int(v) for v in args.span.split(","))
    noise = draw_noise(args.samples, span[1] - span[0], c.d_model, 0.1)
    T, S = args.tokens, args.samples
    print(f"# tracing benchmark: {args.shape} (L={c.n_layers}, d={c.d_model}), {T} tokens, span {span}, "
          f"{S} samples, kinds {','.join(kinds)}, {args.dtype}, device {jax.devices()[0].device_kind}")

    def grid():
        return trace_batch(model, [{"input_ids": ids, "span": span}], kinds=kinds, samples=S, noise=noise,
                           window=args.window, batch_size=1, bucket=1)

    t0 = time.perf_counter()
    grid()
    first = time.perf_counter() - t0
    t_grid = timeit(grid, args.repeat)
    fl_ref = reference_flops(c, T, S, kinds)
    fl_ours = shared_flops(c, T, S, kinds, args.window, first=span[0])
    rows = [("jaxedit grid (one jit call, shared prefixes)", t_grid, fl_ours)]
    print(f"compile + first call: {first:.2f} s")
    if args.jax_loop:
        rows.append(("per-cell JAX loop (one jitted forward per cell)",
                     jax_cell_loop(model, ids, span, noise, kinds, args.window), fl_ref))
    if args.torch:
        tk = tuple((args.torch_kinds or args.kinds).split(","))
        secs = torch_cell_loop(c, ids, span, noise, tk, args.window)
        label = "per-cell PyTorch loop (reference structure)"
        if tk != kinds:
            label += f" [measured on {','.join(tk)}, scaled x{len(kinds)}/{len(tk)}]"
            secs *= len(kinds) / len(tk)
        rows.append((label, secs, fl_ref))
    print()
    print("| method | s / prompt | time vs jaxedit | model FLOPs | TFLOP/s |")
    print("|---|---|---|---|---|")
    for name, secs, fl in rows:
        print(f"| {name} | {secs:.4f} | {secs / t_grid:.1f}x | {fl / 1e9:.3g} G | {fl / secs / 1e12:.4f} |")
    if args.batch:
        reqs = [{"input_ids": rng.integers(0, c.vocab_size, T).astype(np.int32), "span": span}
                for _ in range(args.batch)]
        trace_batch(model, reqs[:args.batch_size], kinds=kinds, samples=S, noise=0.1, window=args.window,
                    batch_size=args.batch_size, bucket=1, fixed_batch=True)  # compile
        t0 = time.perf_counter()
        trace_batch(model, reqs, kinds=kinds, samples=S, noise=0.1, window=args.window,
                    batch_size=args.batch_size, bucket=1, fixed_batch=True)
        secs = time.perf_counter() - t0
        print(f"\nbatch of {args.batch} prompts ({args.batch_size} per call): {secs:.2f} s, "
              f"{args.batch / secs:.2f} prompts/s, {args.batch * fl_ours / secs / 1e12:.3f} TFLOP/s")


if __name__ == "__main__":
    main()
