"""MEMIT edits (Meng et al. 2023) and toxic-memory deletion (Das et al. 2025): closed-form updates of the MLP output
projections of several layers toward target residual vectors.

For each request a key token (the last token of the subject, or of an explicit span) is chosen. Then:

1. **z**: at the residual stream output of the last edited layer L, at the key token, find ``z = h + delta`` with
   Adam (optax) on the request's objective: MEMIT's NLL of the new target, or deletion's log-probability of the
   token(s) to suppress, plus a KL term that keeps the subject's "{} is a" prediction, plus weight decay on
   ||delta|| / ||h||^2; delta is clamped to ``clamp_norm_factor * ||h||`` after each step. All requests are optimized
   at once (``jax.vmap``), each with its own early stop; the forward up to layer L is computed once, each step
   runs only the blocks after L.
2. **spreading**: for the edited layers in order, the keys K (inputs of the output projection at the key token,
   averaged over context templates: 1/2 the bare prompt, 1/2 the mean over sampled prefixes) and the current z are
   recomputed on the partially edited model; the residual ``(z - z_now) / (layers not yet edited)`` is written into
   the layer by ``dW = (lambda C + K K^T)^-1 K R^T`` (a solve, float32 on the device or float64 on the host), with
   C = E[k k^T] from :mod:`jaxedit.edit.stats`.

Requests are dicts: "prompt" (containing the subject literally, or a "{}" placeholder for it), "subject" or "span"
((start, end) token range of the prompt; the key is its last token), and "target" (edit) or "suppress" (delete: a
string whose first token is pushed away, or a token id, or a list of those). Optional "paraphrases" and "neighborhood"
prompts are evaluated in the report.
"""
from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxedit import runtime
from jaxedit.batching import pad_rows, round_up
from jaxedit.calls import STATS_ALIASES, check_names, public
from jaxedit.config import ModelConfig
from jaxedit.edit.stats import layer_stats
from jaxedit.errors import JaxeditError
from jaxedit.forward import apply, apply_jit, block, scan_layers
from jaxedit.generate import generate_ids
from jaxedit.layer_selection import check_layers
from jaxedit.model import model_from_params, params_of
from jaxedit.models import FAMILY_MODULES
from jaxedit.sharding import mesh_of, padded, put_batch, to_host


# ---- hyperparameters ----

@dataclasses.dataclass(frozen=True)
class EditHparams:
    layers: tuple  # the edited layers (MLP output projections)
    v_lr: float = 0.5  # Adam learning rate for delta
    v_num_grad_steps: int = 20
    v_weight_decay: float = 0.5  # x ||delta|| / ||h||^2
    clamp_norm_factor: float = 0.75  # ||delta|| <= factor x ||h||
    kl_factor: float = 0.0625  # MEMIT's KL(P_now || P_orig) weight on "{subject} is a"
    early_stop_loss: float = 0.05  # MEMIT: stop when the loss falls below this
    mom2_update_weight: float = 20000.0  # lambda in (lambda C + K K^T)
    # the key statistics C = E[k k^T] (jaxedit.layer_stats; the same names there and on the command line)
    corpus: str = "wikitext:wikitext-103-raw-v1"
    stats_samples: int = 100_000
    max_len: Optional[int] = None  # tokens per text; default: the model's context, at most 1024
    stats_precision: str = "float32"
    solve_dtype: str = "float32"  # "float64": the solve on the host in float64, as the reference
    context_prefixes: tuple = ("The", "Therefore", "Because", "I", "You")
    context_length: int = 10  # tokens per sampled prefix (starter word included)
    context_top_k: int = 5
    kl_prompt: str = "{} is a"
    delete_objective: str = "logp"  # deletion: "logp" (the reference: mean log P) or "unlikelihood" (-log(1 - P))
    max_update_ratio: float = 10.0  # refuse an update with ||dW|| > ratio x ||W|| (absurd weights)
    seed: int = 0
    # NAS (norm-anchored scaling): v* = delta + v0 (v0: the MLP output of the last edited layer at the key token)
    # rescaled to the mean |v*| of clean edits on the unedited model, or not written when above twice that mean
    nas: bool = False
    nas_samples: int = 1000  # requests whose clean |v*| make the mean (NAS's nas_restart), drawn with seed 0
    nas_quantile: float = 0.95  # the norms above this quantile are dropped from the mean

    def replace(self, **kw):
        return dataclasses.replace(self, **check_names(kw, [f.name for f in dataclasses.fields(self)],
                                                       STATS_ALIASES))


# Presets from the reference configurations (MEMIT's GPT-2-XL; EasyEdit's LLaMA-7B).
PRESETS = {
    "gpt2-xl": EditHparams(layers=(13, 14, 15, 16, 17), v_num_grad_steps=20, v_weight_decay=0.5,
                           clamp_norm_factor=0.75, mom2_update_weight=20000.0),
    "llama-7b": EditHparams(layers=(4, 5, 6, 7, 8), v_num_grad_steps=25, v_weight_decay=1e-3,
                            clamp_norm_factor=4.0, mom2_update_weight=15000.0),
}
_PRESET_SHAPES = {("gpt2", 48, 1600): "gpt2-xl", ("llama", 32, 4096): "llama-7b"}


def default_layers(cfg: ModelConfig) -> tuple:
    """Five consecutive layers (fewer in models under 30 layers: depth // 6, at least 1) starting at the depth
    fraction of the reference sets: 13/48 for GPT-2 (GPT-2-XL: 13..17), 4/32 for LLaMA (LLaMA-7B: 4..8)."""
    L = cfg.n_layers
    n = min(5, max(1, L // 6))
    start = round((13 / 48 if cfg.family == "gpt2" else 4 / 32) * L)
    start = min(start, L - n)
    return tuple(range(start, start + n))


def hparams_for(cfg: ModelConfig, preset: Optional[str] = None, **overrides) -> EditHparams:
    """The preset for the model's shape (or the named ``preset``); other shapes take their family's preset with
    :func:`default_layers`. Keyword arguments override single fields."""
    if preset is not None:
        if preset not in PRESETS:
            raise JaxeditError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        hp = PRESETS[preset]
    else:
        name = _PRESET_SHAPES.get((cfg.family, cfg.n_layers, cfg.d_model))
        hp = PRESETS[name] if name else dataclasses.replace(
            PRESETS["gpt2-xl" if cfg.family == "gpt2" else "llama-7b"], layers=default_layers(cfg))
    return hp.replace(**overrides)


# ---- requests and tokenization ----

@dataclasses.dataclass
class _Request:
    template: str  # the prompt with "{}" where the subject goes
    subject: str
    targets: list  # edit: the target's token ids; delete: the first token id of each string to suppress
    raw: dict


def _ids(tokenizer, text, special=True):
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def parse_request(r, tokenizer, mode: str, other: Optional[str] = None) -> _Request:
    """Check and tokenize one edit ("target") or deletion ("suppress") request; raises :class:`JaxeditError` with a
    message that does not say where the request came from (the caller adds that). ``other``: how to name the
    operation a request with the other field belongs to (default its Python function)."""
    field = "target" if mode == "edit" else "suppress"
    if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
        raise JaxeditError("needs a non-empty \"prompt\"")
    prompt = r["prompt"]
    if ("subject" in r) == ("span" in r):
        raise JaxeditError("give exactly one of \"subject\" and \"span\"")
    if "span" in r:
        try:
            a, b = (int(v) for v in r["span"])
        except (TypeError, ValueError):
            raise JaxeditError("\"span\" must be [start, end]") from None
        enc = tokenizer(prompt, return_offsets_mapping=True)
        n = len(enc["input_ids"])
        if not 0 <= a < b <= n:
            raise JaxeditError(f"span ({a}, {b}) is outside the prompt's {n} tokens")
        offsets = enc["offset_mapping"]
        c0, c1 = offsets[a][0], offsets[b - 1][1]
        subject, template = prompt[c0:c1], prompt[:c0] + "{}" + prompt[c1:]
        if not subject.strip():
            raise JaxeditError(f"span ({a}, {b}) holds no text")
    else:
        subject = r["subject"]
        if not isinstance(subject, str) or not subject.strip():
            raise JaxeditError("empty \"subject\"")
        if "{}" in prompt:
            template = prompt
        elif subject in prompt:
            template = prompt.replace(subject, "{}", 1)
        else:
            raise JaxeditError(f"subject {subject!r} does not occur in the prompt")
    if template.count("{}") != 1:
        raise JaxeditError("the prompt must hold the subject (or \"{}\") exactly once")
    if field not in r:
        wrong = "suppress" if mode == "edit" else "target"
        other = other or ("jaxedit.delete" if mode == "edit" else "jaxedit.memit")
        raise JaxeditError(f"needs \"{field}\"" + (f" (\"{wrong}\" is for {other})" if wrong in r else ""))
    val = r[field]
    if mode == "edit":
        if not isinstance(val, str) or not val.strip():
            raise JaxeditError("empty \"target\"")
        targets = _ids(tokenizer, val, special=False)
    else:
        vals = [val] if isinstance(val, (str, int)) else list(val) if isinstance(val, (list, tuple)) else [None]
        if not vals or any(isinstance(v, bool) or not isinstance(v, (str, int)) or v == "" for v in vals):
            raise JaxeditError("\"suppress\" must be a non-empty string or token id, or a list of them")
        if any(isinstance(v, int) and not 0 <= v < len(tokenizer) for v in vals):
            raise JaxeditError("\"suppress\" holds a token id outside the vocabulary")
        targets = [v if isinstance(v, int) else (_ids(tokenizer, v, special=False) or [None])[0] for v in vals]
        targets = [] if None in targets else targets
    if not targets:
        raise JaxeditError(f"\"{field}\" has no tokens")
    return _Request(template, subject, targets, r)


def each_request(requests, tokenizer, parse, who: str = "editing") -> list:
    """``parse(request)`` for each of ``requests`` (a list, or one dict), which must not be empty; an error names
    the request by its index (``requests[0]: ...``). ``who`` names the method in the missing-tokenizer error."""
    if tokenizer is None:
        raise JaxeditError(f"{who} needs a tokenizer")
    if isinstance(requests, dict):
        requests = [requests]
    if not requests:
        raise JaxeditError("no requests")
    out = []
    for i, r in enumerate(requests):
        try:
            out.append(parse(r))
        except JaxeditError as e:
            raise JaxeditError(f"requests[{i}]: {e}") from None
    return out


def parse_requests(requests, tokenizer, mode) -> list:
    """:func:`parse_request` for each request; errors name the request by its index (``requests[0]``).
    ``mode``: "edit", "delete", or a function of the request that gives one of them."""
    return each_request(requests, tokenizer,
                        lambda r: parse_request(r, tokenizer, mode(r) if callable(mode) else mode))


def context_templates(model, tokenizer, hp: EditHparams) -> list:
    """["{}"] + one sampled prefix per starter word, as "<prefix>. {}" (braces in samples replaced)."""
    starters = [_ids(tokenizer, s, special=False) for s in hp.context_prefixes]
    if not starters:
        return ["{}"]
    new = max(1, hp.context_length - max(len(s) for s in starters))
    ids = generate_ids(model, starters, new, top_k=hp.context_top_k, seed=hp.seed)
    texts = [tokenizer.decode(x, skip_special_tokens=True) for x in ids]
    return ["{}"] + [t.replace("{", " ").replace("}", " ") + ". {}" for t in texts]


def _encode_with_key(tokenizer, context, template, subject, suffix_ids=()):
    """Token ids of context(template(subject)) + suffix_ids, and the position of the subject's last token."""
    full = context.replace("{}", template)
    cut = full.index("{}")
    prefix_ids = _ids(tokenizer, full[:cut] + subject)
    ids = _ids(tokenizer, full.replace("{}", subject)) + list(suffix_ids)
    key = len(prefix_ids) - 1
    if ids[:len(prefix_ids)] != prefix_ids:  # the tokenizer merged across the subject's end: take the covering token
        key = next((i for i in range(min(len(ids), len(prefix_ids))) if ids[i] != prefix_ids[i]), key)
    return ids, key


# ---- the z optimization ----

def z_objective(lp, lp0, tok_ids, tok_w, delta, norm_h, *, mode: str, weight_decay, kl_factor):
    """The loss of one request's z optimization at ``delta``. lp [R, K, V]: log-probabilities at the objective's
    positions of the R rows (the context-templated prompts, then the KL prompt, whose column 0 is its key token);
    lp0 [V]: the KL row's log-probabilities at delta = 0; tok_ids / tok_w [R, K]: the objective's tokens and weights
    (zero on padding and on the KL row); norm_h: ||h|| at the key token. Returns (total, the NLL / deletion term)."""
    tok = jnp.take_along_axis(lp, tok_ids[..., None], -1)[..., 0]  # [R, K]
    if mode == "unlikelihood":  # -log(1 - P) per token, for the mean below
        tok = -jnp.log(-jnp.expm1(jnp.minimum(tok, -1e-7)))
    w = tok_w[:-1]
    per_row = (tok[:-1] * w).sum(-1) / jnp.maximum(w.sum(-1), 1)  # mean over each row's tokens
    lp_kl = lp[-1, 0]
    if mode == "edit":
        main = -per_row.mean()
        kl = (jnp.exp(lp_kl) * (lp_kl - lp0)).sum()  # KL(P_now || P_orig)
    else:
        main = per_row.mean()
        kl = (jnp.exp(lp0) * (lp0 - lp_kl)).sum()  # KL(P_orig || P_now)
    wd = weight_decay * jnp.sqrt(jnp.sum(delta ** 2) + 1e-30) / norm_h ** 2  # gradient 0 at delta = 0
    return main + kl_factor * kl + wd, main


def clamp_norm(x, max_norm):
    """``x`` scaled down to norm ``max_norm`` when it is longer."""
    nrm = jnp.linalg.norm(x)
    return jnp.where(nrm > max_norm, x * max_norm / nrm, x)


@partial(jax.jit, static_argnames=("cfg", "layer", "mode", "steps", "window"))
def optimize_deltas(cfg: ModelConfig, params, h, mask, key_pos, logit_pos, tok_ids, tok_w, h_init, *,
                    layer: int, mode: str, steps: int, lr, weight_decay, clamp_factor, kl_factor, stop_loss,
                    window: int):
    """Optimize one delta per request (vmapped over the leading axis).

    Per request: h [R, T, d] the output of ``layer`` on R rows (the context-templated prompts, then the KL prompt
    as the last row), mask [R, T], key_pos [R], logit_pos [R, K] / tok_ids [R, K] / tok_w [R, K] the positions,
    tokens and weights of the objective (zero weight on the KL row, whose column 0 is its key token), h_init [d];
    ``window``: at least the largest number of tokens from a row's key token to its end.
    Returns (delta [d], total losses [steps], objective terms [steps] (zero after the steps run), steps run).
    """
    tx = optax.adam(lr)
    fam = FAMILY_MODULES[cfg.family]

    def one(h, mask, key_pos, logit_pos, tok_ids, tok_w, h_init):
        # Tokens before the key token do not see delta: their keys/values in the later blocks are computed once,
        # and each step runs only the ``window`` positions from the key token on (the objective's positions are
        # all at or after it). The KL row's objective is at its key token: it runs that one position.
        R, T, _ = h.shape
        K = logit_pos.shape[1]
        kv = apply(cfg, params, None, mask, hidden_in=h, start_layer=layer + 1, capture=("kv",),
                   num_layers=cfg.n_layers).kv
        cache = tuple(jnp.moveaxis(a, 1, 0) for a in kv)  # [later layers, R, T, KV, hd]

        def rows(sl, w):  # the first ``w`` positions from the key token on of the rows ``sl``
            kp, m = key_pos[sl], mask[sl]
            idx = kp[:, None] + jnp.arange(w)[None]  # [r, w] positions in the window
            valid = idx < m.sum(-1)[:, None]
            idx = jnp.minimum(idx, T - 1)
            before = (jnp.arange(T)[None, None] < kp[:, None, None]) & m[:, None].astype(bool)
            allowed = jnp.concatenate([jnp.broadcast_to(before, (idx.shape[0], w, T)),
                                       jnp.tril(jnp.ones((w, w), bool))[None] & valid[:, None]], -1)
            return jnp.take_along_axis(h[sl], idx[..., None], 1), idx, allowed, tuple(c[:, sl] for c in cache)

        split = R > 1
        parts = [rows(slice(0, R - 1), window), rows(slice(R - 1, R), 1)] if split else [rows(slice(0, R), window)]
        at = (logit_pos[:R - 1 if split else R] - key_pos[:R - 1 if split else R, None])[..., None]

        def logprobs(delta):
            def run(x0, idx, allowed, kv_rows):
                def step(x, xs):
                    pl, kv = xs
                    return block(cfg, pl, x, idx, allowed, kv_prefix=kv)[0], None

                return scan_layers(step, x0.at[:, 0].add(delta.astype(h.dtype)), params["blocks"],
                                   start=layer + 1, xs=kv_rows)[0]

            head = lambda x: jax.nn.log_softmax(fam.lm_head(cfg, params, fam.final_norm(cfg, params, x)), -1)
            lp = head(jnp.take_along_axis(run(*parts[0]), at, 1))  # [rows, K, V]
            if split:  # the KL row: its key token's log-probabilities, in every column (only column 0 is read)
                lp_kl = head(run(*parts[1]))  # [1, 1, V]
                lp = jnp.concatenate([lp, jnp.broadcast_to(lp_kl, (1, K, lp_kl.shape[-1]))], 0)
            return lp  # [R, K, V]

        lp0 = jax.lax.stop_gradient(logprobs(jnp.zeros_like(h_init)))[-1, 0]  # KL row, at its key token
        norm_h = jnp.linalg.norm(h_init)

        def loss_fn(delta):
            return z_objective(logprobs(delta), lp0, tok_ids, tok_w, delta, norm_h, mode=mode,
                               weight_decay=weight_decay, kl_factor=kl_factor)

        def cond(carry):
            return ~carry[2] & (carry[3] < steps)

        def step(carry):  # one Adam step; stop (keeping delta) at the last step or, for edits, below stop_loss
            delta, opt, _, it, losses, mains = carry
            (loss, main), g = jax.value_and_grad(loss_fn, has_aux=True)(delta)
            stop = (it == steps - 1) | ((loss < stop_loss) if mode == "edit" else False)
            upd, opt_new = tx.update(g, opt, delta)
            new = clamp_norm(optax.apply_updates(delta, upd), clamp_factor * norm_h)
            delta = jnp.where(stop, delta, new)  # the loop ends at a stop, so the optimizer state needs no guard
            return delta, opt_new, stop, it + 1, losses.at[it].set(loss), mains.at[it].set(main)

        # a while loop: under vmap it runs until every request has stopped, not always ``steps`` times
        d0 = jnp.zeros_like(h_init, dtype=jnp.float32)
        zeros = jnp.zeros((steps,), jnp.float32)
        delta, _, _, n_run, losses, mains = jax.lax.while_loop(
            cond, step, (d0, tx.init(d0), jnp.array(False), jnp.int32(0), zeros, zeros))
        return delta, losses, mains, n_run

    return jax.vmap(one)(h, mask, key_pos, logit_pos, tok_ids, tok_w, h_init)


# ---- keys and current z on the (partially edited) model ----

@partial(jax.jit, static_argnames=("cfg", "start", "stop"))
def _keys_and_hidden(cfg, params, ids, mask, pos, layer, h=None, *, start: int = 0, stop: int):
    """Keys at ``layer`` and the output of layer ``stop - 1`` at the positions ``pos`` [B]; with ``start`` > 0 from
    ``h``, the output of block ``start - 1`` (the blocks before it are not run; ``ids`` unused)."""
    out = apply(cfg, params, None if start else ids, mask, capture=("hidden", "keys"), num_layers=stop,
                start_layer=start, hidden_in=h)
    rows = jnp.arange(mask.shape[0])
    return out.keys[rows, layer - start, pos], out.hidden[rows, stop - 1 - start, pos]


@partial(jax.jit, static_argnames=("cfg", "stop"))
def _hidden_before(cfg, params, ids, mask, *, stop: int):
    """The output of block ``stop - 1`` at every position [B, T, d]."""
    return apply(cfg, params, ids, mask, capture=("hidden",), num_layers=stop).hidden[:, -1]


def _solve_f32(K, R, ridge, N, M, Cp):
    A = K @ K.T if Cp is None else K @ K.T + Cp
    if M is not None:
        A = M @ A
    A = A + ridge * (jnp.eye(K.shape[0], dtype=K.dtype) if N is None else N)
    B = K if M is None else M @ K
    X = jnp.linalg.solve(A, B)
    rel = jnp.linalg.norm(A @ X - B) / jnp.maximum(jnp.linalg.norm(B), 1e-30)
    return X @ R.T, rel


_solve_f32_jit = jax.jit(_solve_f32)


def solve_update(K, R, *, ridge: float, N=None, M=None, Cp=None, dtype: str = "float32", sharding=None):
    """The one solve of MEMIT and AlphaEdit: ``dW = (M (K K^T + C_p) + ridge N)^-1 M K R^T`` with K [f, n], R [d, n];
    returns (dW [f, d] float32, the relative residual of the system).

    MEMIT: M = I, C_p = 0, N = C (the key statistics), ridge = lambda, i.e. (lambda C + K K^T)^-1 K R^T.
    AlphaEdit: M = P (the null-space projector), C_p (the keys of earlier batches), N = I, ridge = l2, i.e.
    (P (K K^T + C_p) + l2 I)^-1 P K R^T, which equals its published form solve(P (K K^T + C_p) + l2 I, P K R^T).
    ``None`` for N, M or C_p: the identity, the identity, zero.

    ``dtype``: "float32" on the device, or "float64" on the host (the references' precision). ``sharding``: the
    placement of one layer of the edited projection (rows over the model axis); dW is then returned as a device
    array placed with it (each device computes the rows it holds after solving the small system itself), else as
    numpy."""
    if dtype == "float64":
        f64 = lambda a: None if a is None else np.asarray(a, np.float64)
        K64, R64, N64, M64, Cp64 = f64(K), f64(R), f64(N), f64(M), f64(Cp)
        A = K64 @ K64.T if Cp64 is None else K64 @ K64.T + Cp64
        if M64 is not None:
            A = M64 @ A
        A = A + ridge * (np.eye(K64.shape[0]) if N64 is None else N64)
        B = K64 if M64 is None else M64 @ K64
        X = np.linalg.solve(A, B)
        rel = np.linalg.norm(A @ X - B) / max(np.linalg.norm(B), 1e-30)
        dW = (X @ R64.T).astype(np.float32)
        return (dW if sharding is None else jax.device_put(dW, sharding)), float(rel)
    f32 = lambda a: None if a is None else np.asarray(a, np.float32)
    args = (f32(K), f32(R), np.float32(ridge), f32(N), f32(M), f32(Cp))
    if sharding is None:
        dW, rel = _solve_f32_jit(*args)
        return np.asarray(dW, np.float32), float(rel)
    rep = NamedSharding(sharding.mesh, P())
    dW, rel = jax.jit(_solve_f32, in_shardings=rep, out_shardings=(sharding, rep))(*args)
    return dW, float(to_host(rel))


def _add_to_layer(w, dW, l):
    return w.at[l].add(dW.astype(w.dtype))


_add_layer = jax.jit(_add_to_layer)
# the later layers of an edit add into the copy the first one made (the unedited model keeps its own array); with
# donate=True the first layer adds into the given model's array too (no copy: the given model is used up)
_add_layer_in_place = jax.jit(_add_to_layer, donate_argnums=0)

DONATED = "; the model given with donate=True is used up"


@jax.jit
def _layer_norm2(w, l):
    return jnp.linalg.norm(w[l].astype(jnp.float32))


def key_rows(tokenizer, reqs, contexts, length: Optional[int] = None):
    """The rows whose keys make each request's key (per request: the bare prompt first, then the prefixed
    prompts): (ids, mask, key positions) as device arrays, rows padded to at least ``length`` tokens. A row ends at
    its key token: under causal attention the tokens after it change neither the key nor the hidden state there."""
    krows, kpos = [], []
    for r in reqs:
        for c in contexts:
            ids_k, k = _encode_with_key(tokenizer, c, r.template, r.subject)
            krows.append(ids_k[:k + 1])
            kpos.append(k)
    T = max(length, max(len(x) for x in krows)) if length else None
    kids, kmask = (jnp.asarray(a) for a in pad_rows(krows, T))
    return kids, kmask, jnp.asarray(np.array(kpos, np.int32))


def request_keys(cfg, params, kids, kmask, kpos, n: int, layers) -> dict:
    """{layer: K [n, f]}: each request's key (1/2 the bare prompt's + 1/2 the mean of the prefixed prompts')."""
    keys = to_host(_keys_at(cfg, params, kids, kmask, kpos, jnp.asarray(list(layers)), stop=max(layers) + 1))
    out = {}
    for i, l in enumerate(layers):
        k = np.asarray(keys[:, i], np.float32).reshape(n, kids.shape[0] // n, -1)
        out[l] = 0.5 * k[:, 0] + 0.5 * k[:, 1:].mean(1) if k.shape[1] > 1 else k[:, 0]
    return out


@partial(jax.jit, static_argnames=("cfg", "stop"))
def _keys_at(cfg, params, ids, mask, pos, layers, *, stop: int):
    """Keys at ``layers`` [m] and the positions ``pos`` [B]: [B, m, f]."""
    out = apply(cfg, params, ids, mask, capture=("keys",), num_layers=stop)
    rows = jnp.arange(ids.shape[0])
    return out.keys[rows[:, None], layers[None, :], pos[:, None]]


def memit_solver(stats, hp: EditHparams):
    """MEMIT's update of layer l from its keys K [f, n] and residuals R [d, n]: (lambda C_l + K K^T)^-1 K R^T."""
    def solve(l, K, R, sharding):
        return solve_update(K, R, ridge=hp.mom2_update_weight, N=stats[l], dtype=hp.solve_dtype, sharding=sharding)

    solve.hint = "raise mom2_update_weight or use more statistics samples"
    return solve


def spread(cfg: ModelConfig, params, tokenizer, reqs, contexts, z, stats, layers, hp: EditHparams, *,
           solver=None, key_length: Optional[int] = None, donate: bool = False):
    """Write the target vectors ``z`` [n, d] (at the output of the last layer of ``layers``) into the layers in
    order: per layer, keys and current z on the partially edited model, residual / layers left, solve, add.
    ``solver(layer, K [f, n], R [d, n], sharding) -> (dW [f, d], relative residual)`` (default MEMIT's, with
    ``stats``). Returns (new params, per-layer report). ``donate``: the first layer adds into ``params``' own output
    projection instead of a copy of it (``params`` is then used up: its output projection is deleted)."""
    n = len(reqs)
    L = layers[-1]
    solver = solver or memit_solver(stats, hp)
    kids, kmask, kpos = key_rows(tokenizer, reqs, contexts, key_length)
    C = len(contexts)

    blocks = dict(params["blocks"])
    w_out = blocks["w_out"]
    mesh = mesh_of(params)
    # on a mesh, dW is made and added where each row of the projection lives (rows over the model axis)
    layer_sharding = None if mesh is None else NamedSharding(mesh, P(*w_out.sharding.spec[1:]))
    layer_report = []
    # the blocks before the first edited layer do not change here: their output on the key rows is computed once
    start = min(layers)
    h0 = _hidden_before(cfg, params, kids, kmask, stop=start) if start > 0 else None
    for i, l in enumerate(layers):
        # after a donated first layer the given model is gone: "nothing was changed" no longer holds for it
        gone = DONATED if donate and w_out is not blocks["w_out"] else ""
        cur_params = dict(params, blocks=dict(blocks, w_out=w_out))
        keys, hidden = to_host(_keys_and_hidden(cfg, cur_params, kids, kmask, kpos, l, h0, start=start, stop=L + 1))
        keys = np.asarray(keys, np.float32).reshape(n, C, -1)
        K = 0.5 * keys[:, 0] + 0.5 * keys[:, 1:].mean(1) if C > 1 else keys[:, 0]  # [n, f]
        z_now = np.asarray(hidden, np.float32).reshape(n, C, -1)[:, 0]
        resid = (z - z_now) / (len(layers) - i)  # [n, d]
        dW, rel = solver(l, K.T, resid.T, layer_sharding)
        if mesh is None:
            nW, ndW = float(np.linalg.norm(np.asarray(w_out[l], np.float32))), float(np.linalg.norm(dW))
            finite = bool(np.all(np.isfinite(dW)))
        else:
            nW, ndW = float(to_host(_layer_norm2(w_out, l))), float(to_host(jnp.linalg.norm(dW)))
            finite = bool(to_host(jnp.all(jnp.isfinite(dW))))
        if not finite:
            raise JaxeditError(f"layer {l}: the update is not finite (ill-conditioned solve); nothing was changed"
                               + gone)
        if rel > 1e-2:
            raise JaxeditError(f"layer {l}: ill-conditioned solve (relative residual {rel:.1e}); nothing was "
                               f"changed ({getattr(solver, 'hint', 'a better-conditioned system is needed')}){gone}")
        if ndW > hp.max_update_ratio * nW:
            raise JaxeditError(f"layer {l}: the update's norm {ndW:.3g} exceeds {hp.max_update_ratio} x the "
                               f"weight's norm {nW:.3g}; refused, nothing was changed{gone}")
        copy = w_out is blocks["w_out"] and not donate
        w_out = (_add_layer if copy else _add_layer_in_place)(w_out, jnp.asarray(dW), l)
        layer_report.append({"layer": l, "update_norm": ndW, "weight_norm": nW,
                             "residual_norm": float(np.linalg.norm(resid, axis=1).mean()), "solve_residual": rel})
    if not bool(jnp.all(jnp.isfinite(w_out))):
        raise JaxeditError("the edited weights are not finite; nothing was changed" + (DONATED if donate else ""))
    return dict(params, blocks=dict(blocks, w_out=w_out)), layer_report


def next_token_dist(model, tokenizer, prompts: Sequence[str]) -> np.ndarray:
    """[len(prompts), vocab]: the next-token distribution after each prompt (one padded batch)."""
    ids, mask = pad_rows([_ids(tokenizer, p) for p in prompts])
    last = mask.sum(1) - 1
    logits = apply_jit(model.config, params_of(model), jnp.asarray(ids), jnp.asarray(mask),
                       logit_positions=jnp.asarray(last[:, None])).logits[:, 0]
    return to_host(jax.nn.softmax(logits, -1))


def next_token_probs(model, tokenizer, prompts: Sequence[str], token_ids: Sequence[Sequence[int]]):
    """p(token | prompt) at the next position for each prompt and each of its token ids, and the argmax ids."""
    p = next_token_dist(model, tokenizer, prompts)
    return [[float(p[i, t]) for t in toks] for i, toks in enumerate(token_ids)], p.argmax(-1).tolist()


# ---- the edit ----

def prepare(model, layers, hp_overrides: dict):
    """The hyperparameters (preset for the model + overrides, ``layers`` if given) and the checked layer tuple."""
    cfg = model.config
    hp_overrides = dict(hp_overrides)
    preset = hp_overrides.pop("preset", None)
    hp = hparams_for(cfg, preset, **hp_overrides)
    if layers is not None:
        hp = hp.replace(layers=tuple(check_layers(cfg.n_layers, layers)))
    layers = tuple(check_layers(cfg.n_layers, hp.layers))
    hp = hp.replace(layers=layers)
    if hp.solve_dtype not in ("float32", "float64"):
        raise JaxeditError("solve_dtype must be float32 or float64")
    if hp.v_num_grad_steps < 1:
        raise JaxeditError("v_num_grad_steps must be >= 1")
    if hp.delete_objective not in ("logp", "unlikelihood"):
        raise JaxeditError("delete_objective must be logp or unlikelihood")
    return hp, layers


def key_stats(model, tokenizer, layers, hp: EditHparams, stats=None, progress=True):
    """``stats`` checked against the model (one [d_ff, d_ff] matrix per layer), or computed (cached on disk)."""
    cfg = model.config
    if stats is None:
        stats = layer_stats(model, layers, tokenizer=tokenizer, corpus=hp.corpus, stats_samples=hp.stats_samples,
                            max_len=hp.max_len, precision=hp.stats_precision, progress=progress)
    missing = [l for l in layers if l not in stats]
    if missing:
        raise JaxeditError(f"no key statistics for layers {missing}")
    for l in layers:
        if np.shape(stats[l]) != (cfg.d_ff, cfg.d_ff):
            raise JaxeditError(f"key statistics of layer {l} have shape {np.shape(stats[l])}, "
                               f"expected ({cfg.d_ff}, {cfg.d_ff})")
    return stats


def z_rows(tokenizer, reqs, mode: str, hp: EditHparams, contexts):
    """The rows of the z optimization: per request the target appended (edit) under every context, then the KL
    prompt. Returns (rows, key positions, objective positions, objective tokens, token weights) as lists."""
    rows, key_pos, logit_pos, tok_ids, tok_w = [], [], [], [], []
    for r in reqs:
        suffix = r.targets[:-1] if mode == "edit" else []
        for c in contexts:
            ids, k = _encode_with_key(tokenizer, c, r.template, r.subject, suffix)
            rows.append(ids)
            key_pos.append(k)
            if mode == "edit":
                n0 = len(ids) - len(suffix)  # the first target token is predicted at position n0 - 1
                logit_pos.append([n0 - 1 + j for j in range(len(r.targets))])
            else:
                logit_pos.append([len(ids) - 1] * len(r.targets))
            tok_ids.append(list(r.targets))
            tok_w.append([1.0] * len(r.targets))
        ids, k = _encode_with_key(tokenizer, "{}", hp.kl_prompt, r.subject)
        rows.append(ids)
        key_pos.append(k)
        logit_pos.append([k])
        tok_ids.append([0])
        tok_w.append([0.0])
    return rows, key_pos, logit_pos, tok_ids, tok_w


def batch_shape(tokenizer, parsed, hp: EditHparams, contexts, bucket: int = 16) -> dict:
    """The padded sizes that hold every request of ``parsed`` [(mode, request)]: giving them to every batch makes
    all batches of one size share one compiled program. "T" and "window" (z rows) and "Tk" (key rows, which end
    at their key token) rounded up to ``bucket`` tokens, "K" (objective tokens) the most any request has: the
    sizes are computed once per sequence, and every padded position of the window and of "K" costs a block pass,
    respectively a vocabulary-wide projection, at every step of the z optimization."""
    T = window = K = Tk = 1
    for mode, r in parsed:
        rows, key_pos, logit_pos, _, _ = z_rows(tokenizer, [r], mode, hp, contexts)
        T = max(T, max(len(x) for x in rows))
        window = max(window, max(len(x) - k for x, k in zip(rows, key_pos)))
        K = max(K, max(len(x) for x in logit_pos))
        Tk = max(Tk, max(_encode_with_key(tokenizer, c, r.template, r.subject)[1] + 1 for c in contexts))
    T = round_up(T, bucket)
    return {"T": T, "window": min(round_up(window, bucket), T), "K": K, "Tk": round_up(Tk, bucket)}


def z_request_bytes(cfg: ModelConfig, R: int, T: int, window: int, K: int, layer: int) -> int:
    """Bytes one request of the z optimization holds (an estimate from the shapes, float32, with room for XLA's
    temporaries): its R rows' hidden states and MLP outputs up to ``layer``; the later layers' attention keys and
    values of every position; per step, the activations of the ``window`` positions through the later layers kept
    for the gradient, and the vocabulary-wide log-probabilities at its K objective positions."""
    later = cfg.n_layers - layer - 1
    d, f, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    captured = 2 * (layer + 1) * T * d
    cache = later * T * 2 * cfg.n_kv_heads * cfg.head_dim
    grads = later * window * (8 * d + 4 * f + 2 * cfg.n_heads * (T + window))
    return int(2 * 4 * R * (captured + cache + grads + 3 * K * V))


def z_chunk(cfg: ModelConfig, R: int, T: int, window: int, K: int, layer: int, n: int, mesh=None,
            budget: Optional[float] = None) -> int:
    """Requests per call of the z optimization for ``n`` requests: as few calls as the memory budget allows (each
    call's :func:`z_request_bytes` within :func:`jaxedit.runtime.default_memory_budget`), of equal sizes; on a mesh
    a multiple of its data axis."""
    budget = budget or runtime.default_memory_budget()
    most = max(1, int(budget // z_request_bytes(cfg, R, T, window, K, layer)))
    k = padded(1, mesh)  # the data axis (1 without a mesh)
    calls = -(-n // max(most, k))
    return round_up(-(-n // calls), k)  # the calls' sizes balanced (10 requests, 7 fit: two calls of 5)


def optimize_targets(model, tokenizer, reqs, mode: str, hp: EditHparams, layers, contexts, *,
                     pad_to: int = 0, shape: Optional[dict] = None):
    """Step 1: z = h + delta at the output of the last edited layer, per request. With ``pad_to``, the batch is
    padded to that many requests (copies of the first) and with ``shape`` (:func:`batch_shape`) its rows to those
    sizes, so batches of one size share one compiled program. Returns (z [n, d], h_init [n, d], delta [n, d],
    losses [n, steps], objective terms [n, steps], steps run [n], v0 [n, d]: the last edited layer's MLP output at
    the key token of the bare context, which NAS anchors)."""
    cfg = model.config
    params = params_of(model)
    L = layers[-1]
    R = len(contexts) + 1
    rows, key_pos, logit_pos, tok_ids, tok_w = z_rows(tokenizer, reqs, mode, hp, contexts)
    Kmax = max(len(x) for x in logit_pos)
    if shape:
        Kmax = max(Kmax, shape["K"])
    pad = lambda xs, v: np.array([x + [x[-1] if v is None else v] * (Kmax - len(x)) for x in xs])
    lp_arr, ti_arr = pad(logit_pos, None), pad(tok_ids, 0)
    tw_arr = np.array([x + [0.0] * (Kmax - len(x)) for x in tok_w], np.float32)
    ids, mask = pad_rows(rows, max(shape["T"], max(len(x) for x in rows)) if shape else None)
    n = len(reqs)
    key_pos = np.array(key_pos, np.int32)
    window = int((mask.sum(1) - key_pos).max())
    if shape:
        window = min(max(window, shape["window"]), ids.shape[1])

    # the state entering the blocks after L, computed once (the unedited model). On a mesh the requests are split
    # over the data axis (padded to a multiple of it with copies of the first request, dropped afterwards)
    runtime.stage(f"optimizing the target vector{'s' * (n > 1)} at layer {L} ({n} request{'s' * (n > 1)}, "
                  f"<= {hp.v_num_grad_steps} steps)")
    mesh = mesh_of(params)
    n_pad = padded(max(n, pad_to), mesh)
    # requests per call: as many as the memory budget holds (each request's optimization is its own, so chunks
    # give the same deltas); every chunk padded to the same size, one compiled program
    chunk = z_chunk(cfg, R, ids.shape[1], window, Kmax, L, n_pad, mesh)
    n_pad = round_up(n_pad, chunk)
    order = np.concatenate([np.arange(n * R), np.tile(np.arange(R), n_pad - n)])
    put = (lambda a: jnp.asarray(a)) if mesh is None else (lambda a: put_batch(mesh, a))
    ids, mask, key_pos, lp_arr, ti_arr, tw_arr = (np.asarray(a)[order] for a in
                                                  (ids, mask, key_pos, lp_arr, ti_arr, tw_arr))
    mode_z = "unlikelihood" if mode == "delete" and hp.delete_objective == "unlikelihood" else mode
    parts = []
    for c0 in range(0, n_pad, chunk):
        if n_pad > chunk and c0 < n:  # progress where the requests take several calls
            runtime.stage(f"target vectors: requests {c0 + 1}-{min(c0 + chunk, n)} of {n} ({chunk} per call, as "
                          f"the memory budget allows)")
        rows_c = slice(c0 * R, (c0 + chunk) * R)
        kp = key_pos[rows_c]
        hid = apply_jit(cfg, params, put(ids[rows_c]), put(mask[rows_c]), capture=("hidden", "mlp"), num_layers=L + 1)
        h = hid.hidden[:, L]  # [chunk*R, T, d]
        h_init = h[jnp.arange(chunk * R), jnp.asarray(kp)].reshape(chunk, R, -1)[:, 0]  # bare context, key token
        v0 = hid.mlp[:, L][jnp.arange(chunk * R), jnp.asarray(kp)].reshape(chunk, R, -1)[:, 0]  # its MLP output
        del hid
        per_request = lambda a: (jnp.reshape(a, (chunk, R) + a.shape[1:]) if isinstance(a, jax.Array)
                                 else put(np.reshape(a, (chunk, R) + np.shape(a)[1:])))
        out = to_host(optimize_deltas(
            cfg, params, per_request(h), per_request(mask[rows_c]), per_request(kp), per_request(lp_arr[rows_c]),
            per_request(ti_arr[rows_c]), per_request(tw_arr[rows_c]),
            h_init, layer=L, mode=mode_z,
            steps=hp.v_num_grad_steps, lr=hp.v_lr, weight_decay=hp.v_weight_decay, clamp_factor=hp.clamp_norm_factor,
            kl_factor=hp.kl_factor, stop_loss=hp.early_stop_loss, window=window))
        parts.append(out + tuple(to_host((h_init, v0))))
    delta, losses, mains, n_run, h_init, v0 = (np.concatenate([p[i] for p in parts])[:n] for i in range(6))
    h_init = np.asarray(h_init, np.float32)
    v0 = np.asarray(v0, np.float32)
    if not np.all(np.isfinite(delta)):
        raise JaxeditError("the target optimization diverged (non-finite delta); nothing was changed")
    return h_init + delta, h_init, delta, np.asarray(losses), np.asarray(mains), np.asarray(n_run), v0


def trimmed_mean(values, upper_quantile: float = 0.95) -> float:
    """The mean of ``values`` without the floor((1 - q) n) largest (NAS's outlier rule)."""
    arr = np.sort(np.asarray(values, np.float64))
    if arr.size == 0 or not np.all(np.isfinite(arr)):
        raise JaxeditError("NAS: no finite |v*| norms to average")
    drop = int(np.floor((1.0 - upper_quantile) * arr.size))
    return float(arr[:arr.size - drop].mean()) if drop else float(arr.mean())


def nas_targets(h_init, delta, v0, mean_norm: float):
    """NAS's targets: v* = delta + v0 scaled to ``mean_norm``, or v* = v0 (nothing written) when |delta + v0| >
    2 x mean_norm; the target is h_init - v0 + v*. Returns (z [n, d], written [n] bool, |v*| before [n])."""
    h_init, delta, v0 = (np.asarray(a, np.float64) for a in (h_init, delta, v0))
    vstar = delta + v0
    norm = np.linalg.norm(vstar, axis=1)
    written = ~(norm > 2 * mean_norm) if mean_norm > 0 else np.ones(len(norm), bool)
    # NAS's scale_vector_to_norm: x * mean / (|x| + 1e-10), x itself when |x| = 0
    scale = np.where(norm > 0, mean_norm / (norm + 1e-10), 1.0) if mean_norm > 0 else 1.0
    vstar = np.where(written[:, None], vstar * np.reshape(scale, (-1, 1)), v0)
    return (h_init - v0 + vstar).astype(np.float32), written, norm


def nas_sample(requests, n: int) -> list:
    """The requests whose clean |v*| make NAS's mean: ``n`` of them drawn with seed 0 (all when fewer)."""
    import random

    requests = list(requests)
    return requests if n >= len(requests) else random.Random(0).sample(requests, n)


def vstar_mean_norm(model, tokenizer, reqs, hp: EditHparams, layers, batch_size: int = 16) -> dict:
    """NAS's mean |v*| of clean edits on ``model`` (the unedited one): each parsed edit request's z optimization on
    its bare prompt (no context prefixes), |delta + v0| at the last edited layer, the largest (1 - nas_quantile)
    share dropped. Returns {"mean_norm", "samples", "dropped"}."""
    bare = hp.replace(context_prefixes=())
    norms = []
    with runtime.bar(len(reqs), f"NAS mean |v*| (layer {layers[-1]})", "request") as bar:
        for start in range(0, len(reqs), batch_size):
            chunk = reqs[start:start + batch_size]
            out = optimize_targets(model, tokenizer, chunk, "edit", bare, layers, ["{}"],
                                   pad_to=batch_size if len(reqs) > batch_size else 0)
            delta, v0 = out[2], out[6]
            norms.extend(np.linalg.norm(delta.astype(np.float64) + v0, axis=1).tolist())
            bar.update(len(chunk))
    return {"mean_norm": trimmed_mean(norms, hp.nas_quantile), "samples": len(norms),
            "dropped": int(np.floor((1.0 - hp.nas_quantile) * len(norms)))}


def edit_batch(model, tokenizer, reqs, mode: str, hp: EditHparams, layers, contexts, stats, *, solver=None,
               evaluate: bool = True, pad_to: int = 0, shape: Optional[dict] = None,
               nas_mean_norm: Optional[float] = None, donate: bool = False):
    """One batch edit of parsed requests: targets (:func:`optimize_targets`; with ``hp.nas``, rescaled by
    :func:`nas_targets` to ``nas_mean_norm``), then :func:`spread` with ``solver`` (default MEMIT's with
    ``stats``). Returns (edited model, report). ``donate``: ``model``'s edited projection is reused (``model`` is used
    up; the evaluation's "before" probabilities are taken before the spread)."""
    t0 = time.perf_counter()
    cfg = model.config
    z, h_init, delta, losses, mains, n_run, v0 = optimize_targets(model, tokenizer, reqs, mode, hp, layers, contexts,
                                                                  pad_to=pad_to, shape=shape)
    nas = None
    if hp.nas and mode == "edit":  # deletion requests (in a mixed sequence) have no target to anchor
        if nas_mean_norm is None:
            raise JaxeditError("nas=True needs the mean |v*| of clean edits (nas_mean_norm)")
        z, written, vnorm = nas_targets(h_init, delta, v0, nas_mean_norm)
        nas = {"mean_norm": float(nas_mean_norm), "written": written.tolist(), "vstar_norm": vnorm.tolist()}
    before = _before(model, tokenizer, reqs, mode) if evaluate else None
    runtime.stage(f"spreading the update over layers {list(layers)}")
    new_params, layer_report = spread(cfg, params_of(model), tokenizer, reqs, contexts, z, stats, layers, hp,
                                      solver=solver, key_length=shape and shape["Tk"], donate=donate)
    del model
    edited = model_from_params(cfg, new_params)

    report = {"mode": mode, "layers": list(layers), "hparams": dataclasses.asdict(hp), "contexts": contexts,
              "requests": [], "layers_report": layer_report, "stats": getattr(stats, "source", None), "nas": nas}
    h_norm = np.linalg.norm(h_init, axis=1)
    for j, r in enumerate(reqs):
        k = max(int(n_run[j]) - 1, 0)
        report["requests"].append({
            "prompt": r.template.replace("{}", r.subject), "subject": r.subject,
            "loss_first": float(losses[j, 0]), "loss_last": float(losses[j, k]),
            "objective_first": float(mains[j, 0]), "objective_last": float(mains[j, k]), "steps": int(n_run[j]),
            "delta_norm": float(np.linalg.norm(delta[j])), "h_norm": float(h_norm[j])})
    if evaluate:
        runtime.stage("evaluating the edited model")
        _evaluate(before, edited, tokenizer, reqs, mode, report)
    report["seconds"] = time.perf_counter() - t0
    return edited, report


def nas_mean(model, tokenizer, reqs, hp: EditHparams, layers, nas_mean_norm=None) -> Optional[float]:
    """The mean |v*| NAS scales to: ``nas_mean_norm`` when given, else computed on ``model`` from a sample of the
    parsed edit requests ``reqs`` (:func:`nas_sample`, :func:`vstar_mean_norm`); None without ``hp.nas``."""
    if not hp.nas:
        if nas_mean_norm is not None:
            raise JaxeditError("nas_mean_norm is NAS's (nas=True)")
        return None
    if nas_mean_norm is not None:
        if isinstance(nas_mean_norm, bool) or not isinstance(nas_mean_norm, (int, float)) or not nas_mean_norm > 0:
            raise JaxeditError(f"nas_mean_norm must be a number > 0 (got {nas_mean_norm!r})")
        return float(nas_mean_norm)
    if hp.nas_samples < 1 or not 0 < hp.nas_quantile <= 1:
        raise JaxeditError("nas_samples must be >= 1 and nas_quantile in (0, 1]")
    sample = nas_sample([r for r in reqs if r.raw.get("target") is not None], hp.nas_samples)
    if not sample:
        raise JaxeditError("NAS needs edit requests (with a \"target\") to measure the mean |v*|")
    runtime.stage(f"NAS: the mean |v*| of {len(sample)} clean edits on the unedited model")
    return vstar_mean_norm(model, tokenizer, sample, hp, layers)["mean_norm"]


def _run(model, requests, mode, layers, tokenizer, stats, progress, hp_overrides, donate=False):
    hp_overrides = dict(hp_overrides)
    given_mean = hp_overrides.pop("nas_mean_norm", None)
    hp, layers = prepare(model, layers, hp_overrides)
    reqs = parse_requests(requests, tokenizer, mode)
    t0 = time.perf_counter()
    stats = key_stats(model, tokenizer, layers, hp, stats, progress)  # before any change
    if mode == "delete" and (hp.nas or given_mean is not None):
        raise JaxeditError("NAS (nas=True) rescales edit targets; deletion has none")
    mean = nas_mean(model, tokenizer, reqs, hp, layers, given_mean) if mode == "edit" else None
    runtime.stage("sampling context templates")
    contexts = context_templates(model, tokenizer, hp)
    edited, report = edit_batch(model, tokenizer, reqs, mode, hp, layers, contexts, stats, nas_mean_norm=mean,
                                donate=_donate_flag(donate))
    report["seconds"] = time.perf_counter() - t0
    return edited, report


def _donate_flag(donate) -> bool:
    if not isinstance(donate, bool):
        raise JaxeditError(f"donate must be True or False (got {donate!r})")
    return donate


def _eval_prompts(reqs, mode):
    """The prompts :func:`_evaluate` scores: (prompts, tracked token ids per prompt, (request, kind, text) each)."""
    prompts, toks, where = [], [], []
    for j, r in enumerate(reqs):
        prompt = r.template.replace("{}", r.subject)
        tracked = [r.targets[0]] if mode == "edit" else list(r.targets)
        for kind in ("prompt", "paraphrases", "neighborhood"):
            texts = [prompt] if kind == "prompt" else list(r.raw.get(kind) or [])
            for t in texts:
                prompts.append(t)
                toks.append(tracked)
                where.append((j, kind, t))
    return prompts, toks, where


def _before(model, tokenizer, reqs, mode) -> list:
    """Per prompt of :func:`_eval_prompts`, the unedited model's (p of each tracked token, argmax id, p of the argmax),
    taken before the spread, so that a donated model need not outlive it (and not its whole distributions)."""
    prompts, toks, _ = _eval_prompts(reqs, mode)
    pb = next_token_dist(model, tokenizer, prompts)
    return [([float(pb[i, x]) for x in t], int(pb[i].argmax()), float(pb[i].max())) for i, t in enumerate(toks)]


def _evaluate(before, edited, tokenizer, reqs, mode, report):
    """Before (from :func:`_before`) and after next-token probabilities of the target's first token (edit) or the
    suppressed tokens (delete) and of the unedited model's argmax, on the prompt, paraphrases and neighbourhood
    prompts."""
    prompts, toks, where = _eval_prompts(reqs, mode)
    pa = next_token_dist(edited, tokenizer, prompts)
    for i, ((j, kind, text), t) in enumerate(zip(where, toks)):
        p_before, ab, p_ab = before[i]
        aa = int(pa[i].argmax())
        entry = {"text": text, "tokens": [tokenizer.decode([x]) for x in t],
                 "p_before": p_before, "p_after": [float(pa[i, x]) for x in t],
                 "original_argmax": tokenizer.decode([ab]),
                 "p_original_before": p_ab, "p_original_after": float(pa[i, ab]),
                 "argmax_after": tokenizer.decode([aa]), "argmax_kept": ab == aa}
        rep = report["requests"][j]
        if kind == "prompt":
            rep.update(entry)
        else:
            rep.setdefault(kind, []).append(entry)


@public("requests", old=("layers", "tokenizer"))
def memit(model, requests, *, tokenizer=None, layers=None, stats=None, progress=True, donate: bool = False,
          **hparams):
    """MEMIT: rewrite each request's subject -> "target" association. Returns ``(edited_model, report)``; the input
    model is untouched (unless ``donate=True``). ``layers``: the layers to edit (default: the preset's; see :func:`hparams_for`).
    ``stats``: {layer: E[k k^T]} (default: computed with :func:`jaxedit.edit.stats.layer_stats`, cached).
    Other keyword arguments override :class:`EditHparams` fields (``preset="gpt2-xl"``/``"llama-7b"`` picks one),
    among them the key statistics' ``corpus``, ``stats_samples`` and ``max_len`` (the names ``jaxedit.layer_stats``
    and the command line use; the MEMIT paper's ``mom2_corpus``, ``mom2_samples``, ``mom2_max_len`` are aliases).
    ``donate=True``: the edit reuses the memory of ``model``'s edited projection (the stacked output projection of
    every layer: one copy of it less at the peak), and ``model`` is used up: do not use it afterwards."""
    return _run(model, requests, "edit", layers, tokenizer, stats, progress, hparams, donate)


@public("requests", old=("layers", "kl_weight", "tokenizer"))
def delete(model, requests, *, tokenizer=None, layers=None, kl_weight: float = 0.0625, stats=None, progress=True,
           donate: bool = False, **hparams):
    """Das et al.'s deletion: lower p("suppress" | prompt) under a KL constraint (``kl_weight`` x KL(P_orig ||
    P_edited) on "{subject} is a"), spread over ``layers`` like MEMIT. Returns ``(edited_model, report)``.
    ``donate=True``: as :func:`memit`'s (``model`` is used up)."""
    if kl_weight < 0:
        raise JaxeditError("kl_weight must be >= 0")
    return _run(model, requests, "delete", layers, tokenizer, stats, progress, dict(hparams, kl_factor=kl_weight),
                donate)
