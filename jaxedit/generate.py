"""Sampling text from a model: one jitted scan over positions with a key/value cache.

Used for MEMIT's context templates (short prefixes sampled from the model) and for the covariance-statistics
fallback corpus (text sampled from the model when no corpus is reachable). Each position runs the same
:func:`jaxedit.forward.block` as every other computation; the cache holds the attention keys/values of the
positions before it. Prompts are teacher-forced, so prompts of different lengths share one batch.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.config import ModelConfig
from jaxedit.errors import JaxeditError
from jaxedit.forward import block, embed
from jaxedit.model import params_of
from jaxedit.models import FAMILY_MODULES


@partial(jax.jit, static_argnames=("cfg", "top_k"))
def decode(cfg: ModelConfig, params, buf, lengths, key, *, top_k: Optional[int], temperature=1.0):
    """Fill ``buf`` [B, T] (int32; row b holds its prompt in ``buf[b, :lengths[b]]``) by sampling every later
    position. ``top_k``: sample among the k most likely tokens (1 = greedy; None = the whole vocabulary)."""
    fam = FAMILY_MODULES[cfg.family]
    B, T = buf.shape
    L, KV, hd = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
    dtype = params["blocks"]["w_out"].dtype
    cache = (jnp.zeros((L, B, T, KV, hd), dtype), jnp.zeros((L, B, T, KV, hd), dtype))

    def position(carry, t):
        buf, cache = carry
        pos = jnp.full((B, 1), t, jnp.int32)
        x = embed(cfg, params, jax.lax.dynamic_slice_in_dim(buf, t, 1, axis=1), pos)
        # cached positions s < t, then the token itself
        allowed = jnp.concatenate([jnp.arange(T) < t, jnp.ones((1,), bool)])[None, None].repeat(B, 0)

        def layer(x, xs):
            pl, kc, vc = xs
            y, parts = block(cfg, pl, x, pos, allowed, kv_prefix=(kc, vc))
            k, v = parts["kv"]
            return y, (jax.lax.dynamic_update_slice_in_dim(kc, k.astype(dtype), t, axis=1),
                       jax.lax.dynamic_update_slice_in_dim(vc, v.astype(dtype), t, axis=1))

        x, cache = jax.lax.scan(layer, x, (params["blocks"], *cache))
        logits = fam.lm_head(cfg, params, fam.final_norm(cfg, params, x))[:, 0]
        if top_k is None:
            choice = jax.random.categorical(jax.random.fold_in(key, t), logits / temperature)
        else:
            vals, idx = jax.lax.top_k(logits, top_k)
            pick = jax.random.categorical(jax.random.fold_in(key, t), vals / temperature)
            choice = jnp.take_along_axis(idx, pick[:, None], -1)[:, 0]
        nxt = jax.lax.dynamic_slice_in_dim(buf, t + 1, 1, axis=1)[:, 0]
        nxt = jnp.where(t + 1 >= lengths, choice.astype(buf.dtype), nxt)
        buf = jax.lax.dynamic_update_slice_in_dim(buf, nxt[:, None], t + 1, axis=1)
        return (buf, cache), None

    (buf, _), _ = jax.lax.scan(position, (buf, cache), jnp.arange(T - 1))
    return buf


def generate_ids(model, prompt_ids: Sequence[Sequence[int]], new_tokens: int, *, top_k: Optional[int] = 5,
                 seed: int = 0, temperature: float = 1.0) -> list:
    """Continue each token-id prompt by ``new_tokens`` sampled tokens. Returns the full id lists."""
    if any(len(p) == 0 for p in prompt_ids):
        raise JaxeditError("cannot generate from an empty prompt")
    if new_tokens < 1:
        raise JaxeditError("new_tokens must be at least 1")
    lengths = np.array([len(p) for p in prompt_ids], np.int32)
    T = int(lengths.max()) + new_tokens
    if T > model.config.max_positions:
        raise JaxeditError(f"{T} tokens exceed the model's {model.config.max_positions} positions")
    buf = np.zeros((len(prompt_ids), T), np.int32)
    for i, p in enumerate(prompt_ids):
        buf[i, :len(p)] = p
    out = np.asarray(decode(model.config, params_of(model), jnp.asarray(buf), jnp.asarray(lengths),
                            jax.random.PRNGKey(seed), top_k=top_k, temperature=temperature))
    return [out[i, :lengths[i] + new_tokens].tolist() for i in range(len(prompt_ids))]


def generate(model, tokenizer, prompts: Sequence[str], new_tokens: int, *, top_k: Optional[int] = 5, seed: int = 0,
             temperature: float = 1.0) -> list:
    """Sample continuations of text prompts; returns the decoded texts, prompt included."""
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] or [tokenizer.bos_token_id or 0] for p in prompts]
    out = generate_ids(model, ids, new_tokens, top_k=top_k, seed=seed, temperature=temperature)
    return [tokenizer.decode(o, skip_special_tokens=True) for o in out]
