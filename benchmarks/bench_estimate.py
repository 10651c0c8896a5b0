"""The plan's time estimate on a fresh machine against the real run: ``jaxedit detox`` (the quick study of
docs/toxicity.md) and a small ``jaxedit dinm`` run, on SmolLM2.

Two phases, each in a jaxedit cache of its own so that nothing measured earlier leaks in:

* ``run``: the real runs in a fresh cache (the model converted, every program compiled, the key statistics computed,
  as on a fresh machine); per stage the measured seconds (the study's ``timings.json``; DINM's cases from the
  calibration the run stores) go to ``WORK/measured.json``.
* ``estimate``: ``--dry-run`` of the same commands in another fresh cache (no calibration: the estimate comes from
  the FLOP counts and the machine probe, :mod:`jaxedit.calibration`); the table (stage, estimated s, measured s,
  ratio) is printed. The selection's outcome (how many prompts it keeps) is unknown to a first plan; the study's
  localize, edit and evaluate estimates assume every prompt is kept (an upper bound), and the table also shows the
  estimate redone with the selection's real count (the plan of a rerun after the select stage).

    python benchmarks/bench_estimate.py run --work /tmp/bench_estimate      # ~10 min on the 2-core machine
    python benchmarks/bench_estimate.py estimate --work /tmp/bench_estimate
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

STUDY = ["detox", "--prompts", "demo", "--limit", "6", "--select-samples", "8", "--eval-samples", "4",
         "--select-threshold", "0.05", "--strategies", "random-single,topk-single", "--objectives", "delete",
         "--random-seeds", "1", "--trace-kinds", "mlp", "--trace-samples", "3", "--corpus", "model",
         "--stats-samples", "64", "--max-len", "64", "--methods", "delete,profs"]
DINM = ["dinm", "--cases", "demo", "--limit", "2"]
STAGE_NAMES = {"select": "select", "localize": "localize", "edit (deletions)": "edit", "edit (DINM / ProFS)": "edit",
               "evaluate": "evaluate"}


def jaxedit(args, cache, check=True):
    env = dict(os.environ, JAXEDIT_CACHE=cache)
    t0 = time.perf_counter()
    exe = os.path.join(os.path.dirname(sys.executable), "jaxedit")
    proc = subprocess.run([exe if os.path.exists(exe) else "jaxedit", *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if check and proc.returncode:
        sys.exit(f"jaxedit {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc, wall


def run(work):
    cache = os.path.join(work, "cache-run")
    shutil.rmtree(cache, ignore_errors=True)
    study, dinm_out = os.path.join(work, "study"), os.path.join(work, "dinm")
    shutil.rmtree(study, ignore_errors=True)
    shutil.rmtree(dinm_out, ignore_errors=True)
    jaxedit(["info", "--model", "smollm2"], cache)  # the conversion (~20 s) is no stage's: done first
    _, wall = jaxedit(STUDY + ["--out", study], cache)
    with open(os.path.join(study, "timings.json")) as f:
        timings = {k: v["seconds"] for k, v in json.load(f).items()}
    sel = [json.loads(l) for l in open(os.path.join(study, "selected.jsonl"))]
    _, dwall = jaxedit(DINM + ["--out", dinm_out], cache)
    with open(os.path.join(cache, "calibration", "dinm.json")) as f:
        c = next(iter(json.load(f).values()))["cases"]
    measured = {"study": timings, "study_wall": wall, "selected": len(sel),
                "edited": sum(r["split"] == "edit" for r in sel), "dinm": c["first"] + c["per_unit"],
                "dinm_wall": dwall}
    with open(os.path.join(work, "measured.json"), "w") as f:
        json.dump(measured, f, indent=1)
    print(json.dumps(measured, indent=1))


def seconds(text):
    m = re.match(r"~?([\d.]+) (s|min|h)", text)
    return float(m.group(1)) * {"s": 1, "min": 60, "h": 3600}[m.group(2)]


def plan_estimates(lines):
    """{stage: seconds} from a plan's time line ("... (select ~1 min, localize ~40 s, ...; ...)")."""
    line = next(l for l in lines if l.startswith("time:"))
    out = {}
    for name, val in re.findall(r"(select|localize|edit \(deletions\)|edit \(DINM / ProFS\)|evaluate) "
                                r"(?:<=)?~([\d.]+ (?:s|min|h))", line):
        stage = STAGE_NAMES.get(name, name)
        out[stage] = out.get(stage, 0.0) + seconds(val)
    return out, line


def estimate(work):
    with open(os.path.join(work, "measured.json")) as f:
        measured = json.load(f)
    cache = os.path.join(work, "cache-estimate")
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    proc, _ = jaxedit(STUDY + ["--out", os.path.join(work, "fresh-study"), "--dry-run"], cache)
    first = time.perf_counter() - t0
    est, line = plan_estimates(proc.stdout.splitlines())
    print(line)
    # the plan once the selection is known: a copy of the study folder's selection, nothing after it
    redo = os.path.join(work, "study-after-select")
    shutil.rmtree(redo, ignore_errors=True)
    os.makedirs(redo)
    for name in ("candidates.jsonl", "selected.jsonl", "run.json"):
        shutil.copy(os.path.join(work, "study", name), redo)
    proc, _ = jaxedit(STUDY + ["--out", redo, "--dry-run", "--stage", "localize"], cache)
    known, _ = plan_estimates(proc.stdout.splitlines())
    for st in ("edit", "evaluate"):
        p, _ = jaxedit(STUDY + ["--out", redo, "--dry-run", "--stage", st], cache)
        known.update(plan_estimates(p.stdout.splitlines())[0])
    proc, _ = jaxedit(DINM + ["--out", os.path.join(work, "fresh-dinm"), "--dry-run"], cache)
    dline = next(l for l in proc.stdout.splitlines() if l.startswith("time:"))
    dest = {"cases": seconds(dline.split("~", 1)[1])}
    print(dline)
    rows = []
    for stage in ("select", "localize", "edit", "evaluate"):
        rows.append((f"detox {stage}", est.get(stage), known.get(stage, est.get(stage)),
                     measured["study"].get(stage)))
    tot = lambda d: sum(d.get(s, 0.0) for s in ("select", "localize", "edit", "evaluate"))  # noqa: E731
    known_all = dict(est, **{k: v for k, v in known.items()})
    rows.append(("detox (4 stages)", tot(est), tot(known_all), tot(measured["study"])))
    rows.append(("dinm (2 cases)", dest.get("cases"), dest.get("cases"), measured["dinm"]))
    print(f"\nfirst dry run (probe included): {first:.1f} s; the study kept {measured['selected']} prompts "
          f"({measured['edited']} edited)\n")
    print("| stage | estimated (s) | estimated, selection known (s) | measured (s) | ratio | ratio, selection known |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, e, k, m in rows:
        f = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731
        r = lambda x: "-" if x is None or not m else f"{x / m:.2f}"  # noqa: E731
        print(f"| {name} | {f(e)} | {f(k)} | {f(m)} | {r(e)} | {r(k)} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("phase", choices=["run", "estimate", "both"])
    ap.add_argument("--work", default="/tmp/bench_estimate")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    if a.phase in ("run", "both"):
        run(a.work)
    if a.phase in ("estimate", "both"):
        estimate(a.work)


if __name__ == "__main__":
    main()
