"""jaxedit's own directory format: ``jaxedit.json`` (the config) and the tokenizer files, with the stacked
parameters under their internal names either in ``params.safetensors`` (the cache of converted models; loads in
seconds) or in an orbax checkpoint ``params/`` (:func:`save`: edited models; restored to the same dtypes).
Both are written into a temporary sibling directory and renamed into place, so a reader never sees half a model."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile

import jax
import numpy as np

from jaxedit.config import ModelConfig
from jaxedit.errors import JaxeditError
from jaxedit.loading.convert import assemble, cast_params, flat_params, unflat_params
from jaxedit.model import abstract_params, model_from_params, params_of, resolve_dtype
from jaxedit.sharding import is_main_process, param_shardings, sync

MARKER = "jaxedit.json"
FORMAT_VERSION = 1


def is_native_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_temps(parent: str) -> None:
    """Temporary directories left by a process that was killed or interrupted while writing (their writer's pid is
    in the name and no longer runs): removed, since nothing will ever rename them into place."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        parts = name.split("-")
        if name.startswith(".tmp-") and len(parts) >= 3 and parts[1].isdigit() and not _alive(int(parts[1])):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yield a temporary sibling directory of ``path``; on success it replaces ``path``, on failure it is removed
    (and one left by a killed process is removed by the next writer in the same folder)."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temps(parent)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=parent)
    try:
        yield tmp
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_reservation_gb(largest_bytes: int) -> int:
    """The host memory (whole GB) :func:`save_native` lets orbax reserve for the arrays it writes at once: the
    largest array, rounded up (orbax refuses an array larger than its reservation). Saving Llama-3.2-1B's shape
    (4.6 GiB) peaked at +2.4 GiB over the loaded model with it, +3.5 with orbax's default (96 GB)."""
    return max(1, math.ceil(largest_bytes / 1e9))


def save_native(model, tokenizer, path: str, extra: dict | None = None, orbax: bool = False) -> None:
    """Write atomically: into a temporary sibling directory, then rename. ``orbax``: the parameters as an orbax
    checkpoint (``params/``) instead of one safetensors file."""
    from safetensors.numpy import save_file

    if orbax and jax.process_count() > 1:
        return _save_orbax_processes(model, tokenizer, path, extra)
    with atomic_dir(path) as tmp:
        if orbax:
            import orbax.checkpoint as ocp

            params = params_of(model)
            largest = max(x.nbytes for x in jax.tree.leaves(params))
            handler = ocp.StandardCheckpointHandler(save_concurrent_gb=save_reservation_gb(largest))
            with ocp.Checkpointer(handler) as ckpt:
                ckpt.save(os.path.join(tmp, "params"), params)
        else:
            flat = {k: np.asarray(jax.device_get(v)) for k, v in flat_params(params_of(model)).items()}
            save_file(flat, os.path.join(tmp, "params.safetensors"))
        _write_meta(model, tokenizer, tmp, extra, orbax)


def _write_meta(model, tokenizer, tmp, extra, orbax):
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    meta = {"format_version": FORMAT_VERSION, "params": "orbax" if orbax else "safetensors",
            "config": json.loads(model.config.to_json()), **(extra or {})}
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump(meta, f, indent=1)


def _save_orbax_processes(model, tokenizer, path: str, extra) -> None:
    """The orbax save of a model whose shards live on several processes (a shared filesystem): every process
    writes its own shards into one temporary sibling directory; process 0 adds the rest and renames it."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}-saving")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    sync("jaxedit-save-start")
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(tmp, "params"), params_of(model))
        ckpt.wait_until_finished()
    sync("jaxedit-save-params")
    if is_main_process():
        _write_meta(model, tokenizer, tmp, extra, True)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    sync("jaxedit-save-done")


def load_native_tokenizer(path: str):
    """The tokenizer saved beside the parameters (a fast tokenizer; skips the slower AutoTokenizer import)."""
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return None
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)


def load_native(path: str, dtype=None, mesh=None):
    """``mesh``: restore straight into the sharded placement (each device's shards read on their own: orbax reads
    the checkpoint's chunks each shard needs; the safetensors cache is read block by block)."""
    from safetensors.numpy import load_file

    with open(os.path.join(path, MARKER)) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise JaxeditError(f"{path}: unsupported jaxedit format version {meta.get('format_version')}")
    cfg = ModelConfig.from_json(json.dumps(meta["config"]))
    if meta.get("params") == "orbax":
        import orbax.checkpoint as ocp

        saved_dtype = meta.get("dtype", "float32")
        target = abstract_params(cfg, saved_dtype)
        if mesh is not None:
            target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target,
                                  param_shardings(cfg, mesh, target))
        with ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore(os.path.join(os.path.abspath(path), "params"), target)
        return model_from_params(cfg, params if dtype is None else cast_params(params, dtype))
    if mesh is not None:
        return _load_safetensors_sharded(os.path.join(path, "params.safetensors"), cfg, dtype or "float32", mesh)
    params = unflat_params(load_file(os.path.join(path, "params.safetensors")))
    return model_from_params(cfg, cast_params(params, dtype or "float32"))  # device arrays, converted once here


def _load_safetensors_sharded(file: str, cfg, dtype, mesh):
    from safetensors import safe_open

    abstract = abstract_params(cfg, dtype)
    shardings = flat_params(param_shardings(cfg, mesh, abstract))
    np_dtype = np.dtype(resolve_dtype(dtype))
    out = {}
    with safe_open(file, "numpy") as f:
        for name, a in flat_params(abstract).items():
            sl = f.get_slice(name)
            if tuple(sl.get_shape()) != tuple(a.shape):
                raise JaxeditError(f"{file}: {name} has shape {tuple(sl.get_shape())}, expected {tuple(a.shape)}")
            out[name] = assemble(a.shape, shardings[name], lambda idx, sl=sl: sl[idx] if idx else sl[:], np_dtype)
    return model_from_params(cfg, unflat_params(out))
