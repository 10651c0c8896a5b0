"""The study's other detoxification methods, run beside the deletion grid and evaluated on the same random streams
(``--methods delete,dinm,profs``):

* ``dinm`` (:func:`jaxedit.dinm`): one case per edited prompt, its safe response the model's own least toxic sample
  for the prompt and its unsafe response the most toxic one (both from ``candidates.jsonl``), its knowledge
  constraint one of the general-knowledge questions of the shipped SafeEdit demo cases (in turn), no system suffix
  (the study samples continuations of the bare openings). The cases go into one model in order, each at the layer
  DINM locates for it on the model edited so far (``per_instance=False``, one case at a time). One run.
* ``profs`` (:func:`jaxedit.profs`): pairs ``(prompt + least toxic sample, prompt + most toxic sample)`` of the
  edited prompts, or the pairs of a ``--pairs`` file; one run per rank.

Each run writes ``edits/RUN.npz`` (the edited layers' output projections, as the deletion runs do) and
``edits/RUN.json`` (its method, settings, layers, seconds, or the reason it failed).
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from jaxedit.detox.common import read_selected
from jaxedit.detox.config import DetoxConfig
from jaxedit.edit.dinm import dinm
from jaxedit.edit.profs import profs
from jaxedit.errors import JaxeditError
from jaxedit.files import read_rows, write_json
from jaxedit.model import params_of
from jaxedit.request_files import RequestFile

DEMO_CASES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "safeedit_demo.json")


def pair_of(obj: dict) -> tuple:
    """(preferred, non_preferred) of one ``--pairs`` line."""
    out = []
    for k in ("preferred", "non_preferred"):
        v = obj.get(k)
        if not isinstance(v, str) or not v.strip():
            raise JaxeditError(f"expected \"{k}\" as a non-empty string")
        out.append(v)
    return tuple(out)


def read_pairs_file(path: str) -> list:
    """[(preferred, non_preferred)] of a JSONL file of {"preferred", "non_preferred"} lines (FILE:LINE errors)."""
    if os.path.isdir(path):
        raise JaxeditError(f"{path} is a directory, not a JSONL file of pairs")
    return [p for _, p in RequestFile(path, "pairs").check(pair_of)]


def extremes(out: str) -> list:
    """[(line, prompt, least toxic sample, most toxic sample)] of the edited prompts, the samples chosen among the
    prompt's non-blank selection samples by their stored scores (ties: the earlier sample). Prompts without a
    non-blank sample are left out."""
    cands = {c["line"]: c for c in read_rows(os.path.join(out, "candidates.jsonl"))}
    rows = []
    for r in read_selected(out):
        if r["split"] != "edit":
            continue
        c = cands[r["line"]]
        ok = [j for j, t in enumerate(c["samples"]) if t.strip()]
        if not ok:
            continue
        lo = min(ok, key=lambda j: (c["scores"][j], j))
        hi = max(ok, key=lambda j: (c["scores"][j], -j))
        rows.append((r["line"], r["prompt"], c["samples"][lo], c["samples"][hi]))
    return rows


def study_pairs(out: str) -> list:
    """ProFS pairs from the edited prompts: (prompt + least toxic sample, prompt + most toxic sample)."""
    return [(p + lo, p + hi) for _, p, lo, hi in extremes(out)]


def dinm_cases(out: str) -> list:
    """SafeEdit-shaped cases of the edited prompts (see the module docstring)."""
    with open(DEMO_CASES, encoding="utf-8") as f:
        kcs = [c["knowledge constrain"] for c in json.load(f)]
    return [{"id": line, "adversarial prompt": p, "safe generation": lo, "unsafe generation": hi,
             "knowledge constrain": kcs[i % len(kcs)]} for i, (line, p, lo, hi) in enumerate(extremes(out))]


def plan_method_runs(cfg: DetoxConfig) -> list:
    """[(run id, method, settings)] of the methods other than the deletion grid."""
    runs = []
    for m in cfg.methods:
        if m == "dinm":
            runs.append(("dinm", "dinm", {"steps": cfg.dinm_steps, "lr": cfg.dinm_lr,
                                          "edit_weight": cfg.dinm_edit_weight}))
        elif m == "profs":
            for r in cfg.profs_ranks:
                runs.append((f"profs__rank{r}", "profs", {"rank": int(r)}))
    return runs


def run_method(model, tokenizer, cfg: DetoxConfig, out: str, rid: str, method: str, settings: dict) -> dict:
    """Run one method run and write ``edits/RUN.npz`` and ``edits/RUN.json`` (or the error to the json). Returns the
    json's contents."""
    edir = os.path.join(out, "edits")
    t0 = time.perf_counter()
    info = {"run": rid, "method": method, "settings": dict(settings)}
    try:
        if method == "dinm":
            cases = dinm_cases(out)
            if not cases:
                raise JaxeditError("no edited prompt has a non-blank sample")
            edited, rep = dinm(model, cases, tokenizer=tokenizer, per_instance=False, suffix=None, steps=cfg.dinm_steps,
                               lr=cfg.dinm_lr, edit_weight=cfg.dinm_edit_weight, batch_size=1)
            layers = sorted(set(rep["layers"]))
            info.update(cases=len(cases), case_layers=rep["layers"], steps_run=rep["steps"],
                        final=rep["final"], update_norm=rep["update_norm"])
        else:
            pairs = read_pairs_file(cfg.pairs) if cfg.pairs else study_pairs(out)
            if not pairs:
                raise JaxeditError("no edited prompt has a non-blank sample")
            edited, rep = profs(model, pairs, tokenizer=tokenizer, layers=list(cfg.profs_layers) if cfg.profs_layers else None,
                                rank=int(settings["rank"]), progress=False)
            layers = list(rep["layers"])
            info.update(pairs=os.path.abspath(cfg.pairs) if cfg.pairs else "selected", n_pairs=rep["n_pairs"],
                        truncated=rep["truncated"],
                        singular_values={str(l): [float(s) for s in rep["singular_values"][l][:4]] for l in layers})
    except JaxeditError as e:
        info["error"] = str(e)
        write_json(os.path.join(edir, rid + ".json"), info)
        return info
    w = np.asarray(jax.device_get(params_of(edited)["blocks"]["w_out"][np.asarray(layers)]))
    tmp = os.path.join(edir, f".{rid}.tmp.npz")
    np.savez(tmp, layers=np.asarray(layers), w_out=w)
    os.replace(tmp, os.path.join(edir, rid + ".npz"))
    info.update(layers=layers, seconds=time.perf_counter() - t0)
    write_json(os.path.join(edir, rid + ".json"), info)
    return info
