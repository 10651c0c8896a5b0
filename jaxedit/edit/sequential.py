"""Sequential (lifelong) editing: many requests edited batch after batch, each batch on the model the previous ones
left, with MEMIT or AlphaEdit (or UltraEdit, :mod:`jaxedit.edit.ultraedit`: a batch is a turn, and the checkpoints
hold the edited input projections and the lifelong normalizer).

The key statistics and the context templates are computed once, on the unedited model (as the published sequential
experiments do); AlphaEdit's projector P is computed once and its C_p grows with every batch. Requests with
"suppress" instead of "target" are edited with deletion's objective (within a batch, the edit requests first, then
the deletion requests). Every batch is padded to ``batch_size`` requests and its rows to the lengths that hold every
request (rounded up to 4 tokens), so all batches reuse one compiled program.

With ``out``, each finished batch is saved (the edited layers' weights, AlphaEdit's C_p; P once) under
``out/ckpt-NNNNN/``, and ``out/sequence.json`` records the options and the batches done: a killed run resumes at the
next batch, and a rerun with other options is refused, naming the first that differs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit import runtime
from jaxedit.calls import check_names, public
from jaxedit.batching import batches
from jaxedit.edit import alphaedit as _alpha
from jaxedit.edit import memit as _memit
from jaxedit.edit import ultraedit as _ultra
from jaxedit.errors import JaxeditError
from jaxedit.model import model_from_params, params_of
from jaxedit.sharding import is_main_process, to_host

METHODS = ("memit", "alphaedit", "ultraedit")
BUCKET = 4  # rows padded to a multiple of this many tokens (the sizes are fixed once per sequence)
FORMAT = 1


def _mode(r) -> str:
    return "delete" if isinstance(r, dict) and "suppress" in r and "target" not in r else "edit"


def parse_mixed(requests, tokenizer) -> list:
    """[(mode, parsed request)] for edit ("target") and deletion ("suppress") requests; errors name the index."""
    return [(_mode(p.raw), p) for p in _memit.parse_requests(requests, tokenizer, _mode)]


def dataset_requests(records, kind: str, where: str = "records") -> list:
    """Edit requests from CounterFact records (``requested_rewrite``: prompt with "{}", subject, target_new) or
    zsRE records (``src`` holding ``subject``, the first of ``answers``), as the published evaluations make them
    (the target after a space). Errors name ``where`` and the record's index."""
    out = []
    for i, d in enumerate(records):
        try:
            if kind == "counterfact":
                rr = d["requested_rewrite"]
                rr = rr[0] if isinstance(rr, list) else rr
                prompt, subject, target = rr["prompt"], rr["subject"], rr["target_new"]["str"]
            elif kind == "zsre":
                subject = d.get("subject")
                if not isinstance(subject, str) or not subject or subject not in d["src"]:
                    raise JaxeditError("a zsRE record to edit needs a \"subject\" that occurs in its \"src\"")
                prompt, target = d["src"].replace(subject, "{}", 1), d["answers"][0]
            else:
                raise JaxeditError(f"unknown record kind {kind!r}")
        except (KeyError, TypeError, IndexError) as e:
            raise JaxeditError(f"{where}: record {i}: missing or malformed field {e}") from None
        except JaxeditError as e:
            raise JaxeditError(f"{where}: record {i}: {e}") from None
        out.append({"prompt": prompt, "subject": subject, "target": target if target.startswith(" ") else
                    " " + target, "case_id": d.get("case_id", i)})
    return out


def as_requests(items) -> list:
    """Edit requests from a list that may hold CounterFact records ("requested_rewrite") or zsRE records ("src",
    "answers", "subject") beside jaxedit's own requests: each record becomes the request the published
    evaluations edit (:func:`dataset_requests`); requests pass unchanged."""
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise JaxeditError("requests must be a list of requests or CounterFact / zsRE records")
    out = []
    for i, d in enumerate(items):
        kind = None
        if isinstance(d, dict) and "requested_rewrite" in d:
            kind = "counterfact"
        elif isinstance(d, dict) and "src" in d and "answers" in d and "prompt" not in d:
            kind = "zsre"
        if kind is None:
            out.append(d)
        else:
            try:
                out.append(dataset_requests([d], kind, where="requests")[0])
            except JaxeditError as e:
                raise JaxeditError(str(e).replace("requests: record 0", f"requests[{i}] ({kind} record)")) from None
    return out


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_signature(model, layers) -> dict:
    """What identifies the starting model for a resume: its shape and the norms of the edited layers."""
    w = params_of(model)["blocks"]["w_out"]
    norms = to_host(jnp.stack([jnp.linalg.norm(w[l].astype(jnp.float32)) for l in layers]))
    return {"config": _fingerprint(dataclasses.asdict(model.config)),
            "edited_layer_norms": [round(float(x), 4) for x in norms]}


def _set_layers_fn(w, idx, values):
    return w.at[idx].set(values.astype(w.dtype))


_set_layers = jax.jit(_set_layers_fn)
_set_layers_in_place = jax.jit(_set_layers_fn, donate_argnums=0)  # donate=True: no copy of the stacked projection


def _with_layers(model, layers, values: np.ndarray, donate: bool = False):
    params = params_of(model)
    w = params["blocks"]["w_out"]
    new = (_set_layers_in_place if donate else _set_layers)(w, jnp.asarray(list(layers)), jnp.asarray(values))
    if getattr(w, "sharding", None) is not None:
        new = jax.device_put(new, w.sharding)
    return model_from_params(model.config, dict(params, blocks=dict(params["blocks"], w_out=new)))


class _Checkpoints:
    """``out/sequence.json`` + ``out/ckpt-NNNNN/`` (weights.npz, state.npz) + ``out/projection.npz``."""

    def __init__(self, out: str, options: dict):
        self.out = out
        self.options = json.loads(json.dumps(options, default=str))  # as it reads back (tuples -> lists)
        self.path = os.path.join(out, "sequence.json")
        self.extra = {}  # more of the sequence's state recorded with every checkpoint (NAS's mean |v*|)

    def load(self) -> Optional[dict]:
        if not os.path.exists(self.path):
            return None
        try:
            with open(self.path) as f:
                seq = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise JaxeditError(f"{self.path}: unreadable ({e}); remove {self.out}/ to start over") from None
        if seq.get("format") != FORMAT:
            raise JaxeditError(f"{self.path}: written by another version of jaxedit; use another output folder")
        old, new = _flat(seq.get("options", {})), _flat(self.options)
        for key in new:
            if old.get(key) != new[key]:
                raise JaxeditError(f"{self.out}/ holds a sequential edit with other options ({key} "
                                   f"{_short(old.get(key))} -> {_short(new[key])}); use another output "
                                   f"folder or remove it")
        return seq

    def weights(self, seq) -> np.ndarray:
        with np.load(os.path.join(self.out, seq["checkpoint"], "weights.npz")) as z:
            return z["w_out"]

    def state(self, seq, layers) -> dict:
        with np.load(os.path.join(self.out, "projection.npz")) as z:
            P = {l: z[f"P_{l}"] for l in layers}
        with np.load(os.path.join(self.out, seq["checkpoint"], "state.npz")) as z:
            C_p = {l: z[f"C_p_{l}"] for l in layers}
        return dict(seq["state"], layers=list(layers), P=P, C_p=C_p, contexts=list(seq["contexts"]),
                    null_space={int(k): v for k, v in seq["state"]["null_space"].items()})

    def save_projection(self, state, layers) -> None:
        if not is_main_process():
            return
        os.makedirs(self.out, exist_ok=True)
        tmp = os.path.join(self.out, ".projection.npz")
        with open(tmp, "wb") as f:
            np.savez(f, **{f"P_{l}": state["P"][l] for l in layers})
        os.replace(tmp, os.path.join(self.out, "projection.npz"))

    def save(self, done: int, model, layers, state, contexts, batch_reports, total: int) -> None:
        w = to_host(params_of(model)["blocks"]["w_out"][jnp.asarray(list(layers))].astype(jnp.float32))
        if not is_main_process():
            return
        seq = {"contexts": list(contexts), "batches": batch_reports, **self.extra}
        arrays = {"weights.npz": {"w_out": np.asarray(w, np.float32)}}
        if state is not None:
            arrays["state.npz"] = {f"C_p_{l}": state["C_p"][l] for l in layers}
            seq["state"] = {k: state[k] for k in ("null_space", "null_space_threshold", "edits", "stats")}
        self.write(done, total, arrays, seq)

    def write(self, done: int, total: int, arrays: dict, seq: dict) -> None:
        """Write checkpoint ``done`` ({file name: {array name: array}}) into a new ``ckpt-NNNNN/`` folder, then
        ``sequence.json`` (``seq`` with the options and counts): its atomic replacement is the commit point (a run
        killed before it resumes from the previous checkpoint); older checkpoints are removed after it."""
        os.makedirs(self.out, exist_ok=True)
        name = f"ckpt-{done:05d}"
        tmp = os.path.join(self.out, ".ckpt-tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for fname, named in arrays.items():
            with open(os.path.join(tmp, fname), "wb") as f:
                np.savez(f, **named)
        seq = {"format": FORMAT, "options": self.options, "done": done, "batches_total": total, "checkpoint": name,
               **seq}
        shutil.rmtree(os.path.join(self.out, name), ignore_errors=True)
        os.replace(tmp, os.path.join(self.out, name))
        tmpj = self.path + ".tmp"
        with open(tmpj, "w") as f:
            json.dump(seq, f, indent=1, default=str)
        os.replace(tmpj, self.path)  # the commit point: the new checkpoint is the one recorded
        for entry in os.listdir(self.out):
            if entry.startswith("ckpt-") and entry != name:
                shutil.rmtree(os.path.join(self.out, entry), ignore_errors=True)


def _flat(options: dict) -> dict:
    """{"hparams": {"v_lr": ...}} -> {"v_lr": ...}: a changed hyperparameter is named by its own name."""
    out = {k: v for k, v in options.items() if k != "hparams"}
    out.update(options.get("hparams", {}))
    return out


def _short(v) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


@public("requests")
def edit_sequential(model, requests, *, tokenizer=None, method: str = "alphaedit", batch_size: int = 100,
                    layers=None, stats=None, out: Optional[str] = None, progress=True,
                    on_batch: Optional[Callable] = None, donate: bool = False, **hparams):
    """Edit ``requests`` (jaxedit requests, or CounterFact / zsRE records as :func:`jaxedit.load_counterfact` and
    :func:`jaxedit.load_zsre` return them) in consecutive batches of ``batch_size`` with ``method`` ("memit", "alphaedit" or
    "ultraedit": a batch is then one UltraEdit turn, and ``lr``, ``micro_batch``, ``solve_dtype`` are its options),
    each batch on the model the previous batches left. Returns ``(edited_model, report)``; ``report["batches"]`` holds
    one entry per batch (its requests' indices, z losses, the layers' update norms, seconds) and, for AlphaEdit,
    ``report["state"]`` the sequence's state. ``out``: a folder where each finished batch is saved, so that a
    killed run resumes at the next batch. ``on_batch(batches_done, model)`` is called after each batch (e.g. to
    evaluate every K batches). ``donate=True`` (MEMIT, AlphaEdit): each batch reuses the memory of the edited
    projection of the model it starts from (one copy of it less at the peak): ``model``, and each model given to
    ``on_batch``, is used up by the next batch, so do not keep them. AlphaEdit's ``null_space_threshold`` and ``l2``
    and MEMIT's hyperparameters go in the keywords."""
    t0 = time.perf_counter()
    if method not in METHODS:
        raise JaxeditError(f"method must be one of {', '.join(METHODS)} (got {method!r})")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise JaxeditError(f"batch_size must be an integer >= 1 (got {batch_size!r})")
    donate = _memit._donate_flag(donate)
    if method == "ultraedit":
        return _ultraedit_sequential(model, requests, tokenizer=tokenizer, batch_size=batch_size, layers=layers,
                                     stats=stats, out=out, progress=progress, on_batch=on_batch, **hparams)
    hparams = dict(hparams)
    threshold = hparams.pop("null_space_threshold", _alpha.DEFAULT_THRESHOLD)
    l2 = hparams.pop("l2", 10.0)
    given_mean = hparams.pop("nas_mean_norm", None)
    if method == "alphaedit":
        _alpha.parse_threshold(threshold)
        if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not l2 >= 0:
            raise JaxeditError(f"l2 must be a number >= 0 (got {l2!r})")
    elif "null_space_threshold" in hparams or l2 != 10.0:
        raise JaxeditError("null_space_threshold and l2 are AlphaEdit's options (method=\"alphaedit\")")
    hp, layers = _memit.prepare(model, layers, hparams)
    parsed = parse_mixed(as_requests(requests), tokenizer)
    chunks = list(batches(list(range(len(parsed))), batch_size))
    options = {"method": method, "batch_size": batch_size, "layers": list(layers),
               "hparams": dataclasses.asdict(hp), "requests": _fingerprint([p.raw for _, p in parsed]),
               "n_requests": len(parsed), "model": _model_signature(model, layers)}
    if method == "alphaedit":
        options.update(null_space_threshold=threshold, l2=float(l2))
    ckpt = _Checkpoints(out, options) if out else None
    seq = ckpt.load() if ckpt else None
    done, batch_reports, state = 0, [], None
    if seq is not None:
        done, batch_reports = int(seq["done"]), list(seq["batches"])
        runtime.stage(f"resuming at batch {done + 1} of {len(chunks)} from {out}/" if done < len(chunks) else
                      f"all {len(chunks)} batches were done earlier in {out}/: nothing to edit")
        model = _with_layers(model, layers, ckpt.weights(seq), donate)
        if method == "alphaedit":
            state = ckpt.state(seq, layers)
    contexts = seq["contexts"] if seq is not None else None
    if done < len(chunks):
        if method == "alphaedit" and state is None:
            state = _alpha.new_state(model, tokenizer, layers, hp, stats=stats, null_space_threshold=threshold,
                                     progress=progress)
            if ckpt:
                ckpt.save_projection(state, layers)
        if method == "alphaedit":
            contexts = state["contexts"]
        else:
            stats = _memit.key_stats(model, tokenizer, layers, hp, stats, progress)
            if contexts is None:
                runtime.stage("sampling context templates")
                contexts = _memit.context_templates(model, tokenizer, hp)
    # NAS: the mean |v*| of clean edits, measured once on the model the sequence starts from (recorded with the
    # checkpoints, so a resumed run keeps it)
    nas_mean = seq.get("nas_mean_norm") if seq is not None else None
    if done < len(chunks) and nas_mean is None:
        nas_mean = _memit.nas_mean(model, tokenizer, [p for m, p in parsed if m == "edit"], hp, layers, given_mean)
    if ckpt and nas_mean is not None:
        ckpt.extra["nas_mean_norm"] = nas_mean
    if method == "alphaedit" and state is not None:
        state = dict(state, nas_mean_norm=nas_mean)
    shape = _memit.batch_shape(tokenizer, parsed, hp, contexts, BUCKET) if done < len(chunks) else None
    note = (lambda: f"{done} of {len(chunks)} batches kept in {out}/; rerun to resume") if out else \
        (lambda: "nothing kept (give an output folder to resume)")
    with runtime.resume_note_while(note), \
            runtime.bar(len(chunks), f"{method}, batches of {batch_size}", "batch", done, enabled=progress) as pbar:
        for b in range(done, len(chunks)):
            tb = time.perf_counter()
            entry = {"batch": b, "requests": chunks[b], "parts": []}
            for mode in ("edit", "delete"):
                reqs = [parsed[i][1] for i in chunks[b] if parsed[i][0] == mode]
                if not reqs:
                    continue
                if method == "alphaedit":
                    model, rep, state = _alpha.run_batch(model, tokenizer, reqs, mode, hp, layers, state, float(l2),
                                                         evaluate=False, pad_to=batch_size, shape=shape,
                                                         donate=donate)
                else:
                    model, rep = _memit.edit_batch(model, tokenizer, reqs, mode, hp, layers, contexts, stats,
                                                   evaluate=False, pad_to=batch_size, shape=shape,
                                                   nas_mean_norm=nas_mean if mode == "edit" else None,
                                                   donate=donate)
                entry["parts"].append({
                    "mode": mode, "layers_report": rep["layers_report"],
                    "loss_last": [r["loss_last"] for r in rep["requests"]],
                    "objective_last": [r["objective_last"] for r in rep["requests"]],
                    "steps": [r["steps"] for r in rep["requests"]],
                    **({"nas": rep["nas"]} if rep.get("nas") else {})})  # NAS: which targets were written
            entry["seconds"] = time.perf_counter() - tb
            batch_reports.append(entry)
            done = b + 1
            if ckpt:
                ckpt.save(done, model, layers, state, contexts, batch_reports, len(chunks))
            pbar.update(1)
            if on_batch is not None:
                on_batch(done, model)
    report = {"method": method, "batch_size": batch_size, "layers": list(layers), "n_requests": len(parsed),
              "batches": batch_reports, "hparams": dataclasses.asdict(hp), "contexts": contexts,
              "resumed_at": 0 if seq is None else int(seq["done"]), "seconds": time.perf_counter() - t0,
              "nas_mean_norm": nas_mean}
    if method == "alphaedit":
        report.update(l2=float(l2), null_space_threshold=threshold, state=state,
                      null_space=None if state is None else state["null_space"])
    return model, report



# ---------------------------------------------------------------------------------------------- UltraEdit

class _UltraCheckpoints(_Checkpoints):
    """``out/sequence.json`` + ``out/ckpt-NNNNN/`` (weights.npz: the edited projections; state.npz: the
    normalizer)."""

    def weights(self, seq) -> dict:
        with np.load(os.path.join(self.out, seq["checkpoint"], "weights.npz")) as z:
            return {k: z[k] for k in z.files}

    def state(self, seq) -> dict:
        with np.load(os.path.join(self.out, seq["checkpoint"], "state.npz")) as z:
            norms = {key: {"n": float(seq["state"]["n"][key]), "mean": z[f"mean_{key}"], "var": z[f"var_{key}"]}
                     for key in seq["state"]["n"]}
        return dict(seq["state"]["meta"], normalizers=norms)

    def save(self, done: int, model, modules, state, batch_reports, total: int) -> None:
        blocks = params_of(model)["blocks"]
        w = {f"{name}_{l}": np.asarray(to_host(blocks[name][l]), np.float32) for name, l in modules}
        if not is_main_process():
            return
        norms = state["normalizers"]
        meta = {k: v for k, v in state.items() if k != "normalizers"}
        self.write(done, total, {"weights.npz": w, "state.npz": {
            f"{part}_{key}": norms[key][part] for key in norms for part in ("mean", "var")}},
            {"contexts": [], "batches": batch_reports,
             "state": {"meta": meta, "n": {key: float(norms[key]["n"]) for key in norms}}})


def _with_modules(model, weights: dict):
    params = params_of(model)
    blocks = dict(params["blocks"])
    for key, value in weights.items():
        name, l = key.rsplit("_", 1)
        w = blocks[name]
        new = _set_layers(w, jnp.asarray([int(l)]), jnp.asarray(value)[None])
        blocks[name] = jax.device_put(new, w.sharding) if getattr(w, "sharding", None) is not None else new
    return model_from_params(model.config, dict(params, blocks=blocks))


def _ultra_signature(model, modules) -> dict:
    blocks = params_of(model)["blocks"]
    norms = to_host(jnp.stack([jnp.linalg.norm(blocks[n][l].astype(jnp.float32)) for n, l in modules]))
    return {"config": _fingerprint(dataclasses.asdict(model.config)),
            "edited_module_norms": [round(float(x), 4) for x in norms]}


def _ultraedit_sequential(model, requests, *, tokenizer, batch_size, layers, stats, out, progress, on_batch,
                          **options):
    """UltraEdit over consecutive turns of ``batch_size`` requests (see :func:`edit_sequential`)."""
    t0 = time.perf_counter()
    if stats is not None:
        raise JaxeditError("stats (the key statistics) are MEMIT's and AlphaEdit's; ultraedit uses none")
    other = [k for k in options if k in ("null_space_threshold", "l2")]
    if other:
        raise JaxeditError(f"{other[0]} is AlphaEdit's option (method=\"alphaedit\"); ultraedit takes lr, "
                           f"micro_batch, solve_dtype")
    options = check_names(options, ("lr", "micro_batch", "solve_dtype"), what="ultraedit option")
    lr = _ultra._check_lr(options.get("lr", _ultra.DEFAULT_LR))
    micro_batch = _ultra._check_micro_batch(options.get("micro_batch", _ultra.DEFAULT_MICRO_BATCH))
    solve_dtype = options.get("solve_dtype", "float64")
    if solve_dtype not in ("float32", "float64"):
        raise JaxeditError(f"solve_dtype must be float32 or float64 (got {solve_dtype!r})")
    modules = _ultra.resolve_modules(model.config, layers)
    reqs = as_requests(requests)
    records = _ultra.parse_records(reqs, tokenizer)
    chunks = list(batches(list(range(len(records))), batch_size))
    options = {"method": "ultraedit", "batch_size": batch_size, "modules": [list(m) for m in modules],
               "lr": lr, "micro_batch": micro_batch, "solve_dtype": solve_dtype,
               "requests": _fingerprint(reqs), "n_requests": len(records),
               "model": _ultra_signature(model, modules)}
    ckpt = _UltraCheckpoints(out, options) if out else None
    seq = ckpt.load() if ckpt else None
    done, batch_reports = 0, []
    if seq is not None:
        done, batch_reports = int(seq["done"]), list(seq["batches"])
        runtime.stage(f"resuming at turn {done + 1} of {len(chunks)} from {out}/" if done < len(chunks) else
                      f"all {len(chunks)} turns were done earlier in {out}/: nothing to edit")
        model = _with_modules(model, ckpt.weights(seq))
        state = ckpt.state(seq)
    else:
        state = _ultra.new_state(model, modules)
    # one compiled capture program per micro-batch length bucket for the whole sequence
    T, R = _ultra.turn_shapes(records, micro_batch)
    note = (lambda: f"{done} of {len(chunks)} turns kept in {out}/; rerun to resume") if out else \
        (lambda: "nothing kept (give an output folder to resume)")
    with runtime.resume_note_while(note), \
            runtime.bar(len(chunks), f"ultraedit, turns of {batch_size}", "turn", done, enabled=progress) as pbar:
        for b in range(done, len(chunks)):
            tb = time.perf_counter()
            model, rep, state = _ultra.run_turn(model, [records[i] for i in chunks[b]], modules, state, lr,
                                                micro_batch=micro_batch, solve_dtype=solve_dtype, shapes=(T, R),
                                                progress=False)
            batch_reports.append({"batch": b, "requests": chunks[b], "losses": rep["losses"],
                                  "layers_report": rep["modules"], "seconds": time.perf_counter() - tb})
            done = b + 1
            if ckpt:
                ckpt.save(done, model, modules, state, batch_reports, len(chunks))
            pbar.update(1)
            if on_batch is not None:
                on_batch(done, model)
    return model, {"method": "ultraedit", "batch_size": batch_size, "modules": [list(m) for m in modules],
                   "layers": sorted({l for _, l in modules}), "n_requests": len(records), "lr": lr,
                   "micro_batch": micro_batch, "solve_dtype": solve_dtype, "batches": batch_reports,
                   "state": state, "resumed_at": 0 if seq is None else int(seq["done"]),
                   "seconds": time.perf_counter() - t0}
