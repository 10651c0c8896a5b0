"""Building models and running them: abstract init, parameter access (:func:`params_of`, defined beside the
parameter containers in :mod:`jaxedit.models.common`), placing a model on a mesh, and the public ``forward``."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxedit.config import ModelConfig
from jaxedit.errors import JaxeditError
from jaxedit.forward import ForwardOutput, Interventions, apply_jit
from jaxedit.models import MODEL_CLASSES
from jaxedit.models.common import params_of
from jaxedit.sharding import data_size, mesh_of, put_batch, shard_params

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise JaxeditError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


def create_model(cfg: ModelConfig, dtype="float32", seed: int = 0) -> nnx.Module:
    """A model with random weights (useful for timing and tests)."""
    return MODEL_CLASSES[cfg.family](cfg, dtype=resolve_dtype(dtype), rngs=nnx.Rngs(seed))


def abstract_params(cfg: ModelConfig, dtype="float32") -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything."""
    abstract = nnx.eval_shape(lambda: create_model(cfg, dtype))
    return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def model_from_params(cfg: ModelConfig, params: dict) -> nnx.Module:
    """Abstract init, then fill with ``params`` (a pure dict with the model's structure)."""
    dtype = params["blocks"]["w_out"].dtype
    abstract = nnx.eval_shape(lambda: create_model(cfg, dtype))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def shard_model(model, mesh):
    """A copy of ``model`` with its parameters placed on ``mesh`` (a Mesh or a spec such as "data=4,model=2").
    :func:`jaxedit.load` with ``mesh=`` loads straight into this placement instead, reading only each device's
    shards; use this for a model built in memory."""
    return model_from_params(model.config, shard_params(model.config, params_of(model), mesh))


def count_params(model) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params_of(model)))


def forward(model, input_ids, attention_mask=None, interventions: Optional[Interventions] = None,
            capture: tuple = (), logit_positions=None) -> ForwardOutput:
    """Run ``model`` on ``input_ids`` [B, T] (jitted). Returns a :class:`ForwardOutput`; ``.logits`` is [B, T, V].

    A model on a mesh runs with the batch split over the ``data`` axis (without interventions the batch is padded
    to a multiple of it and the padding dropped from the outputs; with them, split when it divides)."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    mask = None if attention_mask is None else np.asarray(attention_mask)
    if mask is not None and mask.ndim == 1:
        mask = mask[None]
    mesh = mesh_of(model)
    B = ids.shape[0]
    k = data_size(mesh)
    if mesh is None or (interventions is not None and B % k):
        return apply_jit(model.config, params_of(model), jnp.asarray(ids), None if mask is None else jnp.asarray(mask),
                         interventions, tuple(capture), logit_positions)
    pad = (-B) % k if interventions is None else 0
    grow = lambda a: None if a is None else np.concatenate([a, np.repeat(np.asarray(a)[:1], pad, 0)])
    ids, mask, pos = grow(ids), grow(mask), grow(None if logit_positions is None else np.asarray(logit_positions))
    put = lambda a: None if a is None else put_batch(mesh, a)
    out = apply_jit(model.config, params_of(model), put(ids), put(mask), interventions, tuple(capture), put(pos))
    return jax.tree.map(lambda a: a[:B], out) if pad else out
