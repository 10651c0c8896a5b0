"""Check (and filter) the CounterFact-format set of simple facts for SmolLM2-135M.

Loads the embedded model (``jaxedit.load("smollm2")``), scores every record with ``jaxedit.counterfact_eval``
(no generation), and keeps only the records whose facts the unedited model knows:

* the rewrite prompt prefers target_true (row ``efficacy`` == 0),
* the paraphrases prefer target_true on at least half of them (row ``generalization`` <= 1/2),
* the neighborhood prompts prefer target_true on at least two thirds of them (row ``specificity`` >= 2/3).

It prints how many records were dropped (and which), the unedited summary of the kept ones (x100, as the papers
print it), and writes the kept records with case_ids renumbered 0..n-1 to ``--out``. Run from the repository root:

    source .venv/bin/activate
    python benchmarks/data/check_counterfact_set.py                      # re-check the committed set in place
    python benchmarks/data/check_counterfact_set.py candidates.json      # filter new candidates into the set
    python benchmarks/data/check_counterfact_set.py --dry-run            # report only, write nothing

On the committed set nothing should be dropped. Target ``id`` values are the Wikidata ids of the demo set
(``jaxedit/data/counterfact_demo.json``) where the target occurs there, and ``local:<name>`` placeholders
otherwise: MEMIT's ``attribute_snippets.json`` (consistency) has no entries for the placeholders.
Run time: about 12 minutes for 238 candidates on a shared 2-core CPU machine (almost all of it in
counterfact_eval; the model loads in seconds); faster on more cores or an accelerator.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jaxedit
from jaxedit.evaluate.editing import format_summary

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = os.path.join(HERE, "counterfact_smollm2.json")


def keep(row) -> bool:
    return row["efficacy"] == 0 and row["generalization"] <= 0.5 and row["specificity"] >= 2 / 3 - 1e-9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("records", nargs="?", default=DEFAULT, help="CounterFact records to check (default: the set)")
    ap.add_argument("--out", default=DEFAULT, help="where the kept records go")
    ap.add_argument("--dry-run", action="store_true", help="report only; write nothing")
    args = ap.parse_args(argv)

    t0 = time.time()
    with open(args.records, encoding="utf-8") as f:
        records = json.load(f)
    subjects = [r["requested_rewrite"]["subject"] for r in records]
    dup = sorted({s for s in subjects if subjects.count(s) > 1})
    if dup:
        raise SystemExit(f"duplicate subjects: {dup}")
    model, tok = jaxedit.load("smollm2")
    t1 = time.time()
    res = jaxedit.counterfact_eval(model, records, tokenizer=tok)
    t2 = time.time()
    kept, dropped = [], []
    for rec, row in zip(records, res["rows"]):
        (kept if keep(row) else dropped).append((rec, row))
    print(f"{len(records)} records checked, {len(dropped)} dropped, {len(kept)} kept "
          f"(load {t1 - t0:.0f} s, eval {t2 - t1:.0f} s)")
    for rec, row in dropped:
        rr = rec["requested_rewrite"]
        print(f"  dropped: {rr['prompt'].format(rr['subject'])!r} -> {rr['target_true']['str']!r} "
              f"(eff {row['efficacy']:.0f}, gen {row['generalization']:.2f}, spec {row['specificity']:.2f})")
    if not kept:
        raise SystemExit("no record kept")
    out = []
    for i, (rec, _) in enumerate(kept):
        rec = dict(rec)
        rec["case_id"] = i
        out.append(rec)
    rows = [row for _, row in kept]
    summary = {k: sum(r[k] for r in rows) / len(rows) for k in ("efficacy", "generalization", "specificity")}
    summary.update({k + "_magnitude": sum(r[k + "_magnitude"] for r in rows) / len(rows)
                    for k in ("efficacy", "generalization", "specificity")})
    parts = [summary[k] for k in ("efficacy", "generalization", "specificity")]
    summary["score"] = 0.0 if min(parts) <= 0 else 3 / sum(1 / v for v in parts)  # as counterfact_eval (0 here)
    summary["fluency"] = None
    summary["records"] = len(rows)
    print(format_summary(summary, "unedited (kept records)"))
    rel = {}
    for rec in out:
        r = rec["requested_rewrite"]["relation_id"]
        rel[r] = rel.get(r, 0) + 1
    print("records per relation:", dict(sorted(rel.items())))
    if not args.dry_run:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print(f"wrote {len(out)} records to {args.out}")
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
