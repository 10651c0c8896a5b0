"""LLaMA family: RMSNorm, rotary embeddings (incl. llama3 rope scaling), SwiGLU MLP, grouped-query attention,
tied or untied LM head.

The module only holds parameters (per-layer weights stacked on a leading layer axis). The computation is
the family's set of pure functions below, called by the shared forward in :mod:`jaxedit.forward`.
Weights are stored in ``x @ W`` layout ([in, out]); Q and K rows are in the Hugging Face (half-split) rotary order.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxedit.config import ModelConfig
from jaxedit.models.common import Blocks, normal


class Llama(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        L, d, f, hd = c.n_layers, c.d_model, c.d_ff, c.head_dim
        self.config = c
        self.embed = nnx.Param(normal(rngs, (c.vocab_size, d), dtype))
        self.norm_f = nnx.Param(jnp.ones((d,), dtype))
        if not c.tie_embeddings:
            self.lm_head = nnx.Param(normal(rngs, (d, c.vocab_size), dtype))
        self.blocks = Blocks(rngs, dtype, {
            "attn_norm": ((L, d), "ones"),
            "wq": ((L, d, c.n_heads * hd), "normal"),
            "wk": ((L, d, c.n_kv_heads * hd), "normal"),
            "wv": ((L, d, c.n_kv_heads * hd), "normal"),
            "wo": ((L, c.n_heads * hd, d), "normal"),
            "mlp_norm": ((L, d), "ones"),
            "w_gate": ((L, d, f), "normal"), "w_up": ((L, d, f), "normal"),
            "w_out": ((L, f, d), "normal"),
        })


def _rms_norm(x, scale, eps):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + eps)
    return scale * y.astype(x.dtype)


def inv_frequencies(c: ModelConfig) -> np.ndarray:
    """Rotary inverse frequencies [head_dim / 2], with the llama3 low/high-frequency rescaling when configured."""
    inv = 1.0 / (c.rope_theta ** (np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim))
    if not c.rope_scaling:
        return inv.astype(np.float32)
    s = c.rope_scaling_dict
    factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = old / lo, old / hi
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)  # long wavelengths: slowed down by `factor`
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled  # medium wavelengths: interpolate
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _rotate(x, positions, c: ModelConfig):
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_frequencies(c))  # [..., T, hd/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[..., None, :]  # broadcast over heads
    sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[..., None, :]
    x32 = x.astype(jnp.float32)
    half = c.head_dim // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], -1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


# ---- the family's pure functions (p: whole-model params dict, pl: one layer's slice of p["blocks"]) ----

def embed_tokens(c: ModelConfig, p, ids):
    return jnp.take(p["embed"], ids, axis=0)


def add_positions(c: ModelConfig, p, x, positions):
    return x  # positions enter through the rotary embedding


def norm_attn(c: ModelConfig, pl, x):
    return _rms_norm(x, pl["attn_norm"], c.norm_eps)


def qkv(c: ModelConfig, pl, xn, positions):
    def proj(w, heads):
        y = xn @ w
        return y.reshape(*y.shape[:-1], heads, c.head_dim)
    q = _rotate(proj(pl["wq"], c.n_heads), positions, c)
    k = _rotate(proj(pl["wk"], c.n_kv_heads), positions, c)
    return q, k, proj(pl["wv"], c.n_kv_heads)


def attn_out(c: ModelConfig, pl, ctx):
    return ctx @ pl["wo"]


def norm_mlp(c: ModelConfig, pl, x):
    return _rms_norm(x, pl["mlp_norm"], c.norm_eps)


def mlp_key(c: ModelConfig, pl, xn):
    """The input of the MLP output projection (down_proj): silu(gate(x)) * up(x). MEMIT's key."""
    return jax.nn.silu(xn @ pl["w_gate"]) * (xn @ pl["w_up"])


def mlp_out(c: ModelConfig, pl, key):
    return key @ pl["w_out"]


def final_norm(c: ModelConfig, p, x):
    return _rms_norm(x, p["norm_f"], c.norm_eps)


def lm_head(c: ModelConfig, p, x):
    if c.tie_embeddings:
        return jnp.einsum("...d,vd->...v", x, p["embed"], preferred_element_type=jnp.float32)
    return jnp.einsum("...d,dv->...v", x, p["lm_head"], preferred_element_type=jnp.float32)
