"""UltraEdit (Gu et al. 2025): training-free lifelong editing of the MLP input projections, one closed-form update
per turn of edits, with a normalizer that carries over from turn to turn.

Per turn (a list of requests, processed in micro-batches of ``micro_batch``), all on the model as it was before
the turn:

1. each record becomes ``prompt + target`` with the target's last token dropped from the input; the labelled
   positions are the prompt's last position and every target position but the last (each predicts the next
   target token);
2. per micro-batch: one forward and backward of the mean cross-entropy over all labelled positions of the
   micro-batch; for every edited projection (LLaMA: ``w_gate`` / ``w_up``, GPT-2: ``w_in``, i.e. c_fc), its input
   rows k (the normed hidden state entering the MLP) and the gradient g of that loss with respect to its output,
   at the labelled positions only;
3. the lifelong normalizer (one running mean / std per weight shape, shared by every projection of that shape,
   never reset) takes each micro-batch's [k, g] rows of each projection (parallel-variance update, unbiased
   per-chunk variance);
4. per projection over the turn's rows: k^, g^ = the normalized halves, v = -lr * |k^|^2 * g^ (row-wise),
   dW = solve(K^T K + I, K^T V) with the raw keys K, and W += dW (W is stored [in, out]).

``report["state"]`` holds the normalizer (and what identifies the model and the edited projections); pass it back
as ``state=`` to continue the sequence. Nothing else carries over from one turn to the next.
"""
from __future__ import annotations

import time
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit import runtime
from jaxedit.batching import round_up
from jaxedit.calls import check_names, public
from jaxedit.edit import memit as _memit
from jaxedit.errors import JaxeditError
from jaxedit.forward import attention, block, causal_allowed, embed, positions_from_mask
from jaxedit.model import model_from_params, params_of
from jaxedit.models import FAMILY_MODULES

EPS = float(np.finfo(np.float32).eps)  # the reference's eps: float32 machine epsilon
DEFAULT_LR = 1e-6
DEFAULT_MICRO_BATCH = 10
PROJECTIONS = {"llama": ("w_gate", "w_up"), "gpt2": ("w_in",)}
ALIASES = {"gate": "w_gate", "gate_proj": "w_gate", "up": "w_up", "up_proj": "w_up", "c_fc": "w_in", "fc": "w_in",
           "in": "w_in"}
# The published LLaMA-3-8B choice (32 layers): gate_proj of layers 11-15, up_proj of layers 18-24.
_PUBLISHED = {"w_gate": (11, 5), "w_up": (18, 7)}
OPTIONS = ("tokenizer", "layers", "state", "lr", "micro_batch", "solve_dtype", "progress")


# ---------------------------------------------------------------------------------------------- modules

def _range(L: int, start_frac: float, count_frac: float) -> list:
    n = max(1, round(count_frac * L))
    n = min(n, L)
    start = min(round(start_frac * L), L - n)
    return list(range(start, start + n))


def default_modules(cfg) -> dict:
    """{projection: [layers]}: the published LLaMA-3-8B ranges scaled to the model's depth (SmolLM2's 30 layers:
    w_gate 10-14, w_up 17-23); GPT-2's w_in (c_fc) over the depth fraction both ranges span (11/32 .. 24/32)."""
    L = cfg.n_layers
    if cfg.family == "llama":
        return {name: _range(L, s / 32, n / 32) for name, (s, n) in _PUBLISHED.items()}
    lo, hi = round(11 / 32 * L), max(round(24 / 32 * L), round(11 / 32 * L))
    hi = min(hi, L - 1)
    return {"w_in": list(range(min(lo, hi), hi + 1))}


def resolve_modules(cfg, layers=None) -> list:
    """The edited projections as a list of (name, layer), in the order the normalizer sees them. ``layers``: None
    (:func:`default_modules`), a list of layers (every input projection of the family at those layers), or a dict
    {projection: [layers]} (names: w_gate/gate/gate_proj, w_up/up/up_proj for LLaMA; w_in/c_fc for GPT-2)."""
    names = PROJECTIONS.get(cfg.family)
    if names is None:
        raise JaxeditError(f"ultraedit: no input projections known for the {cfg.family} family")
    if layers is None:
        spec = default_modules(cfg)
    elif isinstance(layers, dict):
        spec = {}
        for k, v in layers.items():
            name = ALIASES.get(str(k), str(k))
            if name not in names:
                raise JaxeditError(f"layers: unknown module {k!r} for a {cfg.family} model (known: "
                                   f"{', '.join(names)})")
            spec[name] = v
    else:
        spec = {name: layers for name in names}
    out = []
    for name in names:
        if name not in spec:
            continue
        ls = spec[name]
        if isinstance(ls, (int, np.integer)):
            ls = [ls]
        try:
            ls = [int(l) for l in ls] if all(not isinstance(l, bool) and int(l) == l for l in ls) else None
        except (TypeError, ValueError):
            ls = None
        if not ls:
            raise JaxeditError(f"layers: {name} needs a non-empty list of integer layers (got {spec[name]!r})")
        bad = [l for l in ls if not 0 <= l < cfg.n_layers]
        if bad:
            raise JaxeditError(f"layers: {name} layer {bad[0]} is outside the model's {cfg.n_layers} layers "
                               f"(0-{cfg.n_layers - 1})")
        if len(set(ls)) != len(ls):
            raise JaxeditError(f"layers: {name} lists a layer twice")
        out.extend((name, l) for l in sorted(ls))
    if not out:
        raise JaxeditError("layers: no module to edit")
    return out


def _shape_key(shape) -> str:
    return f"{int(shape[0])}x{int(shape[1])}"


def model_id(cfg) -> dict:
    return {"family": cfg.family, "n_layers": int(cfg.n_layers), "d_model": int(cfg.d_model),
            "d_ff": int(cfg.d_ff), "vocab_size": int(cfg.vocab_size)}


# ---------------------------------------------------------------------------------------------- normalizer

def normalizer_new(size: int) -> dict:
    return {"n": 0.0, "mean": np.zeros(size, np.float64), "var": np.zeros(size, np.float64)}


def normalizer_update(st: dict, x: np.ndarray) -> dict:
    """The running mean / variance sum after the rows ``x`` [m, D] (the reference's parallel-variance update:
    var += m var(x) + n m delta^2 / (n + m), var(x) unbiased). A chunk of one row adds no within-chunk term (the
    reference's unbiased variance of one row is NaN)."""
    x = np.asarray(x, np.float64)
    m = x.shape[0]
    if m == 0:
        return st
    n = st["n"] + m
    delta = x.mean(0) - st["mean"]
    within = x.var(0, ddof=1) if m > 1 else np.zeros(x.shape[1])
    return {"n": n, "mean": st["mean"] + m * delta / n,
            "var": st["var"] + m * within + st["n"] * m * np.square(delta) / n}


def normalizer_std(st: dict) -> np.ndarray:
    return np.sqrt(st["var"] / (st["n"] - 1 + EPS))


def normalize(st: dict, x: np.ndarray) -> np.ndarray:
    return (x - st["mean"]) / (normalizer_std(st) + EPS)


# ---------------------------------------------------------------------------------------------- records

def parse_records(requests, tokenizer) -> list:
    """[(input ids, labelled positions, label ids)] per request: prompt (its subject put in for a "{}") + target
    with the target's last token dropped; errors name the request."""
    return _memit.each_request(requests, tokenizer, lambda r: parse_record(r, tokenizer), who="ultraedit")


def parse_record(r, tokenizer) -> tuple:
    """(input ids, labelled positions, label ids) of one request; errors do not say where it came from."""
    if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
        raise JaxeditError("needs a non-empty \"prompt\"")
    prompt = r["prompt"]
    if "{}" in prompt:
        subject = r.get("subject")
        if not isinstance(subject, str) or not subject.strip():
            raise JaxeditError("the prompt has a \"{}\" placeholder but no \"subject\"")
        prompt = prompt.replace("{}", subject, 1)
    target = r.get("target")
    if not isinstance(target, str) or not target.strip():
        raise JaxeditError("needs a non-empty \"target\""
                           + (" (ultraedit writes targets; \"suppress\" is for deletion)" if "suppress" in r else ""))
    p = list(tokenizer(prompt)["input_ids"])
    a = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    if not p or not a:
        raise JaxeditError("the prompt or the target has no tokens")
    ids = p + a[:-1]
    return ids, list(range(len(p) - 1, len(ids))), a


def micro_batches(records: list, size: int) -> list:
    """The turn's record indices sorted by length, longest first (ties in order), in chunks of ``size`` (the
    reference's collate order)."""
    order = sorted(range(len(records)), key=lambda i: -len(records[i][0]))
    return [order[s:s + size] for s in range(0, len(order), size)]


# ---------------------------------------------------------------------------------------------- capture

def _mlp_with_deltas(cfg, pl, x, deltas):
    """The block's MLP with zero ``deltas`` added to the input projections' outputs (their gradients are the
    gradients w.r.t. those outputs); returns (MLP output, the normed MLP input)."""
    fam = FAMILY_MODULES[cfg.family]
    xn = fam.norm_mlp(cfg, pl, x)
    if cfg.family == "llama":
        key = jax.nn.silu(xn @ pl["w_gate"] + deltas["w_gate"]) * (xn @ pl["w_up"] + deltas["w_up"])
    else:
        key = jax.nn.gelu(xn @ pl["w_in"] + pl["b_in"] + deltas["w_in"], approximate=cfg.activation == "gelu_new")
    return fam.mlp_out(cfg, pl, key), xn


def _block_with_deltas(cfg, pl, x, positions, allowed, deltas):
    fam = FAMILY_MODULES[cfg.family]
    q, k, v = fam.qkv(cfg, pl, fam.norm_attn(cfg, pl, x), positions)
    x = x + fam.attn_out(cfg, pl, attention(q, k, v, allowed))
    m, xn = _mlp_with_deltas(cfg, pl, x, deltas)
    return x + m, xn


@partial(jax.jit, static_argnames=("cfg", "lo", "hi"))
def capture(cfg, params, ids, mask, bi, ti, labels, valid, lo: int, hi: int):
    """One micro-batch: (loss, keys [hi-lo+1, R, d], {projection: grads [hi-lo+1, R, out]}) at the rows (bi, ti)
    (labels [R], valid [R]: 0 for padding rows). Layers before ``lo`` run forward only."""
    fam = FAMILY_MODULES[cfg.family]
    positions, allowed = positions_from_mask(mask), causal_allowed(mask)
    blocks = params["blocks"]

    def part(a, b):
        return jax.tree.map(lambda w: w[a:b], blocks)

    def plain(x, pl):
        return block(cfg, pl, x, positions, allowed)[0], None

    x, _ = jax.lax.scan(plain, embed(cfg, params, ids, positions), part(0, lo))
    B, T = ids.shape
    n = hi + 1 - lo
    deltas = {name: jnp.zeros((n, B, T, blocks[name].shape[-1]), x.dtype) for name in PROJECTIONS[cfg.family]}

    def loss_of(deltas):
        def step(x, xs):
            pl, dl = xs
            return _block_with_deltas(cfg, pl, x, positions, allowed, dl)

        y, xns = jax.lax.scan(step, x, (part(lo, hi + 1), deltas))
        y, _ = jax.lax.scan(plain, y, part(hi + 1, cfg.n_layers))
        h = fam.final_norm(cfg, params, y[bi, ti])
        logits = fam.lm_head(cfg, params, h).astype(jnp.float32)
        ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
        return (ce * valid).sum() / jnp.maximum(valid.sum(), 1.0), xns

    loss, vjp, xns = jax.vjp(loss_of, deltas, has_aux=True)
    (g,) = vjp(jnp.ones_like(loss))
    keys = xns[:, bi, ti].astype(jnp.float32)
    grads = {name: v[:, bi, ti].astype(jnp.float32) for name, v in g.items()}
    return loss, keys, grads


def _pad_batch(records, idx, T: int, R: int, pad_id: int = 0):
    B = len(idx)
    ids = np.full((B, T), pad_id, np.int32)
    mask = np.zeros((B, T), np.int32)
    bi, ti, lab = (np.zeros(R, np.int32) for _ in range(3))
    valid = np.zeros(R, np.float32)
    r = 0
    for b, i in enumerate(idx):
        x, pos, a = records[i]
        ids[b, :len(x)] = x
        mask[b, :len(x)] = 1
        for p, t in zip(pos, a):
            bi[r], ti[r], lab[r], valid[r] = b, p, t, 1.0
            r += 1
    return ids, mask, bi, ti, lab, valid, r


# ---------------------------------------------------------------------------------------------- one turn

def new_state(model, modules) -> dict:
    """The state of a new sequence: an empty normalizer per weight shape of the edited projections."""
    blocks = params_of(model)["blocks"]
    norms = {}
    for name, _ in modules:
        shape = blocks[name].shape[1:]
        norms.setdefault(_shape_key(shape), normalizer_new(int(shape[0]) + int(shape[1])))
    return {"method": "ultraedit", "model": model_id(model.config), "modules": [list(m) for m in modules],
            "normalizers": norms, "edits": 0, "turns": 0}


def check_state(state, model, layers) -> list:
    """The edited projections of a state that continues a sequence on ``model`` (``layers`` None: the state's)."""
    if not isinstance(state, dict) or state.get("method") != "ultraedit" or "normalizers" not in state:
        raise JaxeditError("state must be the report[\"state\"] of an earlier ultraedit call (this one is "
                           + (f"{state.get('method')}'s)" if isinstance(state, dict) and state.get("method")
                              else "not)"))
    if state.get("model") != model_id(model.config):
        raise JaxeditError(f"state is from another model ({state.get('model')}, not {model_id(model.config)})")
    have = [tuple(m) for m in state["modules"]]
    modules = have if layers is None else resolve_modules(model.config, layers)
    if modules != have:
        raise JaxeditError(f"layers: the state edits {have}, not {modules}")
    blocks = params_of(model)["blocks"]
    for name, _ in modules:
        shape = blocks[name].shape[1:]
        st = state["normalizers"].get(_shape_key(shape))
        if st is None or np.shape(st["mean"]) != (int(shape[0]) + int(shape[1]),):
            raise JaxeditError(f"state has no normalizer for {name}'s shape {tuple(shape)}")
    return modules


def _check_lr(lr):
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not np.isfinite(lr) or lr <= 0:
        raise JaxeditError(f"lr must be a number > 0 (got {lr!r})")
    return float(lr)


def _check_micro_batch(mb):
    if isinstance(mb, bool) or not isinstance(mb, (int, np.integer)) or mb < 1:
        raise JaxeditError(f"micro_batch must be an integer >= 1 (got {mb!r})")
    return int(mb)


@jax.jit
def _add_rows(w, idx, dw):
    return w.at[idx].add(dw.astype(w.dtype))


def turn_shapes(records, micro_batch: int) -> tuple:
    """(T, R): the token length and labelled-row count one compiled capture program holds for these records."""
    T = round_up(max(len(r[0]) for r in records), 8)
    longest = sorted((len(r[2]) for r in records), reverse=True)[:micro_batch]
    return T, round_up(sum(longest), 8)


def run_turn(model, records, modules, state: dict, lr: float, *, micro_batch: int = DEFAULT_MICRO_BATCH,
             solve_dtype: str = "float64", shapes: Optional[tuple] = None, progress=True, keep_updates=False):
    """One turn on parsed records. Returns (edited model, turn report, new state); ``model`` is unchanged.
    ``keep_updates``: the report's "updates" holds each projection's dW [in, out] (float32) by (name, layer)."""
    cfg = model.config
    params = params_of(model)
    lo, hi = min(l for _, l in modules), max(l for _, l in modules)
    T, R = shapes if shapes is not None else turn_shapes(records, micro_batch)
    keys = {m: [] for m in modules}
    grads = {m: [] for m in modules}
    norms = {k: dict(v) for k, v in state["normalizers"].items()}
    blocks = params["blocks"]
    losses = []
    chunks = micro_batches(records, micro_batch)
    with runtime.bar(len(chunks), "ultraedit micro-batches", "batch", enabled=progress) as pbar:
        for idx in chunks:
            Tb = min(T, round_up(max(len(records[i][0]) for i in idx), 8))
            ids, mask, bi, ti, lab, valid, r = _pad_batch(records, idx, Tb, R)
            if r > R:
                raise JaxeditError(f"internal: {r} labelled rows > {R}")
            loss, K, G = capture(cfg, params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(bi),
                                 jnp.asarray(ti), jnp.asarray(lab), jnp.asarray(valid), lo=lo, hi=hi)
            K = np.asarray(K)
            G = {k: np.asarray(v) for k, v in G.items()}
            losses.append(float(loss))
            for name, l in modules:
                k_rows, g_rows = K[l - lo, :r], G[name][l - lo, :r]
                keys[(name, l)].append(k_rows)
                grads[(name, l)].append(g_rows)
                sk = _shape_key(blocks[name].shape[1:])
                norms[sk] = normalizer_update(norms[sk], np.concatenate([k_rows, g_rows], -1))
            pbar.update(1)
    dt = np.float64 if solve_dtype == "float64" else np.float32
    updates, layer_report = {}, []
    for name, l in modules:
        K = np.concatenate(keys.pop((name, l))).astype(dt)
        G = np.concatenate(grads.pop((name, l))).astype(dt)
        d_in = K.shape[1]
        st = norms[_shape_key(blocks[name].shape[1:])]
        Z = normalize(st, np.concatenate([K, G], -1)).astype(dt)
        k_hat, g_hat = Z[:, :d_in], Z[:, d_in:]
        V = -lr * np.square(k_hat).sum(-1, keepdims=True) * g_hat
        A = K.T @ K + np.eye(d_in, dtype=dt)
        dW = np.linalg.solve(A, K.T @ V)
        if not np.all(np.isfinite(dW)):
            raise JaxeditError(f"ultraedit: the update of {name} at layer {l} is not finite; nothing was changed")
        updates[(name, l)] = dW.astype(np.float32)
        layer_report.append({"module": name, "layer": int(l), "rows": int(K.shape[0]),
                             "update_norm": float(np.linalg.norm(dW)),
                             "weight_norm": float(np.linalg.norm(np.asarray(blocks[name][l], np.float32)))})
    new_blocks = dict(blocks)
    for name in {n for n, _ in modules}:
        ls = [l for n, l in modules if n == name]
        new_blocks[name] = _add_rows(blocks[name], jnp.asarray(ls),
                                     jnp.asarray(np.stack([updates[(name, l)] for l in ls])))
    edited = model_from_params(cfg, dict(params, blocks=new_blocks))
    new = dict(state, normalizers=norms, edits=int(state.get("edits", 0)) + len(records),
               turns=int(state.get("turns", 0)) + 1)
    rep = {"losses": losses, "modules": layer_report}
    if keep_updates:
        rep["updates"] = updates
    return edited, rep, new


@public("requests")
def ultraedit(model, requests, *, tokenizer=None, layers=None, state=None, lr: float = DEFAULT_LR,
              micro_batch: int = DEFAULT_MICRO_BATCH, solve_dtype: str = "float64", progress=True, **kw):
    """UltraEdit: one turn editing ``requests`` ({"prompt", "target"}, "subject" for a "{}" prompt) into the MLP
    input projections. Returns ``(edited_model, report)``; ``report["state"]`` (the lifelong normalizer) continues
    the sequence when passed as ``state=`` to the next call. ``layers``: None (the published ranges scaled to the
    model), a list of layers (every input projection there) or {projection: [layers]}. ``lr``: the step on the
    normalized gradients (published 1e-6); ``micro_batch``: records per forward/backward (published 10);
    ``solve_dtype``: "float64" (host) or "float32"."""
    t0 = time.perf_counter()
    if kw:
        check_names(kw, OPTIONS, what="option")
    lr = _check_lr(lr)
    micro_batch = _check_micro_batch(micro_batch)
    if solve_dtype not in ("float32", "float64"):
        raise JaxeditError(f"solve_dtype must be float32 or float64 (got {solve_dtype!r})")
    if state is None:
        modules = resolve_modules(model.config, layers)
        state = new_state(model, modules)
    else:
        modules = check_state(state, model, layers)
    records = parse_records(requests, tokenizer)
    runtime.stage(f"ultraedit: a turn of {len(records)} edit{'s' * (len(records) != 1)} into "
                  f"{len(modules)} projections")
    edited, rep, state = run_turn(model, records, modules, state, lr, micro_batch=micro_batch,
                                  solve_dtype=solve_dtype, progress=progress)
    return edited, {"method": "ultraedit", "lr": lr, "micro_batch": micro_batch,
                    "modules": [list(m) for m in modules], "losses": rep["losses"], "layers_report": rep["modules"],
                    "state": state, "seconds": time.perf_counter() - t0}
