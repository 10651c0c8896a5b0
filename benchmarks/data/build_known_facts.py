"""Build the known-facts set of a model: the neighborhood prompts of jaxedit's synthetic edit stream.

Every candidate fact of ``jaxedit.synthetic.FACT_CANDIDATES`` (capitals, official languages, continents,
currencies, landmarks' cities, famous people, general knowledge; written for jaxedit) is continued greedily by the
model; a fact is kept when its continuation begins with the answer (``jaxedit.evaluate.editing.generative_match``:
whitespace collapsed, case folded, a word boundary after the answer). Kept facts must also be predicted
teacher-forced (every answer token the argmax after the prompt and the answer's earlier tokens), so that the
unedited model scores 1 on both of zsRE's specificity measures. The first line of the output holds the model's name,
its weights fingerprint (``jaxedit.edit.stats.model_fingerprint``; ``jaxedit.synthetic_edits(model=...)`` uses the
shipped set only for a model with this fingerprint) and the counts.

Run from the repository root (about a minute on a 2-core CPU):

    . .venv/bin/activate
    python benchmarks/data/build_known_facts.py                       # SmolLM2 -> jaxedit/data/known_facts_smollm2.jsonl
    python benchmarks/data/build_known_facts.py --model DIR --out facts.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter

import jaxedit
from jaxedit.edit.stats import model_fingerprint
from jaxedit.evaluate.editing import generative_match, greedy_continuations, prompt_target_ids, score_rows
from jaxedit.synthetic import FACT_CANDIDATES, KNOWN_FACTS_SMOLLM2


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default=KNOWN_FACTS_SMOLLM2)
    args = ap.parse_args(argv)
    t0 = time.time()
    model, tok = jaxedit.load(args.model)
    cands = FACT_CANDIDATES
    conts = greedy_continuations(model, [c["prompt"] for c in cands], tokenizer=tok,
                                 targets=[c["answer"] for c in cands])
    scores = score_rows(model, [prompt_target_ids(tok, c["prompt"], c["answer"]) for c in cands])
    kept, dropped = [], []
    for c, t, (_, hit) in zip(cands, conts, scores):
        (kept if generative_match(t, c["answer"]) and bool(hit.all()) else dropped).append((c, t))
    meta = {"model": args.model, "fingerprint": model_fingerprint(model), "probed": len(cands), "kept": len(kept),
            "rule": "greedy continuation begins with the answer and every answer token is the teacher-forced argmax",
            "built_by": "benchmarks/data/build_known_facts.py"}
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        for c, _ in kept:
            f.write(json.dumps(c) + "\n")
    os.replace(tmp, args.out)
    by = Counter(c["relation"] for c, _ in kept)
    tot = Counter(c["relation"] for c in cands)
    print(f"kept {len(kept)} of {len(cands)} candidate facts ({time.time() - t0:.0f} s); wrote {args.out}")
    print("| relation | kept | probed |\n|---|---:|---:|")
    for r in tot:
        print(f"| {r} | {by[r]} | {tot[r]} |")
    for c, t in dropped[:15]:
        print(f"dropped: {c['prompt']!r} -> {t!r} (answer {c['answer']!r})")


if __name__ == "__main__":
    main()
