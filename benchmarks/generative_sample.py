"""Teacher-forced and generative zsRE metrics of finished editing runs, side by side, on one even sample of the
edits each run made: what the collapse table (benchmarks/collapse_smollm2.py) reads only teacher-forced.

Generative scores decode greedily from each prompt (success: the continuation begins with the target), which costs
a few forwards per prompt where the teacher-forced score costs one packed row; so this script scores an even sample
of the stream's first EDITS records (record 0, ..., EDITS - 1, evenly spaced), the same sample for every model:

    python benchmarks/generative_sample.py --edits 10000 --records 500 unedited=smollm2 \
        UltraEdit=runs/ue/model "UltraEdit lr 1e-6=runs/ue_pub/model"

Each NAME=MODEL is a model jaxedit.load reads (a name, or a folder `jaxedit edit` saved under OUT/model). Prints a
markdown table (x100) with each model's seconds; ``--json FILE`` writes the summaries with their protocol records.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="NAME=MODEL")
    ap.add_argument("--stream", default="synthetic:10000", help="the edited stream (synthetic:N[:SEED])")
    ap.add_argument("--edits", type=int, default=10000, help="edits the runs made (the stream's first EDITS)")
    ap.add_argument("--records", type=int, default=500, help="records in the even sample")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import jaxedit
    from jaxedit.synthetic import parse_synthetic

    n, seed = parse_synthetic(args.stream)
    if not 0 < args.edits <= n:
        ap.error(f"--edits must be in 1..{n} (got {args.edits})")
    stream = jaxedit.synthetic_edits(n, seed=seed)
    idx = np.unique(np.linspace(0, args.edits - 1, min(args.records, args.edits)).round().astype(int))
    sample = [stream[i] for i in idx]
    keys = ("efficacy", "generalization", "specificity", "gen_efficacy", "gen_generalization", "gen_specificity")
    print(f"{len(sample)} records: every ~{args.edits / len(sample):.0f}th of the first {args.edits} of {args.stream}")
    print("| model | Eff | Gen | Spe | gen Eff | gen Gen | gen Spe | seconds |")
    print("|---|" + "---:|" * 7)
    out = {}
    for item in args.models:
        name, _, path = item.partition("=")
        model, tok = jaxedit.load(path or name)
        t0 = time.perf_counter()
        res = jaxedit.zsre_eval(model, sample, tokenizer=tok, generative=True, progress=False)
        sec = time.perf_counter() - t0
        s = res["summary"]
        print(f"| {name} | " + " | ".join(f"{100 * s[k]:.1f}" for k in keys) + f" | {sec:.0f} |", flush=True)
        out[name] = {"model": path or name, "summary": s, "seconds": sec, "sample": [int(i) for i in idx],
                     "protocol": jaxedit.protocol_record(model, stream, kind="zsre", evaluated="stream",
                                                         evaluated_records=len(sample), edits_so_far=args.edits,
                                                         generative=True, source=args.stream, model_name=name,
                                                         progress=False)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
