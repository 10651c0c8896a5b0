"""Pieces shared by the model families' parameter containers, and :func:`params_of`, a container's parameters as
a plain dict."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Blocks(nnx.Module):
    """All transformer layers' parameters, each stacked on a leading layer axis (run with ``jax.lax.scan``).

    ``spec`` maps a parameter name to (shape, init) with init one of "normal", "ones", "zeros".
    """

    def __init__(self, rngs: nnx.Rngs, dtype, spec: dict):
        for name, (shape, init) in spec.items():
            if init == "normal":
                value = normal(rngs, shape, dtype)
            else:
                value = (jnp.ones if init == "ones" else jnp.zeros)(shape, dtype)
            setattr(self, name, nnx.Param(value))


def params_of(model) -> dict:
    """The model's parameters as a pure nested dict of arrays (the input of :func:`jaxedit.forward.apply`)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
