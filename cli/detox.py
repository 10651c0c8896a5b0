"""``jaxedit detox``: the toxic-memory study (select, localize, edit, evaluate, report) as one resumable command."""
from __future__ import annotations

import os

import click
from click.core import ParameterSource

import jaxedit
from jaxedit import runtime
from jaxedit.calibration import setup_key
from jaxedit.cli.app import MODEL_HELP, SKIP_BAD, Renamed, cli, echo, request_file, with_mesh, with_options
from jaxedit.cli.edit import _STATS_OPTIONS, parse_hparams
from jaxedit.detox.config import PROFS_PAIRS, STAGES, DetoxConfig
from jaxedit.detox.data import prompt_of, read_facts, read_prompts, read_texts
from jaxedit.detox.editing import grid_run_ids, plan_runs
from jaxedit.detox.estimate import estimate_lines, text_tokens
from jaxedit.detox.methods import (check_classes, extra_samples_needed, plan_method_runs, read_aura_texts,
                                   read_pairs_file, study_aura_texts)
from jaxedit.detox.pipeline import run_study
from jaxedit.edit.aura import is_authors_rule
from jaxedit.edit.profs import default_layers
from jaxedit.edit.stats import DEFAULT_CORPUS
from jaxedit.errors import JaxeditError
from jaxedit.files import read_rows
from jaxedit.loading.peek import peek


def _csv(text, what, cast=str):
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise JaxeditError(f"--{what} is empty")
    try:
        return tuple(cast(t) for t in items)
    except ValueError:
        raise JaxeditError(f"--{what} must be a comma list of numbers (got {text!r})") from None


def _layer_list(text):
    """Layer indices from a comma list of N or A-B (inclusive)."""
    out = []
    for part in [t.strip() for t in str(text).split(",") if t.strip()]:
        a, sep, b = part.partition("-")
        try:
            out += list(range(int(a), int(b) + 1)) if sep else [int(a)]
        except ValueError:
            raise JaxeditError(f"--profs-layers must be a comma list of layers N or ranges A-B (got {text!r})") \
                from None
    if not out:
        raise JaxeditError("--profs-layers is empty")
    return tuple(sorted(set(out)))


@cli.command()
@click.option("--prompts", required=True,
              help="JSONL of prompts (RealToxicityPrompts lines or {\"prompt\": ...}), 'demo' (the shipped demo "
                   "openings), or a datasets name such as allenai/real-toxicity-prompts")
@click.option("--out", default="detox_out", show_default=True, type=click.Path(file_okay=False),
              help="the study's folder (reruns resume)")
@click.option("--stage", default="all", show_default=True,
              type=click.Choice(["select", "localize", "edit", "evaluate", "report", "all"]))
@click.option("--model", "model_name", default="smollm2", show_default=True, help=MODEL_HELP)
@click.option("--limit", type=click.IntRange(min=1), help="read at most this many prompts")
@click.option("--scorer", default="profanity", show_default=True,
              help="toxicity scorer: 'profanity' (offline), hf:PATH[#LABEL] (a classifier folder; needs torch)")
@click.option("--chunker", default="phrases", show_default=True, help="phrases (offline), words, spacy[:MODEL]")
@click.option("--select-samples", default=25, show_default=True, type=click.IntRange(min=1), help="samples per prompt in selection")
@click.option("--eval-samples", default=20, show_default=True, type=click.IntRange(min=1),
              help="samples per prompt in evaluation (20: see docs/toxicity.md, what is noise)")
@click.option("--max-new-tokens", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--top-p", default=0.9, show_default=True, type=click.FloatRange(0, 1, min_open=True), help="nucleus sampling")
@click.option("--select-threshold", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="keep prompts whose continuations' mean toxicity is above this")
@click.option("--prompt-threshold", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="keep prompts whose own toxicity is below this")
@click.option("--value", default="first", show_default=True, type=click.Choice(["first", "toxic-word"]),
              help="the token deleted: the first token of the most toxic continuation, or of its most toxic word")
@click.option("--heldout-fraction", default=0.25, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="selected prompts held out of editing, evaluated to see whether edits generalize")
@click.option("--max-prompts", type=click.IntRange(min=1), help="edit at most this many selected prompts (the most toxic first)")
@click.option("--trace-kinds", default="hidden,mlp,attn", show_default=True)
@click.option("--trace-samples", default=10, show_default=True, type=click.IntRange(min=1),
              help="noisy copies per prompt in the localize stage's tracing (trace's --noise-samples)")
@click.option("--window", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--strategies", default="random-single,random-multi,topk-single,topk-multi,ct-single,ct-multi,"
              "saliency-multi", show_default=True, help="layer choices (comma list)")
@click.option("--objectives", default="edit-nontoxic,edit-canned,delete", show_default=True)
@click.option("--kl-weights", "--kl-weight", "kl_weights", cls=Renamed, default="0.0625", show_default=True, help="comma list; several draw the frontier")
@click.option("--n-layers", type=click.IntRange(min=1), help="layers of the multi strategies [6 of 48, scaled to the depth]")
@click.option("--topk", type=click.IntRange(min=1), help="K of the top-K strategies [15 of 48, scaled to the depth]")
@click.option("--random-seeds", default=5, show_default=True, type=click.IntRange(min=1), help="seeds averaged for random choices")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--canned", default=" Sorry, I cannot engage with provocative prompts", show_default=True)
@with_options(_STATS_OPTIONS)
@click.option("--delete-objective", default="logp", show_default=True, type=click.Choice(["logp", "unlikelihood"]))
@click.option("--hparam", multiple=True, help="override one editing hyperparameter: NAME=VALUE (repeatable)")
@click.option("--neutral", default="neutral", show_default=True, help="a .txt file for the neutral perplexity")
@click.option("--factual", default="facts", show_default=True,
              help="JSONL of factual prompts ('facts': the shipped set; '' for none)")
@click.option("--factual-samples", default=2, show_default=True, type=click.IntRange(min=0))
@click.option("--obfuscate/--no-obfuscate", default=True, show_default=True,
              help="star the vowels of the chunk's tokens in the plots")
@click.option("--methods", default="delete", show_default=True,
              help="comma list of delete (the deletion grid above), dinm, profs, aura; all go into one study and one "
                   "table")
@click.option("--dinm-steps", default="10", show_default=True,
              help="DINM: Adam steps per prompt (a comma list: one run per value)")
@click.option("--dinm-lr", default=5e-4, show_default=True, type=click.FloatRange(min=0, min_open=True), help="DINM: Adam learning rate")
@click.option("--dinm-edit-weight", default=0.1, show_default=True, type=click.FloatRange(min=0),
              help="DINM: the NLL's weight against the KL's 1")
@click.option("--profs-rank", "--profs-ranks", "profs_ranks", cls=Renamed, default="2", show_default=True,
              help="ProFS: rank of the removed subspace (a comma list: one run per rank)")
@click.option("--profs-layers", help="ProFS: edited layers, comma list of N or A-B [the upper layers, jaxedit.profs]")
@click.option("--pairs", type=click.Path(dir_okay=True),
              help="ProFS: JSONL of {\"preferred\", \"non_preferred\"} [pairs from the edited prompts' least and "
                   "most toxic samples]")
@click.option("--profs-pairs", default=str(PROFS_PAIRS), show_default=True,
              help="ProFS: pairs built from the edited prompts' samples (most / least toxic of the same prompt; more "
                   "samples drawn when needed); a comma list: one run per value and rank")
@click.option("--aura-layers", default="all", show_default=True,
              help="AurA: layers, a comma list of settings, one run each: all, upper (the upper half), A-B, N")
@click.option("--aura-texts", type=click.Path(dir_okay=True),
              help="AurA: JSONL of {\"text\", \"toxic\": 0/1}, or 'demo' (60 rude sentences, each beside a civil one "
                   "of the same shape) [prompt + sample of the selection's samples, toxic above --select-threshold]")
@click.option("--aura-min-auroc", default="0.5", show_default=True,
              help="AurA: dampen only units whose AUROC is above this (0.5: the authors' rule); a number in "
                   "[0.5, 1) or chance:Z (0.5 + Z standard deviations of a chance AUROC); a comma list: one run each")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="prompts per sampling / tracing call")
@click.option("--dtype", default="float32", type=click.Choice(["float32", "bfloat16"]), show_default=True)
@click.option("--dry-run", is_flag=True,
              help="check the options and print the plan (stages, runs, sample counts), then stop before loading "
                   "the model's weights")
@SKIP_BAD
@with_mesh
def detox(prompts, out, stage, model_name, trace_kinds, strategies, objectives, kl_weights, hparam, dtype,
          stats_float64, n_samples, skip_bad, dry_run, methods, profs_ranks, profs_layers, dinm_steps, profs_pairs,
          aura_layers, aura_min_auroc, mesh=None, **kw):
    """Das et al.'s toxic-memory study: select toxic prompts, localize the toxic chunk, edit or delete with every
    layer strategy, evaluate toxicity, perplexity and fluency, and report the tables and figures.

    Writes candidates.jsonl, selected.jsonl, trace/, localize.json, edits/, runs.jsonl, summary.jsonl,
    table1/table2/table_methods (.md, .csv), summary.md, aie_layers.png/pdf and frontier.png/pdf into OUT.
    --methods adds DINM, ProFS and AurA runs beside the deletions, evaluated the same way.
    """
    refuse_inapplicable(click.get_current_context(), _csv(methods, "methods"))
    hp = parse_hparams(hparam)
    if stats_float64:
        hp["stats_precision"] = "float64"
    cfg = DetoxConfig(prompts=prompts, model=model_name, trace_kinds=_csv(trace_kinds, "trace-kinds"),
                      strategies=_csv(strategies, "strategies"), objectives=_csv(objectives, "objectives"),
                      kl_weights=_csv(kl_weights, "kl-weights", float), hparams=hp, samples=n_samples,
                      skip_bad=skip_bad, methods=_csv(methods, "methods"),
                      profs_ranks=_csv(profs_ranks, "profs-rank", int),
                      dinm_steps=_csv(dinm_steps, "dinm-steps", int), profs_pairs=_csv(profs_pairs, "profs-pairs", int),
                      aura_layers=_csv(aura_layers, "aura-layers"),
                      aura_min_auroc=_csv(aura_min_auroc, "aura-min-auroc"),
                      profs_layers=None if profs_layers is None else _layer_list(profs_layers), **kw)
    stages = STAGES if stage == "all" else (stage,)
    check_inputs(cfg, out, stages)  # every option and input file, before anything is loaded or written
    import jax

    if jax.process_count() > 1:
        raise JaxeditError("jaxedit detox runs as one process: use --mesh over one host's devices")
    config, _ = peek(model_name, tokenizer=False)  # the config alone: layer counts and hparams checked unloaded
    if config is not None:
        cfg.check_model(config)
    lines = plan(cfg, config, out, stages, setup_key(dtype, mesh))
    if dry_run:
        echo("\n".join(lines + ["dry run: nothing loaded, nothing written"]))
        return
    for line in lines:
        runtime.stage(line)
    runtime.set_resume_note(f"finished steps are kept in {out}/; rerun the same command to resume")
    model, tok = jaxedit.load(model_name, dtype=dtype, mesh=mesh)
    cfg.check_model(model.config)
    run_study(model, cfg, out, tokenizer=tok, stages=stages)
    if "report" in stages:
        table = os.path.join(out, "table2.md")
        echo(open(table).read() if os.path.isfile(table) else "")
        table = os.path.join(out, "table_methods.md")
        if set(cfg.methods) - {"delete"} and os.path.isfile(table):
            echo(open(table).read())
    echo(f"wrote {out}/ (stage {stage})")


# options that only one method uses: refused when given (even at their default value) without it in --methods
METHOD_OPTIONS = {
    "profs": ("profs_ranks", "profs_layers", "pairs", "profs_pairs"),
    "aura": ("aura_layers", "aura_texts", "aura_min_auroc"),
    "dinm": ("dinm_steps", "dinm_lr", "dinm_edit_weight"),
    "delete": ("strategies", "objectives", "kl_weights", "n_layers", "topk", "random_seeds", "canned",
               "delete_objective", "trace_kinds", "trace_samples", "window"),
}
WHY = {"profs": "ProFS", "dinm": "DINM", "aura": "AurA",
       "delete": "the deletion grid (and the localize stage it needs)"}


def refuse_inapplicable(ctx, methods) -> None:
    """Refuse an option given on the command line that no method in ``methods`` uses, naming why (one line)."""
    for method, names in METHOD_OPTIONS.items():
        if method in methods:
            continue
        for name in names:
            if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
                opt = next(p for p in ctx.command.params if p.name == name).opts[0]
                raise JaxeditError(f"{opt} applies to {WHY[method]} only: add {method} to --methods "
                                   f"(--methods is {','.join(methods)})")


def plural(n: int, word: str, many: str = None) -> str:
    """``1 kind``, ``3 kinds``."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def edited_bound(cfg: DetoxConfig, n: int) -> tuple:
    """(edited, held out) if every one of ``n`` prompts were selected: the most the select stage can keep."""
    n_sel = min(n, cfg.max_prompts or n)
    n_held = int(round(cfg.heldout_fraction * n_sel)) if n_sel > 1 else 0
    return n_sel - n_held, n_held


def check_inputs(cfg: DetoxConfig, out: str, stages) -> None:
    """Refuse bad options and input files (one line, FILE:LINE where a file was read) without loading the model or
    writing anything: names, ranges, the prompt file, the neutral text and the factual prompts."""
    cfg.check()
    if os.path.isfile(out):
        raise JaxeditError(f"{out} is a file, not a directory")
    if "select" in stages and cfg.prompts != "demo" and (os.path.exists(cfg.prompts)
                                                          or cfg.prompts.endswith((".jsonl", ".json"))):
        if os.path.isdir(cfg.prompts):
            raise JaxeditError(f"{cfg.prompts} is a directory, not a JSONL file of prompts")
        request_file(cfg.prompts, "prompts", cfg.skip_bad, check=prompt_of)  # every bad line named
    if "evaluate" in stages:
        read_texts(cfg.neutral)
        read_facts(cfg.factual)
    if cfg.pairs and "edit" in stages:
        n = len(read_pairs_file(cfg.pairs))  # every bad line named
        if max(cfg.profs_ranks) > n:
            raise JaxeditError(f"--profs-rank {max(cfg.profs_ranks)} is more than the {n} pair{'s' * (n > 1)} of "
                               f"{cfg.pairs} give")
    # without --pairs, --profs-pairs pairs are built (more samples drawn when needed): DetoxConfig.check bounds ranks
    if "aura" in cfg.methods and "edit" in stages:
        if cfg.aura_texts:
            read_aura_texts(cfg.aura_texts)  # every bad line named; both classes
        elif os.path.isfile(os.path.join(out, "selected.jsonl")) and os.path.isfile(os.path.join(out,
                                                                                                 "candidates.jsonl")):
            check_classes(study_aura_texts(out, cfg)[1], f"the selection samples of {out} (toxic: scored above "
                                                         f"--select-threshold {cfg.select_threshold:g})")


def plan(cfg: DetoxConfig, config, out: str, stages, setup: str = setup_key()) -> list:
    """What a run would do, as lines: per stage its work and what ``out`` already holds. Reads the inputs and the
    study folder only."""
    import dataclasses
    import json

    have = lambda name: os.path.isfile(os.path.join(out, name))  # noqa: E731
    lines = [f"plan for {out}/ with {cfg.model}"
             + (f" ({config.n_layers} layers)" if config is not None else " (layers: known once the model loads)")]
    if cfg.prompts == "demo" or os.path.isfile(cfg.prompts):
        n = len(read_prompts(cfg.prompts, cfg.limit, cfg.skip_bad))
        prompts = plural(n, "prompt")
    else:
        n, prompts = cfg.limit, f"{'up to ' + str(cfg.limit) if cfg.limit else 'every'} prompt of {cfg.prompts}"
    cands = len(read_rows(os.path.join(out, "candidates.jsonl"))) if have("candidates.jsonl") else 0
    sel = read_rows(os.path.join(out, "selected.jsonl")) if have("selected.jsonl") else None
    n_edit = sum(r["split"] == "edit" for r in sel) if sel is not None else None
    n_held = sum(r["split"] == "heldout" for r in sel) if sel is not None else None
    edited = f"{n_edit}" if n_edit is not None else "the selected"
    if "select" in stages:
        lines.append(f"select: {prompts} x {cfg.select_samples} continuations of {cfg.max_new_tokens} tokens"
                     + (f" ({n * cfg.select_samples} samples)" if n else "") + (f"; {plural(cands, 'prompt')} done earlier"
                                                                                 if cands else ""))
    if "localize" in stages and "delete" not in cfg.methods:
        lines.append("localize: skipped (no deletion grid in the methods)")
    elif "localize" in stages:
        lines.append(f"localize: {edited} edited prompts x {plural(len(cfg.trace_kinds), 'kind')} "
                     f"({', '.join(cfg.trace_kinds)}) x {cfg.trace_samples} noisy samples"
                     + (", saliency profiles" if "saliency-multi" in cfg.strategies else ""))
    grid = grid_run_ids(cfg) if "delete" in cfg.methods else []
    n_runs = len(grid)
    more = plan_method_runs(cfg)
    # this configuration's runs only: a folder may hold runs of other KL weights, strategies or ranks
    method_ids = [rid for rid, _, _ in more]
    edited_run = lambda rid: have(f"edits/{rid}.json")  # noqa: E731
    done = sum(map(edited_run, grid))
    if "edit" in stages and "delete" in cfg.methods:
        lines.append(f"edit: {plural(n_runs, 'run')} ({plural(len(cfg.strategies), 'strategy', 'strategies')} x "
                     f"{plural(len(cfg.objectives), 'objective')} x {plural(len(cfg.kl_weights), 'KL weight')}; "
                     f"random strategies x {plural(cfg.random_seeds, 'seed')}), each one "
                     f"batched edit of {edited} prompts" + (f"; {done} done earlier" if done else ""))
        if config is not None:
            loc = None
            if have("localize.json"):
                with open(os.path.join(out, "localize.json")) as f:
                    loc = json.load(f)
            try:
                layers = sorted({l for r in plan_runs(cfg, config.n_layers, loc) for l in r[5]})
                lines.append(f"  key statistics of layers {layers}")
            except JaxeditError:  # CT / saliency layers: known after the localize stage
                fixed = [s for s in cfg.strategies if s.startswith(("random", "topk"))]
                if fixed:
                    part = dataclasses.replace(cfg, strategies=tuple(fixed))
                    layers = sorted({l for r in plan_runs(part, config.n_layers, None) for l in r[5]})
                    lines.append(f"  key statistics of layers {layers} and the CT / saliency layers (known after "
                                 f"localize)")
        lines.append(f"  key statistics from {cfg.corpus or 'the default corpus'}"
                     + (f", {cfg.samples} texts" if cfg.samples else "") + (f" of <= {cfg.max_len} tokens"
                                                                             if cfg.max_len else ""))
    if "edit" in stages and more:
        for rid, method, st in more:
            if method == "dinm":
                what = (f"DINM on {edited} edited prompts in turn (safe / unsafe: the prompt's least / most toxic "
                        f"sample; the layer DINM locates per prompt), {st['steps']} steps, lr {st['lr']:g}, edit "
                        f"weight {st['edit_weight']:g}")
            elif method == "aura":
                src = (f"the {len(read_aura_texts(cfg.aura_texts)[0])} texts of {cfg.aura_texts}" if cfg.aura_texts
                       else "the selection's samples of the prompts not held out (toxic above --select-threshold)")
                what = f"AurA on {src}, layers {st['layers']}" + (
                    "" if is_authors_rule(st.get("min_auroc", 0.5)) else f", units with AUROC > {st['min_auroc']}")
            else:
                if cfg.pairs:
                    src = f"the {len(read_pairs_file(cfg.pairs))} pairs of {cfg.pairs}"
                else:
                    extra = extra_samples_needed(cfg, n_edit, st["pairs"]) if n_edit else None
                    src = (f"{st['pairs']} pairs of {edited} edited prompts' samples (most / least toxic of a prompt)"
                           + (f", {extra} more samples per prompt" if extra else "")
                           + ("" if n_edit else ", more samples drawn where the selection's are too few"))
                lay = ("layers " + " ".join(map(str, cfg.profs_layers)) if cfg.profs_layers
                       else "the upper layers" + (f" {default_layers(config.n_layers)[0]}-{config.n_layers - 1}"
                                                  if config is not None else ""))
                what = f"ProFS rank {st['rank']} from {src}, {lay}"
            lines.append(f"edit: run {rid}: {what}" + ("; done earlier" if edited_run(rid) else ""))
    if "evaluate" in stages:
        facts = len(read_facts(cfg.factual))
        each = (f"{cfg.eval_samples} continuations per edited prompt"
                + (f" ({cfg.eval_samples * n_edit} in all)" if n_edit is not None else "")
                + (f", {cfg.eval_samples * n_held} on held-out prompts" if n_held else "")
                + (f", {cfg.factual_samples} per factual prompt ({cfg.factual_samples * facts})" if facts else "")
                + ", perplexities")
        evaluated = {r["run"] for r in read_rows(os.path.join(out, "runs.jsonl"))} if have("runs.jsonl") else set()
        before = sum(rid in evaluated for rid in ["base"] + grid + method_ids)
        lines.append(f"evaluate: {plural(1 + n_runs + len(more), 'model')} (the unedited one and every run): {each}"
                     + (f"; {before} evaluated earlier" if before else ""))
    if "report" in stages:
        lines.append("report: table1, table2, summary, table_methods, aie_layers, frontier")
    units = {}
    if "select" in stages:
        units["select"] = None if n is None else max(n - cands, 0)
    if "localize" in stages and "delete" in cfg.methods:
        traced = len(read_rows(os.path.join(out, "trace", "results.jsonl"))) if have("trace/results.jsonl") else 0
        units["localize"] = None if n_edit is None else max(n_edit - traced, 0)
    if "edit" in stages:  # the deletions and the other methods' runs are timed apart (jaxedit.detox.estimate)
        units["edit"] = n_runs - done
        units["edit-methods"] = sum(not edited_run(rid) for rid in method_ids)
    if "evaluate" in stages:
        units["evaluate"] = sum(rid not in evaluated for rid in ["base"] + grid + method_ids)
    sizes = plan_sizes(cfg, out, stages, n, sel, more, edited_run, units)
    lines += estimate_lines(cfg, units, setup, config, sizes)
    lines += corpus_warnings(cfg, stages)
    return lines


def plan_sizes(cfg: DetoxConfig, out: str, stages, n, sel, more, edited_run, units) -> dict:
    """What the FLOP estimate of a stage never measured needs (:func:`jaxedit.detox.estimate.stage_flops`): the
    prompts' mean length, the edited and held-out prompt counts (before selection: as if every prompt were kept,
    and ``units`` sized so), the factual prompts, the neutral text, the DINM / ProFS / AurA runs left
    (with their settings), ProFS's extra samples, AurA's texts."""
    texts = ([r["prompt"] for r in sel] if sel else [p["prompt"] for p in read_prompts(cfg.prompts, cfg.limit,
                                                                                         cfg.skip_bad)]
             if cfg.prompts == "demo" or os.path.isfile(cfg.prompts) else [])
    left = [(m, st) for rid, m, st in more if not edited_run(rid)]
    sizes = {"methods": [m for m, _ in left], "method_runs": left, "bound": {}}
    if texts:
        sizes["prompt_tokens"] = sum(map(text_tokens, texts)) / len(texts)
    if sel is not None:
        sizes["edited"] = sum(r["split"] == "edit" for r in sel)
        sizes["heldout"] = sum(r["split"] == "heldout" for r in sel)
    elif n is not None:
        sizes["edited"], sizes["heldout"] = edited_bound(cfg, n)
        sizes["bound"] = {s: True for s in ("localize", "edit", "edit-methods", "evaluate")}
        if units.get("localize", 0) is None:
            units["localize"] = sizes["edited"]
    if any(m == "profs" for m, _ in left):
        if cfg.pairs:
            sizes["file_pairs"] = len(read_pairs_file(cfg.pairs))
        elif sizes.get("edited"):
            done = 0
            path = os.path.join(out, "pair_samples.jsonl")
            if os.path.isfile(path):
                done = min((len(r["samples"]) for r in read_rows(path)), default=0)
            need = max(extra_samples_needed(cfg, sizes["edited"], st["pairs"]) for m, st in left if m == "profs")
            sizes["extra_samples"] = max(need - done, 0)
    if any(m == "aura" for m, _ in left):
        if cfg.aura_texts:
            sizes["aura_texts"] = len(read_aura_texts(cfg.aura_texts)[0])
        elif sel is not None and os.path.isfile(os.path.join(out, "candidates.jsonl")):
            sizes["aura_texts"] = len(study_aura_texts(out, cfg)[0])
        elif n is not None:
            sizes["aura_texts"] = (n - sizes.get("heldout", 0)) * cfg.select_samples
    if "evaluate" in stages:
        facts = read_facts(cfg.factual)
        sizes["facts"] = len(facts)
        if facts:
            sizes["fact_tokens"] = sum(text_tokens(f if isinstance(f, str) else str(f)) for f in facts) / len(facts)
        sizes["neutral_tokens"] = sum(map(text_tokens, read_texts(cfg.neutral)))
    return sizes


def corpus_warnings(cfg: DetoxConfig, stages) -> list:
    """Warnings for inputs that need the datasets package when it is not installed: a stage would fail only once
    it starts (the prompts when select runs; the key statistics' corpus when the deletion grid's edits run)."""
    import importlib.util
    if importlib.util.find_spec("datasets") is not None:
        return []
    out = []
    if "select" in stages and cfg.prompts != "demo" and not os.path.exists(cfg.prompts) \
            and not cfg.prompts.endswith((".jsonl", ".json")):
        out.append(f"warning: --prompts {cfg.prompts} is a datasets name and the datasets package is not installed: "
                   f"the select stage will stop (pip install datasets, or give a JSONL file)")
    corpus = cfg.corpus or cfg.hparams.get("corpus") or cfg.hparams.get("mom2_corpus") or DEFAULT_CORPUS
    if "edit" in stages and "delete" in cfg.methods and corpus != "model" and not os.path.exists(corpus):
        out.append(f"warning: the key statistics' corpus {corpus} is a datasets name and the datasets package is not "
                   f"installed: the edit stage will stop unless statistics of its layers are cached (pip install "
                   f"datasets, or --corpus model, or --corpus FILE)")
    return out
