"""How long a study's stages take on this machine, for the plan a run (or ``--dry-run``) prints first.

Each stage's progress bar times its work (:mod:`jaxedit.calibration`): the first unit (a batch of prompts, one edit
run, one evaluated model), timed from the stage's start (the compile and any set-up, such as the key statistics,
are in it), and the units after it. The edit stage is timed in two parts, the deletion grid's runs and the DINM /
ProFS runs, whose costs differ by an order of magnitude. When a stage has done work, those times are kept per model,
batch size, dtype and mesh shape in the jaxedit cache (``<cache>/calibration/detox.json``), with the sizes that set
a unit's cost (samples x tokens for the sampling stages, noisy samples x kinds for tracing). The plan extrapolates
them to the work left:

    estimate = fixed part (the first unit's seconds beyond one unit's: compile, set-up; once per stage)
               + seconds per later unit x units left x (this run's unit size / the measured run's unit size)

A model with no measurement yet gets no estimate (the plan says so); the first run of a stage measures it.
"""
from __future__ import annotations

from typing import Optional

from jaxedit import calibration
from jaxedit.calibration import TimedBar, begin, human, setup_key  # noqa: F401  (the stages and the pipeline use them)
from jaxedit.detox.config import DetoxConfig
from jaxedit.model import params_of
from jaxedit.sharding import mesh_of

STAGES_TIMED = ("select", "localize", "edit", "edit-methods", "evaluate")
# the edit stage is timed in two parts: the deletion grid's runs (minutes each) and the DINM / ProFS runs (seconds
# to a minute or two each), so that a plan of one kind is not extrapolated from the other's times
TIMED_PARTS = {"edit": ("edit", "edit-methods")}
SHOWN = {"edit": "edit (deletions)", "edit-methods": "edit (DINM / ProFS)"}


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


def model_setup(model) -> str:
    """:func:`setup_key` of a loaded model."""
    return setup_key(str(params_of(model)["blocks"]["w_out"].dtype), mesh_of(model))


def _key(cfg: DetoxConfig, setup: str) -> str:
    return f"{calibration.model_key(cfg.model)} | batch {cfg.batch_size} | {setup}"


def load_calibration(cfg: DetoxConfig, setup: str = setup_key()) -> dict:
    return calibration.read("detox").get(_key(cfg, setup), {})


def record(cfg: DetoxConfig, stage: str, setup: str = setup_key()) -> None:
    """Keep what this process measured of ``stage`` (if it did any work) as the calibration of this model, batch
    size and set-up."""
    rec = calibration.measured(stage)
    if rec is not None:
        calibration.store("detox", _key(cfg, setup), stage, rec, unit_size(cfg, stage))


def stage_seconds(cal: dict, cfg: DetoxConfig, stage: str, units: Optional[int]) -> Optional[float]:
    """Estimated seconds for ``units`` units of ``stage`` (None: no measurement, or the units are not known yet):
    the measured run's fixed part (its first unit's time beyond one unit's: compile, set-up) plus its seconds per
    unit, scaled by the unit's size, for every unit left."""
    return calibration.extrapolate(cal.get(stage), units, unit_size(cfg, stage))


def estimate_lines(cfg: DetoxConfig, units: dict, setup: str = setup_key()) -> list:
    """The plan's time lines: per stage ``units`` (stage -> units left, None when unknown before an earlier stage
    runs), and the total."""
    cal = load_calibration(cfg, setup)
    if not cal:
        return [f"time: no estimate yet for {cfg.model} at batch size {cfg.batch_size} ({setup}) on this machine "
                f"(the first run of each stage measures it)"]
    parts, total, unknown = [], 0.0, []
    for stage in STAGES_TIMED:
        if stage not in units:
            continue
        s = stage_seconds(cal, cfg, stage, units[stage])
        if s is None:
            unknown.append(stage)
            continue
        total += s
        parts.append(f"{SHOWN.get(stage, stage)} ~{human(s)}")
    unknown = [SHOWN.get(u, u) for u in unknown]
    if not parts:
        return [f"time: no estimate yet for {', '.join(unknown)} (not measured for {cfg.model} at batch size "
                f"{cfg.batch_size} ({setup}) on this machine, or sized by an earlier stage)"]
    dates = sorted({c["date"] for c in cal.values()})
    line = f"time: ~{human(total)}" + (" + " + ", ".join(unknown) + " (not measured yet, or sized by an earlier "
                                       "stage)" if unknown else "")
    return [line + f" ({', '.join(parts)}; from runs on this machine, {dates[-1]})"]
