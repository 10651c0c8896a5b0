"""End to end at real shapes on this machine: each step one ``jaxedit`` command in a fresh process, with its wall
time and peak resident memory (the child's own accounting: ``ru_maxrss`` from ``os.wait4``), beside the memory plan
of the same programs (``jaxedit.plan``: XLA's analysis of the compiled programs, no weights allocated).

    python benchmarks/make_shapes.py gpt2-xl --out shapes/gpt2-xl
    python benchmarks/bench_scale.py shapes/gpt2-xl --steps load,trace,stats --work scale_work

Steps (``--steps``, in this order): ``load`` (``jaxedit info``: reading the checkpoint), ``trace`` (one 10-token
prompt, hidden/mlp/attn, 10 noisy samples), ``saliency`` (one prompt), ``stats`` (key statistics of 5 layers from
1,000 texts of 128 tokens, streamed from a local file; ``--stats-texts`` for fewer), ``edit`` (one MEMIT edit,
its statistics from the stats step's cache), ``alphaedit`` (one AlphaEdit batch),
``localize`` (the detox study's localize stage on up to 4 prompts (select may drop some), after its select stage,
which is not measured).
Batch sizes come from the plan at ``--budget`` bytes (default 20 GiB): the rows of each program that fit, capped at
``--max-batch``; the script prints which. Swap is checked before each step (``/proc/meminfo``) and reported.

The plan table of docs/scaling.md (no checkpoint needed; every mesh's programs compiled with abstract shapes):

    python benchmarks/bench_scale.py --plan-table llama-2-7b,llama-3-8b,llama-2-13b,llama-3-70b --meshes 1,2,4,8

Prints a markdown table: step, command, wall time, peak RSS, the plan's peak for the step's program(s) plus the
process's baseline (a bare ``import jax`` process's RSS), and the plan's error against the measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GIB = 2**30
PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"
STEPS = ("load", "trace", "saliency", "stats", "edit", "alphaedit", "localize")
# which plan programs a step runs (its peak is the largest of them)
STEP_PROGRAMS = {"load": (), "trace": ("trace",), "saliency": ("saliency",), "stats": ("statistics",),
                 "edit": ("z step", "solve", "update"), "alphaedit": ("z step", "solve", "update", "projected solve"),
                 "localize": ("trace", "saliency")}  # the localize stage also ranks layers by saliency


def step_plan(step: str, report: dict, peaks: dict) -> int:
    """The plan's peak for a step on CPU (where the host is the device): its largest program, plus the host memory
    the plan counts beside the programs (``report["host"]``) that is alive at the same time. The statistics pass
    ends with its sums on the host beside the device's (one statistics' worth). An edit holds the
    statistics of its layers through the solves, each later layer's solve running beside what the update left
    (the update's peak plus the solve's own bytes; the command line's update adds in place, donate=True), and then
    writes the model. AlphaEdit makes its projectors first (the statistics not yet used and the projectors made: one
    statistics' worth, and one layer's eigendecomposition), then edits holding its state (P, C_p) instead of the
    statistics, and lets the state go before writing the model."""
    top, host, weights = max(peaks.values()), report.get("host") or {}, report["parameters_per_device"]
    if step == "stats" and host:  # the sums' host copy beside the device's, when the means are made
        return top + host["statistics"]
    if step in ("edit", "alphaedit") and host:
        solve = "solve" if step == "edit" else "projected solve"
        held = host["statistics"] if step == "edit" else host["alphaedit state"]
        spread = max(top, peaks["update"] + peaks[solve] - weights) + held  # the solves' peaks include the weights
        first = weights + host["statistics"] + host["eigendecomposition"] if step == "alphaedit" else 0
        return max(spread, first, weights + host["save"])
    return top


def run_child(cmd: list, log: str) -> dict:
    """Run ``cmd``; its wall time, exit status and peak RSS (bytes, from the kernel's accounting of that child)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": time.perf_counter() - t0, "rc": proc.returncode, "peak_rss": usage.ru_maxrss * 1024}


def swap_used() -> int:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            info[k] = int(v.split()[0]) * 1024
    return info.get("SwapTotal", 0) - info.get("SwapFree", 0)


def write_corpus(path: str, n: int = 1000, words: int = 160) -> str:
    """``n`` lines of ``words`` words each (over 128 tokens), drawn from jaxedit's neutral text."""
    import random

    src = open(os.path.join(ROOT, "jaxedit", "data", "neutral.txt"), encoding="utf-8").read().split()
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(" ".join(rng.choice(src) for _ in range(words)) + "\n")
    return path


def plan_table(shapes: str, meshes: str, device: str, dtype: str, out_json: str) -> None:
    """``--plan-table``: the plan of each shape on each model axis (``meshes``: "1,2,4,8" devices, all on
    ``model``), as a markdown table of peaks per device (GiB) and the rows that fit; a mesh whose weights do not fit
    is reported without compiling."""

    sys.path.insert(0, ROOT)
    from jaxedit import planning as planner
    rows = []
    for name in shapes.split(","):
        _, cfg = planner.resolve_config(name)
        for n in (int(x) for x in meshes.split(",")):
            t0 = time.time()
            if n not in planner.model_axes(cfg, n):
                rows.append({"model": name, "mesh": f"model={n}", "note": "model axis does not divide the heads"})
                continue
            try:
                r = planner.plan(name, device_memory=device, mesh=f"model={n}", dtype=dtype, refuse=False)
            except Exception as e:  # noqa: BLE001 (reported in the table)
                rows.append({"model": name, "mesh": f"model={n}", "note": str(e)})
                continue
            r["seconds"] = time.time() - t0
            rows.append(r)
            print(f"{name} model={n}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
            with open(out_json, "w") as f:
                json.dump(rows, f, indent=1, default=str)
    g = lambda b: f"{b / GIB:.1f}"  # noqa: E731
    progs = ["trace", "saliency", "statistics", "z step", "solve", "update", "projected solve"]
    print(f"device {device}, {dtype} parameters; GiB per device at one row (rows per device that fit)\n")
    print("| model | devices (model axis) | weights / device | " + " | ".join(progs) + " | fits |")
    print("|---|---|---|" + "---|" * len(progs) + "---|")
    for r in rows:
        if "note" in r:
            print(f"| {r['model']} | {r['mesh']} | " + " | ".join(["—"] * (len(progs) + 1)) + f" | {r['note']} |")
            continue
        cells = []
        for p in progs:
            e = r["programs"].get(p)
            if e is None:
                cells.append("—")
            else:
                fit = f" ({e['rows_per_device']})" if e.get("unit") else ""
                cells.append(g(e["peak"]) + fit if e["fits"] else f"{g(e['peak'])} (no)")
        if not r["programs"]:
            cells = ["not compiled"] * len(progs)
        print(f"| {r['model']} | {r['devices']} | {g(r['parameters_per_device'])} | " + " | ".join(cells) +
              f" | {'yes' if r['fits'] else 'no'} |")


def main():
    if "--plan-table" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--plan-table", required=True, help="shapes, comma-separated")
        ap.add_argument("--meshes", default="1,2,4,8")
        ap.add_argument("--device", default="h100-80g")
        ap.add_argument("--dtype", default="float32")
        ap.add_argument("--json", default="plan_table.json")
        a = ap.parse_args()
        return plan_table(a.plan_table, a.meshes, a.device, a.dtype, a.json)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a checkpoint folder (benchmarks/make_shapes.py)")
    ap.add_argument("--steps", default="load,trace,stats,saliency,edit,alphaedit,localize")
    ap.add_argument("--work", default="scale_work", help="folder for outputs, logs and the statistics cache")
    ap.add_argument("--budget", default="20GiB", help="memory the steps may use (plan's device memory)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-plan", action="store_true", help="measure only")
    ap.add_argument("--stats-texts", type=int, default=1000,
                    help="texts of the key statistics (stats, edit, alphaedit); the pass streams them in batches, so "
                         "fewer texts change the time in proportion, not the peak memory")
    ap.add_argument("--null-space-threshold", default="0.02",
                    help="alphaedit's (the published absolute 0.02 refuses a random model's full-rank statistics "
                         "whose smallest eigenvalue is above it: give energy:0.99 then)")
    args = ap.parse_args()
    steps = [s for s in STEPS if s in args.steps.split(",")]
    os.makedirs(args.work, exist_ok=True)
    env = dict(os.environ, JAXEDIT_CACHE=os.path.abspath(os.path.join(args.work, "cache")))
    os.environ.update(env)
    jaxedit_cmd = [sys.executable, "-m", "jaxedit.cli.main"]
    corpus = write_corpus(os.path.join(args.work, "corpus.txt"), n=max(args.stats_texts, 1))
    edits = os.path.join(args.work, "edits.jsonl")
    with open(edits, "w") as f:
        f.write(json.dumps({"prompt": PROMPT, "subject": SUBJECT, "target": " Rome"}) + "\n")

    sys.path.insert(0, ROOT)

    from jaxedit import planning as planner

    name, cfg = planner.resolve_config(args.model)
    settings = planner.settings_of(cfg, {"dtype": args.dtype})
    settings["usable"] = planner.parse_bytes(args.budget)  # rows that fit: compiled near the limit
    layers = settings["layers"]
    lay = f"{layers[0]}-{layers[-1]}"
    # the process's baseline: a bare JAX process (plan bytes are the programs' alone)
    base = run_child([sys.executable, "-c", "import jax.numpy as j; j.zeros(1).block_until_ready()"],
                     os.path.join(args.work, "baseline.log"))["peak_rss"]
    report = None
    if not args.no_plan:
        t0 = time.time()
        measured, platform = planner.measure(cfg, {"data": 1, "model": 1}, settings,
                                             sorted({p for s in steps for p in STEP_PROGRAMS[s]}))
        report = planner._summarize(name, cfg, settings, {"data": 1, "model": 1}, "budget",
                                    planner.parse_bytes(args.budget), 1.0, measured, platform)
        print(f"plan compiled in {time.time() - t0:.0f} s", file=sys.stderr)
    rows_of = lambda prog: (min(args.max_batch, report["programs"][prog]["rows_per_device"])  # noqa: E731
                            if report and prog in report["programs"] else 8)
    stats_batch = rows_of("statistics")
    if report:
        print(f"batch sizes from the plan at {args.budget}: statistics {stats_batch} texts "
              f"(plan: {report['programs'].get('statistics', {}).get('rows_per_device')} fit; capped at "
              f"{args.max_batch}); trace, saliency, edit: one prompt / example / request", file=sys.stderr)
    common = ["--model", args.model, "--dtype", args.dtype]
    stats_opts = ["--corpus", corpus, "--stats-samples", str(args.stats_texts), "--max-len", "128"]
    # the study on the first 4 demo prompts (threshold 0, as random weights make no toxic text; the prompt-toxicity
    # filter may still drop one) and none held out;
    # the select stage runs first as its own command (not in the table), so the localize step measures localize
    study = common + ["--prompts", "demo", "--limit", "4", "--select-threshold", "0", "--heldout-fraction", "0",
                      "--out", os.path.join(args.work, "study")]
    cmds = {
        "load": ["info"] + common,
        "trace": ["trace"] + common + ["--prompt", PROMPT, "--subject", SUBJECT, "--out",
                                       os.path.join(args.work, "trace"), "--no-plots"],
        "saliency": ["saliency"] + common + ["--prompt", PROMPT, "--target", " Paris", "--out",
                                             os.path.join(args.work, "saliency")],
        "stats": ["stats"] + common + ["--layers", lay, "--batch-size", str(stats_batch)] + stats_opts,
        "edit": ["edit"] + common + ["--requests", edits, "--layers", lay, "--out",
                                     os.path.join(args.work, "edited")] + stats_opts,
        "alphaedit": ["edit", "--method", "alphaedit"] + common + ["--requests", edits, "--layers", lay, "--out",
                                                                   os.path.join(args.work, "alpha"),
                                                                   "--null-space-threshold",
                                                                   args.null_space_threshold] + stats_opts,
        "localize": ["detox"] + study + ["--stage", "localize"],
    }
    results = []
    for step in steps:
        cmd = jaxedit_cmd + cmds[step]
        if step == "localize":
            pre = run_child(jaxedit_cmd + ["detox"] + study + ["--stage", "select"],
                            os.path.join(args.work, "select.log"))
            print(f"select (before localize): {pre['wall_s']:.0f} s, exit {pre['rc']}", file=sys.stderr, flush=True)
        swap0 = swap_used()
        print(f"{step}: {shlex.join(['jaxedit'] + cmds[step])}", file=sys.stderr, flush=True)
        r = run_child(cmd, os.path.join(args.work, f"{step}.log"))
        r.update(step=step, cmd=shlex.join(["jaxedit"] + cmds[step]), swap=swap_used() - swap0)
        progs = [p for p in STEP_PROGRAMS[step] if report and p in report["programs"]]
        if progs:
            peaks = {p: report["programs"][p]["peak"] for p in progs}
            r["plan"] = step_plan(step, report, peaks) + base
            r["plan_programs"] = peaks
        results.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
    with open(os.path.join(args.work, "results.json"), "w") as f:
        json.dump({"model": name, "baseline_rss": base, "results": results,
                   "plan": report}, f, indent=1, default=str)
    g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    print(f"{name} ({args.dtype}); baseline process {g(base)} GiB; swap used by the steps: "
          f"{g(max(r['swap'] for r in results))} GiB\n")
    print("| step | wall (s) | peak RSS (GiB) | plan + baseline (GiB) | plan error | exit |")
    print("|---|---|---|---|---|---|")
    for r in results:
        plan = r.get("plan")
        err = f"{100 * (plan - r['peak_rss']) / r['peak_rss']:+.0f} %" if plan else "—"
        print(f"| {r['step']} | {r['wall_s']:.0f} | {g(r['peak_rss'])} | {g(plan) if plan else '—'} | {err} | "
              f"{r['rc']} |")


if __name__ == "__main__":
    main()
