"""Apply a name-mapping table to a checkpoint: every tensor consumed or explicitly ignored, shapes checked."""
from __future__ import annotations

import re
from functools import partial
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit import sharding as sh
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


def _matched(names: Iterable[str], cfg: ModelConfig, fmt: str, expected: dict):
    """``(name, rule, layer)`` for every checkpoint tensor the model takes, matched by the name-mapping table of
    ``fmt`` (``layer``: the block index, None outside the blocks). A name the table ignores is skipped, as is one
    whose targets the model lacks (lm_head.weight in a tied model: the head is the embedding); any other name, or
    a layer past the model's, raises :class:`JaxeditError` naming the tensor."""
    rules, ignored, prefix = TABLES[(fmt, cfg.family)]
    compiled = [(r, r.regex()) for r in rules]
    ignored_re = [re.compile("^" + re.escape(s).replace(r"\{i\}", r"\d+") + "$") for s in ignored]
    for name in names:
        short = name[len(prefix):] if prefix and name.startswith(prefix) else name
        match = next(((r, m) for r, rx in compiled if (m := rx.match(short))), None)
        if match is None:
            if any(rx.match(short) for rx in ignored_re):
                continue
            raise JaxeditError(f"unexpected tensor {name!r} in the checkpoint (not a {cfg.family} {fmt} parameter)")
        rule, m = match
        if not any(t in expected for t in rule.targets):
            continue
        layer = int(m.group(1)) if m.groups() else None
        if layer is not None and layer >= cfg.n_layers:
            raise JaxeditError(f"unexpected tensor {name!r}: the model has {cfg.n_layers} layers")
        yield name, rule, layer


def _check_shape(name: str, target: str, got, expected: dict, layer) -> None:
    want = expected[target].shape[1:] if layer is not None else expected[target].shape
    if tuple(got) != tuple(want):
        raise JaxeditError(f"shape mismatch for checkpoint tensor {name!r} (-> {target}): "
                           f"expected {tuple(want)}, got {tuple(got)}")


def _check_complete(found: dict, cfg: ModelConfig, fmt: str) -> None:
    """Raise naming the first checkpoint tensor missing from ``found`` (target -> layer -> anything)."""
    rules = TABLES[(fmt, cfg.family)][0]
    source_of = {t: r.source for r in rules for t in r.targets}  # target -> rule source, for the message
    for target, parts in found.items():
        for i in (range(cfg.n_layers) if target.startswith("blocks.") else [None]):
            if i not in parts:
                src = source_of[target].replace("{i}", str(i))
                raise JaxeditError(f"missing tensor {src!r} in the checkpoint (needed for {target})")


def convert(names: Iterable[str], get: Callable[[str], np.ndarray], cfg: ModelConfig, fmt: str, dtype="float32"):
    """Build a model from checkpoint tensors. ``names``: the checkpoint's tensor names; ``get(name)`` returns one
    as a numpy array. Raises :class:`JaxeditError` naming the tensor on a missing, unexpected or misshapen tensor.

    Memory: each stacked parameter is allocated once on the device and its layers are written into it one at a time
    (a jitted in-place update with the stack donated), each layer read, converted and dropped before the next, so
    loading needs the weights plus about one layer's tensors (not a second copy of every weight)."""
    np_dtype = np.dtype(resolve_dtype(dtype))
    expected = _flatten(abstract_params(cfg, dtype))
    plan: dict = {}  # rule id -> (rule, {layer: name})
    found: dict[str, dict] = {t: {} for t in expected}  # target -> layer -> name (the completeness check)
    for name, rule, layer in _matched(names, cfg, fmt, expected):
        plan.setdefault(id(rule), (rule, {}))[1][layer] = name
        for target in rule.targets:
            if target in expected:
                found[target][layer] = name
    _check_complete(found, cfg, fmt)
    params = {}
    for rule, layers in plan.values():
        for layer, name in sorted(layers.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
            arr = np.asarray(get(name))
            outs = rule.transform(arr, cfg) if rule.transform else (arr,)
            for target, out in zip(rule.targets, outs):
                if target not in expected:
                    continue
                _check_shape(name, target, out.shape, expected, layer)
                out = np.asarray(out, np_dtype)
                if layer is None:
                    params[target] = jnp.asarray(out)
                    continue
                if target not in params:
                    params[target] = jnp.zeros((cfg.n_layers,) + out.shape, np_dtype)
                params[target] = _put_layer(params[target], out, layer)
            del arr, outs
    return model_from_params(cfg, _unflatten(params))


@partial(jax.jit, donate_argnums=0)
def _put_layer(stack, value, layer):
    """``stack`` with ``stack[layer] = value``, written in place (the stack is donated)."""
    return jax.lax.dynamic_update_index_in_dim(stack, value.astype(stack.dtype), layer, 0)


def assemble(shape, sharding, read_block, np_dtype):
    """A global array of ``shape`` placed with ``sharding``, built from host blocks: ``read_block(index)`` (a tuple
    of slices) returns that block of the array. Only this process's devices' blocks are read, each distinct block
    once (replicas share it); no device ever holds more than its shard."""
    shape = tuple(int(n) for n in shape)
    blocks, arrays, devices = {}, [], []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
        key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        if key not in blocks:
            block = np.asarray(read_block(tuple(slice(a, b) for a, b in key)))
            want = tuple(b - a for a, b in key)
            if block.shape != want:
                raise JaxeditError(f"internal error: read a block of shape {block.shape}, expected {want}")
            blocks[key] = block.astype(np_dtype, copy=False)
        arrays.append(jax.device_put(blocks[key], device))
        devices.append(device)
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def convert_sharded(names: Iterable[str], source, cfg: ModelConfig, fmt: str, dtype, mesh):
    """:func:`convert` straight into the placement of :func:`jaxedit.sharding.param_specs` on ``mesh``.

    ``source`` has ``get(name)`` (the whole tensor) and, where the format allows, ``shape(name)`` and
    ``read(name, index)`` (one block of a tensor): then every device's shard is read on its own, through the
    mapping hooks' ``read_slice``, and the host never holds more than one parameter's blocks. Sources without them
    (GGUF dequantization, pickles) are read tensor by tensor on the host and split there."""
    np_dtype = np.dtype(resolve_dtype(dtype))
    abstract = abstract_params(cfg, dtype)
    shardings = _flatten(sh.param_shardings(cfg, mesh, abstract))
    expected = _flatten(abstract)
    plan: dict[str, dict] = {t: {} for t in expected}  # target -> layer -> (name, rule, output index, shape)
    sliced = hasattr(source, "read") and hasattr(source, "shape")
    full_cache: dict = {}

    def full(name):  # a whole tensor, kept while its outputs are being placed
        if name not in full_cache:
            full_cache.clear()
            full_cache[name] = np.asarray(source.get(name))
        return full_cache[name]

    def src_shape(name):
        return tuple(source.shape(name)) if sliced else full(name).shape

    L = cfg.n_layers
    for name, rule, layer in _matched(names, cfg, fmt, expected):
        shape = src_shape(name)
        if rule.transform is None:
            outs = (shape,)
        elif hasattr(rule.transform, "out_shapes"):
            outs = rule.transform.out_shapes(shape, cfg)
        else:
            outs = tuple(o.shape for o in rule.transform(full(name), cfg))
        for k, (target, out) in enumerate(zip(rule.targets, outs)):
            _check_shape(name, target, out, expected, layer)
            plan[target][layer] = (name, rule, k, shape)

    def read_one(name, rule, k, shape, index):
        hook = rule.transform
        if sliced and hook is None:
            return source.read(name, index)
        if sliced and hasattr(hook, "read_slice"):
            return hook.read_slice(lambda idx: source.read(name, idx), shape, k, index, cfg)
        out = full(name) if hook is None else hook(full(name), cfg)[k]
        return out[index]

    _check_complete(plan, cfg, fmt)
    params = {}
    for target, parts in plan.items():
        stacked = target.startswith("blocks.")

        def block(index, parts=parts, stacked=stacked):
            if not stacked:
                return read_one(*parts[None], index)
            return np.stack([read_one(*parts[i], index[1:]) for i in range(*index[0].indices(L))])

        params[target] = assemble(expected[target].shape, shardings[target], block, np_dtype)
    full_cache.clear()
    return model_from_params(cfg, _unflatten(params))


def flat_params(params: dict) -> dict:
    return _flatten(params)


def unflat_params(flat: dict) -> dict:
    return _unflatten(flat)


def cast_params(params: dict, dtype) -> dict:
    """The parameters as device (jax) arrays of ``dtype``."""
    dt = resolve_dtype(dtype)
    return jax.tree.map(lambda a: jnp.asarray(a, dtype=dt), params)
