"""Stage 4 of the study, evaluate: the unedited model and every edit: % toxic continuations, perplexity on the
prompts and on a neutral text, fluency; the same on held-out selected prompts and on factual prompts. Files:
``runs.jsonl`` (one row per run and seed), ``summary.jsonl`` (seeds averaged)."""
from __future__ import annotations

import json
import os
import time

import numpy as np

from jaxedit import runtime
from jaxedit.detox.common import check_stage, read_selected, stage_bar, stage_scorer
from jaxedit.detox.config import DetoxConfig
from jaxedit.detox.data import read_facts, read_texts
from jaxedit.detox.editing import edited_model, parse_run_id
from jaxedit.edit.memit import next_token_dist
from jaxedit.evaluate.metrics import fluency, perplexity
from jaxedit.files import append_jsonl, read_rows, write_jsonl
from jaxedit.generate import sample_texts

METRICS = ("toxic_rate", "perplexity_prompts", "perplexity_neutral", "fluency", "heldout_toxic_rate",
           "heldout_perplexity", "heldout_fluency", "factual_argmax_kept", "factual_toxic_rate", "factual_perplexity",
           "edit_seconds")


def measure(model, tokenizer, cfg: DetoxConfig, sets: dict, scorer, base_argmax=None, say=None) -> dict:
    """The evaluation metrics of one model on the prompt sets (see :func:`evaluate`). ``say``: called with a status
    line before each step (the first model evaluated compiles every program)."""
    say = say or (lambda msg: None)
    res = {}
    groups = [("", sets["edit"], cfg.eval_samples), ("heldout_", sets["heldout"], cfg.eval_samples),
              ("factual_", sets["factual"], cfg.factual_samples)]
    for prefix, items, n in groups:
        if not items or n < 1:
            continue
        say(f"evaluate: sampling {n} continuations of {len(items)} {prefix.rstrip('_') or 'edited'} prompts, "
            f"scoring them, perplexity")
        conts = sample_texts(model, tokenizer, [p for _, p in items], cfg.max_new_tokens, samples=n,
                             seed=cfg.seed + 1, top_p=cfg.top_p, prompt_keys=[k for k, _ in items])
        flat = [c for row in conts for c in row]
        sc = scorer(flat)
        res[prefix + "toxic_rate"] = float((sc > cfg.toxic_threshold).mean())
        if prefix != "factual_":
            res[prefix + "fluency"] = fluency(flat)
        res[prefix + ("perplexity_prompts" if not prefix else "perplexity")] = perplexity(
            model, [p for _, p in items], tokenizer=tokenizer)
    say("evaluate: perplexity of the neutral text" + (", the factual prompts' greedy answers" if sets["factual"] else ""))
    res["perplexity_neutral"] = perplexity(model, sets["neutral"], tokenizer=tokenizer)
    if sets["factual"]:
        arg = next_token_dist(model, tokenizer, [p for _, p in sets["factual"]]).argmax(-1)
        res["factual_argmax"] = arg.tolist()
        if base_argmax is not None:
            res["factual_argmax_kept"] = float(np.mean(arg == np.asarray(base_argmax)))
    return res


def evaluate(model, tokenizer, cfg: DetoxConfig, out: str, progress: bool = True) -> list:
    """Stage 4: metrics of the unedited model (``"strategy": "base"``) and of every edit. Returns the summary rows
    (seeds averaged), also written to ``summary.jsonl``."""
    check_stage(out, "evaluate", cfg)
    sel = read_selected(out)
    sets = {"edit": [(r["line"], r["prompt"]) for r in sel if r["split"] == "edit"],
            "heldout": [(r["line"], r["prompt"]) for r in sel if r["split"] == "heldout"],
            "factual": [(10**6 + i, p) for i, p in enumerate(read_facts(cfg.factual))],
            "neutral": read_texts(cfg.neutral)}
    scorer = stage_scorer(cfg, out)
    runs_path = os.path.join(out, "runs.jsonl")
    done = {r["run"]: r for r in read_rows(runs_path)}
    edir = os.path.join(out, "edits")
    planned = sorted(f[:-5] for f in os.listdir(edir) if f.endswith(".json")) if os.path.isdir(edir) else []
    todo = [rid for rid in ["base"] + planned if rid not in done]
    common = {"n_prompts": len(sets["edit"]), "n_samples": cfg.eval_samples, "n_heldout": len(sets["heldout"]),
              "n_factual": len(sets["factual"])}
    runtime.stage(f"evaluate: {len(todo)} of {1 + len(planned)} models to evaluate")
    with stage_bar(1 + len(planned), "evaluate: runs", 1 + len(planned) - len(todo), progress) as bar:
        for i, rid in enumerate(todo):
            say = runtime.stage if i == 0 else None  # the first model compiles: say each step
            t0 = time.perf_counter()
            if rid == "base":
                row = {"run": "base", "method": "base", "strategy": "base", "objective": None, "kl_weight": None,
                       "seed": None, "layers": []}
                row.update(measure(model, tokenizer, cfg, sets, scorer, say=say))
            else:
                with open(os.path.join(edir, rid + ".json")) as f:
                    info = json.load(f)
                method = info.get("method", "delete")
                if method == "delete":
                    strategy, objective, kl, seed = parse_run_id(rid)
                    row = {"run": rid, "method": method, "strategy": strategy, "objective": objective,
                           "kl_weight": kl, "seed": seed, "layers": info.get("layers")}
                else:  # DINM, ProFS: the method names the row; its settings (ProFS: the rank) tell runs apart
                    row = {"run": rid, "method": method, "strategy": method, "objective": None, "kl_weight": None,
                           "seed": None, "layers": info.get("layers"), "settings": info.get("settings")}
                if "error" in info:
                    row["error"] = info["error"]
                else:
                    row["edit_seconds"] = info.get("seconds")
                    row.update(measure(edited_model(model, out, rid), tokenizer, cfg, sets, scorer,
                                       done["base"].get("factual_argmax"), say=say))
            row.update(common, eval_seconds=time.perf_counter() - t0)
            append_jsonl(runs_path, row)
            done[rid] = row
            bar.update(1)
    summary = summarize([done[r] for r in ["base"] + planned])
    write_jsonl(os.path.join(out, "summary.jsonl"), summary)
    return summary


def method_of(row: dict) -> str:
    """A run row's method ("base", "delete", "dinm", "profs"; rows written before methods were recorded are the
    deletion grid's)."""
    return row.get("method") or ("base" if row["strategy"] == "base" else "delete")


def summarize(rows: list) -> list:
    """One row per (method, strategy, objective, KL weight, settings): the metrics averaged over seeds (with their
    spread in ``*_std`` and the layers of each seed); failed runs are listed in ``failed``."""
    groups: dict = {}
    for r in rows:
        method = method_of(r)
        key = (method, r["strategy"], r["objective"], r["kl_weight"], json.dumps(r.get("settings"), sort_keys=True))
        groups.setdefault(key, []).append(r)
    out = []
    for (method, strategy, objective, kl, _), members in groups.items():
        ok = [m for m in members if "error" not in m]
        row = {"method": method, "strategy": strategy, "objective": objective, "kl_weight": kl,
               "layers": ok[0]["layers"] if len(members) == 1 and ok else [m["layers"] for m in ok],
               "seeds": len(ok)}
        for k in ("n_prompts", "n_samples", "n_heldout", "n_factual"):
            row[k] = members[0].get(k)
        if members[0].get("settings") is not None:
            row["settings"] = members[0]["settings"]
        for k in METRICS:
            vals = [m[k] for m in ok if m.get(k) is not None]
            if vals:
                row[k] = float(np.mean(vals))
                if len(vals) > 1:
                    row[k + "_std"] = float(np.std(vals))
        if len(ok) < len(members):
            row["failed"] = [m["error"] for m in members if "error" in m]
        out.append(row)
    return out
