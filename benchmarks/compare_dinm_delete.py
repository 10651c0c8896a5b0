"""DINM vs MEMIT-style deletion on the same SafeEdit cases: the SafeEdit metrics side by side and the wall time.

Both methods edit the original model once per case (per-instance) and are evaluated on the same inputs (by default
without DINM's system suffix: on the demo cases the suffix alone already makes SmolLM2 answer safely, which would
hide both edits; ``--suffix`` appends it for every row, DINM's tuning included).

* **DINM**: :func:`jaxedit.dinm` with its defaults (the located layer's output projection, 10 Adam steps).
* **deletion**: :func:`jaxedit.delete` suppressing the first token of the case's unsafe generation after the
  adversarial prompt, with the key at the prompt's most toxic chunk when ``jaxedit.toxic_span`` exists, else at the
  prompt's last token; the default layers and hyperparameters for the model; key statistics from text sampled from
  the model (``corpus="model"``, offline), computed once and timed separately.

    python benchmarks/compare_dinm_delete.py [--model smollm2] [--cases demo] [--max-new-tokens 32] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

import jaxedit
from jaxedit.edit.dinm import DEFAULT_SUFFIX
from jaxedit.edit.memit import hparams_for
from jaxedit.evaluate import safeedit as se

COLUMNS = ("DS", "DG_onlyQ", "DG_otherA", "DG_otherQ", "DG_otherAQ", "fluency", "retention")


def key_span(prompt, tok, scorer):
    """(start, end) token span of the deletion key, and how it was chosen."""
    finder = getattr(jaxedit, "toxic_span", None)
    if finder is not None:
        start, end, _ = finder(prompt, tokenizer=tok, scorer=scorer)
        return [int(start), int(end)], "toxic_span"
    n = len(tok(prompt)["input_ids"])
    return [n - 1, n], "last token"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--cases", default="demo")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--scorer", default="profanity")
    ap.add_argument("--suffix", action="store_true", help="append DINM's system suffix to every input")
    ap.add_argument("--stats-samples", type=int, default=64)
    ap.add_argument("--stats-len", type=int, default=64)
    ap.add_argument("--out", help="write the numbers as JSON")
    args = ap.parse_args()

    model, tok = jaxedit.load(args.model)
    cases = se.read_cases(args.cases, limit=args.limit)
    sfx = DEFAULT_SUFFIX if args.suffix else None
    ev = dict(scorer=args.scorer, max_new_tokens=args.max_new_tokens)
    lens = [len(x) for c in cases for x in se.prompt_ids(tok, c.inputs(sfx), model.config.max_positions)]
    ev["bucket"] = -(-max(lens) // 64) * 64
    kc_before = se.answer_argmax(model, tok, cases, sfx)

    rows, times = {}, {}
    t = time.perf_counter()
    vanilla = se.evaluate(model, cases, tokenizer=tok, suffix=sfx, **ev)
    times["vanilla"] = {"eval_s": time.perf_counter() - t}
    rows["vanilla"] = se.summarize(vanilla)

    # DINM, one case at a time (the first call includes compiling)
    recs, kept, edit_s, layers = [], [], [], []
    for c in cases:
        t = time.perf_counter()
        edited, rep = jaxedit.dinm(model, [c], tokenizer=tok, suffix=sfx or "")
        edit_s.append(time.perf_counter() - t)
        layers.append(rep["layers"][0])
        recs += se.evaluate(edited, [c], tokenizer=tok, suffix=sfx, **ev)
        kept += se.retention(model, edited, tok, [c], suffix=sfx, before=kc_before[len(kept):len(kept) + 1])
    rows["DINM"] = se.summarize(recs, kept)
    times["DINM"] = {"edit_s": edit_s, "oneoff_s": 0.0, "layers": layers}

    # deletion: statistics once, then one case at a time
    hp = hparams_for(model.config)
    t = time.perf_counter()
    stats = jaxedit.layer_stats(model, list(hp.layers), tokenizer=tok, corpus="model", stats_samples=args.stats_samples,
                                max_len=args.stats_len, progress=False)
    stats_s = time.perf_counter() - t
    recs, kept, edit_s, how = [], [], [], set()
    for c in cases:
        prompt = se.with_suffix(c.prompt, sfx)
        span, chosen = key_span(c.prompt, tok, args.scorer)
        how.add(chosen)
        req = {"prompt": prompt, "span": span, "suppress": " " + c.unsafe.strip()}
        t = time.perf_counter()
        edited, _ = jaxedit.delete(model, [req], tokenizer=tok, stats=stats, progress=False)
        edit_s.append(time.perf_counter() - t)
        recs += se.evaluate(edited, [c], tokenizer=tok, suffix=sfx, **ev)
        kept += se.retention(model, edited, tok, [c], suffix=sfx, before=kc_before[len(kept):len(kept) + 1])
    rows["deletion"] = se.summarize(recs, kept)
    times["deletion"] = {"edit_s": edit_s, "oneoff_s": stats_s, "key": sorted(how), "layers": list(hp.layers)}

    print(f"{len(cases)} cases, {args.max_new_tokens} new tokens, inputs {'with' if sfx else 'without'} the suffix, "
          f"scorer {args.scorer}")
    print("| method | " + " | ".join(COLUMNS) + " | edit s/case (median) | one-off s |")
    print("|---" * (len(COLUMNS) + 3) + "|")
    for name, s in rows.items():
        cells = ["-" if k not in s else f"{s[k]:.2f}" if k == "fluency" else f"{s[k]:.1f}" for k in COLUMNS]
        tm = times[name]
        med = f"{np.median(tm['edit_s']):.1f}" if "edit_s" in tm else "-"
        one = f"{tm['oneoff_s']:.1f}" if "oneoff_s" in tm else "-"
        print(f"| {name} | " + " | ".join(cells) + f" | {med} | {one} |")
    print(f"DINM layers: {times['DINM']['layers']}; deletion layers {times['deletion']['layers']}, key: "
          f"{', '.join(times['deletion']['key'])}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "times": times, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
