"""ProFS (Uppaal et al., ICLR 2025, "DeTox"): remove a toxic subspace from the MLP output projections by a
projection, without gradients.

Inputs are pairs of texts (non-toxic = "preferred", toxic = "non-preferred"). Then:

1. **Sentence embeddings.** Each set (the N preferred texts, the N non-preferred texts) is tokenized as one padded
   batch (``max_len`` tokens, truncation), and for every block l the block's output (the residual stream after
   block l; for the last block its own output, not the final-normed state) is averaged over the sequence:
   ``e_l(text)`` [d]. ``mean_over="tokens"`` (the default) averages over the text's real tokens only.
   ``mean_over="padded"`` reproduces the public implementation: the mean is over every position of the set's
   padded length (the longest text of the set, at most ``max_len``), padding included; positions are numbered
   0..T-1 on every row, padding keys are masked in every block, except that the last block of a GPT-2 model sees
   the padding keys (a causal mask only: the public code runs that block again without the attention mask).
   Padding is on the right with the tokenizer's pad token (its end-of-sequence token when it has none).
2. **Preference matrix.** ``T_l = (e_l(preferred) - e_l(non-preferred)) / 2``, [N, d], one row per pair.
3. **Centering** (``centering=True``): ``mu_l``, the top right-singular vector of the preferred embeddings [N, d]
   (not mean-centred), is projected out of every row: ``T_l <- T_l - (T_l mu_l) mu_l^T``.
4. **Toxic subspace.** ``V_l`` [d, rank]: the top-``rank`` right-singular vectors of ``T_l``;
   ``P_l = V_l V_l^T``.
5. **Edit.** For each edited layer l, only the MLP output projection changes (``w_out`` [d_ff, d], ``x @ W``
   orientation: GPT-2's c_proj, LLaMA's down_proj): ``W_l <- W_l (I - P_l)``, so that the MLP's output before its
   bias has no component in the subspace. Biases are untouched.

The subspace of layer l comes from the output of block l (transformers' ``hidden_states[l + 1]``) and edits the
output projection of the same block l, as in the public implementation. The default layers are the upper part of
the model, ``round(L * 10 / 24)`` to ``L - 1`` (the public GPT-2 Medium configuration edits 10..23 of 24 layers);
the default rank is 2. Embeddings are computed in float32 (block outputs in the model's dtype, means in float32),
the SVDs in float64 on the host, the projection in float32 on the device (cast back to the weights' dtype).
"""
from __future__ import annotations

import time
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.calls import public
from jaxedit import runtime
from jaxedit.batching import pad_rows, round_up
from jaxedit.config import ModelConfig
from jaxedit.errors import JaxeditError
from jaxedit.forward import block, causal_allowed, embed, positions_from_mask, scan_layers
from jaxedit.layer_selection import check_layers
from jaxedit.model import model_from_params, params_of
from jaxedit.sharding import mesh_of, padded, put_batch, to_host

MEAN_OVER = ("tokens", "padded")


def default_layers(n_layers: int) -> list:
    """The layers ProFS edits by default: ``round(n_layers * 10 / 24)`` .. ``n_layers - 1``."""
    return list(range(min(int(round(n_layers * 10 / 24)), n_layers - 1), n_layers))


def read_pairs(pairs) -> tuple:
    """``(preferred, non_preferred)`` lists of texts from (non-toxic, toxic) 2-tuples or dicts with "preferred" and
    "non_preferred"."""
    if isinstance(pairs, (str, bytes, dict)) or not hasattr(pairs, "__len__"):
        raise JaxeditError("pairs must be a list of (non-toxic, toxic) text pairs")
    if len(pairs) == 0:
        raise JaxeditError("profs needs at least one (non-toxic, toxic) pair")
    good, bad = [], []
    for i, p in enumerate(pairs):
        if isinstance(p, dict):
            missing = [k for k in ("preferred", "non_preferred") if k not in p]
            if missing:
                raise JaxeditError(f"pair {i}: missing {' and '.join(repr(k) for k in missing)}")
            p = (p["preferred"], p["non_preferred"])
        elif isinstance(p, (str, bytes)) or not hasattr(p, "__len__") or len(p) != 2:
            raise JaxeditError(f"pair {i}: expected a (non-toxic, toxic) pair of texts or a dict with 'preferred' "
                               f"and 'non_preferred'")
        for text in p:
            if not isinstance(text, str) or not text.strip():
                raise JaxeditError(f"pair {i}: each text must be a non-empty string")
        good.append(p[0])
        bad.append(p[1])
    return good, bad


def _pad_id(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    return 0


@partial(jax.jit, static_argnames=("cfg", "padded_mode"))
def sentence_embeddings(cfg: ModelConfig, params, ids, mask, weight, padded_mode: bool = False):
    """[B, L, d] float32: per row and block, the block's output averaged over the positions with ``weight`` 1.

    ``padded_mode``: positions 0..T-1 on every row (the padding numbered on), and the last block of a GPT-2 model
    with a causal mask only (see the module docstring); otherwise positions start at 0 on each row's first real
    token, as in :func:`jaxedit.forward.apply`."""
    B, T = ids.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)) if padded_mode \
        else positions_from_mask(mask)
    allowed = causal_allowed(mask)
    w = weight.astype(jnp.float32)[..., None]
    denom = jnp.maximum(jnp.sum(w, 1), 1.0)

    def mean(h):
        return jnp.sum(h.astype(jnp.float32) * w, 1) / denom

    def step(x, pl):
        y, _ = block(cfg, pl, x, positions, allowed)
        return y, mean(y)

    x = embed(cfg, params, ids, positions)
    blocks = params["blocks"]
    if padded_mode and cfg.family == "gpt2":
        x, means = scan_layers(step, x, blocks, stop=cfg.n_layers - 1)
        causal = causal_allowed(jnp.ones_like(mask))
        y, _ = block(cfg, jax.tree.map(lambda a: a[-1], blocks), x, positions, causal)
        means = jnp.concatenate([means, mean(y)[None]], 0)
    else:
        _, means = jax.lax.scan(step, x, blocks)
    return jnp.moveaxis(means, 0, 1)


def _embed_set(cfg, params, rows, pad, mean_over, cap, batch_size, bar) -> np.ndarray:
    """[N, L, d] float64 sentence embeddings of the token ``rows`` (one set, padded to its longest row)."""
    mesh = mesh_of(params)
    n = len(rows)
    longest = max(len(r) for r in rows)
    T = round_up(longest, 32, cap=cap)  # a bucket (fewer compiles); the padded mean stops at ``longest``
    B = padded(min(batch_size, n), mesh)
    out = []
    for start in range(0, n, B):
        part = rows[start:start + B]
        ids, mask = pad_rows(part, T, n_rows=B, value=pad)
        weight = mask.copy() if mean_over == "tokens" else np.zeros_like(mask)
        if mean_over == "padded":
            weight[:len(part), :longest] = 1
        put = (lambda a: jnp.asarray(a)) if mesh is None else (lambda a: put_batch(mesh, a))
        e = sentence_embeddings(cfg, params, put(ids), put(mask), put(weight), padded_mode=mean_over == "padded")
        out.append(np.asarray(to_host(e), np.float64)[:len(part)])
        bar.update(len(part))
    return np.concatenate(out, 0)


def toxic_subspace(preferred: np.ndarray, non_preferred: np.ndarray, rank: int, centering: bool = True):
    """One layer's subspace from its [N, d] embeddings: ``(V [rank, d], singular values of the preference matrix)``.
    The sign of each vector is fixed so that its largest-magnitude entry is positive."""
    Tm = (np.asarray(preferred, np.float64) - np.asarray(non_preferred, np.float64)) / 2
    if centering:
        mu = np.linalg.svd(np.asarray(preferred, np.float64), full_matrices=False)[2][0]
        Tm = Tm - np.outer(Tm @ mu, mu)
    _, s, vt = np.linalg.svd(Tm, full_matrices=False)
    V = vt[:rank]
    sign = np.sign(V[np.arange(rank), np.argmax(np.abs(V), 1)])
    return V * np.where(sign == 0, 1.0, sign)[:, None], s


def _project_out_fn(w_out, layers, V):
    """``w_out`` [L, d_ff, d] with ``w_out[l] <- w_out[l] (I - V^T V)`` for the ``layers`` [k]; V [k, r, d]."""
    W = w_out[layers].astype(jnp.float32)
    W = W - jnp.einsum("kfr,krd->kfd", jnp.einsum("kfd,krd->kfr", W, V), V)
    return w_out.at[layers].set(W.astype(w_out.dtype))


_project_out = jax.jit(_project_out_fn)


@public("pairs", old=("tokenizer",))
def profs(model, pairs, *, tokenizer=None, layers=None, rank: int = 2, centering: bool = True, max_len: int = 128,
          progress: bool = True, mean_over: str = "tokens", batch_size: int = 32):
    """ProFS on ``pairs`` of (non-toxic, toxic) texts (see the module docstring). Returns ``(edited, report)``:
    the edited model (its weights placed as the input's) and a report with ``layers``, ``subspace`` {layer: [rank,
    d] orthonormal rows}, ``singular_values`` {layer: the preference matrix's singular values, after centering},
    ``rank``, ``centering``, ``mean_over``, ``n_pairs``, ``truncated`` (texts cut at ``max_len`` tokens) and
    ``seconds``. ``max_len`` is capped at the model's context; ``batch_size``: texts per forward."""
    t0 = time.perf_counter()
    if tokenizer is None:
        raise JaxeditError("profs needs a tokenizer")
    cfg = model.config
    good, bad = read_pairs(pairs)
    n = len(good)
    if isinstance(layers, (int, np.integer)):
        layers = [layers]
    layers = default_layers(cfg.n_layers) if layers is None else check_layers(cfg.n_layers, layers)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise JaxeditError(f"rank must be an integer >= 1 (got {rank!r})")
    if rank > min(n, cfg.d_model):
        raise JaxeditError(f"rank {rank} is more than {n} pair{'s' * (n > 1)} of {cfg.d_model}-dimensional "
                           f"embeddings give (at most {min(n, cfg.d_model)})")
    if mean_over not in MEAN_OVER:
        raise JaxeditError(f"mean_over must be 'tokens' or 'padded' (got {mean_over!r})")
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise JaxeditError(f"max_len must be an integer >= 1 (got {max_len!r})")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise JaxeditError(f"batch_size must be an integer >= 1 (got {batch_size!r})")
    cap = min(int(max_len), cfg.max_positions)
    sets, truncated = [], 0
    for texts in (good, bad):
        rows = [list(r) for r in tokenizer(texts, truncation=True, max_length=cap)["input_ids"]]
        truncated += sum(len(r) > cap for r in tokenizer(texts)["input_ids"])
        empty = [i for i, r in enumerate(rows) if not r]
        if empty:
            raise JaxeditError(f"pair {empty[0]}: a text tokenizes to no tokens")
        sets.append(rows)

    params = params_of(model)
    pad = _pad_id(tokenizer)
    runtime.stage(f"ProFS: sentence embeddings of {n} pair{'s' * (n > 1)} ({mean_over} mean, {cfg.n_layers} blocks)")
    with runtime.bar(2 * n, "ProFS sentence embeddings", "text", enabled=progress) as bar:
        emb = [_embed_set(cfg, params, rows, pad, mean_over, cap, int(batch_size), bar) for rows in sets]

    runtime.stage(f"ProFS: rank-{rank} subspaces of layers {layers}{' (centered)' * bool(centering)}")
    subspace, singular = {}, {}
    for l in layers:
        subspace[l], singular[l] = toxic_subspace(emb[0][:, l], emb[1][:, l], int(rank), bool(centering))

    w_out = params["blocks"]["w_out"]
    V = np.stack([subspace[l] for l in layers]).astype(np.float32)
    idx = np.asarray(layers, np.int32)
    if mesh_of(params) is None:
        new = _project_out(w_out, idx, V)
    else:  # the edited projection keeps the input's placement
        new = jax.jit(_project_out_fn, out_shardings=w_out.sharding)(w_out, idx, V)
    edited = model_from_params(cfg, dict(params, blocks=dict(params["blocks"], w_out=new)))
    report = {"layers": list(layers), "rank": int(rank), "centering": bool(centering), "mean_over": mean_over,
              "n_pairs": n, "truncated": int(truncated), "subspace": subspace, "singular_values": singular,
              "seconds": time.perf_counter() - t0}
    return edited, report
