"""Sampling throughput: jaxedit's batched sampler (prefill + key/value cache, nucleus sampling) against
transformers' ``generate`` (torch, the same SmolLM2 weights read from the same GGUF file), same prompts, same
batch, same number of new tokens. Prints a markdown table of new tokens per second (compilation excluded and
reported apart; the torch run is warmed up once too).

    python benchmarks/bench_sample.py [--batches 8,32,128] [--new 20] [--top-p 0.9] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

PROMPTS = ["He looked at me and said, shut up you", "My boss is a complete", "The driver cut me off, so I yelled",
           "That guy is the dumbest", "I told him to go to", "The weather today is", "Once upon a time there was",
           "The best way to learn a language is"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="8,32,128")
    ap.add_argument("--new", type=int, default=20)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    import jaxedit
    from jaxedit.generate import sample
    from jaxedit.loading import embedded_gguf_path

    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = jaxedit.load("smollm2")
    path = embedded_gguf_path("smollm2")
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    rows = []
    for B in (int(b) for b in a.batches.split(",")):
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(B)]
        ids = [tok(p)["input_ids"] for p in prompts]

        def ours(seed):
            return sample(model, ids, a.new, top_p=a.top_p, seed=seed, bucket=16, max_batch=B)

        t0 = time.perf_counter()
        ours(0)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours(1)
        t_ours = time.perf_counter() - t0

        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True)

        def theirs():
            with torch.no_grad():
                return hf.generate(**enc, do_sample=True, top_p=a.top_p, top_k=0, max_new_tokens=a.new,
                                   min_new_tokens=a.new, pad_token_id=tok.pad_token_id)
        theirs()
        t0 = time.perf_counter()
        out = theirs()
        t_hf = time.perf_counter() - t0
        assert out.shape[1] - enc["input_ids"].shape[1] == a.new
        n = B * a.new
        rows.append((B, first - t_ours, n / t_ours, n / t_hf, t_hf / t_ours))
    print(f"SmolLM2-135M, float32, {a.new} new tokens, top-p {a.top_p}, prompts of 6-9 tokens; torch threads "
          f"{torch.get_num_threads()}\n")
    print("| batch | jaxedit compile (s) | jaxedit tok/s | transformers generate tok/s | ratio |")
    print("|---|---|---|---|---|")
    for B, comp, ours_tps, hf_tps, ratio in rows:
        print(f"| {B} | {comp:.1f} | {ours_tps:.0f} | {hf_tps:.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
