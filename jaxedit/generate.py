"""Sampling text from a model with a key/value cache.

Two entry points share the per-token step (:func:`_token_step`, the same :func:`jaxedit.forward.block` as every
other computation, attending to the cached keys/values):

* :func:`sample` (the study's bulk: many prompts x many samples): prompts are left-padded into length buckets and
  run through one full forward (the prefill, which fills the cache), then each new token is one cached step; rows
  of a bucket run in fixed-size batches (one compile per bucket), sized to a memory budget. Nucleus (top-p),
  top-k, temperature and greedy decoding; each sample's random stream depends only on (seed, prompt index,
  sample index), so an edited and an unedited model draw with the same random numbers.
* :func:`generate_ids` / :func:`generate`: a short continuation of a few prompts (MEMIT's context templates, the
  model-sampled statistics corpus): one scan over all positions, prompts teacher-forced.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.batching import batch_rows, batches, group_by_bucket, pad_rows, rows_within
from jaxedit.config import ModelConfig
from jaxedit.errors import JaxeditError
from jaxedit.forward import apply, block, embed
from jaxedit.model import params_of
from jaxedit.models import FAMILY_MODULES
from jaxedit.runtime import default_memory_budget
from jaxedit.sharding import mesh_of, padded, put_batch, to_host


def _token_step(cfg: ModelConfig, params, tokens, pos, cache, slot, allowed):
    """One new token per row through every layer, attending to the cache. tokens/pos [B]; cache (k, v)
    [L, B, S, KV, hd]; the token's own keys/values are written at ``slot``; ``allowed`` [B, S] marks the cache
    slots it may attend to (its own slot excluded: it attends to itself separately). Returns (logits [B, V]
    float32, the updated cache)."""
    fam = FAMILY_MODULES[cfg.family]
    B = tokens.shape[0]
    dtype = params["blocks"]["w_out"].dtype
    x = embed(cfg, params, tokens[:, None], pos[:, None])
    allow = jnp.concatenate([allowed, jnp.ones((B, 1), bool)], -1)[:, None]  # [B, 1, S + 1]

    def layer(x, xs):  # each layer reads its own cache slice; the new keys/values come out per layer
        pl, kc, vc = xs
        y, parts = block(cfg, pl, x, pos[:, None], allow, kv_prefix=(kc, vc))
        k, v = parts["kv"]
        return y, (k.astype(dtype), v.astype(dtype))

    # written into the cache once, after the layers: carrying the whole cache through the layer scan and writing
    # one layer's slot per layer copied the cache once per layer (cost ~ layers^2 per token)
    x, new = jax.lax.scan(layer, x, (params["blocks"], *cache))
    cache = tuple(jax.lax.dynamic_update_slice(c, n, (0, 0, slot, 0, 0)) for c, n in zip(cache, new))
    logits = fam.lm_head(cfg, params, fam.final_norm(cfg, params, x))[:, 0].astype(jnp.float32)
    return logits, cache


def nucleus_mask(probs, top_p):
    """[B, V] bool: the nucleus of each row of ``probs`` — the most likely tokens whose probabilities, taken in
    decreasing order, first reach ``top_p`` (a token is kept iff the mass of the tokens more likely than it is
    below ``top_p``). Found without a sort (slow on CPU): positive float32s order like their bit patterns, so a
    31-step bisection over the integers finds the smallest kept probability exactly."""
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)
    mass = lambda t: jnp.sum(jnp.where(bits >= t[:, None], probs, 0.0), -1)

    def halve(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        ok = mass(mid) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    hi = bits.max(-1) + 1
    lo, _ = jax.lax.fori_loop(0, 31, halve, (jnp.zeros_like(hi), hi))
    return bits >= lo[:, None]


def _choose(logits, key, *, greedy: bool, top_k, top_p, temperature):
    """Next token per row [B] from logits [B, V]: argmax, or a draw after temperature, top-k and top-p (nucleus),
    in that order. ``key`` [B, 2]: one uniform number per row picks the token by inverse CDF (drawing a Gumbel
    number per vocabulary entry costs far more on CPU)."""
    if greedy:
        return jnp.argmax(logits, -1)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    probs = jax.nn.softmax(logits, -1)
    if top_p is not None:
        probs = jnp.where(nucleus_mask(probs, top_p), probs, 0.0)
    cdf = jnp.cumsum(probs, -1)
    u = jax.vmap(jax.random.uniform)(key) * cdf[:, -1]
    return jnp.minimum(jnp.sum(cdf <= u[:, None], -1), logits.shape[-1] - 1)


@partial(jax.jit, static_argnames=("cfg", "new_tokens", "greedy", "top_k", "nucleus"))
def sample_bucket(cfg: ModelConfig, params, ids, mask, keys, top_p, temperature, *, new_tokens: int, greedy: bool,
                  top_k, nucleus: bool):
    """Sample ``new_tokens`` tokens after each left-padded prompt of ``ids``/``mask`` [B, P]; ``keys`` [B, 2] one
    random key per row (token s of a row is drawn with ``fold_in(key, s)``); ``top_p`` is used when ``nucleus``.
    Returns [B, new_tokens] int32."""
    B, P = ids.shape
    dtype = params["blocks"]["w_out"].dtype
    out = apply(cfg, params, ids, mask, capture=("kv",), logit_positions=jnp.full((B, 1), P - 1))
    S = P + new_tokens - 1  # cache slots: the prompt, then every new token but the last
    pad = ((0, 0), (0, 0), (0, S - P), (0, 0), (0, 0))
    cache = tuple(jnp.pad(jnp.moveaxis(a, 1, 0).astype(dtype), pad) for a in out.kv)  # [L, B, S, KV, hd]
    n_real = mask.sum(-1).astype(jnp.int32)
    draw = lambda logits, s: _choose(logits, jax.vmap(jax.random.fold_in, (0, None))(keys, s), greedy=greedy,
                                     top_k=top_k, top_p=top_p if nucleus else None, temperature=temperature)
    first = draw(out.logits[:, 0].astype(jnp.float32), 0)
    allowed0 = jnp.concatenate([mask.astype(bool), jnp.zeros((B, S - P), bool)], -1)

    def step(carry, s):  # the token drawn at step s - 1 enters the cache at slot P + s - 1; draw token s
        tok, cache, allowed = carry
        logits, cache = _token_step(cfg, params, tok, n_real + s - 1, cache, P + s - 1, allowed)
        allowed = allowed.at[:, P + s - 1].set(True)
        nxt = draw(logits, s)
        return (nxt, cache, allowed), tok

    (last, _, _), toks = jax.lax.scan(step, (first, cache, allowed0), jnp.arange(1, new_tokens))
    return jnp.concatenate([toks.T, last[:, None]], 1).astype(jnp.int32)


@jax.jit
def row_keys(base, prompt_keys, sample_ids):
    """[B, 2] random keys, row b's = fold_in(fold_in(base, prompt_keys[b]), sample_ids[b]): a row's stream depends
    only on its prompt's key and its sample index (not on the batch it lands in). One call for the whole batch (a
    Python loop of fold_ins cost ~1.3 ms a row)."""
    return jax.vmap(lambda p, j: jax.random.fold_in(jax.random.fold_in(base, p), j))(prompt_keys, sample_ids)


def sample_rows(cfg: ModelConfig, P: int, new_tokens: int, budget_bytes: float) -> int:
    """Rows per batch for prompts of ``P`` tokens: a power of two whose cache, prefill activations and sorted
    logits fit ``budget_bytes``."""
    per_row = 4 * (2 * cfg.n_layers * (P + new_tokens) * cfg.n_kv_heads * cfg.head_dim  # cache
                   + 2 * cfg.n_layers * P * cfg.n_kv_heads * cfg.head_dim  # captured prefill keys/values
                   + P * (4 * cfg.d_model + 2 * cfg.d_ff)  # prefill activations
                   + 4 * cfg.vocab_size)  # logits, sorted copy, probabilities, mask
    return rows_within(budget_bytes, per_row, power_of_two=True)


def sample(model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *, samples: int = 1, seed: int = 0,
           greedy: bool = False, top_k: Optional[int] = None, top_p: Optional[float] = None, temperature: float = 1.0,
           stop_ids: Optional[Sequence[int]] = None, bucket: int = 8, max_batch: int = 256,
           memory_budget: Optional[float] = None, progress=None, prompt_keys: Optional[Sequence[int]] = None) -> list:
    """Continuations of token-id prompts: ``samples`` per prompt, ``max_new_tokens`` each, batched with a
    key/value cache (see the module docstring). Returns ``out[i][j]``: the new token ids of sample j of prompt i,
    cut before the first of ``stop_ids`` (default: none). ``progress``: a callable(rows_done) after each batch.
    ``prompt_keys``: one integer per prompt that names its random stream (default: its index), so a prompt draws
    the same samples in any call that gives it the same key."""
    if not prompt_ids:
        return []
    if any(len(p) == 0 for p in prompt_ids):
        raise JaxeditError("cannot sample from an empty prompt")
    if max_new_tokens < 1 or samples < 1:
        raise JaxeditError("max_new_tokens and samples must be at least 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise JaxeditError(f"top_p must be in (0, 1] (got {top_p})")
    if top_k is not None and top_k < 1:
        raise JaxeditError(f"top_k must be >= 1 (got {top_k})")
    if temperature <= 0:
        raise JaxeditError(f"temperature must be > 0 (got {temperature}); use greedy=True for argmax decoding")
    cfg = model.config
    longest = max(len(p) for p in prompt_ids) + max_new_tokens
    if longest > cfg.max_positions:
        raise JaxeditError(f"{longest} tokens exceed the model's {cfg.max_positions} positions")
    budget = memory_budget or default_memory_budget()
    params = params_of(model)
    base = jax.random.PRNGKey(seed)
    if prompt_keys is None:
        prompt_keys = range(len(prompt_ids))
    elif len(prompt_keys) != len(prompt_ids):
        raise JaxeditError("prompt_keys needs one key per prompt")
    mesh = mesh_of(model)  # on a mesh: the prompt x sample rows of a batch split over the data axis
    rows = [(i, j) for i in range(len(prompt_ids)) for j in range(samples)]
    out = [[None] * samples for _ in prompt_ids]
    stop = set(stop_ids or ())
    for P, members in group_by_bucket(rows, lambda row: len(prompt_ids[row[0]]), bucket):
        B = padded(batch_rows(len(members), max_batch, sample_rows(cfg, P, max_new_tokens, budget)), mesh)
        for chunk in batches(members, B):
            filled = chunk + [chunk[0]] * (B - len(chunk))
            ids, mask = pad_rows([prompt_ids[i] for i, _ in filled], P, left=True)
            keys = np.asarray(row_keys(base, np.array([int(prompt_keys[i]) for i, _ in filled], np.uint32),
                                       np.array([j for _, j in filled], np.uint32)))
            put = lambda a: put_batch(mesh, a)
            new = to_host(sample_bucket(cfg, params, put(ids), put(mask), put(keys),
                                        jnp.float32(top_p or 1.0), jnp.float32(temperature),
                                        new_tokens=int(max_new_tokens), greedy=bool(greedy), top_k=top_k,
                                        nucleus=top_p is not None and top_p < 1))
            for b, (i, j) in enumerate(chunk):
                toks = new[b].tolist()
                cut = next((k for k, t in enumerate(toks) if t in stop), len(toks))
                out[i][j] = toks[:cut]
            if progress is not None:
                progress(len(chunk))
    return out


def prompt_token_ids(tokenizer, prompts: Sequence[str]) -> list:
    """Each text prompt's token ids as the tokenizer makes them by default (a LLaMA tokenizer's BOS included); an
    empty prompt is BOS alone (token 0 for a tokenizer without one)."""
    return [list(tokenizer(p)["input_ids"]) or [tokenizer.bos_token_id or 0] for p in prompts]


def sample_texts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, **kw) -> list:
    """:func:`sample` on text prompts; returns ``out[i][j]``, the decoded continuation (prompt not included),
    stopped at the tokenizer's end-of-sequence token."""
    ids = prompt_token_ids(tokenizer, prompts)
    if tokenizer.eos_token_id is not None:
        kw.setdefault("stop_ids", [tokenizer.eos_token_id])
    new = sample(model, ids, max_new_tokens, **kw)
    return [[tokenizer.decode(s, skip_special_tokens=True) for s in row] for row in new]


@partial(jax.jit, static_argnames=("cfg", "top_k"))
def decode(cfg: ModelConfig, params, buf, lengths, key, *, top_k: Optional[int], temperature=1.0):
    """Fill ``buf`` [B, T] (int32; row b holds its prompt in ``buf[b, :lengths[b]]``) by sampling every later
    position. ``top_k``: sample among the k most likely tokens (1 = greedy; None = the whole vocabulary)."""
    B, T = buf.shape
    L, KV, hd = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
    dtype = params["blocks"]["w_out"].dtype
    cache = (jnp.zeros((L, B, T, KV, hd), dtype), jnp.zeros((L, B, T, KV, hd), dtype))

    def position(carry, t):
        buf, cache = carry
        tok = jax.lax.dynamic_slice_in_dim(buf, t, 1, axis=1)[:, 0]
        allowed = jnp.broadcast_to(jnp.arange(T) < t, (B, T))  # cached positions s < t
        logits, cache = _token_step(cfg, params, tok, jnp.full((B,), t, jnp.int32), cache, t, allowed)
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
    mesh = mesh_of(model)  # on a mesh: prompts split over the data axis (padded with copies of the first)
    B = padded(len(prompt_ids), mesh)
    buf, _ = pad_rows(list(prompt_ids) + [prompt_ids[0]] * (B - len(prompt_ids)), T)
    lengths = np.concatenate([lengths, np.full(B - len(lengths), lengths[0], np.int32)])
    out = to_host(decode(model.config, params_of(model), put_batch(mesh, buf), put_batch(mesh, lengths),
                         jax.random.PRNGKey(seed), top_k=top_k, temperature=temperature))
    return [out[i, :lengths[i] + new_tokens].tolist() for i in range(len(prompt_ids))]


def generate(model, tokenizer, prompts: Sequence[str], new_tokens: int, *, top_k: Optional[int] = 5, seed: int = 0,
             temperature: float = 1.0) -> list:
    """Sample continuations of text prompts (top-k at ``temperature``); returns the decoded texts, prompt included.
    Prompts are tokenized by :func:`prompt_token_ids`, as in :func:`sample_texts`."""
    ids = prompt_token_ids(tokenizer, prompts)
    out = generate_ids(model, ids, new_tokens, top_k=top_k, seed=seed, temperature=temperature)
    return [tokenizer.decode(o, skip_special_tokens=True) for o in out]
