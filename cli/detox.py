"""``jaxedit detox``: the toxic-memory study (select, localize, edit, evaluate, report) as one resumable command."""
from __future__ import annotations

import click

import jaxedit
from jaxedit import runtime
from jaxedit.cli.app import MODEL_HELP, SKIP_BAD, cli, request_file, with_mesh, with_options
from jaxedit.cli.edit import _STATS_OPTIONS, parse_hparams
from jaxedit.detox.config import STAGES, DetoxConfig
from jaxedit.detox.data import prompt_of, read_facts, read_texts
from jaxedit.loading.peek import peek
from jaxedit.detox.pipeline import run_study
from jaxedit.errors import JaxeditError


def _csv(text, what, cast=str):
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise JaxeditError(f"--{what} is empty")
    try:
        return tuple(cast(t) for t in items)
    except ValueError:
        raise JaxeditError(f"--{what} must be a comma list of numbers (got {text!r})") from None


@cli.command()
@click.option("--prompts", required=True,
              help="JSONL of prompts (RealToxicityPrompts lines or {\"prompt\": ...}), 'demo' (the shipped demo "
                   "openings), or a datasets name such as allenai/real-toxicity-prompts")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="the study's folder (reruns resume)")
@click.option("--stage", default="all", show_default=True,
              type=click.Choice(["select", "localize", "edit", "evaluate", "report", "all"]))
@click.option("--model", "model_name", default="smollm2", show_default=True, help=MODEL_HELP)
@click.option("--limit", type=int, help="read at most this many prompts")
@click.option("--scorer", default="profanity", show_default=True,
              help="toxicity scorer: 'profanity' (offline), hf:PATH[#LABEL] (a classifier folder; needs torch)")
@click.option("--chunker", default="phrases", show_default=True, help="phrases (offline), words, spacy[:MODEL]")
@click.option("--select-samples", default=25, show_default=True, type=int, help="samples per prompt in selection")
@click.option("--eval-samples", default=10, show_default=True, type=int, help="samples per prompt in evaluation")
@click.option("--max-new-tokens", default=20, show_default=True, type=int)
@click.option("--top-p", default=0.9, show_default=True, type=float, help="nucleus sampling")
@click.option("--select-threshold", default=0.5, show_default=True, type=float,
              help="keep prompts whose continuations' mean toxicity is above this")
@click.option("--prompt-threshold", default=0.5, show_default=True, type=float,
              help="keep prompts whose own toxicity is below this")
@click.option("--value", default="first", show_default=True, type=click.Choice(["first", "toxic-word"]),
              help="the token deleted: the first token of the most toxic continuation, or of its most toxic word")
@click.option("--heldout-fraction", default=0.25, show_default=True, type=float,
              help="selected prompts held out of editing, evaluated to see whether edits generalize")
@click.option("--max-prompts", type=int, help="edit at most this many selected prompts (the most toxic first)")
@click.option("--trace-kinds", default="hidden,mlp,attn", show_default=True)
@click.option("--trace-samples", default=10, show_default=True, type=int)
@click.option("--window", default=10, show_default=True, type=int)
@click.option("--strategies", default="random-single,random-multi,topk-single,topk-multi,ct-single,ct-multi,"
              "saliency-multi", show_default=True, help="layer choices (comma list)")
@click.option("--objectives", default="edit-nontoxic,edit-canned,delete", show_default=True)
@click.option("--kl-weights", default="0.0625", show_default=True, help="comma list; several draw the frontier")
@click.option("--n-layers", type=int, help="layers of the multi strategies [6 of 48, scaled to the depth]")
@click.option("--topk", type=int, help="K of the top-K strategies [15 of 48, scaled to the depth]")
@click.option("--random-seeds", default=5, show_default=True, type=int, help="seeds averaged for random choices")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--canned", default=" Sorry, I cannot engage with provocative prompts", show_default=True)
@with_options(_STATS_OPTIONS)
@click.option("--delete-objective", default="logp", show_default=True, type=click.Choice(["logp", "unlikelihood"]))
@click.option("--hparam", multiple=True, help="override one editing hyperparameter: NAME=VALUE (repeatable)")
@click.option("--neutral", default="neutral", show_default=True, help="a .txt file for the neutral perplexity")
@click.option("--factual", default="facts", show_default=True,
              help="JSONL of factual prompts ('facts': the shipped set; '' for none)")
@click.option("--factual-samples", default=2, show_default=True, type=int)
@click.option("--obfuscate/--no-obfuscate", default=True, show_default=True,
              help="star the vowels of the chunk's tokens in the plots")
@click.option("--batch-size", default=8, show_default=True, type=int, help="prompts per sampling / tracing call")
@click.option("--dtype", default="float32", type=click.Choice(["float32", "bfloat16"]), show_default=True)
@SKIP_BAD
@with_mesh
def detox(prompts, out, stage, model_name, trace_kinds, strategies, objectives, kl_weights, hparam, dtype,
          stats_float64, n_samples, skip_bad, mesh=None, **kw):
    """Das et al.'s toxic-memory study: select toxic prompts, localize the toxic chunk, edit or delete with every
    layer strategy, evaluate toxicity, perplexity and fluency, and report the tables and figures.

    Writes candidates.jsonl, selected.jsonl, trace/, localize.json, edits/, runs.jsonl, summary.jsonl,
    table1/table2 (.md, .csv), summary.md, aie_layers.png/pdf and frontier.png/pdf into OUT.
    """
    import os

    hp = parse_hparams(hparam)
    if stats_float64:
        hp["mom2_precision"] = "float64"
    cfg = DetoxConfig(prompts=prompts, model=model_name, trace_kinds=_csv(trace_kinds, "trace-kinds"),
                      strategies=_csv(strategies, "strategies"), objectives=_csv(objectives, "objectives"),
                      kl_weights=_csv(kl_weights, "kl-weights", float), hparams=hp, samples=n_samples,
                      skip_bad=skip_bad, **kw)
    stages = STAGES if stage == "all" else (stage,)
    check_inputs(cfg, out, stages)  # every option and input file, before anything is loaded or written
    import jax

    if jax.process_count() > 1:
        raise JaxeditError("jaxedit detox runs as one process: use --mesh over one host's devices")
    config, _ = peek(model_name, tokenizer=False)  # the config alone: layer counts and hparams checked unloaded
    if config is not None:
        cfg.check_model(config)
    runtime.set_resume_note(f"finished steps are kept in {out}/; rerun the same command to resume")
    model, tok = jaxedit.load(model_name, dtype=dtype, mesh=mesh)
    cfg.check_model(model.config)
    run_study(model, tok, cfg, out, stages)
    if "report" in stages:
        table = os.path.join(out, "table2.md")
        click.echo(open(table).read() if os.path.isfile(table) else "")
    click.echo(f"wrote {out}/ (stage {stage})")


def check_inputs(cfg: DetoxConfig, out: str, stages) -> None:
    """Refuse bad options and input files (one line, FILE:LINE where a file was read) without loading the model or
    writing anything: names, ranges, the prompt file, the neutral text and the factual prompts."""
    import os

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
