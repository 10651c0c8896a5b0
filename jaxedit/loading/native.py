"""jaxedit's own directory format: ``jaxedit.json`` (the config), ``params.safetensors`` (the stacked parameters under
their internal names) and the tokenizer files. Used as the cache of converted models; loads in seconds."""
from __future__ import annotations

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


def save_native(model, tokenizer, path: str, extra: dict | None = None) -> None:
    """Write atomically: into a temporary sibling directory, then rename."""
    from safetensors.numpy import save_file

    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        flat = {k: np.asarray(jax.device_get(v)) for k, v in flat_params(params_of(model)).items()}
        save_file(flat, os.path.join(tmp, "params.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {"format_version": FORMAT_VERSION, "config": json.loads(model.config.to_json()), **(extra or {})}
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_native_tokenizer(path: str):
    """The tokenizer saved beside the parameters (a fast tokenizer; skips the slower AutoTokenizer import)."""
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return None
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)


def load_native(path: str, dtype="float32"):
    from safetensors.numpy import load_file

    with open(os.path.join(path, MARKER)) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise JaxeditError(f"{path}: unsupported jaxedit format version {meta.get('format_version')}")
    cfg = ModelConfig.from_json(json.dumps(meta["config"]))
    params = unflat_params(load_file(os.path.join(path, "params.safetensors")))
    return model_from_params(cfg, cast_params(params, dtype))  # device arrays, converted once here
