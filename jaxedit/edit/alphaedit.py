"""AlphaEdit (Fang et al. 2025): MEMIT's update projected onto the null space of the preserved knowledge's keys, so
that a long sequence of edits leaves what the model knew (and the edits made before) in place.

Everything up to the residuals is MEMIT's (:mod:`jaxedit.edit.memit`: the z optimization, the keys averaged over the
context templates, the residual spread over the layers, each layer's keys recomputed on the model as edited so far).
Only the solve per layer differs (the same function as MEMIT's, :func:`jaxedit.edit.memit.solve_update`, with
M = P, C_p and a ridge l2 I in place of MEMIT's lambda C):

    dW = solve(P (K K^T + C_p) + l2 I,  P K R^T)        (dW [f, d], added to the [f, d] output projection)

- P [f, f] projects onto the eigenvectors of the layer's key statistics C = E[k k^T] (the second moment MEMIT uses)
  whose eigenvalues are small: below ``null_space_threshold`` (absolute, the published default 2e-2) or, with
  ``"energy:F"``, the smallest ones whose sum is at most (1 - F) of the trace. P is computed once per sequence, in
  float64 on the host (:func:`null_space_projector` says why).
- C_p [f, f] is the sum of K K^T over the batches edited before (zero for the first), each batch's keys recomputed
  on the model after that batch's edit.

``report["state"]`` holds P, C_p and the context templates; passing it back as ``state=`` continues the sequence.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np

from jaxedit import runtime
from jaxedit.calls import public
from jaxedit.edit import memit as _memit
from jaxedit.errors import JaxeditError
from jaxedit.model import params_of
from jaxedit.sharding import to_host

DEFAULT_THRESHOLD = 2e-2


def parse_threshold(value):
    """``null_space_threshold`` as ("absolute", t) or ("energy", F); a string "energy:F" or a number."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("energy:"):
            try:
                frac = float(text[len("energy:"):])
            except ValueError:
                frac = None
            if frac is None or not 0.0 < frac < 1.0:
                raise JaxeditError(f"null_space_threshold {value!r}: energy:F needs 0 < F < 1 (e.g. energy:0.99)")
            return "energy", frac
        try:
            value = float(text)
        except ValueError:
            raise JaxeditError(f"null_space_threshold must be a number or energy:F (got {value!r})") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
        raise JaxeditError(f"null_space_threshold must be a positive number or energy:F (got {value!r})")
    return "absolute", float(value)


def null_space_projector(C, threshold=DEFAULT_THRESHOLD, *, layer=None):
    """(P [f, f] float32, info): the projector onto the eigen-directions of the key statistics ``C`` kept by
    ``threshold`` (see :func:`parse_threshold`). Refuses a projector of rank 0 (every direction preserved: no
    edit could be written) or of full rank (nothing preserved: plain MEMIT without its regularizer).

    The eigendecomposition and the product are float64, on the host, and only P is rounded to float32. A
    float32 eigensolver's eigenvectors are off by about 1e-7 ||C|| / (the gap to the next eigenvalue): key
    statistics with many eigenvalues near the threshold (e.g. from few texts, so that C is rank-deficient and its
    spectrum crowds the threshold) then move P by 1e-2 (Frobenius) and the update by percents, and an eigenvalue
    within the float32 error of the threshold may land on either side.

    Memory: LAPACK's MRRR solver (``syevr``) works in a float64 copy of C that it overwrites and writes the
    eigenvectors beside it (2 f^2 float64, no f x f workspace: the divide-and-conquer solver numpy uses needs
    2 f^2 more); P is then made in blocks of rows from a view of the kept eigenvectors, straight into float32
    (:data:`PROJECTOR_F2_BYTES` f^2 bytes at the peak beside C)."""
    import scipy.linalg

    kind, t = parse_threshold(threshold)
    C64 = np.array(to_host(C), np.float64, order="F")  # our copy, in LAPACK's order: the solver overwrites it
    w, U = scipy.linalg.eigh(C64, lower=True, overwrite_a=True, check_finite=False, driver="evr")  # ascending
    del C64
    f = w.shape[0]
    if kind == "absolute":
        keep = w < t
    else:
        trace = float(np.clip(w, 0, None).sum())
        keep = np.cumsum(np.clip(w, 0, None)) <= (1.0 - t) * trace
    rank = int(keep.sum())  # the eigenvalues ascend, so the kept ones are the first ``rank``
    where = f"layer {layer}: " if layer is not None else ""
    if rank == 0:
        raise JaxeditError(f"{where}null_space_threshold {threshold!r} keeps no direction of the key statistics "
                           f"(smallest eigenvalue {w[0]:.3g}); raise it or use energy:F (e.g. energy:0.99)")
    if rank == f:
        raise JaxeditError(f"{where}null_space_threshold {threshold!r} keeps all {f} directions of the key "
                           f"statistics (largest eigenvalue {w[-1]:.3g}), so nothing is preserved; lower it or "
                           f"use energy:F (e.g. energy:0.99)")
    complement = rank > f - rank  # from the smaller set of eigenvectors: U_k U_k^T, or I - U_p U_p^T
    V = U[:, rank:] if complement else U[:, :rank]
    P = np.empty((f, f), np.float32)
    for i in range(0, f, _PROJECTOR_ROWS):
        block = V[i:i + _PROJECTOR_ROWS] @ V.T  # [rows, f] float64
        if complement:
            np.negative(block, out=block)
            block[np.arange(block.shape[0]), i + np.arange(block.shape[0])] += 1.0
        P[i:i + _PROJECTOR_ROWS] = block
    kept = float(np.clip(w[keep], 0, None).sum() / max(np.clip(w, 0, None).sum(), 1e-30))
    return P, {"rank": rank, "dim": f, "energy_in_null_space": kept,
               "largest_kept_eigenvalue": float(w[keep].max())}


_PROJECTOR_ROWS = 512  # rows of P made at a time (a float64 block of 512 x f)
# host bytes per f^2 that making a projector adds to the caller's C: its float64 copy and the float64 eigenvectors
# (then the eigenvectors, P in float32 and a block); tests/test_plan.py measures it
PROJECTOR_F2_BYTES = 8 + 8 + 1  # + the solver's vectors and workspace (measured: 16.4 f^2 at f = 1536)


def _no_edits_yet(state) -> bool:
    """A state new_state made and no batch has added to (its C_p is zero)."""
    return state.get("edits") == 0


def alphaedit_solver(state: dict, l2: float, dtype: str):
    """The solver :func:`jaxedit.edit.memit.spread` calls per layer, with the sequence's P and C_p."""
    first = _no_edits_yet(state)  # C_p is zero: the solve leaves it out (nothing to copy or add)

    def solve(l, K, R, sharding):
        return _memit.solve_update(K, R, ridge=l2, M=state["P"][l], Cp=None if first else state["C_p"][l],
                                   dtype=dtype, sharding=sharding)

    solve.hint = "raise l2"
    return solve


def new_state(model, tokenizer, layers, hp, *, stats=None, null_space_threshold=DEFAULT_THRESHOLD,
              contexts=None, progress=True) -> dict:
    """The state of a new sequence: P per layer from the key statistics, C_p = 0, the context templates."""
    ours = stats is None  # statistics computed (or read from the cache) here go as soon as P is made from them
    stats = _memit.key_stats(model, tokenizer, layers, hp, stats, progress)
    source = getattr(stats, "source", None)
    parse_threshold(null_space_threshold)
    P, info = {}, {}
    for l in layers:
        runtime.stage(f"null-space projector of layer {l}")
        P[l], info[l] = null_space_projector(stats[l], null_space_threshold, layer=l)
        if ours:
            stats[l] = None
    del stats
    if contexts is None:
        runtime.stage("sampling context templates")
        contexts = _memit.context_templates(model, tokenizer, hp)
    f = model.config.d_ff
    return {"layers": list(layers), "P": P, "C_p": {l: np.zeros((f, f), np.float32) for l in layers},
            "null_space": info, "null_space_threshold": null_space_threshold, "contexts": list(contexts),
            "edits": 0, "stats": source, "nas_mean_norm": None}


def check_state(state, layers, d_ff: int) -> None:
    if not isinstance(state, dict) or not {"P", "C_p", "contexts"} <= set(state):
        raise JaxeditError("state must be the report[\"state\"] of an earlier alphaedit call")
    if list(state.get("layers", [])) != list(layers):
        raise JaxeditError(f"state is for layers {list(state.get('layers', []))}, not {list(layers)}")
    for l in layers:
        for name in ("P", "C_p"):
            if np.shape(state[name].get(l)) != (d_ff, d_ff):
                raise JaxeditError(f"state[{name!r}] of layer {l} has shape {np.shape(state[name].get(l))}, "
                                   f"expected ({d_ff}, {d_ff})")


def accumulate(model, tokenizer, reqs, state: dict, layers, *, key_length: Optional[int] = None) -> dict:
    """A new state whose C_p adds K K^T of ``reqs``' keys, computed on ``model`` (the model after their edit)."""
    cfg = model.config
    kids, kmask, kpos = _memit.key_rows(tokenizer, reqs, state["contexts"], key_length)
    keys = _memit.request_keys(cfg, params_of(model), kids, kmask, kpos, len(reqs), layers)
    C_p = dict(state["C_p"])
    for l in layers:
        K = keys[l].astype(np.float32)  # [n, f]
        C_p[l] = K.T @ K
        if not _no_edits_yet(state):
            C_p[l] += state["C_p"][l]
    return dict(state, C_p=C_p, edits=int(state.get("edits", 0)) + len(reqs))


def run_batch(model, tokenizer, reqs, mode: str, hp, layers, state: dict, l2: float, *, evaluate=True,
              pad_to: int = 0, shape: Optional[dict] = None, donate: bool = False):
    """One AlphaEdit batch on parsed requests: the edit, then C_p updated. Returns (edited, report, new state).
    With ``hp.nas``, the targets are rescaled to the sequence's ``state["nas_mean_norm"]``. ``donate``: as
    :func:`jaxedit.edit.memit.edit_batch`'s (``model`` is used up)."""
    edited, report = _memit.edit_batch(model, tokenizer, reqs, mode, hp, layers, state["contexts"], None,
                                       solver=alphaedit_solver(state, l2, hp.solve_dtype), evaluate=evaluate,
                                       pad_to=pad_to, shape=shape, nas_mean_norm=state.get("nas_mean_norm"),
                                       donate=donate)
    runtime.stage("adding the batch's keys to the preserved set")
    return edited, report, accumulate(edited, tokenizer, reqs, state, layers, key_length=shape and shape["Tk"])


@public("requests", old=("layers", "tokenizer"))
def alphaedit(model, requests, *, tokenizer=None, layers=None, stats=None, state=None,
              null_space_threshold=DEFAULT_THRESHOLD, l2: float = 10.0, progress=True, donate: bool = False,
              **hparams):
    """AlphaEdit: MEMIT's edit of each request's subject -> "target", with the null-space projected solve
    (``nas=True``: AlphaEdit + NAS, the targets rescaled to the mean |v*| of clean edits, computed once per
    sequence on the model it starts from and kept in the state; ``nas_mean_norm=`` gives it).
    Returns ``(edited_model, report)``; ``report["state"]`` continues the sequence when passed as ``state=`` to the
    next call (its P is reused, its C_p holds the keys of every batch so far). ``stats``: {layer: E[k k^T]}
    (default computed and cached like MEMIT's; only needed for a new sequence). ``null_space_threshold``: a number
    (eigenvalues below it span the null space) or "energy:F". ``donate=True``: as :func:`jaxedit.memit`'s (``model``
    is used up). Other keywords are MEMIT's hyperparameters."""
    t0 = time.perf_counter()
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not l2 >= 0:
        raise JaxeditError(f"l2 must be a number >= 0 (got {l2!r})")
    hparams = dict(hparams)
    given_mean = hparams.pop("nas_mean_norm", None)
    hp, layers = _memit.prepare(model, layers, hparams)
    reqs = _memit.parse_requests(requests, tokenizer, "edit")
    if state is None:
        state = new_state(model, tokenizer, layers, hp, stats=stats, null_space_threshold=null_space_threshold,
                          progress=progress)
    else:
        check_state(state, layers, model.config.d_ff)
    if hp.nas and state.get("nas_mean_norm") is None:  # once per sequence, on the model the sequence starts from
        state = dict(state, nas_mean_norm=_memit.nas_mean(model, tokenizer, reqs, hp, layers, given_mean))
    elif not hp.nas and given_mean is not None:
        raise JaxeditError("nas_mean_norm is NAS's (nas=True)")
    edited, report, state = run_batch(model, tokenizer, reqs, "edit", hp, layers, state, float(l2),
                                      donate=_memit._donate_flag(donate))
    report.update(method="alphaedit", l2=float(l2), null_space_threshold=state["null_space_threshold"],
                  null_space=state["null_space"], state=state, seconds=time.perf_counter() - t0)
    return edited, report
