"""Key-statistics throughput: tokens/s of jaxedit's one-pass E[k k^T] accumulation for a set of layers, and the
time extrapolated to the reference workload (100,000 texts of up to 1024 tokens; the reference truncates
Wikipedia articles to the context, most of which fill it, so 100k x 1024 tokens is the upper bound used here).

Random weights and random token ids at the named shape (throughput does not depend on the values):

    python benchmarks/bench_stats.py --shape gpt2-xl --layers 13-17 --batch 16 --len 1024   # on a GPU
    python benchmarks/bench_stats.py --shape gpt2-small --layers 3-7 --batch 2 --len 256     # a CPU smoke run

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
from jaxedit.edit.stats import accumulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_trace import SHAPES, layer_flops  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="gpt2-small", choices=list(SHAPES))
    ap.add_argument("--layers", default="3-7")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--len", dest="T", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--texts", type=int, default=100_000, help="reference workload: texts")
    ap.add_argument("--text-len", type=int, default=1024, help="reference workload: tokens per text")
    args = ap.parse_args()
    a, _, b = args.layers.partition("-")
    layers = tuple(range(int(a), int(b or a) + 1))
    c = ModelConfig(**SHAPES[args.shape])
    params = jaxedit.params_of(jaxedit.create_model(c, args.dtype))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, c.vocab_size, (args.batch, args.T)), jnp.int32)
    mask = jnp.ones_like(ids)
    acc = jnp.zeros((len(layers), c.d_ff, c.d_ff), jnp.float32)
    t = time.perf_counter()
    acc = accumulate(c, params, ids, mask, acc, layers=layers)
    acc.block_until_ready()
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(args.steps):
        acc = accumulate(c, params, ids, mask, acc, layers=layers)
    acc.block_until_ready()
    per_step = (time.perf_counter() - t) / args.steps
    tok_s = args.batch * args.T / per_step
    total_tokens = args.texts * args.text_len
    flops = args.batch * (max(layers) + 1) * layer_flops(c, args.T, args.T) / 2 \
        + len(layers) * 2 * args.batch * args.T * c.d_ff ** 2  # causal attention ~ half; k k^T products
    print(f"# Key statistics: {args.shape}, layers {layers[0]}-{layers[-1]}, {jax.devices()[0].device_kind}\n")
    print("| batch x len | s / step | tokens / s | TFLOP/s | compile s | reference workload (min) |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.batch} x {args.T} | {per_step:.3f} | {tok_s:,.0f} | {flops / per_step / 1e12:.2f} | "
          f"{compile_s:.1f} | {total_tokens / tok_s / 60:.1f} ({args.texts:,} x {args.text_len} tokens) |")


if __name__ == "__main__":
    main()
