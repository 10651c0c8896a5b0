"""Gradient x activation ("attribution patching"): a first-order estimate of the causal-tracing grid from one
corrupted forward and one backward.

What it approximates: restoring the clean state c at (layer l, token t) in a corrupted run with state x changes
the score p(answer) by about (c - x) . dp/dx, the gradient taken in the corrupted run. The estimate is exact when p
is linear in the restored state and is usually good for small effects; it misses saturation (a restoration that
alone recovers the answer) and interactions between states. For the windowed kinds the window's terms are summed
(each term's gradient is the full one, so paths through the window's later, also restored, layers are counted
too: for windows wider than 1 this is a further approximation). The gradient of an MLP output equals that of its block output
(the block adds it to the residual stream), so "hidden" and "mlp" share one backward; attention outputs get theirs
through a zero ``attn_delta``. Each noisy sample is linearised around its own corrupted run and the estimates are
averaged, like the scores they approximate.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.forward import Interventions, apply
from jaxedit.model import params_of
from jaxedit.sharding import to_host
from jaxedit.locate.tracing import (KINDS, TraceResult, check_options, draw_noise, parse_noise, prepare_inputs,
                             resolve_noise_level, _resolve_target)


def _attribution(cfg, params, ids, span_mask, noise, answer, kinds, window, replace):
    S, T = noise.shape[0], ids.shape[0]
    L, d = cfg.n_layers, cfg.d_model
    clean = apply(cfg, params, ids[None], capture=("hidden", "attn", "mlp"))
    p_clean = jax.nn.softmax(clean.logits[0, -1])
    answer = jnp.where(answer < 0, jnp.argmax(p_clean), answer)
    rows = jnp.broadcast_to(ids, (S, T))
    base_iv = dict(embed_mask=jnp.broadcast_to(span_mask, (S, T)), embed_values=noise, embed_replace=replace)

    def score(deltas):
        iv = Interventions(resid_delta=deltas["resid"], attn_delta=deltas["attn"], **base_iv)
        out = apply(cfg, params, rows, interventions=iv, capture=("hidden", "attn", "mlp"))
        return jax.nn.softmax(out.logits[:, -1])[:, answer].sum(), out  # sum: per-sample gradients

    zeros = {"resid": jnp.zeros((S, L, T, d), jnp.float32), "attn": jnp.zeros((S, L, T, d), jnp.float32)}
    (total, corr), grads = jax.value_and_grad(score, has_aux=True)(zeros)
    low = total / S
    g = {"hidden": grads["resid"], "mlp": grads["resid"], "attn": grads["attn"]}
    out = {"answer": answer, "high": p_clean[answer], "low": low}
    layers = jnp.arange(L)
    for kind in kinds:
        diff = getattr(clean, kind)[0][None] - getattr(corr, kind)  # [S, L, T, d]
        term = (diff * g[kind]).sum(-1).mean(0)  # [L, T]
        if kind != "hidden":  # sum over each layer's window
            lo = layers[:, None] - window // 2
            hi = layers[:, None] + window - window // 2
            win = ((layers[None, :] >= lo) & (layers[None, :] < hi)).astype(term.dtype)  # [l, j]
            term = win @ term
        out[kind] = (low + term).T  # [T, L]
    return out


_attribution_jit = jax.jit(_attribution, static_argnames=("cfg", "kinds", "window", "replace"))


def attribution_patching(model, prompt=None, *, input_ids=None, span=None, kinds=KINDS, samples=10, noise="s3",
                         window=10, target=None, tokenizer=None, seed=1, uniform=False, replace=False):
    """The first-order estimate of :func:`jaxedit.trace`'s grid, with the same arguments and result type:
    ``scores`` [T, L] = low_score + estimated indirect effect."""
    kinds = check_options(kinds, samples, window)
    ids, (s, e) = prepare_inputs(model, tokenizer, prompt, input_ids, span)
    mode, value = parse_noise(noise)
    level = resolve_noise_level(model, tokenizer, noise, [ids[s:e]])
    arr = np.asarray(value, np.float32) if mode == "array" else draw_noise(samples, e - s, model.config.d_model,
                                                                           level, seed, uniform)
    full = np.zeros((samples, len(ids), model.config.d_model), np.float32)
    full[:, s:e] = arr
    span_mask = np.zeros(len(ids), bool)
    span_mask[s:e] = True
    tgt = _resolve_target(tokenizer, target)
    out = to_host(_attribution_jit(model.config, params_of(model), jnp.asarray(ids), jnp.asarray(span_mask),
                                          jnp.asarray(full), jnp.asarray(-1 if tgt is None else tgt), kinds=kinds,
                                          window=int(window), replace=bool(replace)))
    answer = int(out["answer"])
    toks = [tokenizer.decode([int(t)]) for t in ids] if tokenizer is not None else [str(int(t)) for t in ids]
    return {k: TraceResult(kind=k, scores=np.asarray(out[k], np.float64), low_score=float(out["low"]),
                           high_score=float(out["high"]), answer_id=answer,
                           answer=tokenizer.decode([answer]) if tokenizer is not None else str(answer),
                           input_ids=np.asarray(ids), tokens=toks, span=(s, e), window=int(window),
                           samples=int(samples), noise_level=level) for k in kinds}
