"""What the study's stages share: the options check against ``run.json`` (:func:`check_stage`), a stage's progress
bar, its toxicity scorer (with the score file that makes a rerun cheap), and reading an earlier stage's files."""
from __future__ import annotations

import json
import os
import re

from jaxedit import runtime
from jaxedit.detox.config import DetoxConfig
from jaxedit.detox.estimate import TimedBar
from jaxedit.errors import JaxeditError
from jaxedit.evaluate.toxicity import get_scorer
from jaxedit.files import read_rows, write_json

DOWNSTREAM = ("trace/results.jsonl", "localize.json", "edits", "runs.jsonl")
OPTION_NAMES = {"samples": "stats-samples"}  # DetoxConfig fields whose option has another name


def check_stage(out: str, stage: str, cfg: DetoxConfig) -> None:
    """Record the stage's options in run.json, or refuse a rerun with other options (naming them). The selection
    filter's options, and a smaller --select-samples, may change while no later stage has results (the candidates
    are re-filtered; cut to their first samples)."""
    path = os.path.join(out, "run.json")
    stored = {}
    if os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f)
    mine = json.loads(json.dumps(cfg.stage_options(stage)))
    raw = before = stored.get(stage)
    if before is not None:  # a study written by an older version: --limit was a "sample" option; an option it
        moved = stored.get("sample", {}) if stage == "filter" else {}  # did not record is compared as it is now
        before = {k: before[k] if k in before else moved.get(k, v) for k, v in mine.items()}
    if before is not None and before != mine:
        changed = diff_keys(before, mine)
        diff = [f"--{OPTION_NAMES.get(k, k.replace('_', '-'))} {before.get(k)!r} -> {mine.get(k)!r}"
                for k in changed]
        later = [f for f in DOWNSTREAM if os.path.exists(os.path.join(out, f))]
        fewer = (stage == "sample" and changed == ["select_samples"]
                 and mine["select_samples"] < before["select_samples"])  # the stored samples' first N are reused
        if (stage != "filter" and not fewer) or later:
            hint = (f"; or delete {', '.join(later)} to select again" if stage == "filter" or fewer else "")
            raise JaxeditError(f"{out} holds a {'select' if stage in ('sample', 'filter') else stage} stage run with "
                               f"other options ({'; '.join(diff)}); use another --out, or the same options{hint}")
    if raw != mine:
        stored[stage] = mine
        write_json(path, stored)


def diff_keys(a: dict, b: dict) -> list:
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


TIMED_BARS = {"select: sampling": "select", "localize: tracing": "localize", "edit: runs": "edit",
              "edit: method runs": "edit-methods", "evaluate: runs": "evaluate"}


def stage_bar(total, desc, initial=0, progress=True):
    """The stage's progress bar; the main bar of each stage also times its units for the plan's estimate
    (:mod:`jaxedit.detox.estimate`)."""
    bar = runtime.bar(total, desc, "prompt" if "run" not in desc else "run", initial, enabled=progress)
    return TimedBar(bar, TIMED_BARS[desc]) if desc in TIMED_BARS else bar


def stage_scorer(cfg: DetoxConfig, out: str):
    scorer = get_scorer(cfg.scorer)
    scorer.attach_file(os.path.join(out, f"scores_{re.sub(r'[^A-Za-z0-9_.-]', '_', scorer.name)[-60:]}.jsonl"))
    return scorer


def need_file(out: str, name: str, stage: str) -> str:
    path = os.path.join(out, name)
    if not os.path.isfile(path):
        raise JaxeditError(f"{path} is missing: run the {stage} stage first (--stage {stage})")
    return path


def read_selected(out: str) -> list:
    """The rows the select stage kept (``selected.jsonl``)."""
    return read_rows(need_file(out, "selected.jsonl", "select"))
