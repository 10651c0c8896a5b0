"""Causal tracing (Meng et al., ROME): corrupt a span's token embeddings, restore one clean state, measure p(answer).

Semantics follow ``docs/methods.md`` section 1: noise drawn as ``RandomState(seed).randn(samples, span_len, d)`` x
level (seed 1 = the reference's draw), the same noise for every restoration of a prompt; a score is the mean over the
noisy samples of softmax(logits at the last token)[answer]; kind "hidden" restores one block output, "mlp"/"attn"
restore that sublayer's output at one token over a window of layers ``max(0, l - w//2) .. min(L, l + ceil(w/2)) - 1``.

How the grid is computed (method "shared", the default): a restoration at (layer l, token t) leaves every state
below its first restored layer, and every token before t, equal to the corrupted run. So for each l the work starts
at that layer from the corrupted run's stored states, and for each t only tokens t..T-1 are recomputed, attending
to the corrupted run's keys/values for tokens < t. All T token-rows of one layer are packed into one sequence of
T(T+1)/2 positions with a block mask, and the last block and the LM head run only at each row's last token. For
mlp/attn the window's first block changes only the restored token (a known sublayer value, plus that token's MLP for
attn), so the packed run starts a block later, and restore layers with the same clipped window share one column.
This is exact (the same arithmetic as a full forward per cell) and does about a quarter of the work or less.
Method "dense" runs one full forward per cell (vmapped over cells, chunked with ``lax.map``): simpler, for
cross-checks. Rows of tokens before the corrupted
span are never reached by the noise, so "shared" fills them with low_score instead of computing them.
"""
from __future__ import annotations

import dataclasses
import math
import re
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit import runtime
from jaxedit.batching import batches, group_by_bucket, pad_rows, rows_within
from jaxedit.config import ModelConfig
from jaxedit.errors import JaxeditError
from jaxedit.forward import Interventions, apply, block
from jaxedit.model import params_of
from jaxedit.models import FAMILY_MODULES
from jaxedit.runtime import default_memory_budget
from jaxedit.sharding import local_rows, mesh_of, padded, put_batch, to_host

KINDS = ("hidden", "mlp", "attn")
SPLIT_FLOPS = 2e10  # a kind's grid above this (~ seconds on a CPU) runs as its own call: see trace_batch


# ---------------------------------------------------------------------------------------------- results

@dataclasses.dataclass
class TraceResult:
    kind: str
    scores: np.ndarray  # [T, L]: p(answer) after restoring (token, layer)
    low_score: float  # corrupted, nothing restored
    high_score: float  # clean
    answer_id: int
    answer: str
    input_ids: np.ndarray  # [T]
    tokens: list  # decoded tokens
    span: tuple  # (start, end) half-open token range that was corrupted
    window: int
    samples: int
    noise_level: float

    @property
    def ie(self) -> np.ndarray:
        """Indirect effect per cell: scores - low_score."""
        return self.scores - self.low_score

    def npz_fields(self) -> dict:
        """Fields named like the reference's saved traces (so its plotting code reads them)."""
        return dict(scores=self.scores, low_score=self.low_score, high_score=self.high_score,
                    input_ids=self.input_ids, input_tokens=np.array(self.tokens), subject_range=np.array(self.span),
                    answer=self.answer, answer_id=self.answer_id, window=self.window,
                    kind="" if self.kind == "hidden" else self.kind, samples=self.samples,
                    noise_level=self.noise_level)


# ---------------------------------------------------------------------------------------------- inputs

def find_token_range(tokenizer, input_ids: Sequence[int], substring: str) -> tuple:
    """Half-open range of the tokens overlapping the first occurrence of ``substring`` in the decoded prompt.

    Where each token's characters lie is read from decodes of growing prefixes of the ids, not from decoding each
    token alone: a sentencepiece-style decoder drops the leading space of a token decoded on its own ("▁Tower" ->
    "Tower"), and a byte-level token can hold part of a character."""
    ids = [int(i) for i in input_ids]
    prefixes = tokenizer.batch_decode([ids[:i + 1] for i in range(len(ids))], clean_up_tokenization_spaces=False)
    whole = prefixes[-1] if prefixes else ""
    pos = whole.find(substring)
    if not substring or pos < 0:
        raise JaxeditError(f"span {substring!r} does not occur in the prompt {whole!r}")
    ends = [len(p) for p in prefixes]  # where each token's text ends
    start = next(i for i, end in enumerate(ends) if end > pos)
    end = next(i for i, end in enumerate(ends) if end >= pos + len(substring)) + 1
    return start, end


def window_layers(layer: int, window: int, n_layers: int) -> range:
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def parse_noise(noise):
    """A float, 's<k>' (k x std of the span embeddings), or an explicit array -> (kind, value)."""
    if isinstance(noise, str):
        m = re.fullmatch(r"s(\d+(\.\d+)?)", noise.strip())
        if m:
            return "std", float(m.group(1))
        try:
            return "level", float(noise)
        except ValueError:
            raise JaxeditError(f"bad noise {noise!r}: use a number, 's<k>' (k x embedding std) or an array") from None
    if isinstance(noise, (int, float)):
        return "level", float(noise)
    return "array", np.asarray(noise, np.float32)


def embedding_std(model, token_id_lists) -> float:
    """Std (unbiased, over all elements) of the token embeddings of the given token lists, concatenated."""
    fam = FAMILY_MODULES[model.config.family]
    ids = np.concatenate([np.asarray(t, np.int64) for t in token_id_lists])
    if ids.size == 0:
        raise JaxeditError("no tokens to take the embedding std over")
    emb = to_host(fam.embed_tokens(model.config, params_of(model), jnp.asarray(ids))).astype(np.float64)
    return float(emb.std(ddof=1)) if emb.size > 1 else 0.0


def resolve_noise_level(model, tokenizer, noise, span_token_lists, noise_strings=None) -> float:
    """The noise scale: the float itself, or k x embedding std for "s<k>" (over ``noise_strings`` when given, else
    over the spans' tokens); NaN for an explicit array."""
    mode, value = parse_noise(noise)
    if mode == "level":
        return value
    if mode == "array":
        return float("nan")
    if noise_strings:
        if tokenizer is None:
            raise JaxeditError("noise strings need a tokenizer")
        span_token_lists = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in noise_strings]
    return value * embedding_std(model, span_token_lists)


def draw_noise(samples: int, span_len: int, d: int, level: float, seed: int = 1, uniform: bool = False):
    prng = np.random.RandomState(seed)
    base = prng.uniform(-1, 1, (samples, span_len, d)) if uniform else prng.randn(samples, span_len, d)
    return (level * base).astype(np.float32)


def _resolve_target(tokenizer, target):
    if target is None or isinstance(target, (int, np.integer)):
        return None if target is None else int(target)
    if tokenizer is None:
        raise JaxeditError("a target string needs a tokenizer")
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise JaxeditError(f"target {target!r} encodes to no tokens")
    return int(ids[0])


def prepare_inputs(model, tokenizer, prompt, input_ids, span):
    if input_ids is None:
        if prompt is None or not str(prompt).strip():
            raise JaxeditError("empty prompt")
        if tokenizer is None:
            raise JaxeditError("a text prompt needs a tokenizer")
        input_ids = tokenizer(prompt)["input_ids"]
    ids = np.asarray(input_ids, np.int32).reshape(-1)
    T = ids.size
    if T == 0:
        raise JaxeditError("empty prompt")
    if T > model.config.max_positions:
        raise JaxeditError(f"prompt has {T} tokens, longer than the model's context ({model.config.max_positions})")
    if span is None:
        raise JaxeditError("no span: give a subject string or a (start, end) token range")
    if isinstance(span, str):
        if tokenizer is None:
            raise JaxeditError("a subject string needs a tokenizer")
        span = find_token_range(tokenizer, ids, span)
    start, end = (int(s) for s in span)
    if not 0 <= start < end <= T:
        raise JaxeditError(f"span {(start, end)} is not a token range inside the {T}-token prompt")
    return ids, (start, end)


def check_options(kinds, samples, window):
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    for k in kinds:
        if k not in KINDS:
            raise JaxeditError(f"unknown kind {k!r} (choose from {', '.join(KINDS)})")
    if not kinds:
        raise JaxeditError("no kind to trace")
    if int(samples) < 1:
        raise JaxeditError(f"samples must be >= 1 (got {samples})")
    if int(window) < 1:
        raise JaxeditError(f"window must be >= 1 (got {window})")
    return kinds


# ---------------------------------------------------------------------------------------------- the computation
# Everything below works on one prompt padded on the right to a bucket length T (real length n); jax.vmap adds
# the prompt axis. Right padding leaves the real tokens' computation untouched (causal attention).

def _p_answer(logits, answer):
    return jax.nn.softmax(logits, axis=-1)[..., answer]


def _clean_and_corrupted(cfg, params, ids, n, embed_mask, noise, answer, replace):
    """Clean run (captures) and corrupted runs (per-layer inputs). Returns what every kind's grid needs."""
    T = ids.shape[0]
    S = noise.shape[0]
    mask = (jnp.arange(T) < n).astype(jnp.int32)[None]
    last = jnp.reshape(n - 1, (1, 1))
    clean = apply(cfg, params, ids[None], mask, capture=("hidden", "attn", "mlp"), logit_positions=last)
    p_clean = jax.nn.softmax(clean.logits[0, 0])
    answer = jnp.where(answer < 0, jnp.argmax(p_clean), answer)
    iv = Interventions(embed_mask=jnp.broadcast_to(embed_mask, (S, T)), embed_values=noise, embed_replace=replace)
    corr = apply(cfg, params, jnp.broadcast_to(ids, (S, T)), jnp.broadcast_to(mask, (S, T)), iv,
                 capture=("hidden", "attn", "embeds", "kv"), logit_positions=jnp.broadcast_to(last, (S, 1)))
    low = _p_answer(corr.logits[:, 0], answer).mean()
    # layer inputs of the corrupted runs: [L + 1, S, T, d] (index 0: the embeddings; index j: block j-1's output)
    layer_in = jnp.concatenate([corr.embeds[None], jnp.moveaxis(corr.hidden, 1, 0)], axis=0)
    return dict(answer=answer, high=p_clean[answer], low=low, clean_hidden=clean.hidden[0], clean_attn=clean.attn[0],
                clean_mlp=clean.mlp[0], layer_in=layer_in, corr_attn=jnp.moveaxis(corr.attn, 1, 0),
                kv=tuple(jnp.moveaxis(a, 1, 0) for a in corr.kv))  # corrupted keys/values [L, S, T, KV, hd]


def packed_layout(T: int, rows: Sequence[int]):
    """Static index arrays for packing token-rows ``rows`` (restored token t; positions t..T-1) into one sequence."""
    row_of = np.concatenate([np.full(T - t, t) for t in rows]).astype(np.int32)
    tok_of = np.concatenate([np.arange(t, T) for t in rows]).astype(np.int32)
    offsets = np.cumsum([0] + [T - t for t in rows])[:-1].astype(np.int32)
    allowed_cache = np.arange(T)[None, :] < row_of[:, None]  # corrupted tokens before the row's token
    allowed_self = (row_of[:, None] == row_of[None, :]) & (tok_of[None, :] <= tok_of[:, None])
    return row_of, tok_of, offsets, np.concatenate([allowed_cache, allowed_self], axis=1)


def _grid_shared(cfg, params, kind, window, base, n, rows, group):
    """Scores [len(rows), L] for one kind and the token-rows ``rows``, with prefix sharing (see module doc).

    ``group`` restore layers run together as one batch (lax.map over the groups): a layer step then updates only
    the rows whose start layer has been reached. group=1 does the least arithmetic; larger groups make fewer,
    bigger steps (per-step overhead on small models, utilisation on accelerators).
    """
    L = cfg.n_layers
    _, S, T, d = base["layer_in"].shape
    # mlp/attn: restore layers whose clipped windows coincide (all of them when L <= window) give the same column;
    # compute each distinct window once
    if kind == "hidden":
        reps, col = list(range(L)), np.arange(L)
    else:
        spans = [(w.start, w.stop) for w in (window_layers(l, window, L) for l in range(L))]
        reps = [l for l in range(L) if spans.index(spans[l]) == l]
        col = np.array([reps.index(spans.index(s)) for s in spans])
    U = len(reps)
    G = min(group, U)
    row_of, tok_of, offsets, allowed = packed_layout(T, rows)
    P = tok_of.size
    diag = jnp.asarray(row_of == tok_of)
    row_of_j = jnp.asarray(row_of)
    positions = jnp.asarray(tok_of)[None]  # [1, P] and [1, P, T + P]: broadcast over the G x S rows
    allowed = jnp.asarray(allowed)[None]
    last_idx = jnp.asarray(offsets) + jnp.clip(n - 1 - jnp.asarray(rows), 0)  # each row's last real token
    fam = FAMILY_MODULES[cfg.family]
    clean_sub = {"mlp": base["clean_mlp"], "attn": base["clean_attn"]}.get(kind)
    half = window // 2

    rows_j, offsets_j = jnp.asarray(rows), jnp.asarray(offsets)  # a row's restored token, its packed position

    def start_of(l):  # the first layer whose block is run for a restoration at l
        return l + 1 if kind == "hidden" else jnp.maximum(0, l - half) + 1

    def init(l):  # the packed state entering layer start_of(l): the corrupted run, plus the restoration
        x = jnp.take(base["layer_in"], start_of(l), axis=0)[:, tok_of]
        if kind == "hidden":
            y = jnp.broadcast_to(base["clean_hidden"][l][rows_j], (S, len(rows), d))
        else:
            # the window's first block changes only the restored token's own output (its attention reads the
            # corrupted states): mlp = the corrupted input + attention output + the clean MLP output; attn = the
            # corrupted input + the clean attention output, then that token's MLP
            s = start_of(l) - 1
            x_in = jnp.take(base["layer_in"], s, axis=0)[:, rows_j]  # [S, rows, d]
            if kind == "mlp":
                y = x_in + base["corr_attn"][s][:, rows_j] + base["clean_mlp"][s][rows_j][None]
            else:
                pl = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, s, keepdims=False), params["blocks"])
                h = x_in + base["clean_attn"][s][rows_j][None]
                y = h + fam.mlp_out(cfg, pl, fam.mlp_key(cfg, pl, fam.norm_mlp(cfg, pl, h)))
        return x.at[:, offsets_j].set(y.astype(x.dtype))

    def layer(j, x, ls, queries=None):  # block j on the packed states x [G, S, P, d] (output at ``queries`` only)
        pl = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, j, keepdims=False), params["blocks"])
        k, v = (jnp.tile(a[j], (G, 1, 1, 1)) for a in base["kv"])  # the corrupted run's, for tokens before a row's
        sel = slice(None) if queries is None else queries
        Q = P if queries is None else len(rows)
        ivl = {}
        if kind != "hidden":
            in_window = (j >= ls - half) & (j < ls + window - half)  # [G]
            restore = diag[sel][None, None, :] & in_window[:, None, None]
            ivl[f"restore_{kind}"] = jnp.broadcast_to(restore, (G, S, Q)).reshape(G * S, Q)
            ivl[f"clean_{kind}"] = clean_sub[j][row_of_j[sel]][None]
        y, _ = block(cfg, pl, x.reshape(G * S, P, d), positions, allowed[:, sel], ivl, kv_prefix=(k, v),
                     queries=queries)
        return y.reshape(G, S, Q, d)

    def run(ls):  # ls: [G] restore layers
        starts = start_of(ls)

        def body(j, x):
            return jnp.where((j >= starts)[:, None, None, None], layer(j, x, ls), x)

        x = jax.lax.fori_loop(jnp.min(starts), L - 1, body, jax.vmap(init)(ls))
        # the last block only at each row's last token: the LM head reads nothing else
        x_last = jnp.where((L - 1 >= starts)[:, None, None, None], layer(L - 1, x, ls, last_idx), x[:, :, last_idx])
        x_last = fam.final_norm(cfg, params, x_last)
        return _p_answer(fam.lm_head(cfg, params, x_last), base["answer"]).mean(1)  # [G, rows]

    steps = -(-U // G)
    ls = jnp.asarray(np.array(reps + [reps[-1]] * (steps * G - U), np.int32).reshape(steps, G))
    scores = jax.lax.map(run, ls).reshape(steps * G, len(rows))[:U]
    return scores[col].T  # [rows, L]


def _grid_dense(cfg, params, kind, window, base, ids, n, embed_mask, noise, replace, cells_per_step):
    """Scores [T, L]: one full forward per cell (vmapped over cells, lax.map over chunks of cells)."""
    L = cfg.n_layers
    T = ids.shape[0]
    S = noise.shape[0]
    mask = (jnp.arange(T) < n).astype(jnp.int32)
    layers = np.arange(L)

    lo = jnp.asarray(layers)[None, :]

    def cell(c):
        t, l = c // L, c % L
        sel = (lo == l) if kind == "hidden" else (lo >= l - window // 2) & (lo < l + window - window // 2)
        restore = jnp.broadcast_to(sel.T & (jnp.arange(T) == t)[None], (S, L, T))
        iv = Interventions(embed_mask=jnp.broadcast_to(embed_mask, (S, T)), embed_values=noise, embed_replace=replace,
                           **{f"restore_{kind}": restore, f"clean_{kind}": base[f"clean_{kind}"][None]})
        out = apply(cfg, params, jnp.broadcast_to(ids, (S, T)), jnp.broadcast_to(mask, (S, T)), iv,
                    logit_positions=jnp.broadcast_to(jnp.reshape(n - 1, (1, 1)), (S, 1)))
        return _p_answer(out.logits[:, 0], base["answer"]).mean()

    scores = jax.lax.map(cell, jnp.arange(T * L), batch_size=cells_per_step)
    return scores.reshape(T, L)


def row_flops(cfg: ModelConfig, keys: int) -> float:
    """Matmul FLOPs of one block for one query row attending to ``keys`` keys."""
    proj = 2 * cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = 2 * cfg.d_model * cfg.d_ff * (3 if cfg.family == "llama" else 2)
    return proj + mlp + 4 * keys * cfg.n_heads * cfg.head_dim


def packed_bytes(cfg: ModelConfig, S: int, T: int, P: int) -> float:
    """Working set of one restore layer's packed step: activations ~ P x (d_ff + 4d) plus attention scores
    P x (T + P) x heads, float32, for each of S samples."""
    return 4 * S * P * (cfg.d_ff + 4 * cfg.d_model + cfg.n_heads * (T + P))


def auto_layers_per_step(cfg: ModelConfig, S: int, T: int, groups, budget_bytes: float) -> int:
    """How many restore layers to batch per step: enough that a step is not dominated by per-step overhead
    (~1e7 FLOPs on CPU, ~5e10 on accelerators), within the memory budget; 1 when a single layer's step is big.
    Batching costs arithmetic for the hidden kind (a step runs every layer from the group's first start), so on CPU,
    where a step's overhead is small, it is 1 for all but the smallest models (measured on 4-layer models with
    d = 32 and 64: 1 layer per step is 25-30% faster than 4)."""
    P = max(sum(T - t for t in g) for g in groups)
    work = S * P * row_flops(cfg, T + P)
    target = 1e7 if jax.default_backend() == "cpu" else 5e10
    g = max(1, min(cfg.n_layers, int(math.ceil(target / work))))
    return min(g, rows_within(budget_bytes, max(packed_bytes(cfg, S, T, P), 1)))


def row_groups(T: int, S: int, cfg: ModelConfig, budget_bytes: float, first: int = 0):
    """Split token-rows first..T-1 into consecutive groups whose packed working set fits ``budget_bytes``."""
    groups, cur, size = [], [], 0
    for t in range(first, T):
        rows = T - t
        if cur and packed_bytes(cfg, S, T, size + rows) > budget_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += rows
    groups.append(cur)
    return groups


@partial(jax.jit, static_argnames=("cfg", "kinds", "window", "replace", "method", "groups", "cells_per_step",
                                   "layers_per_step"))
def trace_grid(cfg, params, ids, n, embed_mask, noise, answer, *, kinds, window, replace=False, method="shared",
               groups=None, cells_per_step=None, layers_per_step=1):
    """The whole computation for a batch of prompts in one jit call.

    ids [B, T] (right-padded), n [B] real lengths, embed_mask [B, T] (the span), noise [B, S, T, d] (zero outside
    the span), answer [B] (-1 = the clean argmax). Returns a dict: answer, high, low [B] and per kind scores [B, T, L].
    """
    def one(ids, n, embed_mask, noise, answer):
        base = _clean_and_corrupted(cfg, params, ids, n, embed_mask, noise, answer, replace)
        out = {"answer": base["answer"], "high": base["high"], "low": base["low"]}
        for kind in kinds:
            if method == "dense":
                out[kind] = _grid_dense(cfg, params, kind, window, base, ids, n, embed_mask, noise, replace,
                                        cells_per_step)
            else:
                # rows before the first corrupted token are never touched by the noise: exactly low_score
                skipped = jnp.full((groups[0][0], cfg.n_layers), base["low"])
                parts = [_grid_shared(cfg, params, kind, window, base, n, rows, layers_per_step) for rows in groups]
                out[kind] = jnp.concatenate([skipped] + parts, axis=0)
        return out

    return jax.vmap(one)(ids, n, embed_mask, noise, answer)


# ---------------------------------------------------------------------------------------------- public API

def trace_batch(model, requests, *, kinds=KINDS, samples=10, noise="s3", window=10, tokenizer=None, seed=1,
                uniform=False, replace=False, method="shared", batch_size=8, bucket=4, memory_budget=None,
                cells_per_step=None, layers_per_step=None, noise_strings=None, progress=None, fixed_batch=False,
                noise_per_prompt=False, on_kind=None, kind_by_kind=None):
    """Trace many prompts. ``requests``: dicts with "prompt" (or "input_ids"), "subject" (a string) or "span"
    ((start, end) token range), optional "target", optional "noise" (an explicit array for this prompt).

    Prompts are right-padded into length buckets (multiples of ``bucket`` tokens) and run ``batch_size`` at a time,
    so each bucket compiles once (one program per kind). ``noise``: float, "s<k>" (k x std of the token embeddings
    of all the requests' spans together, or of ``noise_strings`` when given; with ``noise_per_prompt=True``, of each
    request's own span, so a prompt gets the same level alone and in any batch), or one array
    [samples, span_len, d] used for every request. Each result's ``noise_level`` is the level it was traced with.
    ``progress``: a callable(n_done) called after each batch (the CLI passes a progress bar's update);
    ``on_kind``: a callable(kinds) called before each call (the kinds it computes, joined by ", ").
    ``kind_by_kind``: one compiled call per kind (True) or all kinds in one (False); default: per kind when a kind's
    grid is big (over :data:`SPLIT_FLOPS`: progress between kinds is worth the extra compiles), else in one.
    ``fixed_batch``: always pad a batch to ``batch_size`` prompts (one compile per bucket across calls).
    ``layers_per_step`` / ``cells_per_step`` / ``memory_budget``: chunking of the shared / dense grid (auto).
    A model placed on a mesh (``jaxedit.load(..., mesh=)``) runs each batch with its prompts split over the
    ``data`` axis (a batch is padded to a multiple of it) and the model over ``model``; with several processes
    each one draws the noise of its own prompts only, and every process gets every result.
    Returns one dict kind -> :class:`TraceResult` per request, in order.
    """
    kinds = check_options(kinds, samples, window)
    cfg = model.config
    params = params_of(model)
    prepared = []
    for r in requests:
        ids, span = prepare_inputs(model, tokenizer, r.get("prompt"), r.get("input_ids"),
                                   r.get("span", r.get("subject")))
        prepared.append((ids, span, _resolve_target(tokenizer, r.get("target")), r.get("noise")))
    mode, value = parse_noise(noise)
    if noise_per_prompt and not noise_strings:
        levels = [resolve_noise_level(model, tokenizer, noise, [ids[s:e]]) for ids, (s, e), _, _ in prepared]
    else:
        level = resolve_noise_level(model, tokenizer, noise, [ids[s:e] for ids, (s, e), _, _ in prepared],
                                    noise_strings)
        levels = [level] * len(prepared)
    levels = [float("nan") if own is not None else lv for (_, _, _, own), lv in zip(prepared, levels)]  # own array

    d = cfg.d_model
    for ids, (s, e), _, own in prepared:
        arr = own if own is not None else (value if mode == "array" else None)
        if arr is not None and np.shape(arr) != (samples, e - s, d):
            raise JaxeditError(f"noise array has shape {np.shape(arr)}, expected (samples, span_len, d) = "
                               f"{(samples, e - s, d)}")

    def noise_of(j):  # drawn when its prompt is placed (on a mesh: only by the process whose devices hold it)
        _, (s, e), _, own = prepared[j]
        arr = own if own is not None else (value if mode == "array" else None)
        return np.asarray(draw_noise(samples, e - s, d, levels[j], seed, uniform) if arr is None else arr,
                          np.float32)

    mesh = mesh_of(model)

    order = sorted(range(len(prepared)), key=lambda i: len(prepared[i][0]))  # within a bucket: shortest first
    buckets = group_by_bucket(order, lambda j: len(prepared[j][0]), bucket, cap=cfg.max_positions)
    results: list = [None] * len(prepared)
    budget = memory_budget or default_memory_budget()
    for T, chunk in ((T, chunk) for T, members in buckets for chunk in batches(members, batch_size)):
        # a fixed batch shape means one compile per bucket
        B = batch_size if (fixed_batch or len(requests) > batch_size) else len(chunk)
        B = padded(B, mesh)  # prompts split over the data axis (the padding repeats the first prompt)
        mine = set(local_rows(mesh, B).tolist())
        filled = chunk + [chunk[0]] * (B - len(chunk))
        ids_b, _ = pad_rows([prepared[j][0] for j in filled], T)
        n_b = np.array([len(prepared[j][0]) for j in filled], np.int32)
        span_b = np.zeros((B, T), bool)
        noise_b = np.zeros((B, samples, T, d), np.float32)
        ans_b = np.full((B,), -1, np.int32)
        for b, j in enumerate(filled):
            _, (s, e), tgt, _ = prepared[j]
            span_b[b, s:e] = True
            if b in mine:
                noise_b[b, :, s:e] = noise_of(j)
            ans_b[b] = -1 if tgt is None else tgt
        # earliest span start: rows before it cannot change (rounded down to the bucket: fewer programs)
        first = min(prepared[j][1][0] for j in chunk) // bucket * bucket
        groups = tuple(tuple(g) for g in row_groups(T, samples, cfg, budget, first))
        static = dict(window=int(window), replace=bool(replace), method=method, groups=groups,
                      layers_per_step=layers_per_step or auto_layers_per_step(cfg, samples, T, groups, budget),
                      cells_per_step=cells_per_step or rows_within(budget, 8 * samples * T * (cfg.d_ff + 4 * d)))
        put = lambda a: put_batch(mesh, a)  # noqa: E731 (on one device: jnp.asarray)
        args = (cfg, params, put(ids_b), put(n_b), put(span_b), put(noise_b), put(ans_b))
        out = {}
        # a long call per kind (progress between kinds, and programs any later run of one kind reuses); short
        # ones all kinds in one call (one compile)
        split = kind_by_kind if kind_by_kind is not None else \
            B * samples * cfg.n_layers * T * (T + 1) / 2 * row_flops(cfg, 2 * T) > SPLIT_FLOPS
        for part in ([(k,) for k in kinds] if split else [kinds]):
            if on_kind is not None:
                on_kind(", ".join(part))
            fn = runtime.compiled(trace_grid, *args, kinds=part, **static,
                                  what=f"causal tracing ({', '.join(part)}) for {T}-token prompts, {B} per call")
            out.update(to_host(fn(*args[1:])))
        for b, j in enumerate(chunk):
            ids, span, _, _ = prepared[j]
            n = len(ids)
            answer = int(out["answer"][b])
            toks = [tokenizer.decode([int(t)]) for t in ids] if tokenizer is not None else [str(int(t)) for t in ids]
            ans_str = tokenizer.decode([answer]) if tokenizer is not None else str(answer)
            results[j] = {k: TraceResult(kind=k, scores=np.asarray(out[k][b][:n], np.float64),
                                         low_score=float(out["low"][b]), high_score=float(out["high"][b]),
                                         answer_id=answer, answer=ans_str, input_ids=np.asarray(ids), tokens=toks,
                                         span=span, window=int(window), samples=int(samples),
                                         noise_level=levels[j])
                          for k in kinds}
        if progress is not None:
            progress(len(chunk))
    return results


def trace(model, prompt=None, *, input_ids=None, span=None, kinds=KINDS, samples=10, noise="s3", window=10,
          target=None, tokenizer=None, seed=1, uniform=False, replace=False, method="shared", memory_budget=None,
          layers_per_step=None):
    """Causal trace of one prompt. ``span``: a subject string or a (start, end) token range; ``noise``: a float,
    "s<k>" (k x std of the span's token embeddings) or an array [samples, span_len, d_model]; ``target``: the
    answer token (id or string; default the clean argmax). Returns a dict kind -> :class:`TraceResult`."""
    req = {"prompt": prompt, "input_ids": input_ids, "span": span, "target": target}
    return trace_batch(model, [req], kinds=kinds, samples=samples, noise=noise, window=window,
                       tokenizer=tokenizer, seed=seed, uniform=uniform, replace=replace, method=method, batch_size=1,
                       bucket=1, memory_budget=memory_budget, layers_per_step=layers_per_step)[0]

