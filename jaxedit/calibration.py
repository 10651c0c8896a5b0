"""How long a long command's units of work take on this machine, for the plan it prints before the work.

A stage's progress bar, wrapped in :class:`TimedBar`, times its updates: the first unit (a batch of prompts, an
edit run, a case), timed from the stage's start (:func:`begin`; the compile and any set-up are in it), and the
units after it. :func:`measured` hands the numbers over once the stage ends, and :func:`store` keeps them per
command and key (the model and the settings that set a unit's cost) in ``<cache>/calibration/<command>.json``.
A plan then extrapolates:

    estimate = fixed part (the first unit's seconds beyond one unit's: compile, set-up; once per stage)
               + seconds per later unit x units left (x the unit's size relative to the measured one, where a
                 command scales it)

:func:`extrapolate` is that formula; ``jaxedit detox`` (:mod:`jaxedit.detox.estimate`) and ``jaxedit dinm`` use it.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

from jaxedit.cache import cache_dir
from jaxedit.files import write_json

_clock = time.perf_counter
_measured: dict = {}  # stage -> its start, first update, units and last update in this process (begin, TimedBar)


def begin(stage: str) -> None:
    """The stage starts now: its first unit is timed from here (what the stage does before its bar moves, such as
    the key statistics before the first edit, counts in the first unit)."""
    _measured[stage] = {"begin": _clock(), "first": None, "first_units": 0, "rest_units": 0, "last": None}


class TimedBar:
    """A stage's bar that also times its updates for the stage (several bars of one stage add up); the bar's own
    methods pass through."""

    def __init__(self, bar, stage: str):
        self._bar, self._stage = bar, stage

    def __enter__(self):
        self._bar.__enter__()
        if self._stage not in _measured:  # a stage run on its own: timed from its bar
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


def measured(stage: str) -> Optional[dict]:
    """What this process measured of ``stage`` since :func:`begin` (and forget it): ``first`` (seconds to the first
    update), ``first_units``, ``rest`` (seconds from the first update to the last), ``rest_units``; None when the
    stage did no work."""
    rec = _measured.pop(stage, None)
    if rec is None or rec["first"] is None:
        return None
    return {"first": rec["first"] - rec["begin"], "first_units": rec["first_units"],
            "rest": rec["last"] - rec["first"], "rest_units": rec["rest_units"]}


def model_key(model_name: str) -> str:
    """A model's name in a calibration key: a path made absolute (the same file from another folder), else as given."""
    return os.path.abspath(model_name) if os.path.exists(model_name) else model_name


def setup_key(dtype: str = "float32", mesh=None) -> str:
    """The run's set-up in a calibration key: the weights' dtype and the mesh's shape (a bfloat16 model or a mesh of 8
    devices runs at another speed)."""
    return str(dtype) + (" | mesh " + ",".join(f"{k}={v}" for k, v in dict(mesh.shape).items()) if mesh else "")


def _path(command: str) -> str:
    return os.path.join(cache_dir(), "calibration", f"{command}.json")


def read(command: str) -> dict:
    """Every key's stored measurements for ``command`` ({} when none, or the file is unreadable)."""
    try:
        with open(_path(command)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def store(command: str, key: str, stage: str, rec: dict, unit_size: float = 1.0) -> None:
    """Keep ``rec`` (from :func:`measured`) as ``stage``'s calibration under ``key``: the first unit's seconds, the
    seconds per later unit (a run with one unit only keeps the earlier rate, rescaled to this unit size, when there
    is one) and the unit size it was measured at."""
    allc = read(command)
    entry = allc.setdefault(key, {})
    old = entry.get(stage, {})
    first = rec["first"] / max(rec["first_units"], 1)
    if rec["rest_units"]:
        per = rec["rest"] / rec["rest_units"]
    elif old.get("per_unit") and old.get("unit_size"):
        per = old["per_unit"] * unit_size / old["unit_size"]
    else:
        per = first
    entry[stage] = {"first": round(rec["first"], 2), "first_units": rec["first_units"], "per_unit": round(per, 3),
                    "unit_size": unit_size, "date": time.strftime("%Y-%m-%d")}
    try:
        os.makedirs(os.path.dirname(_path(command)), exist_ok=True)
        write_json(_path(command), allc)
    except OSError:  # an unwritable cache only costs the estimate
        pass


def extrapolate(c: Optional[dict], units: Optional[int], unit_size: float = 1.0) -> Optional[float]:
    """Estimated seconds for ``units`` units from a stored calibration ``c`` (see the module docstring): 0 when
    nothing is left; None without a measurement, or when the units are not known yet."""
    if units is not None and units <= 0:
        return 0.0
    if c is None or units is None:
        return None
    ratio = unit_size / c["unit_size"] if c.get("unit_size") else 1.0
    fixed = max(c["first"] - c["per_unit"] * c.get("first_units", 1), 0.0)
    return fixed + c["per_unit"] * ratio * units


def human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
