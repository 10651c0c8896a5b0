"""How long a study's stages take on this machine, for the plan a run (or ``--dry-run``) prints first.

Each stage's progress bar times its work: the first unit (a batch of prompts, one edit run, one evaluated model),
timed from the stage's start (the compile and any set-up, such as the key statistics, are in it), and the units
after it. When a stage has done work, those times are kept per model in the
jaxedit cache (``<cache>/calibration/detox.json``), with the sizes that set a unit's cost (samples x tokens for
the sampling stages, noisy samples x kinds for tracing). The plan extrapolates them to the work left:

    estimate = fixed part (the first unit's seconds beyond one unit's: compile, set-up; once per stage)
               + seconds per later unit x units left x (this run's unit size / the measured run's unit size)

A model with no measurement yet gets no estimate (the plan says so); the first run of a stage measures it.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

from jaxedit.cache import cache_dir
from jaxedit.detox.config import DetoxConfig
from jaxedit.files import write_json

STAGES_TIMED = ("select", "localize", "edit", "evaluate")
_clock = time.perf_counter
_measured: dict = {}  # stage -> its start, first update, units and last update in this process (begin, TimedBar)


def unit_size(cfg: DetoxConfig, stage: str) -> float:
    """What a unit of ``stage`` costs in proportion to: prompts are the units of select and localize, runs those
    of edit, models those of evaluate. An edit run and an evaluated model handle all selected prompts in batched
    calls, whose cost grew far less than the prompt count in the runs measured (docs/toxicity.md); they are not
    scaled by it."""
    if stage == "select":
        return float(cfg.select_samples * cfg.max_new_tokens)
    if stage == "localize":
        return float(cfg.trace_samples * len(cfg.trace_kinds))
    if stage == "evaluate":
        return float(cfg.eval_samples * cfg.max_new_tokens)
    return 1.0


def begin(stage: str) -> None:
    """The stage starts now: its first unit is timed from here (what the stage does before its bar moves, such as
    the key statistics before the first edit, counts in the first unit)."""
    _measured[stage] = {"begin": _clock(), "first": None, "first_units": 0, "rest_units": 0, "last": None}


class TimedBar:
    """A stage's bar that also times its updates for the stage (see the module docstring; several bars of one stage
    add up); the bar's own methods pass through."""

    def __init__(self, bar, stage: str):
        self._bar, self._stage = bar, stage

    def __enter__(self):
        self._bar.__enter__()
        if self._stage not in _measured:  # a stage run outside run_study: timed from its bar
            begin(self._stage)
        return self

    def update(self, n=1):
        now = _clock()
        rec = _measured.get(self._stage)
        if rec is not None:
            if rec["first"] is None:
                rec["first"], rec["first_units"] = now, n
            else:
                rec["rest_units"] += n
            rec["last"] = now
        return self._bar.update(n)

    def __exit__(self, *exc):
        return self._bar.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._bar, name)


def _path() -> str:
    return os.path.join(cache_dir(), "calibration", "detox.json")


def _key(cfg: DetoxConfig) -> str:
    model = os.path.abspath(cfg.model) if os.path.exists(cfg.model) else cfg.model
    return f"{model} | batch {cfg.batch_size}"


def _read_all() -> dict:
    try:
        with open(_path()) as f:
            return json.load(f)
    except (OSError, ValueError):  # none yet, or unreadable: no estimate
        return {}


def load_calibration(cfg: DetoxConfig) -> dict:
    return _read_all().get(_key(cfg), {})


def record(cfg: DetoxConfig, stage: str) -> None:
    """Keep what this process measured of ``stage`` (if it did any work) as the model's calibration."""
    rec = _measured.pop(stage, None)
    if rec is None or rec["first"] is None:  # nothing done in this run
        return
    rec = {"first": rec["first"] - rec["begin"], "first_units": rec["first_units"], "rest": rec["last"] - rec["first"],
           "rest_units": rec["rest_units"]}
    allc = _read_all()
    entry = allc.setdefault(_key(cfg), {})
    old = entry.get(stage, {})
    first = rec["first"] / max(rec["first_units"], 1)
    if rec["rest_units"]:
        per = rec["rest"] / rec["rest_units"]
    elif old.get("per_unit") and old.get("unit_size"):  # one batch only: the earlier run's rate, rescaled
        per = old["per_unit"] * unit_size(cfg, stage) / old["unit_size"]
    else:
        per = first
    entry[stage] = {"first": round(rec["first"], 2), "first_units": rec["first_units"], "per_unit": round(per, 3),
                    "unit_size": unit_size(cfg, stage), "date": time.strftime("%Y-%m-%d")}
    try:
        os.makedirs(os.path.dirname(_path()), exist_ok=True)
        write_json(_path(), allc)
    except OSError:  # an unwritable cache only costs the estimate
        pass


def stage_seconds(cal: dict, cfg: DetoxConfig, stage: str, units: Optional[int]) -> Optional[float]:
    """Estimated seconds for ``units`` units of ``stage`` (None: no measurement, or the units are not known yet):
    the measured run's fixed part (its first unit's time beyond one unit's: compile, set-up) plus its seconds per
    unit, scaled by the unit's size, for every unit left."""
    if units is not None and units <= 0:
        return 0.0
    c = cal.get(stage)
    if c is None or units is None:
        return None
    ratio = unit_size(cfg, stage) / c["unit_size"] if c.get("unit_size") else 1.0
    fixed = max(c["first"] - c["per_unit"] * c.get("first_units", 1), 0.0)
    return fixed + c["per_unit"] * ratio * units


def human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_lines(cfg: DetoxConfig, units: dict) -> list:
    """The plan's time lines: per stage ``units`` (stage -> units left, None when unknown before an earlier stage
    runs), and the total."""
    cal = load_calibration(cfg)
    if not cal:
        return [f"time: no estimate yet for {cfg.model} at batch size {cfg.batch_size} on this machine (the first "
                f"run of each stage measures it)"]
    parts, total, unknown = [], 0.0, []
    for stage in STAGES_TIMED:
        if stage not in units:
            continue
        s = stage_seconds(cal, cfg, stage, units[stage])
        if s is None:
            unknown.append(stage)
            continue
        total += s
        parts.append(f"{stage} ~{human(s)}")
    if not parts:
        return [f"time: no estimate yet for {', '.join(unknown)} (not measured for {cfg.model} at batch size "
                f"{cfg.batch_size} on this machine, or sized by an earlier stage)"]
    dates = sorted({c["date"] for c in cal.values()})
    line = f"time: ~{human(total)}" + (" + " + ", ".join(unknown) + " (not measured yet, or sized by an earlier "
                                       "stage)" if unknown else "")
    return [line + f" ({', '.join(parts)}; from runs on this machine, {dates[-1]})"]
