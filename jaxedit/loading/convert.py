"""Apply a name-mapping table to a checkpoint: every tensor consumed or explicitly ignored, shapes checked."""
from __future__ import annotations

import re
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.config import ModelConfig
from jaxedit.errors import JaxeditError
from jaxedit.loading.mappings import TABLES
from jaxedit.model import abstract_params, model_from_params, resolve_dtype


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _unflatten(flat):
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def convert(names: Iterable[str], get: Callable[[str], np.ndarray], cfg: ModelConfig, fmt: str, dtype="float32"):
    """Build a model from checkpoint tensors. ``names``: the checkpoint's tensor names; ``get(name)`` returns one
    as a numpy array. Raises :class:`JaxeditError` naming the tensor on a missing, unexpected or misshapen tensor."""
    rules, ignored, prefix = TABLES[(fmt, cfg.family)]
    np_dtype = np.dtype(resolve_dtype(dtype))
    expected = _flatten(abstract_params(cfg, dtype))
    compiled = [(r, r.regex()) for r in rules]
    ignored_re = [re.compile("^" + re.escape(s).replace(r"\{i\}", r"\d+") + "$") for s in ignored]
    filled: dict[str, dict] = {t: {} for t in expected}
    source_of: dict[str, str] = {}  # target -> rule source, for error messages
    for r in rules:
        for t in r.targets:
            source_of[t] = r.source
    L = cfg.n_layers

    for name in names:
        short = name[len(prefix):] if prefix and name.startswith(prefix) else name
        match = next(((r, m) for r, rx in compiled if (m := rx.match(short))), None)
        if match is None:
            if any(rx.match(short) for rx in ignored_re):
                continue
            raise JaxeditError(f"unexpected tensor {name!r} in the checkpoint (not a {cfg.family} {fmt} parameter)")
        rule, m = match
        if not any(t in expected for t in rule.targets):
            continue  # e.g. lm_head.weight in a tied model: the head is the embedding
        layer = int(m.group(1)) if m.groups() else None
        if layer is not None and layer >= L:
            raise JaxeditError(f"unexpected tensor {name!r}: the model has {L} layers")
        arr = np.asarray(get(name))
        outs = rule.transform(arr, cfg) if rule.transform else (arr,)
        for target, out in zip(rule.targets, outs):
            want = expected[target].shape[1:] if layer is not None else expected[target].shape
            if tuple(out.shape) != tuple(want):
                raise JaxeditError(f"shape mismatch for checkpoint tensor {name!r} (-> {target}): "
                                   f"expected {tuple(want)}, got {tuple(out.shape)}")
            filled[target][layer] = out.astype(np_dtype)

    params = {}
    for target, parts in filled.items():
        layers = list(range(L)) if target.startswith("blocks.") else [None]
        for i in layers:
            if i not in parts:
                src = source_of[target].replace("{i}", str(i))
                raise JaxeditError(f"missing tensor {src!r} in the checkpoint (needed for {target})")
        params[target] = jnp.asarray(np.stack([parts[i] for i in layers]) if layers[0] is not None else parts[None])
        parts.clear()
    return model_from_params(cfg, _unflatten(params))


def flat_params(params: dict) -> dict:
    return _flatten(params)


def unflat_params(flat: dict) -> dict:
    return _unflatten(flat)


def cast_params(params: dict, dtype) -> dict:
    """The parameters as device (jax) arrays of ``dtype``."""
    dt = resolve_dtype(dtype)
    return jax.tree.map(lambda a: jnp.asarray(a, dtype=dt), params)
