"""jaxedit's own directory format: ``jaxedit.json`` (the config) and the tokenizer files, with the stacked
parameters under their internal names either in ``params.safetensors`` (the cache of converted models; loads in
seconds) or in an orbax checkpoint ``params/`` (:func:`save`: edited models; restored to the same dtypes).
Both are written into a temporary sibling directory and renamed into place, so a reader never sees half a model."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import jax
import numpy as np

from jaxedit.config import ModelConfig
from jaxedit.errors import JaxeditError
from jaxedit.loading.convert import cast_params, flat_params, unflat_params
from jaxedit.model import model_from_params, params_of

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


def save_native(model, tokenizer, path: str, extra: dict | None = None, orbax: bool = False) -> None:
    """Write atomically: into a temporary sibling directory, then rename. ``orbax``: the parameters as an orbax
    checkpoint (``params/``) instead of one safetensors file."""
    from safetensors.numpy import save_file

    with atomic_dir(path) as tmp:
        if orbax:
            import orbax.checkpoint as ocp

            with ocp.StandardCheckpointer() as ckpt:
                ckpt.save(os.path.join(tmp, "params"), params_of(model))
                ckpt.wait_until_finished()
        else:
            flat = {k: np.asarray(jax.device_get(v)) for k, v in flat_params(params_of(model)).items()}
            save_file(flat, os.path.join(tmp, "params.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {"format_version": FORMAT_VERSION, "params": "orbax" if orbax else "safetensors",
                "config": json.loads(model.config.to_json()), **(extra or {})}
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(meta, f, indent=1)


def load_native_tokenizer(path: str):
    """The tokenizer saved beside the parameters (a fast tokenizer; skips the slower AutoTokenizer import)."""
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return None
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)


def load_native(path: str, dtype=None):
    from safetensors.numpy import load_file

    with open(os.path.join(path, MARKER)) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise JaxeditError(f"{path}: unsupported jaxedit format version {meta.get('format_version')}")
    cfg = ModelConfig.from_json(json.dumps(meta["config"]))
    if meta.get("params") == "orbax":
        import orbax.checkpoint as ocp

        from jaxedit.model import abstract_params

        saved_dtype = meta.get("dtype", "float32")
        with ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore(os.path.join(os.path.abspath(path), "params"), abstract_params(cfg, saved_dtype))
        return model_from_params(cfg, params if dtype is None else cast_params(params, dtype))
    params = unflat_params(load_file(os.path.join(path, "params.safetensors")))
    return model_from_params(cfg, cast_params(params, dtype or "float32"))  # device arrays, converted once here
