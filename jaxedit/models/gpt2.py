"""GPT-2 (gpt2 ... gpt2-xl): learned positions, pre-LayerNorm blocks, gelu_new MLP, tied LM head.

The module only holds parameters (per-layer weights stacked on a leading layer axis). The computation is
the family's set of pure functions below, called by the shared forward in :mod:`jaxedit.forward`.
Weights are stored in ``x @ W`` layout ([in, out]).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxedit.config import ModelConfig
from jaxedit.models.common import Blocks, normal


class GPT2(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        L, d, f = c.n_layers, c.d_model, c.d_ff
        self.config = c
        self.wte = nnx.Param(normal(rngs, (c.vocab_size, d), dtype))
        self.wpe = nnx.Param(normal(rngs, (c.max_positions, d), dtype))
        self.ln_f_scale = nnx.Param(jnp.ones((d,), dtype))
        self.ln_f_bias = nnx.Param(jnp.zeros((d,), dtype))
        self.blocks = Blocks(rngs, dtype, {
            "ln1_scale": ((L, d), "ones"), "ln1_bias": ((L, d), "zeros"),
            "wq": ((L, d, d), "normal"), "bq": ((L, d), "zeros"),
            "wk": ((L, d, d), "normal"), "bk": ((L, d), "zeros"),
            "wv": ((L, d, d), "normal"), "bv": ((L, d), "zeros"),
            "wo": ((L, d, d), "normal"), "bo": ((L, d), "zeros"),
            "ln2_scale": ((L, d), "ones"), "ln2_bias": ((L, d), "zeros"),
            "w_in": ((L, d, f), "normal"), "b_in": ((L, f), "zeros"),
            "w_out": ((L, f, d), "normal"), "b_out": ((L, d), "zeros"),
        })


def _layer_norm(x, scale, bias, eps):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


# ---- the family's pure functions (p: whole-model params dict, pl: one layer's slice of p["blocks"]) ----

def embed_tokens(c: ModelConfig, p, ids):
    return jnp.take(p["wte"], ids, axis=0)


def add_positions(c: ModelConfig, p, x, positions):
    return x + jnp.take(p["wpe"], positions, axis=0)


def norm_attn(c: ModelConfig, pl, x):
    return _layer_norm(x, pl["ln1_scale"], pl["ln1_bias"], c.norm_eps)


def qkv(c: ModelConfig, pl, xn, positions):
    def proj(w, b, heads):
        y = xn @ w + b
        return y.reshape(*y.shape[:-1], heads, c.head_dim)
    return (proj(pl["wq"], pl["bq"], c.n_heads), proj(pl["wk"], pl["bk"], c.n_kv_heads),
            proj(pl["wv"], pl["bv"], c.n_kv_heads))


def attn_out(c: ModelConfig, pl, ctx):
    return ctx @ pl["wo"] + pl["bo"]


def norm_mlp(c: ModelConfig, pl, x):
    return _layer_norm(x, pl["ln2_scale"], pl["ln2_bias"], c.norm_eps)


def mlp_key(c: ModelConfig, pl, xn):
    """The input of the MLP output projection (c_proj): gelu(c_fc(x)). MEMIT's key."""
    return jax.nn.gelu(xn @ pl["w_in"] + pl["b_in"], approximate=c.activation == "gelu_new")


def mlp_out(c: ModelConfig, pl, key):
    return key @ pl["w_out"] + pl["b_out"]


def final_norm(c: ModelConfig, p, x):
    return _layer_norm(x, p["ln_f_scale"], p["ln_f_bias"], c.norm_eps)


def lm_head(c: ModelConfig, p, x):
    return jnp.einsum("...d,vd->...v", x, p["wte"], preferred_element_type=jnp.float32)
