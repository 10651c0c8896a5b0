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

Before a stage has ever run on this machine, a plan prices it from its work instead (:func:`from_flops`):

    estimate ~ set-up units x the probe's compile seconds + the stage's FLOPs / the probe's FLOP rate

The stage's FLOPs come from its counts (tokens x :func:`forward_flops` per token, x 3 where a backward pass runs);
:func:`machine` measures, once per machine and model shape, a short probe (about a second: one jitted scan over two
blocks' matmuls of the model's width on 256 tokens) and keeps its FLOP rate and compile seconds in
``<cache>/calibration/machine.json``. The set-up units (how many probe compiles a stage's compiles and set-up cost)
and the rate factors (what fraction of the probe's rate a kind of work reaches) are constants of each command, read
off a measured run on the 2-core CPU machine (``benchmarks/bench_estimate.py``, docs/benchmarks.md).
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


def machine_shared() -> bool:
    """Whether other work shares this machine now: the 1-minute load average above the CPU count plus one (a stage
    running alone keeps it near the CPU count at most). ``$JAXEDIT_MACHINE_SHARED`` ("0" / "1") overrides it."""
    if os.environ.get("JAXEDIT_MACHINE_SHARED") in ("0", "1"):
        return os.environ["JAXEDIT_MACHINE_SHARED"] == "1"
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1) + 1
    except OSError:  # no load average on this platform
        return False


def store(command: str, key: str, stage: str, rec: dict, unit_size: float = 1.0) -> None:
    """Keep ``rec`` (from :func:`measured`) as ``stage``'s calibration under ``key``: the first unit's seconds, the
    seconds per later unit (a run with one unit only keeps the earlier rate, rescaled to this unit size, when there
    is one) and the unit size it was measured at. A measurement taken while other work shared the machine
    (:func:`machine_shared`) does not replace a faster one: a busy hour would otherwise make every later estimate
    several times too long; it is kept, marked ``"shared"``, only where it is the first or faster."""
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
    shared = machine_shared()
    if shared and old.get("per_unit") and old.get("unit_size") and \
            old["per_unit"] * unit_size / old["unit_size"] <= per:
        return
    entry[stage] = {"first": round(rec["first"], 2), "first_units": rec["first_units"], "per_unit": round(per, 3),
                    "unit_size": unit_size, "date": time.strftime("%Y-%m-%d"), **({"shared": True} if shared else {})}
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


def block_flops(cfg, keys: int) -> float:
    """Matmul FLOPs of one block for one token attending to ``keys`` keys (the projections, the MLP, the scores and
    the weighted sum)."""
    proj = 2 * cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = 2 * cfg.d_model * cfg.d_ff * (3 if cfg.family == "llama" else 2)
    return float(proj + mlp + 4 * keys * cfg.n_heads * cfg.head_dim)


def forward_flops(cfg, tokens: float, keys: Optional[float] = None) -> float:
    """Matmul FLOPs of a forward pass over ``tokens`` tokens (each attending to ``keys`` keys, by default the
    sequence's own ``tokens``): every block, and the LM head (2 x d x vocab per token). About 2 x parameters per
    token, the usual count; a backward pass costs twice a forward."""
    keys = tokens if keys is None else keys
    return float(tokens) * (cfg.n_layers * block_flops(cfg, int(keys)) + 2.0 * cfg.d_model * cfg.vocab_size)


_PROBE_TOKENS = 256


def _probe_flops(d: int, ff: int) -> float:
    return 2 * 2 * _PROBE_TOKENS * (4 * d * d + 3 * d * ff)  # two blocks of 4 d x d and 3 d x ff matmuls


def machine_key(cfg) -> str:
    """The machine (host, CPUs, JAX's device) and the probe's shape (the model's width, capped at 2048)."""
    import platform

    import jax

    dev = jax.devices()[0]
    return (f"{platform.node()} | {os.cpu_count()} cpus | {dev.platform} {dev.device_kind} x{jax.device_count()} | "
            f"d {min(cfg.d_model, 2048)} ff {min(cfg.d_ff, 8192)}")


def probe(cfg) -> dict:
    """Measure this machine: jit a scan over two blocks' matmuls (4 d x d and 3 d x d_ff, the model's width capped
    at 2048) on 256 tokens; ``compile`` is the first call's seconds beyond a later one's, ``rate`` the FLOP/s of the
    fastest of three later calls."""
    import jax
    import jax.numpy as jnp

    d, ff = min(cfg.d_model, 2048), min(cfg.d_ff, 8192)
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    wa = jax.random.normal(k[0], (2, 4, d, d), jnp.float32) / d ** 0.5
    wb = jax.random.normal(k[1], (2, 3, d, ff), jnp.float32) / d ** 0.5
    x0 = jax.random.normal(k[2], (_PROBE_TOKENS, d), jnp.float32)

    @jax.jit
    def run(x, wa, wb):
        def block(x, w):
            a, b = w
            for i in range(4):
                x = jnp.tanh(x @ a[i])
            h = jax.nn.silu(x @ b[0]) * (x @ b[1])
            return x + h @ b[2].T, None

        return jax.lax.scan(block, x, (wa, wb))[0].sum()

    t0 = _clock()
    run(x0, wa, wb).block_until_ready()
    first = _clock() - t0
    times = []
    for i in range(3):
        t0 = _clock()
        run(x0 + i, wa, wb).block_until_ready()
        times.append(_clock() - t0)
    best = max(min(times), 1e-6)
    return {"rate": round(_probe_flops(d, ff) / best / 1e9, 3) * 1e9, "compile": round(max(first - best, 0.01), 3),
            "date": time.strftime("%Y-%m-%d")}


_probed: dict = {}  # machine keys probed by this process


def machine(cfg) -> dict:
    """This machine's probe for the model's shape (:func:`probe`), kept in ``<cache>/calibration/machine.json``:
    ``rate`` (FLOP/s) and ``compile`` (seconds). A busy machine probes slow (other jobs take the cores: measured here,
    158.7 GFLOP/s idle against 42.3 under a load average of 6), so each process measures again, once, and the
    fastest rate and compile seen are kept: the estimate is the idle machine's, whatever the load of the first
    plan."""
    key = machine_key(cfg)
    allc = read("machine")
    if key in _probed and key in allc:
        return allc[key]
    new = probe(cfg)
    _probed[key] = True
    old = allc.get(key)
    rec = new if old is None else dict(new, rate=max(old["rate"], new["rate"]),
                                       compile=min(old["compile"], new["compile"]))
    allc[key] = rec
    try:
        os.makedirs(os.path.dirname(_path("machine")), exist_ok=True)
        write_json(_path("machine"), allc)
    except OSError:
        pass
    return rec


def from_flops(flops: float, setup_units: float, probe_rec: dict, rate_factor: float = 1.0) -> float:
    """Seconds for a stage never measured on this machine: ``setup_units`` probe compiles (the stage's compiles and
    set-up) plus its FLOPs at ``rate_factor`` x the probe's rate (see the module docstring)."""
    return setup_units * probe_rec["compile"] + flops / (probe_rec["rate"] * rate_factor)


def human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 600:
        return f"{seconds / 60:.1f} min"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
