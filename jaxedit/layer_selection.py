"""Turning evidence into the layers to edit. One entry point, ``select_layers(strategy, n_layers, ...)``:

* ``fixed``: the given ``layers``;
* ``ct``: the ``n`` layers with the highest AIE in ``evidence`` (a :class:`~jaxedit.locate.tracing.TraceResult`, whose IE
  profile is taken at the span's last token, or over all tokens' max with ``token="max"``; or a [L] profile);
* ``saliency``: the top ``n`` layers of ``evidence`` (a :class:`~jaxedit.locate.saliency.SaliencyResult`: its whole-block
  profile, or ``module``'s; or a [L] profile);
* ``random``: ``n`` distinct layers drawn uniformly from all layers with ``seed``;
* ``random-topk``: ``n`` distinct layers drawn from the first ``k`` (Das et al.: k = 15 for GPT-2-XL).

Every strategy returns sorted layer indices and is deterministic (ties broken by the lower layer; draws seeded).
"""
from __future__ import annotations

import numpy as np

from jaxedit.errors import JaxeditError

STRATEGIES = ("fixed", "ct", "saliency", "random", "random-topk")


def _profile(strategy, evidence, n_layers, token, module):
    if evidence is None:
        raise JaxeditError(f"strategy {strategy!r} needs evidence (a trace or saliency result, or a [L] profile)")
    if hasattr(evidence, "scores"):  # a TraceResult
        ie = np.asarray(evidence.scores) - evidence.low_score
        prof = ie.max(0) if token == "max" else ie[evidence.span[1] - 1]
    elif hasattr(evidence, "layer"):  # a SaliencyResult
        prof = evidence.layer if module is None else evidence.modules[module]
    else:
        prof = evidence
    prof = np.asarray(prof, np.float64).reshape(-1)
    if prof.size == 0:
        raise JaxeditError("empty evidence")
    if prof.size != n_layers:
        raise JaxeditError(f"evidence has {prof.size} layers, the model {n_layers}")
    if not np.all(np.isfinite(prof)):
        raise JaxeditError("evidence holds non-finite values")
    return prof


def check_layers(n_layers: int, layers) -> list:
    """Sorted distinct layer indices, each within 0..n_layers - 1 (a clear error otherwise)."""
    out = sorted({int(l) for l in layers or ()})
    if not out:
        raise JaxeditError("no layers given")
    bad = [l for l in out if not 0 <= l < n_layers]
    if bad:
        raise JaxeditError(f"layers {bad} are outside 0..{n_layers - 1}")
    return out


def select_layers(strategy: str, n_layers: int, *, n: int = 1, k: int | None = None, layers=None, evidence=None,
                  seed: int = 0, token: str = "last_subject", module: str | None = None) -> list:
    if strategy not in STRATEGIES:
        raise JaxeditError(f"unknown layer strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    if strategy == "fixed":
        if not layers:
            raise JaxeditError("strategy 'fixed' needs a non-empty list of layers")
        return check_layers(n_layers, layers)
    if n < 1:
        raise JaxeditError(f"n must be >= 1 (got {n})")
    if strategy in ("ct", "saliency"):
        prof = _profile(strategy, evidence, n_layers, token, module)
        if n > n_layers:
            raise JaxeditError(f"n = {n} is more than the model's {n_layers} layers")
        return sorted(int(i) for i in np.argsort(-prof, kind="stable")[:n])
    pool = n_layers
    if strategy == "random-topk":
        if k is None or k < 1:
            raise JaxeditError("strategy 'random-topk' needs k >= 1")
        if k > n_layers:
            raise JaxeditError(f"k = {k} is more than the model's {n_layers} layers")
        pool = k
    if n > pool:
        raise JaxeditError(f"cannot draw n = {n} distinct layers from {pool}")
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(pool, size=n, replace=False))
