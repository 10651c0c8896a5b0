"""DINM (Wang et al. 2024, SafeEdit): detoxify by locating the layer where a safe and an unsafe response diverge
most, then tuning that layer's MLP output projection on the safe response.

**Locate** (:func:`dinm_locate`). The safe and the unsafe generation of a case (the response texts alone, no prompt)
are tokenized as one batch of two, padded on the right with the end-of-sequence token, and run through the model
with position ids 0..T-1 on every row (padding included, as transformers numbers them). For each block l the
distance is the Frobenius norm of the difference of the two [T, d] block outputs, padding positions included; the
last block's output is taken after the final norm (transformers' last ``hidden_states`` entry). The toxic layer is
the argmax (ties: the lower layer). Pairs are batched with extra padding that is left out of the norm, so each
distance is exactly that of the pair padded on its own.

**Edit** (:func:`dinm`). Only ``w_out`` (down_proj / c_proj) of the located layer changes. With the system suffix
appended to the prompts (``prompt + " " + suffix``), the loss is

    edit_weight x NLL(" " + safe generation | adversarial prompt + suffix)
        + KL(P_original || P_edited) over the positions that predict the knowledge-constraint answer
          (" " + answer after its prompt + suffix),

each averaged over its tokens (over all the cases' tokens when several cases are tuned together). The KL carries
its gradient (``kl_grad=True``, the default); its reference distribution is the unedited model's. Adam (optax;
torch's defaults: betas 0.9/0.999, eps 1e-8; ``weight_decay`` added to the gradient as torch's Adam does) runs
``steps`` steps, stopping early when the loss falls below ``stop_loss``; the whole loop is one jit call.

Two options reproduce the public implementation: ``locate="first"`` (the layer located for the first case is used
for every case) and ``kl_grad=False`` (the KL term is computed but contributes no gradient, so only the NLL moves
the weights).

**Modes.** ``per_instance=True`` (SafeEdit's setting): every case edits the original model on its own; the result
is that case's model (with several cases, a :class:`CaseModels` sequence that builds case i's model on access).
``per_instance=False``: the cases go into one model in order, ``batch_size`` at a time (each group tuned jointly
on the union of its cases' layers, located on the model edited so far).
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

from jaxedit.calls import check_names, public
from jaxedit.batching import pad_rows, round_up
from jaxedit.config import ModelConfig
from jaxedit.errors import JaxeditError
from jaxedit.evaluate.safeedit import Case, read_cases, with_suffix
from jaxedit.forward import apply, block, causal_allowed, embed
from jaxedit.model import model_from_params, params_of
from jaxedit.models import FAMILY_MODULES

DEFAULT_SUFFIX = "If the user's request is reasonable, give the correct answer. Please give the right response:"


@dataclasses.dataclass(frozen=True)
class DinmHparams:
    lr: float = 5e-4
    steps: int = 10
    edit_weight: float = 0.1  # the NLL's weight against the KL's 1 (the public config calls it kl_factor)
    weight_decay: float = 0.0
    kl_grad: bool = True  # False: the public implementation's KL without gradient
    locate: str = "each"  # "each" case (the paper) or "first" (the public implementation: the first case's layer)
    layer: Optional[int] = None  # skip the location: edit this layer for every case
    suffix: Optional[str] = DEFAULT_SUFFIX  # appended to the adversarial and knowledge-constraint prompts
    stop_loss: float = 1e-4  # stop before a step when the loss is below this
    batch_size: int = 1  # per_instance=False: cases tuned together

    def replace(self, **kw):
        names = [f.name for f in dataclasses.fields(self)]
        return dataclasses.replace(self, **check_names(kw, names, what="DINM hyperparameter"))

    def check(self, n_layers: int):
        if self.steps < 1:
            raise JaxeditError(f"steps must be >= 1 (got {self.steps})")
        if not self.lr > 0:
            raise JaxeditError(f"lr must be > 0 (got {self.lr})")
        if self.edit_weight < 0 or self.weight_decay < 0:
            raise JaxeditError("edit_weight and weight_decay must be >= 0")
        if self.locate not in ("each", "first"):
            raise JaxeditError(f"locate must be 'each' or 'first' (got {self.locate!r})")
        if self.batch_size < 1:
            raise JaxeditError(f"batch_size must be >= 1 (got {self.batch_size})")
        if self.layer is not None and not (isinstance(self.layer, (int, np.integer)) and 0 <= self.layer < n_layers):
            raise JaxeditError(f"layer {self.layer} is out of range: the model has layers 0..{n_layers - 1}")


def _pad_id(tokenizer) -> int:
    for t in (tokenizer.eos_token_id, tokenizer.pad_token_id):
        if t is not None:
            return int(t)
    return 0


# ---- locate ----

@partial(jax.jit, static_argnames=("cfg",))
def _pair_distances(cfg: ModelConfig, params, ids, mask, pair_len):
    """ids/mask [2P, T]: rows 2p and 2p + 1 are pair p's safe and unsafe response, right-padded; pair_len [P]: the
    pair's own padded length. Returns [P, L] Frobenius distances of the block outputs over the first pair_len
    positions (the last block after the final norm)."""
    fam = FAMILY_MODULES[cfg.family]
    B, T = ids.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    allowed = causal_allowed(mask)
    valid = (jnp.arange(T)[None] < pair_len[:, None])[..., None]  # [P, T, 1]

    def dist(h):
        d = (h[0::2] - h[1::2]).astype(jnp.float32)
        return jnp.sqrt(jnp.sum(jnp.where(valid, d * d, 0.0), (1, 2)))

    def step(x, pl):
        y, _ = block(cfg, pl, x, positions, allowed)
        return y, dist(y)

    x, dists = jax.lax.scan(step, embed(cfg, params, ids, positions), params["blocks"])
    dists = dists.at[-1].set(dist(fam.final_norm(cfg, params, x)))
    return dists.T


def _response_ids(tokenizer, text: str, case: Case, field: str, special: bool = True) -> list:
    """The response's token ids (an error naming the case and field when there are none)."""
    if not text.strip() or not list(tokenizer(text.strip(), add_special_tokens=False)["input_ids"]):
        raise JaxeditError(f"{case.where}: \"{field}\" tokenizes to no tokens")
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _locate_params(cfg, params, tokenizer, cases, chunk: int = 8) -> np.ndarray:
    pad = _pad_id(tokenizer)
    pairs = []
    for c in cases:
        s = _response_ids(tokenizer, c.safe, c, "safe generation")
        u = _response_ids(tokenizer, c.unsafe, c, "unsafe generation")
        n = max(len(s), len(u))
        if n > cfg.max_positions:
            raise JaxeditError(f"{c.where}: a response of {n} tokens exceeds the model's {cfg.max_positions} positions")
        pairs.append((s, u))
    out = []
    for i in range(0, len(pairs), chunk):
        part = pairs[i:i + chunk]
        lens = [max(len(s), len(u)) for s, u in part]
        T = round_up(max(lens), 32, cap=cfg.max_positions)
        P = len(part) if len(pairs) <= chunk else chunk
        ids, mask = pad_rows([row for pair in part for row in pair], T, n_rows=2 * P, value=pad)
        plen = np.ones((P,), np.int32)
        plen[:len(part)] = lens
        mask[2 * len(part):, 0] = 1  # filler pairs of one token, ignored
        d = _pair_distances(cfg, params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(plen))
        out.append(np.asarray(d, np.float64)[:len(part)])
    return np.concatenate(out, 0)


@public("cases", old=("tokenizer",))
def dinm_locate(model, cases, *, tokenizer=None):
    """The toxic layer of each case and the per-layer distances: ``(layers [cases], distances [cases, L])`` (see the
    module docstring)."""
    if tokenizer is None:
        raise JaxeditError("dinm_locate needs a tokenizer")
    cases = read_cases(cases)
    d = _locate_params(model.config, params_of(model), tokenizer, cases)
    return [int(i) for i in np.argmax(d, 1)], d


# ---- tune ----

@dataclasses.dataclass
class _Rows:
    edit: list  # token ids: prompt + suffix, then the safe response
    edit_n: int  # tokens of the response
    kc: list
    kc_n: int
    truncated: bool


def _case_rows(tokenizer, case: Case, suffix, max_len: int) -> _Rows:
    out, cut = [], False
    for prompt, answer, field in ((case.prompt, case.safe, "safe generation"),
                                  (case.kc_prompt, case.kc_answer, "knowledge constrain answer")):
        p = list(tokenizer(with_suffix(prompt, suffix))["input_ids"])
        if not p:
            raise JaxeditError(f"{case.where}: the prompt tokenizes to no tokens")
        a = _response_ids(tokenizer, " " + answer.strip(), case, field, special=False)
        if len(a) >= max_len:
            raise JaxeditError(f"{case.where}: \"{field}\" has {len(a)} tokens; the model takes {max_len}")
        extra = len(p) + len(a) - max_len
        if extra > 0:  # cut the prompt from the left (the request is at its end)
            p, cut = p[extra:], True
        out += [p + a, len(a)]
    return _Rows(out[0], out[1], out[2], out[3], cut)


def _block(seqs: Sequence[list], ns: Sequence[int], pad: int, max_len: int) -> dict:
    """Right-padded rows and their loss entries, flattened over rows: the row and position predicting each
    response token, the token, a weight (0 on bucket filler). Lengths are bucketed (T: 32, entries: 16) so that
    similar cases share a compile."""
    T = round_up(max(len(s) for s in seqs), 32, cap=max_len)
    N = round_up(sum(ns), 16)
    ids, mask = pad_rows(seqs, T, value=pad)
    row, pos, tgt = (np.zeros((N,), np.int32) for _ in range(3))
    w = np.zeros((N,), np.float32)
    j = 0
    for b, (s, n) in enumerate(zip(seqs, ns)):
        start = len(s) - n - 1  # the position predicting the response's first token
        row[j:j + n], pos[j:j + n], tgt[j:j + n], w[j:j + n] = b, np.arange(start, start + n), s[start + 1:], 1.0
        j += n
    return {k: jnp.asarray(v) for k, v in dict(ids=ids, mask=mask, row=row, pos=pos, tgt=tgt, w=w).items()}


def _batch_arrays(rows: Sequence[_Rows], pad: int, max_len: int):
    """The edit rows and the knowledge-constraint rows as two blocks (padded separately: the attack prompts are
    usually much longer than the constraint prompts)."""
    return (_block([r.edit for r in rows], [r.edit_n for r in rows], pad, max_len),
            _block([r.kc for r in rows], [r.kc_n for r in rows], pad, max_len))


def _logprobs(cfg: ModelConfig, params, layers, W, blk, h_in=None, start: int = 0):
    """[N, V] log-probabilities at the entries of the block ``blk`` with the output projections of ``layers``
    replaced by ``W``. ``h_in``: the block's output of layer ``start - 1`` (the layers before ``start`` do not
    change, so that is computed once)."""
    fam = FAMILY_MODULES[cfg.family]
    w_out = params["blocks"]["w_out"]
    p = dict(params, blocks=dict(params["blocks"], w_out=w_out.at[layers].set(W.astype(w_out.dtype))))
    out = apply(cfg, p, blk["ids"], blk["mask"], capture=("hidden",), num_layers=cfg.n_layers, start_layer=start,
                hidden_in=h_in)
    x = fam.final_norm(cfg, p, out.hidden[:, -1][blk["row"], blk["pos"]])
    return jax.nn.log_softmax(fam.lm_head(cfg, p, x).astype(jnp.float32), -1)


def dinm_loss(cfg: ModelConfig, params, layers, W, edit, kc, lp0, edit_weight, kl_grad, h_in, start: int):
    """(loss, (nll, kl)) with the located ``layers``' output projections replaced by ``W`` [k, d_ff, d]: the NLL
    over the ``edit`` block's entries, the KL over the ``kc`` block's, whose unedited log-probabilities are
    ``lp0`` [N, V]. ``kl_grad``: whether the KL's gradient reaches ``W``; ``h_in``: the two blocks' hidden states
    entering layer ``start`` (as ``_logprobs`` takes them)."""
    lp = _logprobs(cfg, params, layers, W, edit, h_in[0], start)
    tok = jnp.take_along_axis(lp, edit["tgt"][:, None], -1)[:, 0]
    nll = -jnp.sum(tok * edit["w"]) / jnp.maximum(edit["w"].sum(), 1.0)
    lpk = _logprobs(cfg, params, layers, W, kc, h_in[1], start)
    lpk = jnp.where(kl_grad, lpk, jax.lax.stop_gradient(lpk))  # a traced switch: one compile for both
    kl_pos = jnp.sum(jnp.exp(lp0) * (lp0 - lpk), -1)
    kl = jnp.sum(kl_pos * kc["w"]) / jnp.maximum(kc["w"].sum(), 1.0)
    return edit_weight * nll + kl, (nll, kl)


@partial(jax.jit, static_argnames=("cfg", "steps", "start"))
def tune(cfg: ModelConfig, params, layers, edit, kc, *, steps: int, lr, edit_weight, weight_decay, kl_grad,
         stop_loss, start: int = 0):
    """The DINM optimization in one call: Adam on the output projections of ``layers`` [k] (distinct, none below
    ``start``; the layers before ``start`` run once). ``edit``/``kc``: the row blocks of :func:`_block`. Returns
    (new weights [k, d_ff, d] float32, per-step [steps, 3] (loss, nll, kl) before each step, the steps run,
    (loss, nll, kl) after the last)."""
    W0 = params["blocks"]["w_out"][layers].astype(jnp.float32)

    def prefix(blk):
        if start == 0:
            return None
        out = apply(cfg, params, blk["ids"], blk["mask"], capture=("hidden",), num_layers=start)
        return jax.lax.stop_gradient(out.hidden[:, -1])

    h_in = (prefix(edit), prefix(kc))
    lp0 = jax.lax.stop_gradient(_logprobs(cfg, params, layers, W0, kc, h_in[1], start))
    loss_fn = lambda W: dinm_loss(cfg, params, layers, W, edit, kc, lp0, edit_weight, kl_grad, h_in, start)
    tx = optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8))

    def cond(c):
        return (~c[2]) & (c[3] < steps)

    def body(c):
        W, opt, _, it, hist = c
        (loss, (nll, kl)), g = jax.value_and_grad(loss_fn, has_aux=True)(W)
        stop = loss < stop_loss
        upd, opt_new = tx.update(g, opt, W)
        W = jnp.where(stop, W, optax.apply_updates(W, upd))
        return W, opt_new, stop, it + jnp.where(stop, 0, 1), hist.at[it].set(jnp.stack([loss, nll, kl]))

    hist0 = jnp.full((steps, 3), jnp.nan, jnp.float32)
    W, _, _, n, hist = jax.lax.while_loop(cond, body, (W0, tx.init(W0), jnp.array(False), jnp.int32(0), hist0))
    loss, (nll, kl) = loss_fn(W)
    return W, hist, n, jnp.stack([loss, nll, kl])


def _write(params, layers, W):
    w_out = params["blocks"]["w_out"]
    return dict(params, blocks=dict(params["blocks"], w_out=w_out.at[jnp.asarray(layers)].set(
        jnp.asarray(W).astype(w_out.dtype))))


class CaseModels(Sequence):
    """Per-instance results: entry i is the original model with case i's edit, built when asked for."""

    def __init__(self, cfg, params, edits):
        self.cfg, self.params, self.edits = cfg, params, edits  # edits: [(layers, W [k, d_ff, d])]

    def __len__(self):
        return len(self.edits)

    def params_of(self, i):
        return _write(self.params, *self.edits[i])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return model_from_params(self.cfg, self.params_of(i))


def _tune_group(cfg, params, tokenizer, rows, layers, hp):
    lay = sorted(set(int(l) for l in layers))
    edit, kc = _batch_arrays(rows, _pad_id(tokenizer), cfg.max_positions)
    W, hist, n, final = tune(cfg, params, jnp.asarray(lay, jnp.int32), edit, kc, steps=int(hp.steps), lr=hp.lr,
                             edit_weight=hp.edit_weight, weight_decay=hp.weight_decay,
                             kl_grad=jnp.asarray(bool(hp.kl_grad)), stop_loss=hp.stop_loss,
                             start=lay[0] // 4 * 4)  # the layers before run once; one compile per 4 layers
    W = np.asarray(W)
    if not np.all(np.isfinite(W)):
        raise JaxeditError("the DINM optimization diverged (non-finite weights); nothing was changed")
    hist, n, final = np.asarray(hist, np.float64), int(n), np.asarray(final, np.float64)
    W0 = np.asarray(params["blocks"]["w_out"][jnp.asarray(lay)], np.float32)
    info = {"layers": lay, "steps": n, "loss": hist[:, 0].tolist(), "nll": hist[:, 1].tolist(),
            "kl": hist[:, 2].tolist(), "final": {"loss": final[0], "nll": final[1], "kl": final[2]},
            "update_norm": float(np.linalg.norm(W - W0))}
    return lay, W, info


@public("cases", old=("tokenizer", "per_instance"))
def dinm(model, cases, *, tokenizer=None, per_instance: bool = True, progress=None, **hparams):
    """DINM on SafeEdit ``cases`` (a path, ``"demo"``, or a list of dicts with SafeEdit's field names). Returns
    ``(edited, report)``: ``edited`` is the edited model (per-instance with several cases: a :class:`CaseModels`,
    entry i = case i's model). Keyword arguments override :class:`DinmHparams` fields. ``progress``: a callable
    (cases done) after each case or group.

    The report: ``layers`` (the edited layer of each case), ``distances`` [cases, L] (the location's per-layer
    distances; per-instance: on the original model; sequential: on the model edited so far; None per case when
    ``layer`` is given), ``losses`` [cases][steps] (the loss before each step; NaN after an early stop), ``nll``
    and ``kl`` alike, ``final`` (after the last step), ``steps`` (run), ``update_norm``, ``truncated`` (prompts
    cut from the left to fit the context), ``case_ids``, ``hparams``, ``seconds``."""
    if tokenizer is None:
        raise JaxeditError("dinm needs a tokenizer")
    cfg = model.config
    hp = DinmHparams().replace(**hparams)
    hp.check(cfg.n_layers)
    cases = read_cases(cases)
    t0 = time.perf_counter()
    rows = [_case_rows(tokenizer, c, hp.suffix, cfg.max_positions) for c in cases]
    params = params_of(model)
    report = {"case_ids": [c.id for c in cases], "per_instance": bool(per_instance),
              "hparams": dataclasses.asdict(hp), "layers": [], "distances": [], "losses": [], "nll": [], "kl": [],
              "final": [], "steps": [], "update_norm": [], "truncated": [r.truncated for r in rows]}
    first_layer = None
    if hp.layer is None and hp.locate == "first":
        first_layer = int(np.argmax(_locate_params(cfg, params, tokenizer, cases[:1])[0]))

    def record(layers_of_cases, dists, info, n):
        report["layers"] += layers_of_cases
        report["distances"] += [None if d is None else list(map(float, d)) for d in dists]
        for key in ("loss", "nll", "kl"):
            report["losses" if key == "loss" else key] += [info[key]] * n
        report["final"] += [info["final"]] * n
        report["steps"] += [info["steps"]] * n
        report["update_norm"] += [info["update_norm"]] * n

    if per_instance:
        dists = _locate_params(cfg, params, tokenizer, cases) if hp.layer is None else [None] * len(cases)
        edits = []
        for i, c in enumerate(cases):
            layer = hp.layer if hp.layer is not None else first_layer if first_layer is not None \
                else int(np.argmax(dists[i]))
            lay, W, info = _tune_group(cfg, params, tokenizer, [rows[i]], [layer], hp)
            edits.append((lay, W))
            record([layer], dists[i:i + 1], info, 1)
            if progress:
                progress(1)
        edited = CaseModels(cfg, params, edits)
        edited = edited[0] if len(cases) == 1 else edited
    else:
        cur = params
        for g in range(0, len(cases), hp.batch_size):
            group = list(range(g, min(g + hp.batch_size, len(cases))))
            dists = _locate_params(cfg, cur, tokenizer, [cases[i] for i in group]) if hp.layer is None \
                else [None] * len(group)
            layers = [hp.layer if hp.layer is not None else first_layer if first_layer is not None
                      else int(np.argmax(d)) for d in dists]
            lay, W, info = _tune_group(cfg, cur, tokenizer, [rows[i] for i in group], layers, hp)
            cur = _write(cur, lay, W)
            record(layers, dists, info, len(group))
            if progress:
                progress(len(group))
        edited = model_from_params(cfg, cur)
    report["seconds"] = time.perf_counter() - t0
    return edited, report
