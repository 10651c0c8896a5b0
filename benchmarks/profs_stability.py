"""How stable is ProFS's toxic subspace in the number of pairs? Two disjoint sets of N pairs from one detox study's
samples, one subspace each, and how far apart they are, per layer.

The pairs are the study's own (``jaxedit.detox.methods.pairs_by_prompt``: each edited prompt's least / most toxic
samples, then its second least / second most, ...; the selection's samples plus ``pair_samples.jsonl``'s extra
ones). Each prompt's pair 2i goes to set A and its pair 2i+1 to set B, so both sets cover every prompt with
different pairs; each set is then taken round-robin over the prompts (widest pairs first), as the study takes them.
For each N, ``jaxedit.profs`` on A[:N] and on B[:N] (rank R, the default layers), and per layer:

* the projector distance ||V_A^T V_A - V_B^T V_B||_F / sqrt(2 R): 0 for the same subspace, 1 for orthogonal ones;
* the cosines of the principal angles (the singular values of V_A V_B^T), largest first.

    python benchmarks/profs_stability.py STUDY_OUT --n 22,100,250 --rank 2

A subspace that moves little between disjoint sets at some N is what its N pairs pin down; where it moves, the
edit depends on which samples were drawn. Prints one markdown table (the mean and the worst layer per N).
"""
from __future__ import annotations

import argparse
import os

import numpy as np


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", help="a `jaxedit detox` output folder (candidates.jsonl, selected.jsonl)")
    ap.add_argument("--n", default="22,100,250", help="pairs per set, comma-separated")
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--model", default="smollm2")
    args = ap.parse_args(argv)

    import jaxedit
    from jaxedit.detox.methods import pairs_by_prompt, round_robin
    from jaxedit.files import read_rows

    ns = [int(x) for x in args.n.split(",")]
    extra_path = os.path.join(args.study, "pair_samples.jsonl")
    extra = ({r["line"]: (r["samples"], r["scores"]) for r in read_rows(extra_path)}
             if os.path.isfile(extra_path) else None)
    per = pairs_by_prompt(args.study, extra)  # every pair the samples give, per prompt
    A, B = round_robin([p[0::2] for p in per]), round_robin([p[1::2] for p in per])
    print(f"{len(A) + len(B)} pairs of {len(per)} prompts from {args.study}: {len(A)} in set A, {len(B)} in set B "
          f"(each prompt's pairs dealt alternately); rank {args.rank}")
    model, tok = jaxedit.load(args.model)
    print("| pairs per set | layers | projector distance, mean | worst layer | cos of principal angles, mean (1st, "
          "2nd, ...) | singular values of A, mean (1st, 2nd, 3rd) |")
    print("|---:|---|---:|---:|---|---|")
    for n in ns:
        if n > min(len(A), len(B)):
            print(f"| {n} | — | — | — | only {min(len(A), len(B))} pairs per set | — |")
            continue
        _, ra = jaxedit.profs(model, A[:n], tokenizer=tok, rank=args.rank, progress=False)
        _, rb = jaxedit.profs(model, B[:n], tokenizer=tok, rank=args.rank, progress=False)
        dist, cos, sv = [], [], []
        for layer in ra["layers"]:
            Va, Vb = np.asarray(ra["subspace"][layer], np.float64), np.asarray(rb["subspace"][layer], np.float64)
            dist.append(np.linalg.norm(Va.T @ Va - Vb.T @ Vb) / np.sqrt(2 * args.rank))
            cos.append(np.linalg.svd(Va @ Vb.T, compute_uv=False))
            sv.append(np.asarray(ra["singular_values"][layer][:3]))
        worst = int(np.argmax(dist))
        print(f"| {n} | {ra['layers'][0]}-{ra['layers'][-1]} | {np.mean(dist):.3f} | {dist[worst]:.3f} "
              f"(layer {ra['layers'][worst]}) | " + ", ".join(f"{c:.3f}" for c in np.mean(cos, 0)) + " | "
              + ", ".join(f"{s:.2f}" for s in np.mean(sv, 0)) + " |", flush=True)


if __name__ == "__main__":
    main()
