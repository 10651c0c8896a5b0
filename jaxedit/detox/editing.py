"""Stage 3 of the study, edit: one batched MEMIT edit or deletion of all edited prompts per (layer strategy,
objective, KL weight, seed), and the runs of the other methods (methods.py: DINM, ProFS). Files: ``edits/RUN.npz``
(the edited layers' output projections) and ``edits/RUN.json`` (the run's report, or the reason it failed).
:func:`edited_model` puts a run's layers back."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit import runtime
from jaxedit.detox.common import check_stage, need_file, read_selected, stage_bar
from jaxedit.detox.config import RANDOM_STRATEGIES, DetoxConfig
from jaxedit.detox.methods import plan_method_runs, run_method
from jaxedit.calls import STATS_ALIASES, check_names
from jaxedit.edit.memit import EditHparams, delete, hparams_for, memit
from jaxedit.edit.stats import layer_stats
from jaxedit.errors import JaxeditError
from jaxedit.files import write_json
from jaxedit.layer_selection import select_layers
from jaxedit.model import model_from_params, params_of


def run_id(strategy: str, objective: str, kl: float, seed: int) -> str:
    return f"{strategy}__{objective}__kl{kl:g}__s{seed}"


def parse_run_id(rid: str) -> tuple:
    """(strategy, objective, KL weight, seed) of a :func:`run_id`."""
    strategy, objective, kl, seed = rid.split("__")
    return strategy, objective, float(kl[2:]), int(seed[1:])


def strategy_seeds(cfg: DetoxConfig, strategy: str) -> list:
    """The seeds a strategy's runs use: ``random_seeds`` of them for the random strategies, else ``seed``."""
    return [cfg.seed + s for s in range(cfg.random_seeds)] if strategy in RANDOM_STRATEGIES else [cfg.seed]


def grid_run_ids(cfg: DetoxConfig) -> list:
    """The run ids of the deletion grid, in :func:`plan_runs`' order (known without the model)."""
    return [run_id(strategy, objective, kl, seed) for strategy in cfg.strategies
            for seed in strategy_seeds(cfg, strategy) for objective in cfg.objectives for kl in cfg.kl_weights]


def plan_runs(cfg: DetoxConfig, n_layers: int, loc: Optional[dict]) -> list:
    """[(run id, strategy, objective, kl weight, seed, layers)] of the grid."""
    n, k = cfg.layer_counts(n_layers)
    runs = []
    for strategy in cfg.strategies:
        for seed in strategy_seeds(cfg, strategy):
            count = 1 if strategy.endswith("single") else n
            if strategy.startswith("random"):
                layers = select_layers("random", n_layers, n=count, seed=seed)
            elif strategy.startswith("topk"):
                layers = select_layers("random-topk", n_layers, n=count, k=k, seed=seed)
            else:
                if loc is None:
                    raise JaxeditError(f"strategy {strategy} needs the localize stage's results")
                key = "ct_profile" if strategy.startswith("ct") else "saliency_profile"
                if key not in loc:
                    raise JaxeditError(f"strategy {strategy} needs saliency profiles: rerun the localize stage with "
                                       f"saliency-multi among the strategies")
                layers = select_layers("ct" if strategy.startswith("ct") else "saliency", n_layers, n=count,
                                       evidence=loc[key])
            for objective in cfg.objectives:
                for kl in cfg.kl_weights:
                    runs.append((run_id(strategy, objective, kl, seed), strategy, objective, float(kl), seed, layers))
    return runs


def edit_requests(rows: list, objective: str, canned: str) -> list:
    reqs = []
    for r in rows:
        req = {"prompt": r["prompt"], "span": list(r["span"])}
        if objective == "delete":
            req["suppress"] = [r["value_id"]]
        else:
            req["target"] = canned if objective == "edit-canned" else r["nontoxic_target"]
        reqs.append(req)
    return reqs


def edit(model, tokenizer, cfg: DetoxConfig, out: str, progress: bool = True) -> list:
    """Stage 3. Returns the planned runs (the deletion grid's, then the other methods' as (run id, method,
    settings)); each run's edited layers are written to ``edits/RUN.npz`` (or the reason it failed to
    ``edits/RUN.json``)."""
    check_stage(out, "edit", cfg)
    for m in ("dinm", "profs", "aura"):
        if m in cfg.methods:
            check_stage(out, m, cfg)
    runs = _edit_grid(model, tokenizer, cfg, out, progress) if "delete" in cfg.methods else []
    more = plan_method_runs(cfg)
    edir = os.path.join(out, "edits")
    os.makedirs(edir, exist_ok=True)
    todo = [r for r in more if not os.path.isfile(os.path.join(edir, r[0] + ".json"))]
    if todo:
        runtime.stage(f"edit: {len(todo)} of {len(more)} runs of {', '.join(m for m in cfg.methods if m != 'delete')}"
                      f" to do")
    with stage_bar(len(more), "edit: method runs", len(more) - len(todo), progress and bool(todo)) as bar:
        for rid, method, settings in todo:
            info = run_method(model, tokenizer, cfg, out, rid, method, settings)
            if "error" in info:
                bar.write(f"edit {rid} failed: {info['error']}")
            bar.update(1)
    return runs + more


def _edit_grid(model, tokenizer, cfg: DetoxConfig, out: str, progress: bool = True) -> list:
    """The deletion study's grid: one batched MEMIT edit or deletion per (strategy, objective, KL weight, seed)."""
    rows = [r for r in read_selected(out) if r["split"] == "edit"]
    loc_path = os.path.join(out, "localize.json")
    loc = None
    if any(not s.startswith(("random", "topk")) for s in cfg.strategies):
        with open(need_file(out, "localize.json", "localize")) as f:
            loc = json.load(f)
    elif os.path.isfile(loc_path):
        with open(loc_path) as f:
            loc = json.load(f)
    runs = plan_runs(cfg, model.config.n_layers, loc)
    edir = os.path.join(out, "edits")
    os.makedirs(edir, exist_ok=True)
    todo = [r for r in runs if not os.path.isfile(os.path.join(edir, r[0] + ".json"))]
    if not todo:
        return runs
    hp = check_names(dict(cfg.hparams), [f.name for f in dataclasses.fields(EditHparams)] + ["preset"],
                     STATS_ALIASES)
    hp.update({k: v for k, v in (("corpus", cfg.corpus), ("stats_samples", cfg.samples),
                                 ("max_len", cfg.max_len)) if v is not None})
    base = hparams_for(model.config, hp.get("preset"), **{k: v for k, v in hp.items() if k != "preset"})
    # the runs' layers are known before any edit (random draws are seeded): statistics of those layers only, in
    # one pass over the corpus (each layer's statistics are the same whichever layers share the pass)
    needed = sorted({int(l) for r in todo for l in r[5]})
    stats = layer_stats(model, needed, tokenizer=tokenizer, corpus=base.corpus, stats_samples=base.stats_samples,
                        max_len=base.max_len, precision=base.stats_precision, progress=progress)
    runtime.stage(f"edit: {len(todo)} of {len(runs)} runs to do, {len(rows)} prompts each")
    with stage_bar(len(runs), "edit: runs", len(runs) - len(todo), progress) as bar:
        for rid, strategy, objective, kl, seed, layers in todo:
            reqs = edit_requests(rows, objective, cfg.canned)
            t0 = time.perf_counter()
            try:
                if objective == "delete":
                    edited, rep = delete(model, reqs, layers=layers, kl_weight=kl, tokenizer=tokenizer,
                                                 stats=stats, progress=False, delete_objective=cfg.delete_objective,
                                                 **hp)
                else:
                    edited, rep = memit(model, reqs, layers=layers, tokenizer=tokenizer, stats=stats,
                                                progress=False, **dict(hp, kl_factor=kl))
            except JaxeditError as e:
                write_json(os.path.join(edir, rid + ".json"), {"run": rid, "layers": layers, "error": str(e)})
                bar.write(f"edit {rid} failed: {e}")
                bar.update(1)
                continue
            w = np.asarray(jax.device_get(params_of(edited)["blocks"]["w_out"][np.asarray(layers)]))
            tmp = os.path.join(edir, f".{rid}.tmp.npz")
            np.savez(tmp, layers=np.asarray(layers), w_out=w)
            os.replace(tmp, os.path.join(edir, rid + ".npz"))
            summary = {"run": rid, "method": "delete", "strategy": strategy, "objective": objective,
                       "kl_weight": kl, "seed": seed, "layers": layers, "seconds": time.perf_counter() - t0,
                       "requests": [{k: q.get(k) for k in ("prompt", "subject", "steps", "loss_first", "loss_last",
                                                           "tokens", "p_before", "p_after", "argmax_after")}
                                    for q in rep["requests"]],
                       "layers_report": rep["layers_report"]}
            write_json(os.path.join(edir, rid + ".json"), summary)
            bar.update(1)
    return runs


def edited_model(model, out: str, rid: str):
    """The base model with run ``rid``'s edited output projections put back."""
    with np.load(os.path.join(out, "edits", rid + ".npz")) as z:
        layers, w = z["layers"], z["w_out"]
    params = params_of(model)
    blocks = dict(params["blocks"])
    blocks["w_out"] = blocks["w_out"].at[jnp.asarray(layers)].set(jnp.asarray(w, blocks["w_out"].dtype))
    return model_from_params(model.config, dict(params, blocks=blocks))
