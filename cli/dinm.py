"""``jaxedit dinm``: DINM on SafeEdit cases, evaluated, with per-case results that a rerun resumes from.

Files written to ``--out``:

* ``run.json``: the run's settings (a rerun with other settings into the same folder is refused);
* ``results.jsonl``: one line per case, appended (and flushed) as each case finishes: the located layer and the
  per-layer distances, the losses per step, and for each evaluated model (``vanilla`` on the plain inputs,
  ``vanilla_suffix`` on the inputs with the suffix, ``dinm`` the edited model on the inputs with the suffix) the
  five answers with their scores and verdicts, the fluency, and the knowledge-constraint retention;
* ``summary.md`` / ``summary.csv``: DS, DG_onlyQ, DG_otherA, DG_otherQ, DG_otherAQ, fluency, retention per model;
* ``layers.png`` / ``layers.pdf``: the histogram of the located layers.
"""
from __future__ import annotations

import csv
import io
import json
import os

import click

import jaxedit
from jaxedit import calibration, runtime
from jaxedit.batching import round_up
from jaxedit.calibration import forward_flops
from jaxedit.cli.app import MODEL_HELP, cli, echo, with_mesh
from jaxedit.detox.estimate import text_tokens
from jaxedit.edit.dinm import DEFAULT_SUFFIX, DinmHparams
from jaxedit.errors import JaxeditError
from jaxedit.loading.peek import peek
from jaxedit.evaluate import safeedit as se
from jaxedit.evaluate.toxicity import check_scorer
from jaxedit.files import append_jsonl, read_rows, write_atomic, write_json, write_jsonl

ROWS = (("vanilla", "vanilla"), ("vanilla_suffix", "vanilla + suffix"), ("dinm", "DINM"))
COLUMNS = ("DS", "DG_onlyQ", "DG_otherA", "DG_otherQ", "DG_otherAQ", "fluency", "retention")


def _write_image(path: str, fig, fmt: str) -> None:
    tmp = os.path.join(os.path.dirname(path) or ".", "." + os.path.basename(path) + ".tmp")
    fig.savefig(tmp, format=fmt, dpi=150)
    os.replace(tmp, path)


def summary_rows(records: list) -> list:
    """[(label, {column: value})] for the models present in ``records``."""
    out = []
    for key, label in ROWS:
        recs = [r[key] for r in records if key in r]
        if len(recs) != len(records) or not recs:
            continue
        s = se.summarize(recs, [r["retention"] for r in records] if key == "dinm" else None)
        out.append((label, s))
    return out


def write_summary(out: str, records: list, n_layers: int) -> str:
    rows = summary_rows(records)
    fmt = lambda c, s: ("-" if c not in s else f"{s[c]:.2f}" if c == "fluency" else f"{s[c]:.1f}")
    md = [f"| model ({len(records)} cases) | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    md += [f"| {label} | " + " | ".join(fmt(c, s) for c in COLUMNS) + " |" for label, s in rows]
    text = "\n".join(md) + "\n"
    write_atomic(os.path.join(out, "summary.md"), text)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "cases", *COLUMNS])
    for label, s in rows:
        w.writerow([label, len(records), *[("" if c not in s else f"{s[c]:.4f}") for c in COLUMNS]])
    write_atomic(os.path.join(out, "summary.csv"), buf.getvalue())
    plot_layers(out, [r["layer"] for r in records], n_layers)
    return text


def plot_layers(out: str, layers: list, n_layers: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.bincount(np.asarray(layers, int), minlength=n_layers)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.22 * n_layers + 1.5), 2.8))
    ax.bar(np.arange(n_layers), counts, color="#b04a3a")
    ax.set_xlabel("located (toxic) layer")
    ax.set_ylabel("cases")
    ax.set_xlim(-0.7, n_layers - 0.3)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"DINM location over {len(layers)} cases")
    fig.tight_layout()
    for ext in ("png", "pdf"):
        _write_image(os.path.join(out, f"layers.{ext}"), fig, ext)
    plt.close(fig)


def check_run(out: str, settings: dict) -> None:
    path = os.path.join(out, "run.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except ValueError:
            old = None
        if old != settings:
            diff = sorted(k for k in set(settings) | set(old or {}) if (old or {}).get(k) != settings.get(k))
            raise JaxeditError(f"{out}/ holds a run with other settings ({', '.join(diff) or 'unreadable run.json'});"
                               f" use another --out or remove it")
    else:
        write_json(path, settings)


def calibration_key(model_name: str, hp: dict, max_new_tokens: int, sequential: bool, dtype: str, mesh) -> str:
    """What a case's time depends on: the model, the tuning and answer settings, the dtype and the mesh."""
    settings = ", ".join(f"{k}={hp[k]}" for k in ("steps", "locate", "layer", "batch_size", "kl_grad"))
    return (f"{calibration.model_key(model_name)} | {'sequential' if sequential else 'per-instance'} | {settings} | "
            f"suffix {bool(hp['suffix'])} | {max_new_tokens} tokens | {calibration.setup_key(dtype, mesh)}")


# A run never measured on this machine is priced from its FLOPs (jaxedit.calibration.from_flops): the compiles and
# set-up in probe compiles, and the fraction of the probe's FLOP rate the work reaches (greedy decoding one token a
# step, small tuning batches; above 1: the count is an upper bound, the bucket's padding and every step counted in
# full), read off `jaxedit dinm --cases demo --limit 2` on SmolLM2 on the 2-core CPU machine
# (benchmarks/bench_estimate.py, docs/benchmarks.md).
SETUP_UNITS = 27.0  # refit to the idle machine (measured / estimated 1.7 there; see jaxedit/detox/estimate.py)
RATE_FACTOR = 1.12


def case_flops(config, cases, suffix, steps: int, max_new_tokens: int, n_models: int) -> float:
    """Matmul FLOPs of the per-instance run's cases (token counts guessed as characters / 4, the plan tokenizes
    nothing): per case, 5 inputs answered greedily by each of ``n_models`` models (the prompt bucket, a multiple of
    64, plus ``max_new_tokens``); the location (2 forwards of the prompt with the safe and the unsafe answer);
    ``steps`` Adam steps (forward + backward, x 3) on the unsafe-to-safe NLL and the KL input (2 sequences); the
    retention (the knowledge constraint before and after)."""
    if not cases:
        return 0.0
    lens = [text_tokens(x) for c in cases for x in c.inputs(suffix) + c.inputs(None)]
    bucket = round_up(min(max(lens), config.max_positions - max_new_tokens), 64)
    total = 0.0
    for c in cases:
        p = text_tokens(with_suffix(c.prompt, suffix))
        seq = p + max(text_tokens(c.safe), text_tokens(c.unsafe))
        kc = text_tokens(with_suffix(c.kc_prompt, suffix)) + text_tokens(c.kc_answer)
        total += 5 * n_models * forward_flops(config, bucket + max_new_tokens)
        total += 2 * forward_flops(config, seq) + steps * 3 * 2 * forward_flops(config, seq)
        total += 2 * forward_flops(config, kc)
    return total


def with_suffix(text: str, suffix) -> str:
    return se.with_suffix(text, suffix)


def time_line(key: str, cases_left: int, sequential: bool, flops: float = None, config=None) -> str:
    """The plan's time line: the measured first case (compiles included) and seconds per later case, from earlier
    per-instance runs with the same settings on this machine (:mod:`jaxedit.calibration`); with none, the cases'
    ``flops`` (:func:`case_flops`) priced with this machine's probe (for the model's ``config``)."""
    if cases_left <= 0:
        return "time: nothing left to do (every case is in the folder)"
    # a --sequential run tunes and answers as many cases as per-instance runs (into one model, evaluated once at the
    # end): it is priced from the same FLOPs; its own runs are not timed per case, so no measured record exists
    stored = None if sequential else calibration.read("dinm").get(key, {}).get("cases")
    secs = calibration.extrapolate(stored, cases_left)
    if secs is None and flops is not None and config is not None:
        secs = calibration.from_flops(flops, SETUP_UNITS, calibration.machine(config), RATE_FACTOR)
        return (f"time: ~{calibration.human(secs)}* ({cases_left} case{'s' * (cases_left != 1)}; *: estimated from "
                f"FLOPs and a probe of this machine; "
                f"{'per-instance runs measure their cases' if sequential else 'this run measures it'})")
    if secs is None:
        return "time: no estimate yet for these settings on this machine (this run measures it)"
    return (f"time: ~{calibration.human(secs)} ({cases_left} cases; {stored['per_unit']:.0f} s a case after the "
            f"first, from runs on this machine, {stored['date']})")


def _case_record(case, layer_report, i):
    return {"id": case.id, "category": case.category, "layer": layer_report["layers"][i],
            "distances": layer_report["distances"][i], "losses": layer_report["losses"][i],
            "nll": layer_report["nll"][i], "kl": layer_report["kl"][i], "final": layer_report["final"][i],
            "steps": layer_report["steps"][i], "update_norm": layer_report["update_norm"][i],
            "truncated": layer_report["truncated"][i]}


@cli.command()
@click.option("--model", "model_name", default="smollm2", show_default=True, help=MODEL_HELP)
@click.option("--cases", "cases_file", required=True,
              help="SafeEdit JSON file (or JSONL), or 'demo' for the demo cases shipped with jaxedit")
@click.option("--out", default="dinm_out", show_default=True, type=click.Path(file_okay=False),
              help="output folder (a rerun resumes)")
@click.option("--scorer", default="profanity", show_default=True,
              help="toxicity scorer judging the answers: 'profanity', hf:PATH[#UNSAFE_LABEL] (e.g. SafeEdit's "
                   "safety classifier), or a classifier folder; safe = score below 0.5")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(min=1),
              help="greedy answer length (SafeEdit: 600; small by default for CPU)")
@click.option("--steps", default=10, show_default=True, type=click.IntRange(min=1), help="Adam steps")
@click.option("--lr", default=5e-4, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--edit-weight", default=0.1, show_default=True, type=click.FloatRange(min=0),
              help="weight of the NLL against the KL's 1 (the public config's kl_factor)")
@click.option("--weight-decay", default=0.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--kl-no-grad", is_flag=True, help="the public implementation's KL: computed, no gradient")
@click.option("--locate", type=click.Choice(["each", "first"]), default="each", show_default=True,
              help="locate per case (the paper) or once from the first case (the public implementation)")
@click.option("--layer", type=click.IntRange(min=0), help="edit this layer for every case (no location)")
@click.option("--suffix", default=None, help="system suffix appended to the prompts [the public implementation's]")
@click.option("--no-suffix", is_flag=True, help="append no suffix")
@click.option("--sequential", is_flag=True,
              help="edit all cases into one model (in order), then evaluate it; not resumable")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(min=1), help="with --sequential: cases tuned together")
@click.option("--limit", type=click.IntRange(min=1), help="only the first N cases")
@click.option("--dtype", default="float32", type=click.Choice(["float32", "bfloat16"]), show_default=True)
@click.option("--dry-run", is_flag=True,
              help="check the options and cases and print the plan, then stop before loading the model's weights")
@with_mesh
def dinm(model_name, cases_file, out, scorer, max_new_tokens, steps, lr, edit_weight, weight_decay, kl_no_grad,
         locate, layer, suffix, no_suffix, sequential, batch_size, limit, dtype, dry_run, mesh=None):
    """DINM (SafeEdit): locate each case's toxic layer, tune its MLP output projection, evaluate DS / DG /
    fluency / retention before and after."""
    import numpy as np

    if no_suffix and suffix is not None:
        raise JaxeditError("give --suffix or --no-suffix, not both")
    given = lambda name: click.get_current_context().get_parameter_source(name) in (  # noqa: E731
        click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    if given("batch_size") and not sequential:
        raise JaxeditError("--batch-size applies to --sequential runs only (a per-instance run tunes each case on "
                           "its own): add --sequential or leave --batch-size out")
    if given("locate") and layer is not None:
        raise JaxeditError("--locate does not apply with --layer (a given layer is edited for every case, nothing is "
                           "located): leave one out")
    sfx = None if no_suffix else (DEFAULT_SUFFIX if suffix is None else suffix)
    hp = dict(steps=steps, lr=lr, edit_weight=edit_weight, weight_decay=weight_decay, kl_grad=not kl_no_grad,
              locate=locate, layer=layer, suffix=sfx, batch_size=batch_size)
    DinmHparams(**dict(hp, layer=None)).check(1)  # ranges; the layer against the model's depth below
    check_scorer(scorer)
    cases = se.read_cases(cases_file, limit=limit)
    for c in cases:
        c.inputs()  # the evaluation needs the generalization test: fail before loading anything
    se.check_texts(cases)
    if os.path.isfile(out):
        raise JaxeditError(f"{out} is a file, not a directory")
    import jax

    if jax.process_count() > 1:
        raise JaxeditError("jaxedit dinm runs as one process: use --mesh over one host's devices")
    config, tok = peek(model_name)  # config and tokenizer without the weights, where that is cheap
    if config is not None:
        DinmHparams(**hp).check(config.n_layers)
    if tok is not None and config is not None:
        se.check_texts(cases, tok, sfx, config.max_positions)
    done_ids = set() if sequential else ({str(r["id"]) for r in read_rows(os.path.join(out, "results.jsonl"))}
                                         & {str(c.id) for c in cases})
    done_before = len(done_ids)
    where = (f"layer {layer} for every case" if layer is not None else "the first case's located layer for all"
             if locate == "first" else "the layer located per case")
    n_models = 3 if sfx else 2
    time_key = calibration_key(model_name, hp, max_new_tokens, sequential, dtype, mesh)
    lines = [
        f"plan for {out}/ with {model_name}" + (f" ({config.n_layers} layers)" if config is not None else ""),
        f"cases: {len(cases)} from {cases_file}" + (f"; {done_before} done earlier" if done_before else ""),
        f"edit: {'all cases into one model, in order' if sequential else 'each case on its own'}, {where}, "
        f"{steps} Adam steps at lr {lr:g}" + (f", suffix {sfx!r}" if sfx else ", no suffix"),
        f"evaluate: 5 inputs per case x {n_models} models ({'vanilla, vanilla + suffix, DINM' if sfx else 'vanilla, DINM'}), "
        f"greedy answers of <= {max_new_tokens} tokens ({5 * n_models * (len(cases) - done_before)} answers), "
        f"scored by {scorer}; knowledge-constraint retention",
        time_line(time_key, len(cases) - done_before, sequential,
                  None if config is None else case_flops(config, [c for c in cases if str(c.id) not in done_ids],
                                                         sfx, steps, max_new_tokens, n_models), config)]
    if dry_run:
        echo("\n".join(lines + ["dry run: nothing loaded, nothing written"]))
        return
    for line in lines:
        runtime.stage(line)
    model, tok = jaxedit.load(model_name, dtype=dtype, mesh=mesh)
    cfg = model.config
    DinmHparams(**hp).check(cfg.n_layers)
    se.check_texts(cases, tok, sfx, cfg.max_positions)
    # one prompt bucket for every generation of the run: one compile per batch size
    lens = [len(x) for c in cases for x in se.prompt_ids(tok, c.inputs(sfx) + c.inputs(None), cfg.max_positions)]
    bucket = round_up(min(max(lens), cfg.max_positions - max_new_tokens), 64)
    ev = dict(scorer=scorer, max_new_tokens=max_new_tokens, bucket=bucket)
    os.makedirs(out, exist_ok=True)
    settings = {"model": model_name, "cases": os.path.abspath(se.DEMO_CASES if cases_file == "demo" else cases_file),
                "scorer": scorer, "max_new_tokens": max_new_tokens, "dtype": dtype,
                "mode": "sequential" if sequential else "per-instance", "hparams": dict(hp)}
    check_run(out, settings)
    results_path = os.path.join(out, "results.jsonl")

    def evaluate_vanilla(cs):  # the unedited model on the plain inputs and on the inputs with the suffix
        plain = se.evaluate(model, cs, tokenizer=tok, suffix=None, **ev)
        return plain, (se.evaluate(model, cs, tokenizer=tok, suffix=sfx, **ev) if sfx else None)

    if sequential:
        if os.path.exists(results_path):
            os.remove(results_path)  # a sequential run starts over
        runtime.set_resume_note("a sequential run is not resumable: rerun it whole")
        runtime.stage(f"dinm: {len(cases)} cases edited into one model in order ({steps} steps each), then evaluated")
        with runtime.bar(len(cases), "dinm (sequential)", unit="case") as bar:
            edited, rep = jaxedit.dinm(model, cases, tokenizer=tok, per_instance=False, progress=bar.update, **hp)
        runtime.stage(f"answering the {len(cases)} cases' 5 inputs with the unedited model (compiles the sampler)")
        plain, withs = evaluate_vanilla(cases)
        runtime.stage("answering them with the edited model")
        after = se.evaluate(edited, cases, tokenizer=tok, suffix=sfx, **ev)
        runtime.stage("knowledge-constraint retention")
        kept = se.retention(model, edited, tok, cases, suffix=sfx)
        recs = []
        for i, c in enumerate(cases):
            rec = _case_record(c, rep, i)
            rec.update(vanilla=plain[i], dinm=after[i], retention=kept[i])
            if withs:
                rec["vanilla_suffix"] = withs[i]
            recs.append(rec)
        write_jsonl(results_path, recs)
        done = {str(c.id): r for c, r in zip(cases, recs)}
    else:
        done = {str(r["id"]): r for r in read_rows(results_path)}
        todo = [c for c in cases if str(c.id) not in done]
        calibration.begin("dinm")  # the first case's time includes the compiles (and the first case's location)
        if locate == "first" and layer is None:  # the public implementation: the first case's layer for all
            hp["layer"] = jaxedit.dinm_locate(model, cases[:1], tokenizer=tok)[0][0]
        runtime.set_resume_note(lambda: f"{len(done)} of {len(cases)} cases kept in {out}/results.jsonl; rerun to "
                                        f"resume")
        runtime.stage(f"dinm: {len(todo)} of {len(cases)} cases to do ({len(cases) - len(todo)} done earlier); per "
                      f"case: answer its 5 inputs with the unedited model, locate, tune {steps} steps, answer with "
                      f"the edited model, retention")
        with calibration.TimedBar(runtime.bar(len(cases), "dinm", unit="case", initial=len(cases) - len(todo)),
                                  "dinm") as bar:
            for i, c in enumerate(todo):
                say = runtime.stage if i == 0 else (lambda msg: None)  # the first case compiles every program
                say(f"case {c.id}: answering its 5 inputs with the unedited model (compiling the sampler)")
                plain, withs = evaluate_vanilla([c])
                say(f"case {c.id}: locating and tuning (compiling the location and the tuning loop)")
                edited, rep = jaxedit.dinm(model, [c], tokenizer=tok, per_instance=True, **hp)
                if rep["distances"][0] is None:  # a given layer: the case's own distances for the record
                    rep["distances"] = [list(map(float, jaxedit.dinm_locate(model, [c], tokenizer=tok)[1][0]))]
                say(f"case {c.id}: answering with the edited model, then the knowledge-constraint retention")
                after = se.evaluate(edited, [c], tokenizer=tok, suffix=sfx, **ev)
                before_kc = se.answer_argmax(model, tok, [c], sfx)
                kept = se.retention(model, edited, tok, [c], suffix=sfx, before=before_kc)
                rec = _case_record(c, rep, 0)
                rec.update(vanilla=plain[0], dinm=after[0], retention=kept[0], seconds_edit=rep["seconds"])
                if withs:
                    rec["vanilla_suffix"] = withs[0]
                append_jsonl(results_path, rec)  # durable: a killed run resumes after this case
                done[str(c.id)] = rec
                bar.update(1)
        rec = calibration.measured("dinm")
        if rec is not None:
            calibration.store("dinm", time_key, "cases", rec)
    records = [done[str(c.id)] for c in cases]
    table = write_summary(out, records, cfg.n_layers)
    echo(table, nl=False)
    hist = np.bincount([r["layer"] for r in records], minlength=cfg.n_layers)
    echo("located layers: " + ", ".join(f"{l}: {n}" for l, n in enumerate(hist) if n))
    echo(f"wrote {out}/ (results.jsonl, summary.md, summary.csv, layers.png, layers.pdf)")
