"""MEMIT vs AlphaEdit on SmolLM2-135M, sequentially: CounterFact's metrics of all edits so far every few batches
(the collapse curve) and after the last batch, on the CounterFact-format facts of benchmarks/data (facts the
unedited model holds). Also prints the key statistics' spectrum: how many directions each null-space threshold
keeps per layer.

    python benchmarks/sequential_smollm2.py --edits 100 --batch-size 10 --eval-every 2 --figure docs/sequential_smollm2.png

Key statistics: texts sampled from the model itself (works offline), cached like every statistics run.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=2, help="batches between two evaluations")
    ap.add_argument("--records", default=os.path.join(HERE, "data", "counterfact_smollm2.json"))
    ap.add_argument("--stats-texts", type=int, default=256)
    ap.add_argument("--stats-len", type=int, default=64)
    ap.add_argument("--thresholds", default="2e-2,energy:0.99",
                    help="AlphaEdit null-space thresholds to run (comma-separated)")
    ap.add_argument("--methods", default="memit,alphaedit")
    ap.add_argument("--figure", default=None, help="write the collapse curves here (PNG)")
    ap.add_argument("--json", default=None, help="write every number here")
    a = ap.parse_args()

    import jaxedit
    from jaxedit.edit import memit as ed

    model, tok = jaxedit.load("smollm2")
    records = jaxedit.load_counterfact(a.records)[:a.edits]
    from jaxedit.edit.sequential import dataset_requests

    reqs = dataset_requests(records, "counterfact")
    hp, layers = ed.prepare(model, None, {})
    t0 = time.perf_counter()
    stats = jaxedit.layer_stats(model, layers, tokenizer=tok, corpus="model", stats_samples=a.stats_texts, max_len=a.stats_len)
    print(f"key statistics of layers {list(layers)}: {a.stats_texts} model-sampled texts x {a.stats_len} tokens, "
          f"{time.perf_counter() - t0:.0f} s\n")
    print("| layer | trace | eigenvalues < 2e-2 | energy:0.9 | energy:0.99 | energy:0.999 |")
    print("|---|---:|---:|---:|---:|---:|")
    for l in layers:
        w = np.linalg.eigvalsh(np.asarray(stats[l], np.float64))
        cells = [str(int((w < 2e-2).sum()))]
        for f in (0.9, 0.99, 0.999):
            cells.append(str(int((np.cumsum(np.clip(w, 0, None)) <= (1 - f) * np.clip(w, 0, None).sum()).sum())))
        print(f"| {l} | {w.sum():.3g} | " + " | ".join(f"{c} of {len(w)}" for c in cells) + " |")
    print()

    before = jaxedit.counterfact_eval(model, records, tokenizer=tok)["summary"]
    runs = [("memit", None)] if "memit" in a.methods else []
    if "alphaedit" in a.methods:
        runs += [("alphaedit", t) for t in a.thresholds.split(",")]
    results = {"before": before, "runs": []}
    n_batches = -(-len(reqs) // a.batch_size)
    for method, thr in runs:
        curve = []

        def on_batch(done, m):
            if done % a.eval_every == 0 or done == n_batches:
                n = min(done * a.batch_size, len(records))
                curve.append({"edits": n, "summary": jaxedit.counterfact_eval(m, records[:n], tokenizer=tok)["summary"]})
                s = curve[-1]["summary"]
                print(f"  {method} {thr or ''} after {n} edits: eff {100 * s['efficacy']:.1f} "
                      f"gen {100 * s['generalization']:.1f} spe {100 * s['specificity']:.1f}", flush=True)

        kw = {} if thr is None else {"null_space_threshold": float(thr) if thr[0].isdigit() else thr}
        t0 = time.perf_counter()
        try:
            edited, rep = jaxedit.edit_sequential(model, reqs, method=method, batch_size=a.batch_size,
                                                  tokenizer=tok, stats=stats, on_batch=on_batch, progress=False,
                                                  **kw)
            secs = time.perf_counter() - t0
            err = None
        except jaxedit.JaxeditError as e:
            secs, err = time.perf_counter() - t0, str(e)
            print(f"  {method} {thr}: refused: {err}")
        entry = {"method": method, "threshold": thr, "curve": curve, "seconds": secs, "error": err}
        if err is None and method == "alphaedit":
            entry["null_space"] = {str(k): v for k, v in rep["null_space"].items()}
        results["runs"].append(entry)

    print(f"\nSmolLM2-135M, {len(records)} CounterFact-format edits in batches of {a.batch_size}, layers "
          f"{list(layers)} (x100; magnitudes are mean probability differences)\n")
    print("| method | Eff | Gen | Spe | Eff mag | Gen mag | Spe mag | edit+eval seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    fmt = lambda s: " | ".join(f"{100 * s[k]:.1f}" for k in ("efficacy", "generalization", "specificity",
                                                              "efficacy_magnitude", "generalization_magnitude",
                                                              "specificity_magnitude"))
    print(f"| unedited | {fmt(before)} | |")
    for r in results["runs"]:
        name = r["method"] + (f" ({r['threshold']})" if r["threshold"] else "")
        if r["error"]:
            print(f"| {name} | refused | | | | | | |")
        else:
            print(f"| {name} | {fmt(r['curve'][-1]['summary'])} | {r['seconds']:.0f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    if a.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), sharey=True)
        for ax, key in zip(axes, ("efficacy", "generalization", "specificity")):
            for r in results["runs"]:
                if r["error"]:
                    continue
                xs = [0] + [p["edits"] for p in r["curve"]]
                ys = [100 * before[key]] + [100 * p["summary"][key] for p in r["curve"]]
                ax.plot(xs, ys, marker="o", ms=3, label=r["method"] + (f" {r['threshold']}" if r["threshold"]
                                                                       else ""))
            ax.set_title(key)
            ax.set_xlabel("edits so far")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("% (of the edits so far)")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.figure, dpi=120)


if __name__ == "__main__":
    main()
