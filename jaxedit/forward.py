"""The one forward pass every jaxedit method runs through.

``apply(config, params, input_ids, ...)`` is a pure function of the parameters, the token ids, the attention mask
and an :class:`Interventions` record of plain arrays, so it works under ``jax.jit`` and ``jax.vmap``.
Interventions use masks and ``jnp.where`` (never scatters at traced indices):

* ``embed_mask``/``embed_values``: add noise to (or, with ``embed_replace``, replace) the token embeddings of the
  masked tokens (GPT-2: before the position embedding is added);
* ``restore_hidden``/``restore_attn``/``restore_mlp`` [B, L, T] masks with ``clean_*`` [B, L, T, d] values: force the
  block output / attention output / MLP output of a layer at a token to the given value;
* ``resid_delta`` [B, L, T, d]: a vector added to the residual stream (the block output) at (layer, token);
* ``attn_delta`` [B, L, T, d]: a vector added to the attention output (the gradient of a metric with respect to a
  zero ``attn_delta`` is its gradient with respect to the attention outputs);
* ``capture``: a static tuple naming what to return per layer: "hidden" (block outputs), "attn", "mlp",
  "keys" (the MLP output projection's input), "kv" (the attention keys and values, a pair), "embeds" (the input of
  layer 0).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxedit.config import ModelConfig
from jaxedit.models import FAMILY_MODULES

CAPTURE_NAMES = ("hidden", "attn", "mlp", "keys", "kv", "embeds")


@struct.dataclass
class Interventions:
    embed_mask: Optional[jax.Array] = None  # [B, T] bool
    embed_values: Optional[jax.Array] = None  # [B, T, d]
    restore_hidden: Optional[jax.Array] = None  # [B, L, T] bool
    clean_hidden: Optional[jax.Array] = None  # [B, L, T, d]
    restore_attn: Optional[jax.Array] = None
    clean_attn: Optional[jax.Array] = None
    restore_mlp: Optional[jax.Array] = None
    clean_mlp: Optional[jax.Array] = None
    resid_delta: Optional[jax.Array] = None  # [B, L, T, d]
    attn_delta: Optional[jax.Array] = None  # [B, L, T, d]
    embed_replace: bool = struct.field(pytree_node=False, default=False)

    def per_layer(self):
        """The layer-indexed fields, with the layer axis moved to the front (the scan axis)."""
        names = ("restore_hidden", "clean_hidden", "restore_attn", "clean_attn", "restore_mlp", "clean_mlp",
                 "resid_delta", "attn_delta")
        return {n: None if getattr(self, n) is None else jnp.moveaxis(getattr(self, n), 1, 0) for n in names}


@struct.dataclass
class ForwardOutput:
    logits: Optional[jax.Array]  # [B, T, V] float32 ([B, K, V] with logit_positions; None with num_layers)
    hidden: Optional[jax.Array] = None  # [B, L, T, d] block outputs
    attn: Optional[jax.Array] = None  # [B, L, T, d] attention outputs
    mlp: Optional[jax.Array] = None  # [B, L, T, d] MLP outputs
    keys: Optional[jax.Array] = None  # [B, L, T, d_ff] MLP output-projection inputs
    embeds: Optional[jax.Array] = None  # [B, T, d] input of layer 0
    kv: Optional[tuple] = None  # ([B, L, T, KV, hd], [B, L, T, KV, hd]) attention keys (position-encoded), values


def positions_from_mask(attention_mask):
    """Position ids that start at 0 on each row's first real token (left or right padding)."""
    return jnp.clip(jnp.cumsum(attention_mask, -1) - 1, 0).astype(jnp.int32)


def causal_allowed(attention_mask):
    """[B, T, T] bool: query t may attend key s iff s <= t and s is a real token."""
    T = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((T, T), bool))
    return causal[None] & attention_mask[:, None, :].astype(bool)


def attention(q, k, v, allowed):
    """Grouped-query attention. q [B,Tq,H,hd], k/v [B,Tk,KV,hd], allowed [B,Tq,Tk] -> [B,Tq,H*hd].

    Scores and softmax in float32.
    """
    B, Tq, H, hd = q.shape
    KV = k.shape[2]
    q = q.reshape(B, Tq, KV, H // KV, hd)
    s = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) / np.sqrt(hd).astype(np.float32)
    s = jnp.where(allowed[:, None, None], s, jnp.finfo(jnp.float32).min)
    w = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgqs,bskd->bqkgd", w, v).reshape(B, Tq, H * hd)


def _restore(value, mask, clean):
    if mask is None:
        return value
    return jnp.where(mask[..., None], clean.astype(value.dtype), value)


def block(cfg: ModelConfig, pl, x, positions, allowed, ivl=None, kv_prefix=None, queries=None):
    """One transformer block on x [B, T, d] with one layer's params ``pl`` and that layer's interventions ``ivl``.

    ``kv_prefix`` = (k, v) [B, Tp, KV, hd] are keys/values of earlier tokens computed elsewhere; they are put
    before this call's own keys, and ``allowed`` is then [B, T, Tp + T].
    ``queries`` [Tq] int: compute the block's output only at these positions of x (keys and values still come from
    all of them); ``allowed`` and the masks in ``ivl`` are then for those Tq positions, and so is the output.
    Returns the block output and a dict of the intermediate values (hidden, attn, mlp, keys, and this call's own
    attention keys/values "kv" for a cache).
    """
    fam = FAMILY_MODULES[cfg.family]
    ivl = ivl or {}
    q, k, v = fam.qkv(cfg, pl, fam.norm_attn(cfg, pl, x), positions)
    own_kv = (k, v)
    if queries is not None:
        q, x = q[:, queries], x[:, queries]
    if kv_prefix is not None:
        k = jnp.concatenate([kv_prefix[0].astype(k.dtype), k], axis=1)
        v = jnp.concatenate([kv_prefix[1].astype(v.dtype), v], axis=1)
    a = fam.attn_out(cfg, pl, attention(q, k, v, allowed))
    if ivl.get("attn_delta") is not None:
        a = a + ivl["attn_delta"].astype(a.dtype)
    a = _restore(a, ivl.get("restore_attn"), ivl.get("clean_attn"))
    x = x + a
    key = fam.mlp_key(cfg, pl, fam.norm_mlp(cfg, pl, x))
    m = _restore(fam.mlp_out(cfg, pl, key), ivl.get("restore_mlp"), ivl.get("clean_mlp"))
    x = x + m
    if ivl.get("resid_delta") is not None:
        x = x + ivl["resid_delta"].astype(x.dtype)
    x = _restore(x, ivl.get("restore_hidden"), ivl.get("clean_hidden"))
    return x, {"hidden": x, "attn": a, "mlp": m, "keys": key, "kv": own_kv}


def scan_layers(step, carry, blocks, *, start: int = 0, stop: Optional[int] = None, xs=None):
    """``jax.lax.scan`` of ``step`` over the layers ``start .. stop - 1`` of the stacked ``blocks``: ``step(carry,
    pl)`` with one layer's parameters ``pl``, or ``step(carry, (pl, x))`` with ``xs`` (per-layer arrays, one per
    layer of the range). A sub-range is indexed one layer at a time inside the loop: slicing the stack before the
    scan (``a[start:stop]``) is a copy of those layers' weights that XLA materializes (2.2 GiB for the key
    statistics of GPT-2-XL's first layers)."""
    L = jax.tree.leaves(blocks)[0].shape[0]
    stop = L if stop is None else stop
    if start == 0 and stop == L:
        return jax.lax.scan(step, carry, blocks if xs is None else (blocks, xs))

    def body(c, inp):
        i, x = inp
        pl = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), blocks)
        return step(c, pl if xs is None else (pl, x))

    # differentiated (MEMIT's z step), the backward loop keeps only the matrix products' results and recomputes the
    # rest, the layer's parameters included: by default the parameters, and what is computed from them, would be
    # kept per layer (a stacked copy of the layers). Llama-3.2-1B's z step: 2.47 GiB of temporaries when sliced,
    # 4.84 indexed, 0.34 indexed with this policy (XLA:CPU's memory analysis)
    body = jax.checkpoint(body, policy=jax.checkpoint_policies.dots_saveable)
    return jax.lax.scan(body, carry, (jnp.arange(start, stop), xs))


def embed(cfg: ModelConfig, params, input_ids, positions, iv: Optional[Interventions] = None):
    """Token embeddings (with the embedding intervention applied) plus position embeddings: the input of layer 0."""
    fam = FAMILY_MODULES[cfg.family]
    x = fam.embed_tokens(cfg, params, input_ids)
    if iv is not None and iv.embed_values is not None:
        m = iv.embed_mask[..., None].astype(bool)
        vals = iv.embed_values.astype(x.dtype)
        x = jnp.where(m, vals, x) if iv.embed_replace else x + jnp.where(m, vals, jnp.zeros_like(vals))
    return fam.add_positions(cfg, params, x, positions)


def apply(cfg: ModelConfig, params, input_ids, attention_mask=None, interventions: Optional[Interventions] = None,
          capture: tuple = (), logit_positions=None, num_layers: Optional[int] = None, start_layer: int = 0,
          hidden_in=None) -> ForwardOutput:
    """Pure forward pass. ``logit_positions`` [B, K] int: compute logits only at those positions.

    ``attention_mask`` [B, T]: 1 on real tokens, 0 on padding (causal attention among the real tokens). Or
    [B, T, T] bool: token t attends to exactly the tokens s marked in row t, and its position is how many those are,
    minus one: several sequences (or a tree of sequences sharing prefixes) packed into one row, each token marking
    its own sequence's tokens up to itself (see :func:`jaxedit.evaluate.editing.score_rows`).

    ``num_layers``: run only the blocks before ``num_layers`` and stop there (no final norm, ``logits`` is None).
    ``start_layer`` with ``hidden_in`` [B, T, d] (the output of block ``start_layer - 1``): skip the embedding and
    the earlier blocks (``input_ids`` is then unused and may be None; give the ``attention_mask``).
    Captured per-layer arrays hold the blocks that ran, in order.
    """
    capture = tuple(capture)
    for name in capture:
        if name not in CAPTURE_NAMES:
            raise ValueError(f"unknown capture {name!r} (known: {', '.join(CAPTURE_NAMES)})")
    fam = FAMILY_MODULES[cfg.family]
    if (hidden_in is None) != (start_layer == 0):
        raise ValueError("start_layer > 0 goes with hidden_in, the output of the block before it")
    if attention_mask is None:
        attention_mask = jnp.ones(jnp.shape(input_ids), jnp.int32)
    if jnp.ndim(attention_mask) == 3:  # [B, T, T]: which tokens each token sees, its position their count - 1
        allowed = jnp.asarray(attention_mask).astype(bool)
        positions = jnp.clip(allowed.sum(-1) - 1, 0).astype(jnp.int32)
    else:
        positions = positions_from_mask(attention_mask)
        allowed = causal_allowed(attention_mask)
    iv = interventions if interventions is not None else Interventions()
    x = embed(cfg, params, jnp.asarray(input_ids), positions, iv) if hidden_in is None else hidden_in
    embeds = x
    layer_capture = tuple(n for n in capture if n != "embeds")

    def step(x, xs):
        pl, ivl = xs
        x, parts = block(cfg, pl, x, positions, allowed, ivl)
        return x, {n: parts[n] for n in layer_capture}

    per_layer = jax.tree.map(lambda a: a[start_layer:num_layers], iv.per_layer())
    x, caps = scan_layers(step, x, params["blocks"], start=start_layer, stop=num_layers, xs=per_layer)
    out = jax.tree.map(lambda v: jnp.moveaxis(v, 0, 1), caps)
    if num_layers is not None:
        logits = None
    else:
        x = fam.final_norm(cfg, params, x)
        if logit_positions is not None:
            x = jnp.take_along_axis(x, jnp.asarray(logit_positions)[..., None], axis=1)
        logits = fam.lm_head(cfg, params, x)
    if "embeds" in capture:
        out["embeds"] = embeds
    return ForwardOutput(logits=logits, **out)


apply_jit = jax.jit(apply, static_argnames=("cfg", "capture", "num_layers", "start_layer"))
