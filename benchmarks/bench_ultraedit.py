"""UltraEdit on SmolLM2-135M: a synthetic stream of edits in turns, timed (editing only: the model is loaded and the
requests made before the clock starts; the first turn's compilation is included and also shown apart).

The stream: the demo CounterFact records' rewrites (jaxedit/data/counterfact_demo.json), each prompt prefixed with a
numbered clause so that every request differs ("In note 17, The Eiffel Tower is located in the city of" -> " Rome").

With ``--reference DIR`` (a checkout of UltraEdit's public code, XiaojieGu/UltraEdit, with omegaconf importable;
never part of this repository), the same stream's first ``--reference-turns`` turns are also edited by that code
(torch, float32, CPU) on the same model exported as a Hugging Face folder, side by side in this process, and the
table shows both.

    nice -n 10 python benchmarks/bench_ultraedit.py --edits 1000 --turn 100 [--reference /tmp/ultra_parity]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def stream(n: int) -> list:
    import jaxedit

    demo = jaxedit.load_counterfact("demo")
    out = []
    for i in range(n):
        rr = demo[i % len(demo)]["requested_rewrite"]
        prompt = rr["prompt"].replace("{}", rr["subject"])
        target = rr["target_new"]["str"]
        out.append({"prompt": f"In note {i}, {prompt}", "target": " " + target.strip()})
    return out


def run_jaxedit(model, tok, reqs, turn, micro):
    from jaxedit.edit import ultraedit as ue

    modules = ue.resolve_modules(model.config)
    records = ue.parse_records(reqs, tok)
    shapes = ue.turn_shapes(records, micro)
    state = ue.new_state(model, modules)
    times = []
    t0 = time.perf_counter()
    for s in range(0, len(records), turn):
        tb = time.perf_counter()
        model, _, state = ue.run_turn(model, records[s:s + turn], modules, state, 1e-6, micro_batch=micro,
                                      shapes=shapes, progress=False)
        times.append(time.perf_counter() - tb)
        print(f"  jaxedit turn {len(times)}: {times[-1]:.1f} s", file=sys.stderr, flush=True)
    return time.perf_counter() - t0, times


def run_reference(ref_dir, model, tok, reqs, turn, micro, turns):
    """UltraEdit's own code on the same model (exported to a Hugging Face folder) and stream."""
    import importlib.machinery  # noqa: F401
    import types

    sys.path[:0] = [ref_dir, os.path.join(ref_dir, "site")]
    import accelerate  # noqa: F401  (imported before the wandb stand-in: it probes for wandb)
    import torch
    import transformers  # noqa: F401

    wb = types.ModuleType("wandb")
    wb.log = wb.init = lambda *a, **k: None
    sys.modules.setdefault("wandb", wb)
    from omegaconf import OmegaConf
    from data.base import make_loader
    from data.zsre import ZSREDataset
    from editor.ultraedit import ULTRAEDIT

    import jaxedit
    from jaxedit.edit import ultraedit as ue

    work = tempfile.mkdtemp(prefix="ue-bench-")
    mdir = os.path.join(work, "model")  # no "llama" in the path (their LLaMA branch names an unimported class)
    jaxedit.export_hf(model, mdir, tokenizer=tok)
    data = [{"src": r["prompt"], "ans": r["target"][1:], "rephrase": r["prompt"], "loc": "q", "loc_ans": "a"}
            for r in reqs[:turn * turns]]
    path = os.path.join(work, "zsre.json")
    with open(path, "w") as f:
        json.dump(data, f)
    mods = ue.resolve_modules(model.config)
    names = [f"model.layers.{l}.mlp.{'gate_proj' if n == 'w_gate' else 'up_proj'}" for n, l in mods]
    cfg = OmegaConf.create({
        "editor": {"name": "ultraedit", "lr": 1e-6, "batch_size": 128, "token": "ans",
                   "cache_dir": os.path.join(work, "cache")},
        "model": {"name": "smollm2", "name_or_path": mdir, "edit_modules": names,
                  "class_name": "AutoModelForCausalLM", "half": False},
        "dataset": {"name": "zsre", "n_edits": turn, "batch_size": micro, "valid_path": path, "num_seq": turns},
        "num_seq": turns, "model_device": "cpu", "editor_device": "cpu"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(mdir, torch_dtype=torch.float32)
    for p in hf.parameters():
        p.requires_grad = False
    for n in names:
        hf.get_submodule(n).weight.requires_grad = True
    _, loader = make_loader(cfg, ZSREDataset)
    ed = ULTRAEDIT(cfg, hf)
    times = []
    t0 = time.perf_counter()
    for t, tuples in enumerate(loader):
        if t >= turns:
            break
        tb = time.perf_counter()
        ed.cache(tuples["edit_tuples"])
        ed.edit_model(ed.predict_param_shifts(), False)
        hf.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - tb)
        print(f"  reference turn {len(times)}: {times[-1]:.1f} s", file=sys.stderr, flush=True)
    return time.perf_counter() - t0, times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=1000)
    ap.add_argument("--turn", type=int, default=100)
    ap.add_argument("--micro-batch", type=int, default=10)
    ap.add_argument("--reference", default=None, help="UltraEdit's code folder (never committed)")
    ap.add_argument("--reference-turns", type=int, default=2)
    args = ap.parse_args()
    import jaxedit

    jaxedit.set_progress(False)
    model, tok = jaxedit.load("smollm2")
    reqs = stream(args.edits)
    total, times = run_jaxedit(model, tok, reqs, args.turn, args.micro_batch)
    n_turns = len(times)
    rows = [("jaxedit", args.edits, n_turns, total, times)]
    if args.reference:
        k = min(args.reference_turns, n_turns)
        rtotal, rtimes = run_reference(args.reference, model, tok, reqs, args.turn, args.micro_batch, k)
        rows.append(("UltraEdit's code", k * args.turn, k, rtotal, rtimes))
    print(f"\nUltraEdit on SmolLM2-135M, turns of {args.turn} (micro-batches of {args.micro_batch}), CPU "
          f"({os.cpu_count()} cores)\n")
    print("| code | edits | turns | seconds | edits/s | first turn (s) | later turns, mean (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, edits, turns, secs, ts in rows:
        later = sum(ts[1:]) / max(1, len(ts) - 1) if len(ts) > 1 else float("nan")
        print(f"| {name} | {edits} | {turns} | {secs:.1f} | {edits / secs:.2f} | {ts[0]:.1f} | {later:.1f} |")
    if len(rows) == 2 and len(rows[1][4]) > 1 and n_turns > 1:
        mine = sum(times[1:]) / (n_turns - 1)
        theirs = sum(rows[1][4][1:]) / (len(rows[1][4]) - 1)
        print(f"\nlater turns: jaxedit {mine:.1f} s, UltraEdit's code {theirs:.1f} s per turn "
              f"({theirs / mine:.2f}x); 10,000 edits at jaxedit's rate: {mine * 10_000 / args.turn / 60:.1f} min")


if __name__ == "__main__":
    main()
