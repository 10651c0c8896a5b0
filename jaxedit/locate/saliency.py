"""Saliency profiles (SaLEM, after Levin et al.): gradient magnitudes aggregated parameter -> column -> layer.

For an example (prompt X, target Y) the loss is the NLL of Y given X (mean over Y's tokens). Parameter saliency is
|dL/dtheta|; the saliency of a column (the weights feeding one output unit: a column of jaxedit's [in, out]
matrices, i.e. a row of a torch nn.Linear weight) is the mean over it; the saliency of a layer, or of a module of a
layer, is the mean of its columns' saliencies over its weight matrices (norm gains and biases are not columns and
are left out). Gradients are reduced to these per-layer numbers inside the jitted computation as backpropagation
reaches each layer (:func:`_one_example`), so no more than one layer's parameter gradient exists at a time.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit import runtime
from jaxedit.batching import pad_rows
from jaxedit.config import ModelConfig
from jaxedit.errors import JaxeditError
from jaxedit.forward import block, causal_allowed, embed, positions_from_mask
from jaxedit.models import FAMILY_MODULES
from jaxedit.model import forward, params_of
from jaxedit.sharding import data_size, mesh_of, put_batch, to_host

# module name -> the stacked weight matrices it is made of
MODULES = {
    "gpt2": {"attention": ("wq", "wk", "wv", "wo"), "mlp": ("w_in", "w_out"), "mlp_out": ("w_out",)},
    "llama": {"attention": ("wq", "wk", "wv", "wo"), "mlp": ("w_gate", "w_up", "w_out"), "mlp_out": ("w_out",)},
}


@dataclasses.dataclass
class SaliencyResult:
    layer: np.ndarray  # [L]: layer saliency of the whole block (all its weight matrices)
    modules: dict  # module name -> [L]
    loss: float  # mean NLL over the examples
    n_examples: int
    target_ids: Optional[list] = None  # one example: the target's token ids (the argmax when none was given)

    def top_layers(self, k: int, module: str | None = None) -> list:
        prof = self.layer if module is None else self.modules[module]
        return [int(i) for i in np.argsort(-prof, kind="stable")[:k]]


def _profiles_of_layer(cfg: ModelConfig, grads) -> dict:
    """One layer's weight gradients -> its saliency per group (the block and each module): the mean over the
    group's columns of the column's mean |grad| (norm gains and biases, not matrices, are left out)."""
    col = {n: jnp.abs(g.astype(jnp.float32)).mean(axis=0) for n, g in grads.items() if g.ndim == 2}  # [out]
    out = {}
    groups = dict(MODULES[cfg.family], block=tuple(col))
    for name, mats in groups.items():
        out[name] = sum(col[m].sum() for m in mats) / sum(col[m].shape[-1] for m in mats)
    return out


def _head_nll(cfg, params, h, ids, target_mask):
    """Mean NLL of the tokens marked by target_mask (each predicted from the position before it), from the last
    block's output h [T, d]."""
    fam = FAMILY_MODULES[cfg.family]
    logits = fam.lm_head(cfg, params, fam.final_norm(cfg, params, h[None]))[0]
    logp = jax.nn.log_softmax(logits[:-1].astype(jnp.float32), -1)
    tok_logp = jnp.take_along_axis(logp, ids[1:, None], -1)[:, 0]
    w = target_mask[1:].astype(jnp.float32)
    return -(tok_logp * w).sum() / jnp.maximum(w.sum(), 1)


def _one_example(cfg, params, ids, mask, target_mask):
    """(loss, {group: [L]}) of one example [T]. Backpropagation by hand, one layer at a time: the forward keeps each
    block's input; then, from the last block down, the block is run again under ``jax.vjp`` for its parameters'
    and its input's gradients, the parameters' gradient is reduced to the layer's numbers at once, and only the
    input's gradient goes on. So one layer's gradient exists at a time, never the whole model's (which is as large
    as the weights), for one more forward pass of the blocks."""
    ids, mask = ids[None], mask[None]
    positions, allowed = positions_from_mask(mask), causal_allowed(mask)
    run = lambda pl, x: block(cfg, pl, x, positions, allowed)[0]  # noqa: E731

    def forward_step(x, pl):
        return run(pl, x), x

    h, inputs = jax.lax.scan(forward_step, embed(cfg, params, ids, positions), params["blocks"])
    loss, dh = jax.value_and_grad(lambda h: _head_nll(cfg, params, h[0], ids[0], target_mask))(h)

    def backward_step(dx, layer):
        pl, x = layer
        _, vjp = jax.vjp(run, pl, x)
        dpl, dx_in = vjp(dx)
        return dx_in, _profiles_of_layer(cfg, dpl)

    _, prof = jax.lax.scan(backward_step, dh, (params["blocks"], inputs), reverse=True)
    return loss, prof


@partial(jax.jit, static_argnames=("cfg", "chunk"))
def saliency_profiles(cfg, params, ids, mask, target_mask, *, chunk=1):
    """Per-example profiles for a right-padded batch: ids/mask/target_mask [B, T]. Returns (losses [B], dict of
    [B, L] profiles). Examples run ``chunk`` at a time (vmapped). Inputs [steps, C, T] run C examples per step (the
    mesh layout: C split over the data axis), and the outputs are [steps, C] and [steps, C, L]."""
    def one(args):
        return _one_example(cfg, params, *args)

    if ids.ndim == 3:
        return jax.lax.map(jax.vmap(one), (ids, mask, target_mask))
    return jax.lax.map(one, (ids, mask, target_mask), batch_size=chunk)


def encode_example(tokenizer, model, prompt, input_ids, target):
    """(prompt ids, target ids or None) of one example; raises :class:`JaxeditError` for an empty prompt, a target
    with no tokens, or an example longer than the model's context."""
    if input_ids is None:
        if tokenizer is None:
            raise JaxeditError("a text prompt needs a tokenizer")
        if prompt is None or not str(prompt).strip():
            raise JaxeditError("empty prompt")
        input_ids = tokenizer(prompt)["input_ids"]
    ids = [int(i) for i in np.asarray(input_ids).reshape(-1)]
    if not ids:
        raise JaxeditError("empty prompt")
    if target is None:
        tgt = None
    elif isinstance(target, str):
        if tokenizer is None:
            raise JaxeditError("a target string needs a tokenizer")
        tgt = tokenizer(target, add_special_tokens=False)["input_ids"]
        if not tgt:
            raise JaxeditError(f"target {target!r} encodes to no tokens")
    else:
        tgt = [int(t) for t in np.atleast_1d(target)]
    if len(ids) + len(tgt or [0]) > model.config.max_positions:
        raise JaxeditError("prompt and target are longer than the model's context")
    return ids, tgt


def saliency_batch(model, requests, *, tokenizer=None, chunk=None):
    """Saliency of many examples. ``requests``: dicts with "prompt" (or "input_ids") and optional "target" (a
    string, a token id or ids; default the model's own argmax next token). Returns (per-example list of
    :class:`SaliencyResult`, the dataset-level result: the mean of the per-example profiles). A model on a mesh
    runs ``chunk`` examples per device per step, the examples split over the data axis."""
    cfg = model.config
    params = params_of(model)
    encoded = [encode_example(tokenizer, model, r.get("prompt"), r.get("input_ids"), r.get("target")) for r in requests]
    if not encoded:
        raise JaxeditError("no examples")
    need_argmax = [i for i, (_, t) in enumerate(encoded) if t is None]
    if need_argmax:
        for i in need_argmax:
            ids = encoded[i][0]
            encoded[i] = (ids, [int(to_host(forward(model, [ids]).logits[0, -1]).argmax())])
    T = max(len(i) + len(t) for i, t in encoded)
    B = len(encoded)
    ids, mask = pad_rows([p + t for p, t in encoded], T)
    tmask = np.zeros((B, T), bool)
    for b, (p, t) in enumerate(encoded):
        tmask[b, len(p):len(p) + len(t)] = True
    mesh = mesh_of(model)
    k = data_size(mesh)
    if chunk is None:  # an example holds one layer's gradient at a time (per device): a chunk near 1 GiB, <= 8
        layer = sum(int(x.size) for x in jax.tree.leaves(params["blocks"])) / cfg.n_layers
        layer /= 1 if mesh is None else mesh.shape["model"]
        chunk = max(1, min(-(-B // k), 8, int(2**30 // (8 * layer))))
    if mesh is None:
        args = (cfg, params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(tmask))
    else:  # steps of chunk x data examples, each step's examples split over the data axis
        C = int(chunk) * k
        steps = -(-B // C)
        order = np.arange(steps * C) % B  # padded with repeats of the first examples
        grid = lambda a: put_batch(mesh, a[order].reshape(steps, C, T), axis=1)
        args = (cfg, params, grid(ids), grid(mask), grid(tmask))
    fn = runtime.compiled(saliency_profiles, *args, chunk=int(chunk),
                          what=f"saliency profiles for {B} example{'s' * (B > 1)} of <= {T} tokens")
    runtime.stage(f"computing the saliency of {B} example{'s' * (B > 1)}")
    losses, prof = to_host(fn(*args[1:]))
    if mesh is not None:
        losses, prof = losses.reshape(-1)[:B], {m: v.reshape(steps * C, -1)[:B] for m, v in prof.items()}
    mods = [m for m in prof if m != "block"]
    per = [SaliencyResult(layer=np.asarray(prof["block"][b], np.float64),
                          modules={m: np.asarray(prof[m][b], np.float64) for m in mods},
                          loss=float(losses[b]), n_examples=1, target_ids=list(encoded[b][1])) for b in range(B)]
    mean = SaliencyResult(layer=np.mean([r.layer for r in per], 0),
                          modules={m: np.mean([r.modules[m] for r in per], 0) for m in mods},
                          loss=float(np.mean(losses)), n_examples=B)
    return per, mean


def saliency(model, prompt=None, *, input_ids=None, target=None, tokenizer=None):
    """Saliency profile of one example: ``.layer`` [L] (whole block) and ``.modules`` (attention, mlp, mlp_out)."""
    return saliency_batch(model, [{"prompt": prompt, "input_ids": input_ids, "target": target}],
                          tokenizer=tokenizer)[0][0]
