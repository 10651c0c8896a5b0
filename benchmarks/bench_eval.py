"""Throughput of the knowledge-editing evaluation on SmolLM2-135M: teacher-forced zsRE metrics (and, optionally,
the generative ones) of records of the synthetic stream (``jaxedit.synthetic_edits``).

Prints one table row per (records, metric kind): the rows scored (prompt-target pairs after merging equal ones),
the tokens they hold, the seconds (the first call of a size includes compilation; the "again" row is the same call
with the programs compiled) and records per second. Run from the repository root, in the background on a shared
machine:

    . .venv/bin/activate
    nice -n 10 python benchmarks/bench_eval.py --records 1000,10000 > bench_eval.txt 2>&1 &
    nice -n 10 python benchmarks/bench_eval.py --records 1000 --generative > bench_eval_gen.txt 2>&1 &
    git show HEAD~1:jaxedit/evaluate/editing.py > /tmp/editing_old.py     # the code before, on the same records
    nice -n 10 python benchmarks/bench_eval.py --records 1000 --baseline /tmp/editing_old.py > bench_cmp.txt 2>&1 &

The baseline's zsRE locality prompt is loc + "?" (it predates ``loc_suffix``): one token more per locality row.
"""
from __future__ import annotations

import argparse
import os
import time

import jaxedit
from jaxedit.evaluate.editing import prompt_target_ids


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--records", default="1000,10000", help="comma-separated record counts")
    ap.add_argument("--generative", action="store_true", help="also time the generative scores")
    ap.add_argument("--again", action="store_true", help="repeat each call once compiled")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline", default=None,
                    help="also time another revision's evaluation code on the same records: a copy of its "
                         "jaxedit/evaluate/editing.py (git show REV:jaxedit/evaluate/editing.py > old.py)")
    args = ap.parse_args(argv)
    baseline = None
    if args.baseline:
        import importlib.util

        spec = importlib.util.spec_from_file_location("editing_baseline", args.baseline)
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
    model, tok = jaxedit.load(args.model)
    sizes = [int(x) for x in args.records.split(",")]
    stream = jaxedit.synthetic_edits(max(sizes), seed=args.seed)
    print(f"model {args.model}; {os.cpu_count()} CPUs; synthetic stream seed {args.seed}")
    print("| records | kind | distinct rows | tokens | seconds | records/s |")
    print("|---:|---|---:|---:|---:|---:|")
    for n in sizes:
        recs = stream[:n]
        rows = {}
        for d in recs:
            for p, t in ((d["src"], d["answers"][0]), (d["rephrase"], d["answers"][0]),
                         (d["loc"] + d.get("loc_suffix", "?"), d["loc_ans"])):
                rows[(p, t)] = None
        tokens = sum(len(a) + len(b) for a, b in (prompt_target_ids(tok, p, t) for p, t in rows))
        if baseline is not None:
            t0 = time.perf_counter()
            baseline.zsre_eval(model, [dict(d, loc=d["loc"]) for d in recs], tokenizer=tok)
            dt = time.perf_counter() - t0
            print(f"| {n} | teacher-forced, baseline code | - | - | {dt:.1f} | {n / dt:.1f} |", flush=True)
        for label, gen in [("teacher-forced", False)] + ([("+ generative", True)] if args.generative else []):
            for again in ([False, True] if args.again else [False]):
                t0 = time.perf_counter()
                res = jaxedit.zsre_eval(model, recs, tokenizer=tok, generative=gen)
                dt = time.perf_counter() - t0
                name = label + (" (again)" if again else "")
                print(f"| {n} | {name} | {len(rows)} | {tokens} | {dt:.1f} | {n / dt:.1f} |", flush=True)
        s = res["summary"]
        print(f"  unedited: efficacy {s['efficacy']:.3f} generalization {s['generalization']:.3f} "
              f"specificity {s['specificity']:.3f}"
              + (f"; generative {s['gen_efficacy']:.3f} {s['gen_generalization']:.3f} {s['gen_specificity']:.3f}"
                 if args.generative else ""), flush=True)


if __name__ == "__main__":
    main()
