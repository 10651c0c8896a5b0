"""Commands of the edit stage: ``jaxedit stats``, ``edit``, ``delete`` and ``export``."""
from __future__ import annotations

import json
import os
from typing import Optional

import click

import jaxedit
from jaxedit import runtime
from jaxedit.cache import cache_dir
from jaxedit.cli.app import (DRY_RUN, DRY_RUN_END, MODEL_HELP, SKIP_BAD, Renamed, cli, echo, output_folder,
                             request_file, with_mesh, with_options)
from jaxedit.cli.sequence import check_options, detect_kind, read_edit_file, run_sequence
from jaxedit.edit.alphaedit import DEFAULT_THRESHOLD
from jaxedit.calls import STATS_ALIASES, check_names
from jaxedit.edit.memit import EditHparams, hparams_for, parse_request
from jaxedit.edit.stats import DEFAULT_CORPUS
from jaxedit.errors import JaxeditError
from jaxedit.evaluate.editing import DEMO_COUNTERFACT
from jaxedit.layer_selection import check_layers
from jaxedit.edit.ultraedit import resolve_modules
from jaxedit.loading.peek import peek
from jaxedit.sharding import is_main_process


def parse_layers(text):
    """"13-17", "4,6,8" or "4-6,9" -> sorted layer list."""
    out = set()
    try:
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                a, b = (int(v) for v in part.split("-"))
                if b < a:
                    raise ValueError
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise JaxeditError(f"--layers must look like 13-17 or 4,5,6 (got {text!r})") from None
    if not out:
        raise JaxeditError("--layers is empty")
    return sorted(out)


def parse_hparams(items):
    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep:
            raise JaxeditError(f"--hparam must be NAME=VALUE (got {item!r})")
        try:
            out[key.strip()] = json.loads(val)
        except json.JSONDecodeError:
            out[key.strip()] = val
    return out


_STATS_OPTIONS = [
    click.option("--corpus", default=None,
                 help="key-statistics corpus: a .txt/.jsonl file or folder; 'model' (text sampled from the model "
                      "itself: works offline, use --corpus model without network); or a datasets name[:config] "
                      "[default: wikitext:wikitext-103-raw-v1, which needs the datasets package and network; when it "
                      "is unreachable, cached statistics of another corpus for the same model and layers are used, "
                      "with a line saying which]"),
    click.option("--stats-samples", "--samples", "n_samples", cls=Renamed, type=click.IntRange(min=1), default=None,
                 help="corpus texts for the key statistics [100000]"),
    click.option("--max-len", type=click.IntRange(min=2), default=None,
                 help="tokens per text [the model's context, <= 1024]"),
    click.option("--stats-float64", is_flag=True, help="accumulate the statistics in float64"),
]


def stats_hparams(corpus, n_samples, max_len, stats_float64) -> dict:
    """The key-statistics options as hyperparameters (the names jaxedit.memit and jaxedit.layer_stats take)."""
    hp = {}
    if corpus is not None:
        hp["corpus"] = corpus
    if n_samples is not None:
        hp["stats_samples"] = n_samples
    if max_len is not None:
        hp["max_len"] = max_len
    if stats_float64:
        hp["stats_precision"] = "float64"
    return hp


def check_hparam_names(hp: dict) -> dict:
    """--hparam names checked before the model loads (aliases renamed; unknown names refused with the closest)."""
    import dataclasses

    try:
        return check_names(hp, [f.name for f in dataclasses.fields(EditHparams)] + ["preset"], STATS_ALIASES)
    except JaxeditError as e:
        raise JaxeditError(f"--hparam: {e}") from None


def model_config(model_name):
    """The model's config without its weights (None for a hub id that cannot be read offline: checked at load)."""
    try:
        return peek(model_name, tokenizer=False)[0]
    except JaxeditError:
        hub_id = (not os.path.exists(model_name) and not os.path.isabs(model_name) and
                  not model_name.startswith(".") and model_name.count("/") <= 1 and not model_name.endswith(".gguf"))
        if not hub_id or model_name == "smollm2":
            raise
        return None


def corpus_warning(corpus) -> Optional[str]:
    """A line for the plan when the statistics' corpus is the default one and the datasets package is missing."""
    import importlib.util

    if (corpus or DEFAULT_CORPUS) == DEFAULT_CORPUS and importlib.util.find_spec("datasets") is None:
        return (f"warning: the default statistics corpus ({DEFAULT_CORPUS}) needs the datasets package and the "
                f"network; without them only statistics cached earlier can be used (--corpus model works offline)")
    return None


def stats_line(hp: dict, layers) -> str:
    return (f"key statistics of layers {list(layers)}: {hp.get('stats_samples', 100_000)} texts of "
            f"{hp.get('corpus', DEFAULT_CORPUS)}, <= {hp.get('max_len') or 'the model context (at most 1024)'} tokens "
            f"(cached under {cache_dir()}/stats/ after the first run)")


def _edit_command(mode, model_name, requests_file, layers, out, export_hf_dir, corpus, n_samples, max_len,
                  stats_float64, preset, solve_float64, hparam, dtype, skip_bad, limit=None, dry_run=False,
                  kl_weight=None, objective=None, mesh=None, sequence=None):
    out = out or f"{mode}_out"
    for d in (out, export_hf_dir):
        if d and os.path.isfile(d):
            raise JaxeditError(f"{d} is a file, not a directory")
    if sequence is not None and sequence["active"]:
        rf = None
        kind, records, requests, wheres = sequence["read"]
        n = len(requests)
    else:
        rf = request_file(requests_file, "requests", skip_bad)
        if limit is not None:
            rf.items = rf.items[:limit]
        n = len(rf.items)
    hp = parse_hparams(hparam)
    hp.update(stats_hparams(corpus, n_samples, max_len, stats_float64))
    if solve_float64:
        hp["solve_dtype"] = "float64"
    if preset:
        hp["preset"] = preset
    if objective:
        hp["delete_objective"] = objective
    hp = check_hparam_names(hp)
    lay = parse_layers(layers) if layers else None
    config = model_config(model_name)
    if config is not None:  # layers and hyperparameters checked against the model before it loads
        p = dict(hp)
        preset_name = p.pop("preset", None)
        base = hparams_for(config, preset_name, **p)
        lay_used = check_layers(config.n_layers, lay if lay is not None else base.layers)
    else:
        lay_used = lay
    what = f"{mode} {n} request{'s' * (n != 1)}"
    if sequence is not None and sequence["active"]:
        bs = sequence["batch_size"] or n
        nb = -(-n // bs)
        what = (f"{sequence['method']}: {n} {'edit' if kind != 'requests' else 'request'}{'s' * (n != 1)} from "
                f"{'demo' if requests_file == DEMO_COUNTERFACT else requests_file} ({kind}), {nb} batch{'es' * (nb != 1)} of {bs}"
                + ("; then the metrics of all edits" if sequence["evaluate"] else ""))
    ultra = sequence is not None and sequence["active"] and sequence["method"] == "ultraedit"
    lines = [f"model: {model_name}" + (f" ({config.family}, {config.n_layers} layers)" if config else ""), what,
             f"layers: {list(lay_used) if lay_used is not None else 'the preset (checked when the model loads)'}"]
    if ultra:  # UltraEdit edits the MLP input projections and needs no key statistics
        mods = resolve_modules(config, lay) if config is not None else None
        lines[-1] = ("edited projections: " + ", ".join(
            f"{n} {[l for m, l in mods if m == n]}" for n in dict.fromkeys(m for m, _ in mods))) if mods else \
            "edited projections: the defaults (checked when the model loads)"
    elif lay_used is not None:
        lines.append(stats_line(hp, lay_used))
    warn = None if ultra else corpus_warning(hp.get("corpus"))
    if warn:
        lines.append(warn)
    lines.append(f"writes {out}/" + (f" and {export_hf_dir}/" if export_hf_dir else ""))
    if dry_run:
        echo("\n".join(lines + [DRY_RUN_END]))
        return
    if warn:
        runtime.stage(warn)
    with output_folder(out, export_hf_dir):
        if rf is None:  # it loads the model itself, so that the unedited one can go before the edited is written
            return run_sequence(lambda: jaxedit.load(model_name, dtype=dtype, mesh=mesh), kind, records, requests,
                                wheres, layers=lay, out=out, hp=hp,
                                **{k: v for k, v in sequence.items() if k not in ("active", "read")})
        other = "jaxedit delete" if mode == "edit" else "jaxedit edit"
        model, tok = jaxedit.load(model_name, dtype=dtype, mesh=mesh)
        rf.check(lambda r: parse_request(r, tok, mode, other=other) and None)  # FILE:LINE errors before any work
        runtime.set_resume_note(f"nothing written to {out}/ (it is written when the edit is complete)")
        if mode == "edit":
            edited, report = jaxedit.memit(model, rf.objects, layers=lay, tokenizer=tok, donate=True, **hp)
        else:
            edited, report = jaxedit.delete(model, rf.objects, layers=lay, kl_weight=kl_weight, tokenizer=tok,
                                            donate=True, **hp)
        del model  # used up by the edit (donate=True: its edited projection became the edited model's)
        report["model"] = model_name
        for r, line in zip(report["requests"], rf.lines):
            r["line"] = line
        runtime.stage(f"writing {out}/")
        jaxedit.save(edited, out, tokenizer=tok)  # several processes: each saves its shards
        if is_main_process():
            tmp = os.path.join(out, ".report.json.tmp")
            with open(tmp, "w") as f:
                json.dump(report, f, indent=1)
            os.replace(tmp, os.path.join(out, "report.json"))
        if export_hf_dir:
            runtime.stage(f"exporting {export_hf_dir}/")
            jaxedit.export_hf(edited, export_hf_dir, tokenizer=tok)
    if not is_main_process():
        return
    tracked = "target" if mode == "edit" else "suppressed"
    for r in report["requests"]:
        toks = ", ".join(f"{t!r} {b:.4f} -> {a:.4f}" for t, b, a in zip(r["tokens"], r["p_before"], r["p_after"]))
        echo(f"{requests_file}:{r['line']}: {r['prompt']!r}: {tracked} {toks}; original {r['original_argmax']!r} "
                   f"{r['p_original_before']:.4f} -> {r['p_original_after']:.4f}; now argmax {r['argmax_after']!r}")
    echo(f"edited layers {report['layers']} in {report['seconds']:.1f} s; wrote {out}/ (orbax checkpoint, "
               f"report.json){'; exported ' + export_hf_dir if export_hf_dir else ''}")


_EDIT_OPTIONS = [
    click.option("--model", "model_name", default="smollm2", show_default=True, help=MODEL_HELP),
    click.option("--requests", "requests_file", required=True, type=click.Path(dir_okay=False),
                 help="JSONL, one request a line: {\"prompt\", \"subject\" or \"span\", \"target\" (edit) or "
                      "\"suppress\" (delete), optional \"paraphrases\", \"neighborhood\"}; jaxedit edit also "
                      "reads CounterFact and zsRE files, and 'demo' (the shipped demo CounterFact set)"),
    click.option("--limit", type=click.IntRange(min=1), help="only the first N requests or records"),
    click.option("--layers", help="layers to edit, e.g. 13-17 or 4,5,6 [the preset's / derived from depth]"),
    click.option("--out", type=click.Path(file_okay=False),
                 help="folder for the edited model (jaxedit.load reads it) and report.json [edit_out / delete_out]"),
    click.option("--export-hf", "export_hf_dir", type=click.Path(file_okay=False),
                 help="also write a Hugging Face checkpoint folder"),
    *_STATS_OPTIONS,
    click.option("--preset", type=click.Choice(["gpt2-xl", "llama-7b"]), help="hyperparameter preset"),
    click.option("--solve-float64", is_flag=True, help="solve in float64 on the host (the reference's way)"),
    click.option("--hparam", multiple=True, help="override one hyperparameter: NAME=VALUE (repeatable)"),
    click.option("--dtype", default="float32", type=click.Choice(["float32", "bfloat16"]), show_default=True),
    SKIP_BAD,
    DRY_RUN,
]


@cli.command()
@with_options(_EDIT_OPTIONS)
@click.option("--method", type=click.Choice(["memit", "alphaedit", "ultraedit"]), default="memit", show_default=True,
              help="memit, alphaedit (MEMIT's update projected onto the null space of the key statistics), or "
                   "ultraedit (closed-form updates of the MLP input projections, one per turn of --batch-size "
                   "edits; --layers: both of LLaMA's input projections / GPT-2's c_fc at those layers)")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="edit the requests in consecutive batches of this many, each on the model the previous ones "
                   "left (checkpointed under OUT/sequence/: a killed run resumes) [all in one batch]")
@click.option("--eval", "evaluate", is_flag=True,
              help="after the last batch, CounterFact's or zsRE's metrics of all edits (--requests must be such "
                   "a file): OUT/eval.json and a summary table")
@click.option("--eval-every", type=click.IntRange(min=1), default=None,
              help="with --eval: also the metrics of the edits so far every K batches (OUT/curve.jsonl, "
                   "curve.png/.pdf)")
@click.option("--eval-generative", is_flag=True,
              help="with --eval: also the generative scores (greedy decoding from the prompt; success when the "
                   "continuation begins with the target): gen_efficacy, gen_generalization, gen_specificity")
@click.option("--null-space-threshold", default=None,
              help="alphaedit: eigenvalues of the key statistics below this span the null space, or energy:F "
                   f"(the smallest eigenvalues holding at most 1-F of the trace) [{DEFAULT_THRESHOLD:g}]")
@click.option("--l2", type=click.FloatRange(min=0), default=None, help="alphaedit: the solve's ridge term [10]")
@click.option("--lr", type=float, default=None, help="ultraedit: the step on the normalized gradients [1e-6]")
@click.option("--nas", is_flag=True,
              help="memit / alphaedit: norm-anchored scaling of the target vectors (AlphaEdit + NAS): each v* "
                   "rescaled to the mean norm of clean edits on the unedited model, or not written above twice it")
@with_mesh
def edit(method, batch_size, evaluate, eval_every, null_space_threshold, l2, lr, nas, **kw):
    """MEMIT or AlphaEdit: rewrite subject -> target associations, in one batch or sequentially; CounterFact and
    zsRE files (and 'demo', the shipped CounterFact set; 'synthetic:N[:SEED]', N invented zsRE-format edits made
    offline) are read and evaluated as the papers do."""
    generative = kw.pop("eval_generative")
    if nas:
        if method == "ultraedit":
            raise JaxeditError("--nas rescales MEMIT's and AlphaEdit's target vectors; UltraEdit has none "
                               "(--method memit or alphaedit)")
        kw["hparam"] = tuple(kw["hparam"]) + ("nas=true",)
    if kw["requests_file"] == "demo":
        kw["requests_file"] = DEMO_COUNTERFACT
    if generative and not evaluate:
        raise JaxeditError("--eval-generative needs --eval")
    kind = detect_kind(kw["requests_file"])
    if kw["requests_file"].startswith("synthetic:") and kw["model_name"] != "smollm2":
        runtime.stage(f"note: the synthetic stream's neighborhood prompts are facts the default model (smollm2) "
                      f"knows, not necessarily {kw['model_name']} (jaxedit.synthetic_edits(n, model=...) probes "
                      f"another model's)")
    given = {"--corpus": kw["corpus"] is not None, "--stats-samples": kw["n_samples"] is not None,
             "--max-len": kw["max_len"] is not None, "--stats-float64": kw["stats_float64"],
             "--preset": bool(kw["preset"]), "--solve-float64": kw["solve_float64"], "--hparam": bool(kw["hparam"])}
    check_options(method, batch_size, evaluate, eval_every, kind, null_space_threshold, l2, lr=lr,
                  memit_options=[k for k, v in given.items() if v])
    active = kind != "requests" or method != "memit" or batch_size is not None or evaluate
    if active and kw["export_hf_dir"]:
        raise JaxeditError("--export-hf is for a single MEMIT batch; after a sequential edit run `jaxedit export "
                           "--model OUT/model --out DIR`")
    read = read_edit_file(kw["requests_file"], kind, kw["skip_bad"], kw["limit"]) if active else None
    _edit_command("edit", sequence={"active": active, "read": read, "method": method, "batch_size": batch_size,
                                    "evaluate": evaluate, "eval_every": eval_every,
                                    "null_space_threshold": null_space_threshold, "l2": l2,
                                    "generative": generative, "model_name": kw["model_name"], "lr": lr}, **kw)


@cli.command()
@with_options(_EDIT_OPTIONS)
@click.option("--kl-weight", default=0.0625, show_default=True, type=click.FloatRange(min=0),
              help="weight of KL(P_orig || P_edited) on '{subject} is a'")
@click.option("--delete-objective", "--objective", "objective", cls=Renamed, type=click.Choice(["logp", "unlikelihood"]),
              default="logp", show_default=True,
              help="logp: the reference's mean log P (no floor); unlikelihood: -log(1 - P), which the KL weight "
                   "balances (docs/editing.md)")
@with_mesh
def delete(kl_weight, objective, **kw):
    """Das et al.'s deletion: push the "suppress" token(s) away from each prompt."""
    if kw["requests_file"] == "demo":
        raise JaxeditError("--requests demo is the demo CounterFact set, for jaxedit edit; jaxedit delete reads a "
                           "JSONL file of deletion requests ({\"prompt\", \"subject\", \"suppress\"} a line)")
    _edit_command("delete", kl_weight=kl_weight, objective=objective, **kw)


@cli.command()
@click.option("--model", "model_name", default="smollm2", show_default=True, help=MODEL_HELP)
@click.option("--layers", required=True, help="e.g. 13-17 or 4,5,6 (all in one pass)")
@with_options(_STATS_OPTIONS)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--dtype", default="float32", type=click.Choice(["float32", "bfloat16"]), show_default=True)
@DRY_RUN
@with_mesh
def stats(model_name, layers, corpus, n_samples, max_len, stats_float64, batch_size, dtype, dry_run, mesh=None):
    """Key statistics E[k k^T] of the MLP output projection's input, for MEMIT (cached; a killed run resumes)."""
    import numpy as np

    layers = parse_layers(layers)
    config = model_config(model_name)
    if config is not None:
        check_layers(config.n_layers, layers)
        if max_len is not None and max_len > config.max_positions:
            raise JaxeditError(f"--max-len must be <= the model's {config.max_positions} positions (got {max_len})")
    hp = stats_hparams(corpus, n_samples, max_len, stats_float64)
    lines = [f"model: {model_name}" + (f" ({config.family}, {config.n_layers} layers)" if config else ""),
             stats_line(hp, layers) + f", batches of {batch_size}"]
    warn = corpus_warning(corpus)
    if warn:
        lines.append(warn)
    if dry_run:
        echo("\n".join(lines + [DRY_RUN_END]))
        return
    if warn:
        runtime.stage(warn)
    model, tok = jaxedit.load(model_name, dtype=dtype, mesh=mesh)
    res = jaxedit.layer_stats(model, layers, tokenizer=tok, batch_size=batch_size,
                              **{"precision" if k == "stats_precision" else k: v for k, v in hp.items()})
    if not is_main_process():
        return
    for l, c in sorted(res.items()):
        echo(f"layer {l}: [{c.shape[0]} x {c.shape[1]}], trace {float(np.trace(c)):.4g}")
    echo(f"cached under {cache_dir()}/stats/")


@cli.command()
@click.option("--model", "model_name", required=True, help=MODEL_HELP)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Hugging Face checkpoint folder")
@with_mesh
@DRY_RUN
def export(model_name, out, dry_run, mesh=None):
    """Write a model (e.g. an edited one saved by `jaxedit edit`) as a Hugging Face checkpoint folder."""
    if os.path.isfile(out):
        raise JaxeditError(f"{out} is a file, not a directory")
    config = model_config(model_name)
    if dry_run:
        echo("\n".join([f"model: {model_name}" + (f" ({config.family}, {config.n_layers} layers)" if config else ""),
                        f"writes {out}/ (config.json, model.safetensors, tokenizer)", DRY_RUN_END]))
        return
    model, tok = jaxedit.load(model_name, mesh=mesh)
    runtime.stage(f"writing {out}/")
    jaxedit.export_hf(model, out, tokenizer=tok)
    if is_main_process():
        echo(f"wrote {out}/ (config.json, model.safetensors, tokenizer)")
