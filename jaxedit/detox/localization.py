"""Stage 2 of the study, localize: causal tracing of the edited prompts (span = the chunk, answer = the value
token), the aggregate AIE, per-layer profiles at the chunk's last token, and saliency profiles. Files: ``trace/``
(per-prompt grids, heatmaps, ``aie.*``), ``localize.json``."""
from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from jaxedit import runtime
from jaxedit.detox.common import check_stage, read_selected, stage_bar
from jaxedit.detox.config import DetoxConfig
from jaxedit.files import write_json
from jaxedit.locate import trace_files as tf
from jaxedit.locate.saliency import saliency_batch
from jaxedit.locate.tracing import check_options, resolve_noise_level, trace_batch


def obfuscate(token: str) -> str:
    """A token with every vowel after its first letter starred (" stupid" -> " st*p*d"), as papers print toxic
    words."""
    lead = len(token) - len(token.lstrip())
    body = token[lead:]
    return token[:lead] + body[:1] + re.sub(r"[aeiouAEIOU]", "*", body[1:])


def shown_results(results: dict, row: dict, hide: bool = True) -> dict:
    """The trace results of one selected prompt as its heatmaps show them: with ``hide``, the chunk's tokens, any
    other token spelling the value, and the answer (the value: the titles' and colorbars' "p(...)") obfuscated."""
    if not hide:
        return results
    s, e = row["span"]
    value = row.get("value", "").strip().lower()
    hidden = lambda j, t: s <= j < e or (value and t.strip().lower() == value)  # noqa: E731
    return {k: dataclasses.replace(v, tokens=[obfuscate(t) if hidden(j, t) else t for j, t in enumerate(v.tokens)],
                                   answer=obfuscate(v.answer)) for k, v in results.items()}


def plot_prompt(results: dict, row: dict, path_stem: str, hide: bool = True) -> None:
    """One selected prompt's heatmaps (PNG, PDF), the toxic words obfuscated unless ``hide`` is False."""
    shown = shown_results(results, row, hide)
    tf.plot_heatmaps(shown, path_stem, title=tf.heatmap_title(None, next(iter(shown.values()))))


def localize(model, tokenizer, cfg: DetoxConfig, out: str, progress: bool = True) -> dict:
    """Stage 2 (see the module docstring). Returns the contents of ``localize.json`` (per-layer profiles, the CT
    ranking, saliency)."""
    kinds = check_options(tuple(cfg.trace_kinds), cfg.trace_samples, cfg.window)
    if "delete" not in cfg.methods:  # DINM, ProFS and AurA locate nothing per prompt
        runtime.stage("localize: skipped (no deletion grid in the methods)")
        return {}
    check_stage(out, "localize", cfg)
    rows = [r for r in read_selected(out) if r["split"] == "edit"]
    tdir = os.path.join(out, "trace")
    os.makedirs(tdir, exist_ok=True)
    done = tf.read_done(tdir)
    todo = [r for r in rows if r["line"] not in done]
    ids = [tokenizer(r["prompt"])["input_ids"] for r in rows]
    # one noise level for the whole set (the reference's "s3" over all subjects), whatever the batches
    runtime.stage(f"localize: the noise level over the {len(rows)} edited prompts' chunks")
    level = resolve_noise_level(model, tokenizer, "s3", [i[r["span"][0]:r["span"][1]] for i, r in zip(ids, rows)])
    runtime.stage(f"localize: tracing {len(rows)} prompts ({len(rows) - len(todo)} done earlier), kinds "
                  f"{', '.join(kinds)}, noise level {level:.4g}")
    with stage_bar(len(rows), "localize: tracing", len(rows) - len(todo), progress) as bar:
        for i in range(0, len(todo), cfg.batch_size):
            part = todo[i:i + cfg.batch_size]
            reqs = [{"prompt": r["prompt"], "span": tuple(r["span"]), "target": r["value_id"]} for r in part]
            results = trace_batch(model, reqs, kinds=kinds, samples=cfg.trace_samples, noise=level, window=cfg.window,
                                  tokenizer=tokenizer, batch_size=len(part), bucket=4)
            for r, req, res in zip(part, reqs, results):
                row = tf.save_prompt(tdir, r["line"], dict(req, subject=r["chunk"]), res, plots=False)
                plot_prompt(res, r, os.path.join(tdir, tf.stem(r["line"])), cfg.obfuscate)
                tf.append_row(tdir, row)
                done[r["line"]] = row
            bar.update(len(part))
    ordered = [done[r["line"]] for r in rows]
    tf.write_aggregate(tdir, tf.aggregate_aie(tdir, ordered, kinds), len(ordered))
    profiles = {}
    for kind in kinds:
        at_chunk, at_last = [], []
        for row in ordered:
            with np.load(os.path.join(tdir, row["files"][kind])) as z:
                ie = z["scores"] - z["low_score"]
                at_chunk.append(ie[int(z["subject_range"][1]) - 1])
                at_last.append(ie[-1])
        profiles[kind] = {"chunk_last": np.mean(at_chunk, 0).tolist(), "last": np.mean(at_last, 0).tolist()}
    ct_kind = next(k for k in ("mlp", "hidden", "attn") if k in kinds)
    result = {"n_prompts": len(rows), "noise_level": level, "kinds": profiles, "ct_kind": ct_kind,
              "ct_profile": profiles[ct_kind]["chunk_last"],
              "ct_ranking": np.argsort(-np.asarray(profiles[ct_kind]["chunk_last"]), kind="stable").tolist()}
    if "saliency-multi" in cfg.strategies:
        _, mean = saliency_batch(model, [{"prompt": r["prompt"], "target": r["value_id"]} for r in rows],
                                 tokenizer=tokenizer)
        result["saliency_profile"] = mean.modules["mlp_out"].tolist()
        result["saliency_ranking"] = np.argsort(-mean.modules["mlp_out"], kind="stable").tolist()
    write_json(os.path.join(out, "localize.json"), result)
    return result
