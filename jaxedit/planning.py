"""Memory plans: what each heavy computation needs per device, for a model shape on a device kind and a mesh, from
XLA's memory analysis of the compiled programs, with no weights allocated.

:func:`plan` lowers the programs jaxedit runs (the causal-tracing grid, saliency, the key-statistics pass, MEMIT's
z optimization, its solve and weight update, AlphaEdit's projected solve) with abstract arguments
(:class:`jax.ShapeDtypeStruct`; the parameter tree from :func:`jaxedit.model.abstract_params`, placed over the mesh
with :func:`jaxedit.sharding.param_shardings`), compiles them, and reads ``compiled.memory_analysis()``: argument,
output, temporary and aliased (donated) bytes. A program's peak per device = arguments + outputs + temporaries -
aliased; programs that do not take the weights (the two solves) add the weights held on the device while they
run. AlphaEdit's projector comes from a float64 eigendecomposition on the host, not compiled: its host memory is
counted from d_ff (``host_eigh_bytes``), as are the other host-side terms (``host``: the statistics held through
an edit, AlphaEdit's state, the buffers of writing the edited model).

Each batched program is compiled for 1 and 2 rows per device (a row: a traced prompt, a saliency example, a text of
the statistics pass, an edit request), then at the counts :func:`fit_guess` proposes until the limit is bracketed
within 2 % (:func:`refine_rows`); the rows that fit are the largest compiled count whose peak stays within the
usable memory (``headroom`` x the device's memory).

Where the programs are compiled: on this process's devices when it has as many as the mesh (a GPU host compiles for
its GPUs: the accelerator's own analysis); otherwise in a child process with that many simulated CPU devices
(``--xla_force_host_platform_device_count``), whose per-device programs are XLA:CPU's: the CPU backend's analysis
stands in for the accelerator's (same shapes and sharding, but a different compiler's fusion and buffer reuse;
docs/scaling.md says how close it came to measured peaks).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from jaxedit import runtime
from jaxedit.calls import check_names
from jaxedit.config import ModelConfig
from jaxedit.edit.alphaedit import PROJECTOR_F2_BYTES
from jaxedit.edit.memit import _add_layer_in_place, _solve_f32, default_layers, hparams_for, optimize_deltas
from jaxedit.edit.stats import accumulate
from jaxedit.errors import JaxeditError
from jaxedit.loading.native import save_reservation_gb
from jaxedit.loading.peek import peek
from jaxedit.locate.saliency import saliency_profiles
from jaxedit.locate.tracing import SPLIT_FLOPS, auto_layers_per_step, row_flops, row_groups, trace_grid
from jaxedit.model import abstract_params, resolve_dtype
from jaxedit.sharding import make_mesh, param_shardings, param_specs, parse_mesh_spec

# Named shapes, as Hugging Face config.json dicts (the published configs' sizes; benchmarks/make_shapes.py writes
# them as checkpoint folders with random weights).
SHAPES = {
    "gpt2-xl": dict(model_type="gpt2", n_layer=48, n_embd=1600, n_head=25, n_positions=1024, vocab_size=50257,
                    activation_function="gelu_new", layer_norm_epsilon=1e-5),
    "llama-3.2-1b": dict(model_type="llama", num_hidden_layers=16, hidden_size=2048, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-2-7b": dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=False),
    "llama-3-8b": dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                       tie_word_embeddings=False),
    "llama-2-13b": dict(model_type="llama", num_hidden_layers=40, hidden_size=5120, num_attention_heads=40,
                        num_key_value_heads=40, intermediate_size=13824, vocab_size=32000,
                        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                        tie_word_embeddings=False),
    "llama-3-70b": dict(model_type="llama", num_hidden_layers=80, hidden_size=8192, num_attention_heads=64,
                        num_key_value_heads=8, intermediate_size=28672, vocab_size=128256,
                        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                        tie_word_embeddings=False),
}

MIB = 2**20
GIB = 2**30
# device kinds: the memory a process sees (nvidia-smi's total; the CPU kind is this project's 24 GiB machine)
DEVICES = {"h100-80g": 81559 * MIB, "h200-141g": 143771 * MIB, "a100-40g": 40960 * MIB, "cpu-24g": 24 * GIB}
HEADROOM = 0.9  # the fraction of a device's memory a plan may fill (the rest: runtime, allocator, fragmentation)
PROGRAMS = ("trace", "saliency", "statistics", "z step", "solve", "update", "projected solve")
# Host memory no compiled program holds, counted from the shape (the "host" entry of the report):
#   statistics: the key statistics C of every edited layer (d_ff^2 float32 each), held through an edit;
#   alphaedit state: AlphaEdit's sequence state, P and C_p of every edited layer (2 d_ff^2 float32 each);
#   eigendecomposition: alphaedit.PROJECTOR_F2_BYTES d_ff^2 while one layer's projector is made (a float64
#   eigendecomposition of C on the host: C's float64 copy, which LAPACK's MRRR solver overwrites, and the
#   eigenvectors);
#   save: orbax's reservation for the arrays it writes at once (jaxedit.save bounds it by the largest array,
#   rounded up to whole GB).
UNITS = {"trace": "prompt", "saliency": "example", "statistics": "text", "z step": "request"}
MAX_ROWS = 1 << 16
# The rows that fit are found on compiled programs, not on the line through 1 and 2 rows: as rows grow a program's
# peak can move to another instruction with a larger cost per row (the statistics' k k^T product holds copies of
# the keys that a one-row program's peak, in the MLP, does not see: 25 MiB a text against the line's 4.6 on
# Llama-3-8B). Each guess is compiled and the line redrawn through the compiled counts nearest the limit, with a
# bisection floor so that a line bent by a far kink cannot creep (fit_guess).
REFINE_COMPILES = 8

VALID = ("device_memory", "mesh", "dtype", "headroom", "trace_tokens", "samples", "kinds", "stats_len",
         "stats_layers", "saliency_tokens", "z_rows", "z_tokens", "requests", "memory_budget", "refuse", "progress",
         "search")

WORKER_ENV = "JAXEDIT_PLAN_WORKER"


# ---------------------------------------------------------------------------------------------- inputs

def parse_bytes(text) -> int:
    """"24GiB", "80G", "80GB" (GB = 10^9), "20e9", 1234 -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(i?)(b?)", s.lower())
    if not m or (m.group(3) and not m.group(2)):
        raise JaxeditError(f"bad device memory {text!r}: expected bytes such as 24GiB, 80GB or 20e9, or a device "
                           f"kind ({', '.join(DEVICES)})")
    value, unit, binary, _ = m.groups()
    base = 1024 if binary or (unit and not m.group(4)) else 1000  # "80G" / "80GiB": binary; "80GB": decimal
    return int(float(value) * base ** " kmgt".index(unit or " "))


def device_bytes(device_memory) -> tuple:
    """(name, bytes) of a device kind or a byte count."""
    if isinstance(device_memory, str) and device_memory.strip().lower() in DEVICES:
        name = device_memory.strip().lower()
        return name, DEVICES[name]
    n = parse_bytes(device_memory)
    if n <= 0:
        raise JaxeditError(f"bad device memory {device_memory!r}: must be positive")
    return f"{n / GIB:.1f} GiB", n


def resolve_config(model) -> tuple:
    """(name, ModelConfig) of a model, a ModelConfig, a Hugging Face config dict, a named shape, a checkpoint
    folder, a config.json file, a GGUF file or a model name :func:`jaxedit.load` accepts (config only)."""
    if isinstance(model, ModelConfig):
        return "config", model
    if isinstance(model, dict):
        return model.get("_name_or_path") or "config", ModelConfig.from_hf(model)
    if hasattr(model, "config") and isinstance(getattr(model, "config"), ModelConfig):
        return "model", model.config
    name = str(model)
    key = name.strip().lower()
    if key in SHAPES:
        return key, ModelConfig.from_hf(SHAPES[key])
    if os.path.isfile(name) and name.endswith(".json"):
        try:
            with open(name) as f:
                return name, ModelConfig.from_hf(json.load(f))
        except ValueError as e:
            raise JaxeditError(f"{name}: not a JSON config ({e})") from None
    if os.path.exists(name) or key == "smollm2":

        config, _ = peek(name, tokenizer=False)
        if config is not None:
            return name, config
    raise JaxeditError(f"unknown model shape {name!r}: name one of {', '.join(SHAPES)}, or give a checkpoint "
                       f"folder, a config.json or a .gguf file")


def mesh_sizes(mesh) -> dict:
    """{"data": D, "model": m} of a spec ("data=2,model=4", "model=8": data=1), a dict, a Mesh, or None."""

    if mesh is None:
        return {"data": 1, "model": 1}
    if hasattr(mesh, "shape") and hasattr(mesh, "axis_names"):
        return {"data": int(mesh.shape["data"]), "model": int(mesh.shape["model"])}
    sizes = dict(mesh) if isinstance(mesh, dict) else parse_mesh_spec(str(mesh))
    return {"data": int(sizes.get("data", 1)), "model": int(sizes.get("model", 1))}


def mesh_name(sizes: dict) -> str:
    return f"data={sizes['data']},model={sizes['model']}"


def check_mesh(cfg: ModelConfig, sizes: dict) -> None:
    """One-line errors for a model axis that does not divide the heads, d_ff, or both vocabulary and d_model."""

    class _Sizes:  # param_specs reads mesh.shape["model"] only
        shape = sizes

    param_specs(cfg, _Sizes if sizes["model"] > 1 else None, abstract_params(cfg))


def model_axes(cfg: ModelConfig, most: int = 64) -> list:
    """The model-axis sizes this shape can be split over (dividing the key/value heads and d_ff), up to ``most``."""
    out = []
    for m in range(1, most + 1):
        if cfg.n_kv_heads % m == 0 and cfg.d_ff % m == 0 and (cfg.vocab_size % m == 0 or cfg.d_model % m == 0):
            out.append(m)
    return out


# ---------------------------------------------------------------------------------------------- sizes

def settings_of(cfg: ModelConfig, kw: dict) -> dict:
    """The plan's workload (defaults: the issue's end-to-end run)."""

    s = dict(trace_tokens=10, samples=10, kinds=("hidden", "mlp", "attn"), stats_len=128, stats_layers=5,
             saliency_tokens=16, z_rows=6, z_tokens=32, requests=1, memory_budget=None, dtype="float32")
    s.update({k: v for k, v in kw.items() if k in s and v is not None})
    s["kinds"] = tuple(s["kinds"])
    layers = default_layers(cfg)
    n = min(int(s["stats_layers"]), cfg.n_layers)
    start = min(layers[0], cfg.n_layers - n)
    s["layers"] = tuple(range(start, start + n))
    return s


def param_bytes(cfg: ModelConfig, dtype: str, sizes: dict) -> tuple:
    """(total bytes of the parameters, the most any device holds) on a mesh of ``sizes``."""
    import jax
    import numpy as np


    abstract = abstract_params(cfg, dtype)
    total = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(abstract))
    m = sizes["model"]

    class _Sizes:
        shape = sizes

    specs = param_specs(cfg, _Sizes if m > 1 else None, abstract)
    per = 0
    from jax.sharding import PartitionSpec as P

    for a, spec in zip(jax.tree.leaves(abstract), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        shape = list(a.shape)
        for i, ax in enumerate(tuple(spec)):
            if ax == "model":
                shape[i] = -(-shape[i] // m)
        per += int(np.prod(shape)) * a.dtype.itemsize
    return total, per


def host_bytes(cfg: ModelConfig, settings: dict) -> dict:
    """Host memory beside the compiled programs (see the note above UNITS), in bytes."""
    import jax
    import numpy as np

    f, n = cfg.d_ff, len(settings["layers"])
    largest = max(int(np.prod(a.shape)) * a.dtype.itemsize
                  for a in jax.tree.leaves(abstract_params(cfg, settings["dtype"])))
    return {"statistics": 4 * n * f * f, "alphaedit state": 2 * 4 * n * f * f,
            "eigendecomposition": PROJECTOR_F2_BYTES * f * f, "save": save_reservation_gb(largest) * 10**9}


def _peak(m) -> dict:
    out = dict(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
               temp=int(m.temp_size_in_bytes), alias=int(m.alias_size_in_bytes))
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def fit_guess(points: dict, usable: float):
    """(rows to compile next or None, the largest compiled count that fits or 0, bytes per row of the line used)
    from compiled ``points`` {rows: peak bytes}. With a compiled count above the largest that fits (``lo``), the
    limit lies between them: None once they are within 2 % (or one row) of each other, else the count where the line
    through the two meets ``usable``, but at least a quarter of the way up (the line through a far kink is steep and
    would creep). With none above: the line through ``lo`` and the count below it, extended to ``usable`` (None when
    it puts the limit within 2 % of ``lo``, or when the peak does not grow: MAX_ROWS by the line)."""
    good = [r for r in points if points[r] <= usable]
    if not good:
        two = sorted(points)[:2]
        slope = (points[two[1]] - points[two[0]]) / (two[1] - two[0]) if len(two) == 2 else None
        return None, 0, slope
    lo = max(good)
    above = [r for r in points if r > lo]
    tol = max(1, lo // 50)
    if above:
        hi = min(above)
        slope = (points[hi] - points[lo]) / (hi - lo)
        if hi - lo <= tol:
            return None, lo, slope
        guess = lo + int((usable - points[lo]) // slope) if slope > 0 else hi - 1
        guess = min(max(guess, lo + (hi - lo) // 4, lo + 1), hi - 1)
        return guess, lo, slope
    below = [r for r in points if r < lo]
    if not below:
        return None, lo, None
    other = max(below)
    slope = (points[lo] - points[other]) / (lo - other)
    if slope <= 0:
        return None, lo, 0.0
    guess = min(lo + int((usable - points[lo]) // slope), MAX_ROWS)
    return (guess if guess - lo > tol else None), lo, slope


def refine_rows(peak_at, points: dict, usable: float, compiles: int = REFINE_COMPILES) -> dict:
    """Add to ``points`` {rows: peak} the counts :func:`fit_guess` proposes, ``peak_at(rows)`` each, until it
    proposes none or after ``compiles`` of them (a count that fails to compile ends the search: the counts so far
    stand)."""
    for _ in range(compiles):
        guess, _, _ = fit_guess(points, usable)
        if guess is None:
            break
        try:
            points[guess] = peak_at(guess)
        except Exception:  # e.g. a program too large for the compiler at that count
            break
    return points


def rows_that_fit(points: dict, usable: float, refined: bool = True) -> tuple:
    """(rows per device, bytes per row) from compiled ``points``: the largest compiled count that fits when
    :func:`refine_rows` ran on them (MAX_ROWS when the peak does not grow with the rows), else (``refined=False``)
    the line's count beyond the largest."""
    _, lo, slope = fit_guess(points, usable)
    above = any(r > lo for r in points)
    if lo and not above and slope is not None and slope <= 0:
        return MAX_ROWS, 0
    fit = lo
    if not refined and lo and not above and slope:
        fit = lo + int((usable - points[lo]) // slope)
    return min(fit, MAX_ROWS), int(max(0.0, slope or 0.0))


def program_bytes(cfg: ModelConfig, sizes: dict, settings: dict, programs=PROGRAMS, rows=(1, 2)) -> dict:
    """{program: {rows: memory analysis dict}} of the compiled per-device programs; needs data x model devices in
    this process. ``rows``: per-device rows of the batched programs. With ``settings["usable"]`` (bytes per device)
    the batched programs are also compiled at the row counts :func:`fit_guess` proposes, up to
    ``REFINE_COMPILES`` more, so that the rows that fit are a compiled count."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P


    D, m = sizes["data"], sizes["model"]
    n_dev = D * m
    if len(jax.devices()) < n_dev:
        raise JaxeditError(f"mesh {mesh_name(sizes)} needs {n_dev} devices, but {len(jax.devices())} are visible")
    mesh = None if n_dev == 1 else make_mesh(mesh_name(sizes), devices=jax.devices()[:n_dev])
    dtype = settings["dtype"]
    abstract = abstract_params(cfg, dtype)
    act = abstract["blocks"]["w_out"].dtype
    sds = jax.ShapeDtypeStruct
    if mesh is None:
        params = abstract
        data = lambda shape, dt, axis=0: sds(shape, dt)  # noqa: E731
        rep = lambda shape, dt: sds(shape, dt)  # noqa: E731
    else:
        params = jax.tree.map(lambda a, s: sds(a.shape, a.dtype, sharding=s), abstract,
                              param_shardings(cfg, mesh, abstract))

        def data(shape, dt, axis=0):
            spec = [None] * len(shape)
            spec[axis] = "data"
            return sds(shape, dt, sharding=NamedSharding(mesh, P(*spec)))

        rep = lambda shape, dt: sds(shape, dt, sharding=NamedSharding(mesh, P()))  # noqa: E731
    d, f, L = cfg.d_model, cfg.d_ff, cfg.n_layers
    budget = settings["memory_budget"] or 2 * GIB
    out: dict = {}

    usable = settings.get("usable")

    def analyse(name, fn, at=None):
        """``fn(r)``: the program lowered at r rows; or ``at(r)``: its memory analysis dict."""
        at = at or (lambda r: _peak(fn(r).compile().memory_analysis()))
        res = {}
        for r in (rows if name in UNITS else (1,)):
            runtime.stage(f"compiling {name} ({r} row{'s' * (r > 1)} per device) on {mesh_name(sizes)}")
            res[r] = at(r)
        if name in UNITS and usable:
            def peak_at(r):
                runtime.stage(f"compiling {name} ({r} rows per device, near the limit) on {mesh_name(sizes)}")
                res[r] = at(r)
                return res[r]["peak"]

            refine_rows(peak_at, {r: v["peak"] for r, v in res.items()}, usable)
        out[name] = res

    if "trace" in programs:
        T, S = int(settings["trace_tokens"]), int(settings["samples"])
        groups = tuple(tuple(g) for g in row_groups(T, S, cfg, budget, 0))
        static = dict(window=10, replace=False, method="shared", groups=groups,
                      layers_per_step=auto_layers_per_step(cfg, S, T, groups, budget),
                      cells_per_step=max(1, int(budget // (8 * S * T * (f + 4 * d)))))
        kinds = settings["kinds"]

        def lower_trace(r, kinds_):
            B = r * D
            return trace_grid.lower(cfg, params, data((B, T), jnp.int32), data((B,), jnp.int32),
                                    data((B, T), jnp.bool_), data((B, S, T, d), jnp.float32), data((B,), jnp.int32),
                                    kinds=kinds_, **static)

        split = D * S * L * T * (T + 1) / 2 * row_flops(cfg, 2 * T) > SPLIT_FLOPS
        parts = [(k,) for k in kinds] if split else [kinds]

        def trace_at(r):  # split: one program per kind, the largest counts
            best = None
            for part in parts:
                runtime.stage(f"compiling trace {', '.join(part)} ({r} prompt{'s' * (r > 1)} per device) on "
                              f"{mesh_name(sizes)}")
                one = _peak(lower_trace(r, part).compile().memory_analysis())
                if best is None or one["peak"] > best["peak"]:
                    best = one
            return best

        analyse("trace", None, trace_at)
        out["trace_split"] = split

    if "saliency" in programs:
        Ts = int(settings["saliency_tokens"])

        def sal(r):
            if mesh is None:
                x = [sds((r, Ts), dt) for dt in (jnp.int32, jnp.int32, jnp.bool_)]
            else:
                x = [data((1, r * D, Ts), dt, axis=1) for dt in (jnp.int32, jnp.int32, jnp.bool_)]
            return saliency_profiles.lower(cfg, params, *x, chunk=r)

        analyse("saliency", sal)

    if "statistics" in programs:
        Tt, layers = int(settings["stats_len"]), tuple(settings["layers"])

        def stats(r):
            if mesh is None:
                acc = sds((len(layers), f, f), jnp.float32)
                ids = sds((r, Tt), jnp.int32)
            else:
                acc = sds((D, len(layers), f, f), jnp.float32,
                          sharding=NamedSharding(mesh, P("data", None, "model" if f % m == 0 else None)))
                ids = data((D, r, Tt), jnp.int32)
            return accumulate.lower(cfg, params, ids, ids, acc, layers=layers)

        analyse("statistics", stats)

    hp = hparams_for(cfg)
    if "z step" in programs:
        R, Tz, K = int(settings["z_rows"]) + 1, int(settings["z_tokens"]), 4
        layer = settings["layers"][-1]

        def zstep(r):
            n = r * D
            return optimize_deltas.lower(
                cfg, params, data((n, R, Tz, d), act), data((n, R, Tz), jnp.int32), data((n, R), jnp.int32),
                data((n, R, K), jnp.int32), data((n, R, K), jnp.int32), data((n, R, K), jnp.float32),
                data((n, d), act), layer=layer, mode="edit", steps=hp.v_num_grad_steps, lr=hp.v_lr,
                weight_decay=hp.v_weight_decay, clamp_factor=hp.clamp_norm_factor, kl_factor=hp.kl_factor,
                stop_loss=hp.early_stop_loss, window=Tz // 2)

        analyse("z step", zstep)

    row_spec = P("model", None) if (m > 1 and f % m == 0) else P()
    square = sds((f, f), jnp.float32)

    def lower_solve(N, M, Cp):  # memit.solve_update's device program, replicated, dW placed by rows
        n = int(settings["requests"])
        args = (sds((f, n), jnp.float32), sds((d, n), jnp.float32), sds((), jnp.float32), N, M, Cp)
        if mesh is None:
            return jax.jit(_solve_f32).lower(*args)
        r = NamedSharding(mesh, P())
        return jax.jit(_solve_f32, in_shardings=r, out_shardings=(NamedSharding(mesh, row_spec), r)).lower(*args)

    if "solve" in programs:  # MEMIT's: N = C
        analyse("solve", lambda _: lower_solve(square, None, None))

    if "update" in programs:
        w = params["blocks"]["w_out"]
        shard = w.shape if mesh is None else w.sharding.shard_shape(w.shape)
        out["w_out_bytes"] = int(np.prod(shard)) * w.dtype.itemsize

        def update(_):
            dW = sds((f, d), jnp.float32) if mesh is None else sds((f, d), jnp.float32,
                                                                   sharding=NamedSharding(mesh, row_spec))
            # the command line's update adds into the model's own projection (donate=True; without it, one more
            # stacked projection: w_out_bytes)
            return _add_layer_in_place.lower(w, dW, rep((), jnp.int32))

        analyse("update", update)

    if "projected solve" in programs:  # AlphaEdit's: M = P and C_p (d_ff x d_ff each) on the device
        analyse("projected solve", lambda _: lower_solve(None, square, square))
        out["host_eigh_bytes"] = PROJECTOR_F2_BYTES * f * f
    return out


# ---------------------------------------------------------------------------------------------- compile where

def _worker_payload(cfg: ModelConfig, sizes: dict, settings: dict, programs) -> dict:
    return {"config": json.loads(cfg.to_json()), "sizes": sizes, "settings": dict(settings, kinds=list(settings["kinds"]),
                                                                                     layers=list(settings["layers"])),
            "programs": list(programs)}


def measure(cfg: ModelConfig, sizes: dict, settings: dict, programs=PROGRAMS) -> tuple:
    """(program_bytes(...), platform): in this process when it has the devices, else in a child process with
    data x model simulated CPU devices."""
    import jax

    n = sizes["data"] * sizes["model"]
    if len(jax.devices()) >= n and (n == 1 or jax.default_backend() != "cpu" or len(jax.devices()) == n):
        return program_bytes(cfg, sizes, settings, programs), jax.devices()[0].platform
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{WORKER_ENV: "1"})
    env["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""),
                                              f"--xla_force_host_platform_device_count={n}"]))
    runtime.stage(f"compiling the programs for {mesh_name(sizes)} in a process with {n} simulated CPU devices")
    proc = subprocess.run([sys.executable, "-m", "jaxedit.planning"], input=json.dumps(
        _worker_payload(cfg, sizes, settings, programs)), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise JaxeditError(f"compiling the plan's programs for {mesh_name(sizes)} failed: {last}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    fix = lambda v: {int(k): x for k, x in v.items()} if isinstance(v, dict) else v  # noqa: E731
    return {k: fix(v) for k, v in res.items()}, "cpu"


def _worker_main() -> None:
    payload = json.loads(sys.stdin.read())
    cfg = ModelConfig.from_json(json.dumps(payload["config"]))
    settings = dict(payload["settings"], kinds=tuple(payload["settings"]["kinds"]),
                    layers=tuple(payload["settings"]["layers"]))
    runtime.set_progress(False)
    res = program_bytes(cfg, payload["sizes"], settings, tuple(payload["programs"]))
    print(json.dumps(res))


# ---------------------------------------------------------------------------------------------- the plan

def _summarize(name, cfg, settings, sizes, dev_name, dev_bytes, headroom, measured, platform) -> dict:
    total, per = param_bytes(cfg, settings["dtype"], sizes)
    usable = headroom * dev_bytes
    D = sizes["data"]
    progs = {}
    for prog in PROGRAMS:
        if prog not in measured:
            continue
        res = measured[prog]
        one = dict(res[1])
        if prog in ("solve", "projected solve"):  # the weights stay on the device meanwhile
            one["peak"] += per
        elif prog == "update":  # the other parameters stay too
            one["peak"] += per - measured["w_out_bytes"]
        entry = dict(one, unit=UNITS.get(prog))
        if prog in UNITS:
            points = {int(r): v["peak"] for r, v in res.items()}
            fit, entry["per_row"] = rows_that_fit(points, usable, refined=bool(settings.get("usable")))
            entry["compiled"] = {r: points[r] for r in sorted(points)}  # {rows: peak} of every compiled count
            entry["rows_per_device"] = fit
            entry["batch"] = fit * D
        entry["fits"] = one["peak"] <= usable
        progs[prog] = entry
    fits = per <= usable and all(p["fits"] for p in progs.values())
    return {"model": name, "family": cfg.family, "layers": cfg.n_layers, "d_model": cfg.d_model, "d_ff": cfg.d_ff,
            "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads, "vocab": cfg.vocab_size, "dtype": settings["dtype"],
            "device": dev_name, "device_memory": int(dev_bytes), "usable": int(usable), "headroom": headroom,
            "mesh": mesh_name(sizes), "devices": sizes["data"] * sizes["model"], "parameters": int(total),
            "parameters_per_device": int(per), "programs": progs, "fits": bool(fits),
            "host_eigh_bytes": measured.get("host_eigh_bytes"),
            "host": host_bytes(cfg, settings),
            "analysis": ("nothing compiled (the weights alone do not fit)" if platform == "none" else
                         "XLA:CPU (standing in for the accelerator)" if platform == "cpu" and not dev_name.startswith(
                             "cpu") else f"XLA:{platform.upper()}"),
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}}


def plan(model, **kw) -> dict:
    """The memory plan of ``model`` (a named shape: ``gpt2-xl``, ``llama-3.2-1b``, ``llama-2-7b``, ``llama-3-8b``,
    ``llama-2-13b``, ``llama-3-70b``; a checkpoint folder, a config.json, a .gguf file, a loaded model, a
    :class:`ModelConfig` or a config dict) on ``device_memory`` (a kind: ``h100-80g``, ``h200-141g``, ``a100-40g``,
    ``cpu-24g``; or bytes, "80GiB") per device and ``mesh`` ("data=2,model=4", "model=8"; default one device).

    Keywords: ``dtype`` ("float32" / "bfloat16" parameters), ``headroom`` (fraction of the memory a plan may fill,
    0.9), the workload: ``trace_tokens`` (10), ``samples`` (10), ``kinds``, ``stats_len`` (128), ``stats_layers``
    (5), ``saliency_tokens`` (16), ``z_rows`` (6 contexts), ``z_tokens`` (32), ``requests`` (1, the solve's keys),
    ``memory_budget`` (tracing's chunk budget; default 2 GiB as on CPU); ``refuse`` (True: raise a one-line
    :class:`JaxeditError` naming the smallest mesh that fits when this one does not; False: return the report
    with ``fits`` False); ``search`` (True: with ``refuse``, compile larger model axes to find that mesh).

    Returns a dict: the shape, ``parameters_per_device``, ``programs`` {name: argument / output / temp / alias /
    peak bytes per device at one row, ``per_row`` (bytes per row of the line through the compiled counts nearest
    the limit), ``compiled`` ({rows: peak} of every count compiled), ``rows_per_device`` and ``batch`` (the largest
    compiled count that fits, per device and over the data axis), ``fits``}, ``fits``; :func:`format_plan` prints
    it as a table."""
    kw = check_names(kw, VALID, what="plan option")
    progress = kw.pop("progress", True)
    with runtime.progress_scope(progress):
        return _plan(model, **kw)


def _plan(model, device_memory="h100-80g", mesh=None, dtype="float32", headroom=HEADROOM, refuse=True, search=True,
          **work):

    name, cfg = resolve_config(model)
    resolve_dtype(dtype)
    dev_name, dev_bytes = device_bytes(device_memory)
    if not 0 < float(headroom) <= 1:
        raise JaxeditError(f"headroom must be in (0, 1] (got {headroom})")
    sizes = mesh_sizes(mesh)
    check_mesh(cfg, sizes)
    settings = settings_of(cfg, dict(work, dtype=dtype))
    if settings["memory_budget"] is None and not dev_name.startswith("cpu"):
        settings["memory_budget"] = dev_bytes / 4  # tracing's chunk budget on an accelerator (runtime's rule)
    usable = headroom * dev_bytes
    settings["usable"] = usable  # the batched programs are compiled near the rows that fit (refine_rows)
    total, per = param_bytes(cfg, dtype, sizes)
    if per > usable and refuse:
        about = f"{dev_name} ({dev_bytes / GIB:.1f} GiB, " if dev_name in DEVICES else f"{dev_name} ("
        raise JaxeditError(f"device memory {about}{usable / GIB:.1f} usable) is below "
                           f"{name}'s {dtype} weights per device on {mesh_name(sizes)} ({per / GIB:.1f} GiB): "
                           f"{_smallest_hint(cfg, settings, sizes, dev_bytes, headroom, search=False)}")
    runtime.stage(f"planning {name} ({dtype}) on {dev_name} x {mesh_name(sizes)}")
    if per > usable:  # refuse=False: the weights alone do not fit; nothing is compiled
        return _summarize(name, cfg, settings, sizes, dev_name, dev_bytes, headroom, {}, "none")
    measured, platform = measure(cfg, sizes, settings)
    report = _summarize(name, cfg, settings, sizes, dev_name, dev_bytes, headroom, measured, platform)
    if not report["fits"] and refuse:
        worst = max(report["programs"].items(), key=lambda kv: kv[1]["peak"])
        raise JaxeditError(f"{name} does not fit {dev_name} on {mesh_name(sizes)}: {worst[0]} needs "
                           f"{worst[1]['peak'] / GIB:.1f} GiB per device of {usable / GIB:.1f} usable; "
                           f"{_smallest_hint(cfg, settings, sizes, dev_bytes, headroom, search=search)}")
    return report


def _smallest_hint(cfg, settings, sizes, dev_bytes, headroom, search=True) -> str:
    """"the smallest mesh that fits is model=4 (4 devices)"; with ``search``, candidates are compiled."""
    usable = headroom * dev_bytes
    for m in model_axes(cfg):
        if m <= sizes["model"]:
            continue
        cand = {"data": 1, "model": m}
        if param_bytes(cfg, settings["dtype"], cand)[1] > usable:
            continue
        if not search:
            return f"the smallest mesh whose weights fit is model={m} ({m} devices; its programs not checked)"
        one_row = dict(settings, usable=None)  # only whether one row fits: no search for the rows that fit
        measured, platform = measure(cfg, cand, one_row)
        rep = _summarize("", cfg, one_row, cand, "", dev_bytes, headroom, measured, platform)
        if rep["fits"]:
            return f"the smallest mesh that fits is model={m} ({m} devices)"
    return f"no model axis up to {model_axes(cfg)[-1]} fits (model axes this shape allows: {model_axes(cfg)})"


def format_plan(report: dict) -> str:
    """The report as lines: a header and a markdown table of the programs."""
    g = lambda b: f"{b / GIB:,.2f}"  # noqa: E731
    head = (f"{report['model']}: {report['family']}, {report['layers']} layers, d_model {report['d_model']}, d_ff "
            f"{report['d_ff']}, heads {report['heads']} (kv {report['kv_heads']}), vocab {report['vocab']}, "
            f"{report['dtype']}\n"
            f"device {report['device']} ({g(report['device_memory'])} GiB, {g(report['usable'])} usable) x "
            f"{report['mesh']}; parameters {g(report['parameters'])} GiB, {g(report['parameters_per_device'])} GiB "
            f"per device; bytes from {report['analysis']}'s memory analysis of the compiled per-device programs")
    rows = ["| program | peak / device, 1 row (GiB) | arguments | outputs | temporaries | per extra row (GiB) | "
            "rows / device that fit | batch (x data) | fits |", "|---|---|---|---|---|---|---|---|---|"]
    for name, p in report["programs"].items():
        unit = p.get("unit")
        rows.append(f"| {name} | {g(p['peak'])} | {g(p['argument'])} | {g(p['output'])} | {g(p['temp'])} | "
                    + (f"{p['per_row'] / GIB:,.3f} | {p['rows_per_device']} {unit}s | {p['batch']} | "
                       if unit else "— | — | — | ")
                    + ("yes" if p["fits"] else "no") + " |")
    verdict = "fits" if report["fits"] else "does NOT fit"
    host = []
    if report.get("host"):
        h = report["host"]
        host = ["", f"host memory beside the programs: the key statistics of the {len(report['settings']['layers'])} "
                    f"edited layers, held through an edit, {g(h['statistics'])} GiB; AlphaEdit's state (P and C_p of "
                    f"those layers) {g(h['alphaedit state'])} GiB; its projector's float64 eigendecomposition (one "
                    f"layer at a time) {g(h['eigendecomposition'])} GiB; writing the edited model (orbax's buffers) "
                    f"about {g(h['save'])} GiB"]
    return "\n".join([head, ""] + rows + host + ["", f"plan: {verdict}"])


if __name__ == "__main__" and os.environ.get(WORKER_ENV):
    _worker_main()
