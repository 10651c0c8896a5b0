"""AurA (Suau et al., ICML 2024, "Whispering Experts: Neural Interventions for Toxicity Mitigation in Language
Models"): dampen the MLP units that tell toxic from non-toxic text, each in proportion to how well it does, folded
into the weights so that the result is an ordinary model.

Inputs are texts labelled toxic (1) or non-toxic (0). Then:

1. **Responses.** Every text is tokenized on its own (the tokenizer's special tokens included, truncated at
   ``max_len`` tokens, 128 as in the authors' configuration) and run through the model; for each chosen layer and
   each unit of the chosen ``module`` the unit's value at every real token is pooled into one number per text.
   ``pooling="max"`` (the authors' code: the largest value over the text's tokens, padding excluded) or
   ``"mean"`` (an option: the average over the text's tokens).
2. **AUROC.** Per unit, the area under the ROC curve of its pooled response as a score for "toxic": the
   Mann-Whitney statistic with average ranks for ties (equal to scikit-learn's ``roc_auc_score``, which the
   authors use), in float64 on the host.
3. **Dampening.** Every unit with AUROC > 0.5 is multiplied by ``alpha = 1 - 2 (AUROC - 0.5)`` (one minus the
   Gini coefficient); the others keep ``alpha = 1``. No other threshold and no hyperparameter in the authors'
   method. An option beyond it, ``min_auroc``: only units with AUROC above it are dampened (by the same alpha); a
   number, or ``"chance:Z"`` for 0.5 plus Z standard deviations of a chance AUROC with these class sizes
   (:func:`chance_sd`), so that units that pass 0.5 by chance alone on a small text set are left alone. The
   default, 0.5, is the authors' rule.
4. **Folding.** Multiplying a unit's response by alpha is written into the weights that produce (or first
   consume) it:

   ``module="keys"`` (the default): the MLP's hidden units, the input of its output projection (GPT-2: the GELU
   output fed to c_proj; LLaMA: ``silu(gate) * up`` fed to down_proj); row j of ``w_out[l]`` ([d_ff, d], x @ W
   layout) is scaled by alpha_j, which equals scaling unit j's response.
   ``module="up"``: the output of the MLP's first linear layer, the unit the authors hook for GPT-2 (c_fc's output,
   before the GELU; LLaMA: up_proj's output); column j of ``w_in[l]`` and ``b_in[l][j]`` (GPT-2) or of
   ``w_up[l]`` (LLaMA) are scaled.
   ``module="gate"`` (LLaMA only): gate_proj's output before the SiLU; column j of ``w_gate[l]`` is scaled.
   ``module="out"``: the output of the MLP's output projection (c_proj / down_proj, d units, the other module the
   authors hook for GPT-2); column j of ``w_out[l]`` and ``b_out[l][j]`` (GPT-2) are scaled.
   A tuple of modules (``("up", "out")``: the authors' GPT-2 setting) computes all AUROCs on the unedited model
   and applies every module's dampening, as the authors' hooks do together.

The forward pass is one jitted scan over the layers per batch of texts; only the pooled [texts, units] responses
of the chosen layers leave the device. Responses are float32 (the blocks run in the model's dtype).
"""
from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit import runtime
from jaxedit.batching import pad_rows, round_up
from jaxedit.calls import check_names, public
from jaxedit.config import ModelConfig
from jaxedit.errors import JaxeditError
from jaxedit.forward import FAMILY_MODULES, block, causal_allowed, embed, positions_from_mask, scan_layers
from jaxedit.layer_selection import check_layers
from jaxedit.model import model_from_params, params_of
from jaxedit.sharding import mesh_of, padded, put_batch, to_host

POOLINGS = ("max", "mean")
MODULES = ("keys", "up", "gate", "out")
OPTIONS = ("module", "pooling", "max_len", "batch_size", "progress", "min_auroc")


def auroc(responses, labels) -> np.ndarray:
    """Per column of ``responses`` [N, U], the AUROC of the column as a score for ``labels`` [N] (1 = positive):
    the Mann-Whitney U of the positives over (positives x negatives), average ranks for ties, float64."""
    x = np.asarray(responses, np.float64)
    if x.ndim == 1:
        x = x[:, None]
    y = np.asarray(labels).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    order = np.argsort(x, axis=0, kind="mergesort")
    xs = np.take_along_axis(x, order, 0)
    N, U = x.shape
    ranks_sorted = np.empty_like(xs)
    pos = np.arange(1, N + 1, dtype=np.float64)
    for u in range(U):  # average rank of each run of equal values
        col = xs[:, u]
        starts = np.flatnonzero(np.r_[True, col[1:] != col[:-1]])
        ends = np.r_[starts[1:], N]
        avg = (pos[starts] + pos[ends - 1]) / 2
        ranks_sorted[:, u] = np.repeat(avg, ends - starts)
    ranks = np.empty_like(ranks_sorted)
    np.put_along_axis(ranks, order, ranks_sorted, 0)
    r1 = ranks[y].sum(0)
    return (r1 - n1 * (n1 + 1) / 2) / (n1 * n0)


def alpha_of(auc, min_auroc: float = 0.5) -> np.ndarray:
    """AurA's factor per unit: ``1 - 2 (AUROC - 0.5)`` where AUROC > ``min_auroc`` (0.5: the authors' rule), else
    1."""
    auc = np.asarray(auc, np.float64)
    return np.where(auc > min_auroc, 1.0 - 2.0 * (auc - 0.5), 1.0)


def chance_sd(n_pos: int, n_neg: int) -> float:
    """The standard deviation of the AUROC of a score unrelated to the labels (ties aside), ``n_pos`` positives and
    ``n_neg`` negatives: sqrt((n_pos + n_neg + 1) / (12 n_pos n_neg))."""
    return float(np.sqrt((n_pos + n_neg + 1) / (12.0 * n_pos * n_neg)))


def _min_auroc_form(value) -> tuple:
    """A ``min_auroc`` setting as ("chance", Z) or ("number", m); ValueError when it is neither."""
    text = str(value)
    if text.startswith("chance:"):
        return "chance", float(text[len("chance:"):])
    return "number", float(text)


def is_authors_rule(min_auroc) -> bool:
    """Whether a ``min_auroc`` setting is the authors' threshold, the number 0.5."""
    try:
        return _min_auroc_form(min_auroc) == ("number", 0.5)
    except ValueError:
        return False


def min_auroc_order(value) -> float:
    """A number that orders ``min_auroc`` settings from the most units dampened to the fewest, without the class
    sizes: a number itself, "chance:Z" after every number, by Z."""
    form, x = _min_auroc_form(value)
    return 1.0 + x if form == "chance" else x


def parse_min_auroc(value, n_pos: int = 0, n_neg: int = 0) -> float:
    """``min_auroc``: a number in [0.5, 1), or "chance:Z", 0.5 + Z x :func:`chance_sd` (needs the class sizes;
    without them, only the form is checked and 0.5 returned)."""
    try:
        form, m = _min_auroc_form(value)
        if form == "chance":
            if not m >= 0:
                raise ValueError
            return 0.5 + m * chance_sd(n_pos, n_neg) if n_pos and n_neg else 0.5
    except ValueError:
        raise JaxeditError(f"min_auroc must be a number in [0.5, 1) or chance:Z with Z >= 0 (got {value!r})") from None
    if not 0.5 <= m < 1:
        raise JaxeditError(f"min_auroc must be in [0.5, 1) (got {value!r})")
    return m


def read_texts(texts, labels) -> tuple:
    """``(texts, labels [N] int)`` from texts + labels, or from dicts {"text", "toxic"} (labels None)."""
    if isinstance(texts, (str, bytes, dict)) or not hasattr(texts, "__len__"):
        raise JaxeditError("texts must be a list of strings (with labels) or of {'text', 'toxic'} dicts")
    texts = list(texts)
    if labels is None:
        out_t, out_l = [], []
        for i, t in enumerate(texts):
            if not isinstance(t, dict):
                raise JaxeditError(f"text {i}: without labels, each text must be a dict with 'text' and 'toxic' "
                                   f"(or pass labels=[0/1 per text])")
            missing = [k for k in ("text", "toxic") if k not in t]
            if missing:
                raise JaxeditError(f"text {i}: missing {' and '.join(repr(k) for k in missing)}")
            out_t.append(t["text"])
            out_l.append(t["toxic"])
        texts, labels = out_t, out_l
    else:
        if isinstance(labels, (str, bytes)) or not hasattr(labels, "__len__"):
            raise JaxeditError("labels must be a list of 0/1 (1 = toxic), one per text")
        labels = list(np.asarray(labels).tolist()) if isinstance(labels, np.ndarray) else list(labels)
        if len(labels) != len(texts):
            raise JaxeditError(f"{len(texts)} texts but {len(labels)} labels")
    lab = []
    for i, v in enumerate(labels):
        if isinstance(v, np.generic):
            v = v.item()
        ok = isinstance(v, (bool, int, float)) and v in (0, 1)
        if not ok:
            raise JaxeditError(f"text {i}: label {v!r} is not 0 or 1 (1 = toxic)")
        lab.append(int(v))
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise JaxeditError(f"text {i}: not a string ({type(t).__name__})")
    lab = np.asarray(lab, np.int64)
    for cls, name in ((1, "toxic"), (0, "non-toxic")):
        k = int((lab == cls).sum())
        if k < 2:
            raise JaxeditError(f"aura needs at least 2 {name} texts (got {k})")
    return texts, lab


def _pre(cfg: ModelConfig, pl, x, parts, module: str):
    """A module's per-token units in one block: [B, T, units]."""
    if module == "keys":
        return parts["keys"]
    if module == "out":
        return parts["mlp"]
    xn = FAMILY_MODULES[cfg.family].norm_mlp(cfg, pl, x + parts["attn"])
    if cfg.family == "gpt2":
        return xn @ pl["w_in"] + pl["b_in"]
    return xn @ pl["w_up" if module == "up" else "w_gate"]


@partial(jax.jit, static_argnames=("cfg", "modules", "pooling", "n_scan"))
def pooled_responses(cfg: ModelConfig, params, ids, mask, modules: tuple, pooling: str, n_scan: int):
    """{module: [n_scan, B, units] float32}: each block's units pooled over each row's real tokens (``mask`` 1)."""
    positions = positions_from_mask(mask)
    allowed = causal_allowed(mask)
    real = mask.astype(bool)[..., None]
    count = jnp.maximum(jnp.sum(mask, 1).astype(jnp.float32), 1.0)[:, None]

    def pool(h):
        h = h.astype(jnp.float32)
        if pooling == "max":
            return jnp.max(jnp.where(real, h, -jnp.inf), 1)
        return jnp.sum(jnp.where(real, h, 0.0), 1) / count

    def step(x, pl):
        y, parts = block(cfg, pl, x, positions, allowed)
        return y, {m: pool(_pre(cfg, pl, x, parts, m)) for m in modules}

    x = embed(cfg, params, ids, positions)
    _, out = scan_layers(step, x, params["blocks"], stop=n_scan)
    return out


def _responses(cfg, params, rows, pad, modules, pooling, layers, cap, batch_size, bar) -> dict:
    """{module: [len(layers), N, units] float32} host arrays for the token ``rows``."""
    mesh = mesh_of(params)
    n = len(rows)
    n_scan = max(layers) + 1
    B = padded(min(batch_size, n), mesh)
    order = sorted(range(n), key=lambda i: len(rows[i]))  # similar lengths together: less padding
    out = {m: [None] * n for m in modules}
    put = (lambda a: jnp.asarray(a)) if mesh is None else (lambda a: put_batch(mesh, a))
    for start in range(0, n, B):
        idx = order[start:start + B]
        part = [rows[i] for i in idx]
        T = round_up(max(len(r) for r in part), 32, cap=cap)
        ids, mask = pad_rows(part, T, n_rows=B, value=pad)
        got = pooled_responses(cfg, params, put(ids), put(mask), modules, pooling, n_scan)
        for m in modules:
            a = np.asarray(to_host(got[m]), np.float32)[np.asarray(layers)]  # [k, B, units]
            for j, i in enumerate(idx):
                out[m][i] = a[:, j]
        bar.update(len(part))
    return {m: np.stack(out[m], 1) for m in modules}


def _scale_fn(w, layers, alpha, axis):
    """``w`` [L, ...] with ``w[layers[i]]`` multiplied by ``alpha[i]`` along ``axis`` (of the per-layer array)."""
    sub = w[layers].astype(jnp.float32)
    shape = [alpha.shape[0]] + [1] * (sub.ndim - 1)
    shape[axis + 1] = alpha.shape[1]
    return w.at[layers].set((sub * alpha.reshape(shape)).astype(w.dtype))


_scale = jax.jit(_scale_fn, static_argnames=("axis",))


def _targets(cfg: ModelConfig, module: str) -> list:
    """[(parameter name, axis of the per-layer array that indexes the module's units)]."""
    gpt2 = cfg.family == "gpt2"
    if module == "keys":
        return [("w_out", 0)]
    if module == "out":
        return [("w_out", 1)] + ([("b_out", 0)] if gpt2 else [])
    if module == "up":
        return [("w_in", 1), ("b_in", 0)] if gpt2 else [("w_up", 1)]
    return [("w_gate", 1)]


def _check_int(name, v, low=1):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
        raise JaxeditError(f"{name} must be an integer >= {low} (got {v!r})")


@public("texts, labels", n_data=2)
def aura(model, texts, labels=None, *, tokenizer=None, layers=None, **kw):
    """AurA on ``texts`` labelled toxic (1) / non-toxic (0) (see the module docstring): ``texts`` a list of
    strings with ``labels`` a list of 0/1, or a list of {"text", "toxic"} dicts without ``labels``.

    Keywords: ``layers`` (default: every layer), ``module`` ("keys", the default; "up", "gate", "out", or a tuple
    of them), ``pooling`` ("max", the authors', default; "mean"), ``min_auroc`` (0.5, the authors' rule; a
    number in [0.5, 1) or "chance:Z": dampen only units above it), ``max_len`` (128), ``batch_size`` (32),
    ``progress``. Returns ``(edited, report)``: the edited model (an ordinary model: save, export, load it) and a
    report with ``layers``, ``module``, ``pooling``, ``min_auroc`` (the threshold used), ``chance_sd``, ``dampened`` {layer: units dampened}, ``auroc`` {layer: list
    per unit}, ``alpha`` (statistics of the factors), ``texts``, ``toxic``, ``truncated`` and ``seconds``; with
    several modules ``auroc``/``dampened`` are {module: {layer: ...}}."""
    t0 = time.perf_counter()
    kw = check_names(kw, OPTIONS, what="aura option")
    module = kw.get("module", "keys")
    pooling = kw.get("pooling", "max")
    max_len = kw.get("max_len", 128)
    batch_size = kw.get("batch_size", 32)
    progress = kw.get("progress", True)
    min_auroc = kw.get("min_auroc", 0.5)
    parse_min_auroc(min_auroc)
    if tokenizer is None:
        raise JaxeditError("aura needs a tokenizer (tokenizer=...)")
    cfg = model.config
    modules = (module,) if isinstance(module, str) else tuple(module)
    if not modules or any(m not in MODULES for m in modules) or len(set(modules)) != len(modules):
        raise JaxeditError(f"module must be one of {', '.join(MODULES)} or a tuple of them (got {module!r})")
    if "gate" in modules and cfg.family == "gpt2":
        raise JaxeditError("module 'gate' is for LLaMA-family models (GPT-2's MLP has no gate)")
    if pooling not in POOLINGS:
        raise JaxeditError(f"pooling must be 'max' or 'mean' (got {pooling!r})")
    _check_int("max_len", max_len)
    _check_int("batch_size", batch_size)
    if isinstance(layers, (int, np.integer)):
        layers = [layers]
    layers = list(range(cfg.n_layers)) if layers is None else check_layers(cfg.n_layers, layers)
    texts, lab = read_texts(texts, labels)
    cap = min(int(max_len), cfg.max_positions)
    full = tokenizer(texts)["input_ids"]
    rows = [list(r)[:cap] for r in full]
    empty = [i for i, r in enumerate(rows) if not r]
    if empty:
        raise JaxeditError(f"text {empty[0]}: tokenizes to no tokens")
    truncated = sum(len(r) > cap for r in full)
    n, n_tox = len(texts), int(lab.sum())

    params = params_of(model)
    pad = next((int(t) for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    runtime.stage(f"AurA: {pooling}-pooled responses of {n} texts ({n_tox} toxic), module {'+'.join(modules)}, "
                  f"layers {layers}")
    with runtime.bar(n, "AurA responses", "text", enabled=progress) as bar:
        resp = _responses(cfg, params, rows, pad, modules, pooling, layers, cap, int(batch_size), bar)

    threshold = parse_min_auroc(min_auroc, n_tox, n - n_tox)
    runtime.stage("AurA: AUROC per unit, dampening")
    blocks = dict(params["blocks"])
    idx = np.asarray(layers, np.int32)
    per = {}
    for m in modules:
        auc = np.stack([auroc(resp[m][k], lab) for k in range(len(layers))])  # [k, units]
        alpha = alpha_of(auc, threshold)
        per[m] = (auc, alpha)
        for name, axis in _targets(cfg, m):
            w = blocks[name]
            a = alpha.astype(np.float32)
            if mesh_of(params) is None:
                blocks[name] = _scale(w, idx, a, axis=axis)
            else:  # keep the input's placement
                blocks[name] = jax.jit(partial(_scale_fn, axis=axis), out_shardings=w.sharding)(w, idx, a)
    edited = model_from_params(cfg, dict(params, blocks=blocks))

    def summary(auc, alpha):
        damp = alpha < 1.0
        return ({l: int(damp[k].sum()) for k, l in enumerate(layers)},
                {l: [float(v) for v in auc[k]] for k, l in enumerate(layers)},
                {"units": int(alpha.size), "dampened": int(damp.sum()),
                 "min": float(alpha.min()), "mean_dampened": float(alpha[damp].mean()) if damp.any() else 1.0})

    sums = {m: summary(*per[m]) for m in modules}
    one = len(modules) == 1
    report = {"layers": list(layers), "module": modules[0] if one else modules, "pooling": pooling,
              "dampened": sums[modules[0]][0] if one else {m: s[0] for m, s in sums.items()},
              "auroc": sums[modules[0]][1] if one else {m: s[1] for m, s in sums.items()},
              "alpha": sums[modules[0]][2] if one else {m: s[2] for m, s in sums.items()},
              "min_auroc": threshold, "chance_sd": chance_sd(n_tox, n - n_tox),
              "texts": n, "toxic": n_tox, "max_len": cap, "truncated": int(truncated),
              "seconds": time.perf_counter() - t0}
    return edited, report

