"""One stream, four lifelong editors: the collapse table and figure of docs/editing.md.

Each method edits the same offline stream (``synthetic:10000``, seed 0) in turns of 100 with ``jaxedit edit``,
evaluating all edits so far every K turns (``OUT/curve.jsonl``); this script reads those folders and prints one
markdown table (zsRE metrics x100 of all edits so far, per method and number of edits), where each run stopped
(turns done, seconds per turn) and draws one figure. The runs (resumable: rerun the same command to go on):

    S="--requests synthetic:10000 --batch-size 100 --eval --corpus model --stats-samples 128 --max-len 64"
    jaxedit edit --requests synthetic:10000 --batch-size 100 --eval --eval-every 10 --method ultraedit --out runs/ue
    jaxedit edit $S --eval-every 1 --method memit --out runs/memit
    jaxedit edit $S --eval-every 1 --method alphaedit --out runs/alphaedit
    jaxedit edit $S --eval-every 1 --method alphaedit --nas --hparam nas_samples=50 --out runs/nas

    python benchmarks/collapse_smollm2.py UltraEdit=runs/ue MEMIT=runs/memit AlphaEdit=runs/alphaedit \
        "AlphaEdit+NAS=runs/nas" --figure docs/collapse_smollm2.png
"""
from __future__ import annotations

import argparse
import json
import os

KEYS = ("efficacy", "generalization", "specificity")
GEN_KEYS = ("gen_efficacy", "gen_generalization", "gen_specificity")


def read_run(folder: str) -> dict:
    """The curve points, the turns done and their seconds, and the options of one ``jaxedit edit`` run."""
    points = []
    curve = os.path.join(folder, "curve.jsonl")
    if os.path.exists(curve):
        with open(curve) as f:
            points = [json.loads(line) for line in f if line.strip()]
    seq_path = os.path.join(folder, "sequence", "sequence.json")
    seq = {}
    if os.path.exists(seq_path):
        with open(seq_path) as f:
            seq = json.load(f)
    seconds = [b.get("seconds") for b in seq.get("batches", []) if b.get("seconds") is not None]
    return {"points": sorted(points, key=lambda p: p["edits"]), "done": seq.get("done", 0),
            "total": seq.get("batches_total"), "seconds": seconds, "options": seq.get("options", {})}


def table(runs: dict) -> str:
    edits = sorted({p["edits"] for r in runs.values() for p in r["points"]})
    names = list(runs)
    head = "| edits so far | " + " | ".join(f"{n} Eff | Gen | Spe" for n in names) + " |"
    lines = [head, "|---:|" + "---:|---:|---:|" * len(names)]
    for e in edits:
        cells = []
        for n in names:
            p = next((p for p in runs[n]["points"] if p["edits"] == e), None)
            cells += [f"{100 * p['summary'][k]:.1f}" if p else "" for k in KEYS]
        lines.append(f"| {e if e else '0 (unedited)'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stops(runs: dict) -> str:
    lines = ["| method | turns done | edits | seconds per turn (first / later mean) | evaluated points |",
             "|---|---:|---:|---:|---:|"]
    for n, r in runs.items():
        s = r["seconds"]
        per = f"{s[0]:.0f} / {sum(s[1:]) / len(s[1:]):.0f}" if len(s) > 1 else (f"{s[0]:.0f}" if s else "-")
        turn = r["options"].get("batch_size", 100)
        lines.append(f"| {n} | {r['done']} of {r['total'] or '-'} | {r['done'] * turn} | {per} | {len(r['points'])} |")
    return "\n".join(lines)


def figure(runs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    for ax, key in zip(axes, KEYS):
        for n, r in runs.items():
            pts = [p for p in r["points"] if p["edits"] > 0]
            if pts:
                ax.plot([p["edits"] for p in pts], [100 * p["summary"][key] for p in pts], marker="o", ms=4,
                        label=n)
        ax.set_xscale("log")
        ax.set_xlabel("edits so far (turns of 100)")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("zsRE metric of all edits so far (%)")
    axes[0].set_ylim(-2, 102)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="NAME=FOLDER, one per method (a jaxedit edit --out folder)")
    ap.add_argument("--figure", default=None, help="write the figure here (PNG)")
    a = ap.parse_args(argv)
    runs = {}
    for spec in a.runs:
        name, _, folder = spec.partition("=")
        if not folder or not os.path.isdir(folder):
            ap.error(f"{spec!r}: give NAME=FOLDER with an existing folder")
        runs[name] = read_run(folder)
    print(table(runs))
    print()
    print(stops(runs))
    if a.figure:
        figure(runs, a.figure)
        print(f"\nwrote {a.figure}")


if __name__ == "__main__":
    main()
