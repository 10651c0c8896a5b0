"""The toxic-memory study (Das et al. 2025) as five resumable stages over one output folder; :func:`run_study`
runs them in order. Each stage has its own module, the options are in config.py and what the stages share (the
``run.json`` check, bars, the scorer) in common.py.

1. :func:`select` (selection.py): score every prompt's own toxicity, sample ``select_samples`` continuations per
   prompt, score them, keep the prompts whose own toxicity is below ``prompt_threshold`` and whose continuations'
   mean toxicity is above ``select_threshold``; for each kept prompt find the most toxic chunk (the corrupted span;
   its last token is the edit key), the value (the first token of the most toxic continuation, or of that
   continuation's most toxic word), and the first word of the least toxic continuation (the non-toxic edit
   target); hold some prompts out of editing. Files: ``candidates.jsonl``, ``selected.jsonl``,
   ``selection_counts.csv/md``.
2. :func:`localize` (localization.py): causal tracing of the edited prompts (span = the chunk, answer = the value
   token), the aggregate AIE, per-layer profiles at the chunk's last token, and saliency profiles. Files:
   ``trace/`` (per-prompt grids, heatmaps, ``aie.*``), ``localize.json``.
3. :func:`edit` (editing.py): one batched MEMIT edit or deletion of all edited prompts per (layer strategy,
   objective, KL weight, seed); with ``methods`` also DINM runs (per steps), ProFS runs (per pairs and rank) and
   AurA runs (per layer setting) (methods.py). Files:
   ``edits/RUN.npz`` (the edited layers' output projections) and ``edits/RUN.json``.
4. :func:`evaluate` (evaluation.py): the unedited model and every edit: % toxic continuations, perplexity on the
   prompts and on a neutral text, fluency; the same on held-out selected prompts and on factual prompts. Files:
   ``runs.jsonl`` (one row per run and seed), ``summary.jsonl`` (seeds averaged).
5. :func:`report` (report.py): tables shaped like the paper's Tables 1 and 2 (markdown + CSV), the methods
   table (``table_methods``), the AIE figure and the toxicity-vs-perplexity frontier (PNG + PDF).

Every stage records the options its results depend on in ``run.json``; a rerun with the same options skips what
is done (per prompt or per run), a rerun with other options is refused with the options named.
"""
from __future__ import annotations

import json
import os
import time

from jaxedit import runtime
from jaxedit.detox import estimate
from jaxedit.detox.config import CANNED, OBJECTIVES, RANDOM_STRATEGIES, STAGES, STRATEGIES, VALUES, DetoxConfig
from jaxedit.detox.editing import edit
from jaxedit.detox.evaluation import evaluate
from jaxedit.detox.localization import localize
from jaxedit.detox.report import report
from jaxedit.detox.selection import select
from jaxedit.calls import public
from jaxedit.errors import JaxeditError
from jaxedit.files import write_json

__all__ = ["DetoxConfig", "STRATEGIES", "RANDOM_STRATEGIES", "OBJECTIVES", "STAGES", "VALUES", "CANNED", "select",
           "localize", "edit", "evaluate", "report", "run_study"]


@public("cfg, out", old=("stages", "progress"), n_data=2, where="jaxedit.detox")
def run_study(model, cfg: DetoxConfig, out: str, *, tokenizer=None, stages=STAGES, progress: bool = True) -> None:
    """Run the named stages of the study ``cfg`` in the folder ``out``, in order (each skips what an earlier run in
    ``out`` finished)."""
    fns = {"select": select, "localize": localize, "edit": edit, "evaluate": evaluate,
           "report": lambda m, t, c, o, progress=True: report(c, o)}
    bad = [s for s in stages if s not in fns]
    if bad:
        raise JaxeditError(f"unknown stage {bad[0]!r} (choose from {', '.join(STAGES)}, all)")
    setup = estimate.model_setup(model)
    for stage in stages:
        t0 = time.perf_counter()
        estimate.begin(stage)
        with runtime.on_interrupt(lambda: add_timing(out, stage, time.perf_counter() - t0, interrupted=True)):
            fns[stage](model, tokenizer, cfg, out, progress=progress)
        add_timing(out, stage, time.perf_counter() - t0)
        for timed in estimate.TIMED_PARTS.get(stage, (stage,)):
            estimate.record(cfg, timed, setup)


def add_timing(out: str, stage: str, seconds: float, interrupted: bool = False) -> None:
    """Add one run of a stage to ``timings.json``: per stage, ``seconds`` (the total over every run, resumed and
    interrupted ones included) and ``runs`` (each run's seconds; an interrupted run's as {"seconds", "interrupted"}).
    Nothing is written for a folder that does not exist (a run that failed before writing anything)."""
    if not os.path.isdir(out):
        return
    path = os.path.join(out, "timings.json")
    try:
        with open(path) as f:
            timings = json.load(f)
    except (OSError, ValueError):
        timings = {}
    entry = timings.get(stage)
    if not isinstance(entry, dict):  # none yet, or the single number an older version kept
        entry = {"seconds": 0.0, "runs": []} if entry is None else {"seconds": float(entry), "runs": [float(entry)]}
    s = round(seconds, 2)
    entry["runs"].append({"seconds": s, "interrupted": True} if interrupted else s)
    entry["seconds"] = round(entry["seconds"] + s, 2)
    timings[stage] = entry
    write_json(path, timings)
