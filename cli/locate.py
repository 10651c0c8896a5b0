"""Commands of the locate stage: ``jaxedit trace`` (causal tracing) and ``jaxedit saliency``."""
from __future__ import annotations

import json
import os
import types

import click

import jaxedit
from jaxedit import runtime
from jaxedit.cli.app import DRY_RUN, DRY_RUN_END, MODEL_HELP, SKIP_BAD, Renamed, cli, echo, request_file, with_mesh
from jaxedit.errors import JaxeditError
from jaxedit.loading.peek import peek
from jaxedit.locate import trace_files as tf
from jaxedit.locate.saliency import encode_example, saliency_batch
from jaxedit.locate.tracing import check_options, parse_noise, prepare_inputs, resolve_noise_level, trace_batch
from jaxedit.sharding import broadcast_json, describe, is_main_process


def _show(value, width=40):
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _noise_note(noise, level, per_prompt, n):
    mode, k = parse_noise(noise)
    if mode != "std":
        return f"noise level {level:.4g}"
    if per_prompt:
        return f"noise {noise}: {k:g} x std of each prompt's own span embeddings (--noise-per-prompt)"
    over = "the span's token embeddings" if n == 1 else (
        f"the token embeddings of all {n} prompts' spans; --noise-per-prompt for one level per prompt")
    return f"noise level {level:.4g} = {noise}: {k:g} x std of {over}"


def _plural(n, word):
    return f"{n} {word}{'s' * (n != 1)}"


def _peek_model(model_name):
    """A dry run's look at the model: ``(config, tokenizer, stand-in model)`` without the weights (see
    :func:`jaxedit.loading.peek.peek`). A path that does not exist is the error a load would give; a hub id that is
    not in the local cache gives ``(None, None, None)`` (it is named in the plan, not checked)."""
    config, tok = peek(model_name)
    return config, tok, (types.SimpleNamespace(config=config) if config is not None else None)


def _model_line(out, model_name, config, tok, mesh):
    if config is None:
        about = " (a hub id not in the local cache: not checked, fetched when run)"
    else:
        about = f" ({config.family}, {config.n_layers} layers" + (
            "" if tok is not None else "; the texts are tokenized when run: the tokenizer is not cached yet") + ")"
    return f"plan for {out}/ with {model_name}{about}, on {describe(mesh)}"


@cli.command()
@click.option("--model", "model_name", default="smollm2", show_default=True, help=MODEL_HELP)
@click.option("--prompt", help="one prompt to trace")
@click.option("--subject", help="the span to corrupt, as a substring of the prompt")
@click.option("--span", "span_str", help="the span to corrupt as token indices START,END (half-open)")
@click.option("--target", help="answer token (string: its first token); default the clean argmax")
@click.option("--batch", "batch_file", type=click.Path(dir_okay=False),
              help="JSONL file, one request a line: {\"prompt\", \"subject\" or \"span\", optional \"target\"}")
@click.option("--out", default="trace_out", show_default=True, type=click.Path(file_okay=False),
              help="output folder (a --batch run resumes there)")
@click.option("--kinds", default="hidden,mlp,attn", show_default=True, help="comma-separated: hidden, mlp, attn")
@click.option("--noise-samples", "--samples", "samples", cls=Renamed, default=10, show_default=True,
              type=click.IntRange(min=1), help="noisy copies per prompt")
@click.option("--noise", default="s3", show_default=True,
              help="a level, or s<k> = k x std of the spans' token embeddings (over all prompts of the run, or each "
                   "prompt's own with --noise-per-prompt)")
@click.option("--noise-per-prompt", is_flag=True,
              help="s<k> from each prompt's own span: a prompt gets the same level alone and in any batch")
@click.option("--noise-file", type=click.Path(exists=True, dir_okay=False),
              help="explicit noise .npy [samples, span_len, d] (one prompt; reproduces a run bit for bit)")
@click.option("--uniform", is_flag=True, help="uniform U(-1,1) x level noise instead of Gaussian")
@click.option("--replace", is_flag=True, help="noise replaces the span's embeddings instead of being added")
@click.option("--window", default=10, show_default=True, type=click.IntRange(min=1),
              help="layers restored together (mlp, attn)")
@click.option("--seed", default=1, show_default=True, type=int, help="noise seed (1 = the reference's draw)")
@click.option("--dtype", default="float32", type=click.Choice(["float32", "bfloat16"]), show_default=True)
@click.option("--precision-highest", is_flag=True, help="full-precision float32 matmuls (GPUs default to TF32)")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="prompts per compiled call [1 on CPU: each prompt's results land as soon as it is done; 8 on "
                   "accelerators]")
@click.option("--method", default="shared", type=click.Choice(["shared", "dense"]), show_default=True,
              help="shared: prefix sharing (fast); dense: one full forward per cell")
@SKIP_BAD
@click.option("--no-plots", is_flag=True, help="skip the per-prompt heatmaps")
@DRY_RUN
@with_mesh
def trace(model_name, prompt, subject, span_str, target, batch_file, out, kinds, samples, noise, noise_per_prompt,
          noise_file, uniform, replace, window, seed, dtype, precision_highest, batch_size, method, skip_bad,
          no_plots, dry_run=False, mesh=None):
    """Causal tracing: corrupt a span, restore each (token, layer) state, measure p(answer).

    Writes per prompt and kind an .npz (scores [T, L], low_score, high_score, ...), results.jsonl (one row per
    prompt, in input order, each with its input line), heatmaps (PNG/PDF) and the aggregate AIE per layer and
    token group (aie.csv, aie.md, aie.png/pdf). A --batch run resumes where a killed one stopped.
    """
    import jax
    import numpy as np

    kinds_t = check_options(tuple(k.strip() for k in kinds.split(",") if k.strip()), samples, window)
    if (prompt is None) == (batch_file is None):
        raise JaxeditError("give either --prompt (with --subject or --span) or --batch FILE")
    if batch_file:
        if subject or span_str or target or noise_file:
            raise JaxeditError("--subject/--span/--target/--noise-file go with --prompt; in --batch they are per line")
        rf = request_file(batch_file, "requests", skip_bad, check=tf.check_request)
    else:
        if (subject is None) == (span_str is None):
            raise JaxeditError("give the span to corrupt: --subject TEXT or --span START,END")
        req = {"prompt": prompt, "subject": subject}
        if span_str is not None:
            try:
                a, b = (int(v) for v in span_str.split(","))
            except ValueError:
                raise JaxeditError(f"--span must be START,END (got {span_str!r})") from None
            req = {"prompt": prompt, "span": (a, b)}
        if target is not None:
            req["target"] = target
        if noise_file:
            req["noise"] = np.load(noise_file)
        rf = None
    parse_noise(noise)  # a bad --noise is refused before the model loads
    if dry_run:
        config, ptok, stand_in = _peek_model(model_name)
        items = [(1, req)] if rf is None else rf.items
        if stand_in is not None and ptok is not None:  # token counts and spans, as the run checks them
            def check_span(line, r):
                prepare_inputs(stand_in, ptok, r["prompt"], None, r.get("span", r.get("subject")))

            if rf is not None:
                items = rf.check_lines(check_span)
            else:
                check_span(1, req)
        done = set(tf.read_done(out)) & {line for line, _ in items} if os.path.isdir(out) else set()
        echo("\n".join([
            _model_line(out, model_name, config, ptok, mesh),
            f"trace: {_plural(len(items), 'prompt')}" + (f" from {batch_file}" if batch_file else " (--prompt)") +
            (f"; {len(done)} done earlier in {out}/results.jsonl (reused)" if done else ""),
            f"kinds {', '.join(kinds_t)}: {samples} noisy copies per prompt, noise {noise}"
            f"{' per prompt' if noise_per_prompt else ''}{' (uniform)' if uniform else ''}"
            f"{' replacing the span' if replace else ''}, window {window}, seed {seed}, {method} method, {dtype}",
            f"writes {out}/: results.jsonl, an .npz per prompt and kind, "
            f"{'' if no_plots else 'heatmaps, '}aie.csv/md/png",
            DRY_RUN_END]))
        return
    if precision_highest:
        jax.config.update("jax_default_matmul_precision", "highest")

    main = is_main_process()  # several processes: all compute, process 0 writes
    model, tok = jaxedit.load(model_name, dtype=dtype, mesh=mesh)
    info = {}  # line -> (token count, the span's token ids): checked before anything is computed or written

    def check_tokens(line, req):
        ids, span = prepare_inputs(model, tok, req["prompt"], None, req.get("span", req.get("subject")))
        info[line] = (len(ids), ids[span[0]:span[1]])

    if rf is not None:
        valid = rf.check_lines(check_tokens)
    else:
        check_tokens(1, req)
        valid = [(1, req)]
    spans = [info[line][1] for line, _ in valid]
    level = float("nan") if noise_per_prompt else resolve_noise_level(model, tok, noise, spans)
    note = f"noise: the array in {noise_file}" if noise_file else _noise_note(noise, level, noise_per_prompt,
                                                                              len(valid))

    options = {"model": model_name, "kinds": list(kinds_t), "samples": samples, "noise": noise,
               "noise_per_prompt": noise_per_prompt, "level": level, "uniform": uniform, "replace": replace,
               "window": window, "seed": seed, "dtype": dtype,
               "batch": os.path.abspath(batch_file) if batch_file else None, "prompt": prompt,
               "noise_file": os.path.abspath(noise_file) if noise_file else None}
    state = {"done": {}, "error": None}
    if main:
        os.makedirs(out, exist_ok=True)
        state["done"] = tf.read_done(out)
        differ = tf.options_differ(out, options) if state["done"] else None
        if differ and len(differ) > 1:
            differ = [d for d in differ if d[0] != "level"]  # the level follows from the others (prompts, noise)
        if differ:
            what = "; ".join((f"noise level {new:.4g} here, {old:.4g} there (the spans traced together changed)"
                              if k == "level" else f"--{'noise-samples' if k == 'samples' else k.replace('_', '-')} {_show(new)} here, "
                              f"{_show(old)} there")
                             for k, old, new in differ)
            state["error"] = f"{out} holds a run with other options ({what}); choose another --out or delete it"
    state = broadcast_json(state)  # every process resumes from process 0's results.jsonl
    if state["error"]:
        raise JaxeditError(state["error"])
    done = {int(k): v for k, v in state["done"].items()}
    if main:
        tf.write_run(out, options)
    bs = batch_size or (1 if jax.default_backend() == "cpu" else 8)
    pending = [(line, r) for line, r in valid if line not in done]
    if bs > 1:  # similar lengths together: fewer padded tokens per call
        pending.sort(key=lambda v: info[v[0]][0])
    reused = len(valid) - len(pending)
    if reused:
        runtime.stage(f"reusing {reused} stored result{'s' * (reused != 1)} from {out}/results.jsonl" +
                      (f"; tracing {len(pending)} more" if pending else " (delete the folder to recompute)"))
    runtime.stage(note)
    rows = {line: done[line] for line, _ in valid if line in done}
    runtime.set_resume_note(lambda: f"{len(rows)} of {len(valid)} prompts kept in {out}/, rerun to resume")
    extra = {"noise": noise, "noise_per_prompt": noise_per_prompt}
    with runtime.bar(len(valid), "tracing", "prompt", initial=reused, enabled=main) as bar:
        for i in range(0, len(pending), bs):
            chunk = pending[i:i + bs]
            where = f"line {chunk[0][0]}" if len(chunk) == 1 else f"lines {', '.join(str(v[0]) for v in chunk)}"
            results = trace_batch(model, [r for _, r in chunk], kinds=kinds_t, samples=samples,
                                  noise=level if not noise_per_prompt else noise,  # a --noise-file array overrides
                                  window=window, tokenizer=tok, seed=seed, uniform=uniform, replace=replace,
                                  method=method, batch_size=bs, fixed_batch=len(valid) > bs,
                                  bucket=1 if len(valid) == 1 else 4, noise_per_prompt=noise_per_prompt,
                                  on_kind=lambda k: bar.set_postfix_str(f"{k}, {where}" if batch_file else k))
            if main:
                for (line, req), res in zip(chunk, results):
                    row = tf.save_prompt(out, line, req, res, plots=not no_plots, extra=extra)
                    tf.append_row(out, row)
                    rows[line] = row
            bar.update(len(chunk))
    if not main:
        return
    tf.sort_results(out)
    ordered = [rows[line] for line, _ in valid]
    runtime.stage(f"writing the average indirect effects over {len(ordered)} prompt{'s' * (len(ordered) != 1)}")
    tf.write_aggregate(out, tf.aggregate_aie(out, ordered, kinds_t), len(ordered))
    if not batch_file:
        row = ordered[0]
        used = note if noise_file else _noise_note(noise, row["noise_level"], False, 1)
        echo(f"answer {row['answer']!r}: clean p = {row['high_score']:.4f}, corrupted p = "
                   f"{row['low_score']:.4f} ({used})")
        for k in kinds_t:
            best, last = row[k], row[k].get("last_subject")  # (a row stored by an older version has none)
            tokens = np.load(os.path.join(out, row["files"][k]))["input_tokens"]
            echo(f"  {k:<6} max IE {best['max_ie']:+.4f} at token {best['token']} "
                       f"({str(tokens[best['token']])!r}), layer {best['layer']}" + ("" if last is None else
                       f"; at the last subject token {last['token']} ({str(tokens[last['token']])!r}): "
                       f"{last['max_ie']:+.4f}, layer {last['layer']}"))
        echo("  (jaxedit.select_layers(\"ct\", ...) ranks layers by the last subject token's IE unless "
                   "token=\"max\")")
    echo(f"wrote {out}/ ({len(ordered)} prompt{'s' * (len(ordered) != 1)}: results.jsonl, .npz per prompt "
               f"and kind, {'' if no_plots else 'heatmaps, '}aie.csv/md/png)")


def check_example(req):
    """A saliency example's fields: "prompt" (a string), optional "target" (a string)."""
    if not isinstance(req.get("prompt"), str):
        raise JaxeditError("expected a \"prompt\" string")
    if req.get("target") is not None and not isinstance(req["target"], str):
        raise JaxeditError("\"target\" must be a string")
    return {"prompt": req["prompt"], "target": req.get("target")}


@cli.command()
@click.option("--model", "model_name", default="smollm2", show_default=True, help=MODEL_HELP)
@click.option("--prompt", help="one prompt")
@click.option("--target", help="the continuation whose NLL is differentiated (default: the model's argmax token)")
@click.option("--batch", "batch_file", type=click.Path(dir_okay=False),
              help="JSONL file, one example a line: {\"prompt\", optional \"target\"}")
@click.option("--out", default="saliency_out", show_default=True, type=click.Path(file_okay=False))
@click.option("--top", default=5, show_default=True, type=click.IntRange(min=1), help="how many top layers to print")
@click.option("--dtype", default="float32", type=click.Choice(["float32", "bfloat16"]), show_default=True)
@SKIP_BAD
@DRY_RUN
@with_mesh
def saliency(model_name, prompt, target, batch_file, out, top, dtype, skip_bad, dry_run=False, mesh=None):
    """Saliency profiles: |dNLL/dtheta| per layer (whole block, attention, MLP, MLP output projection).

    Writes saliency.json (per-example and mean profiles, each example with its input line), saliency.csv (the
    mean) and saliency.png/pdf (bars).
    """
    import math

    if (prompt is None) == (batch_file is None):
        raise JaxeditError("give either --prompt or --batch FILE")
    if batch_file:
        if target:
            raise JaxeditError("--target goes with --prompt; in --batch it is per line")
        rf = request_file(batch_file, "examples", skip_bad, check=check_example)
    else:
        rf = None
    if dry_run:
        config, ptok, stand_in = _peek_model(model_name)
        items = [(1, {"prompt": prompt, "target": target})] if rf is None else rf.items
        if stand_in is not None and ptok is not None:  # what the run checks once the tokenizer is loaded
            def check_tokens(q):
                encode_example(ptok, stand_in, q["prompt"], None, q["target"])

            if rf is not None:
                items = rf.check(check_tokens)
            else:
                check_tokens(items[0][1])
        echo("\n".join([
            _model_line(out, model_name, config, ptok, mesh),
            f"saliency: {_plural(len(items), 'example')}" + (f" from {batch_file}" if batch_file else " (--prompt)")
            + f", |dNLL/dtheta| per layer (block, attention, MLP, MLP output projection), {dtype}",
            f"writes {out}/: saliency.json, saliency.csv, saliency.png/pdf",
            DRY_RUN_END]))
        return
    model, tok = jaxedit.load(model_name, dtype=dtype, mesh=mesh)
    if rf is not None:
        items = rf.check(lambda q: encode_example(tok, model, q["prompt"], None, q["target"]) and None)
    else:
        items = [(1, {"prompt": prompt, "target": target})]
    requests = [q for _, q in items]
    runtime.set_resume_note(f"nothing written to {out}/ yet")
    per, mean = saliency_batch(model, requests, tokenizer=tok)
    if not is_main_process():  # several processes: process 0 writes
        return
    os.makedirs(out, exist_ok=True)
    names = ["block"] + list(mean.modules)

    def prof(r):
        return {"block": r.layer.tolist(), **{m: v.tolist() for m, v in r.modules.items()}}

    with open(os.path.join(out, "saliency.json"), "w") as f:
        json.dump({"mean": prof(mean), "loss": mean.loss,
                   "examples": [{"line": line, "prompt": q["prompt"], "target": q["target"],
                                 "target_ids": r.target_ids, "loss": r.loss,
                                 **prof(r)} for (line, q), r in zip(items, per)]}, f)
    with open(os.path.join(out, "saliency.csv"), "w") as f:
        f.write("layer," + ",".join(names) + "\n")
        for l in range(len(mean.layer)):
            f.write(f"{l}," + ",".join(f"{prof(mean)[n][l]:.6g}" for n in names) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(names), 1, figsize=(7, 1.6 * len(names) + 0.4), sharex=True,
                             constrained_layout=True)
    for ax, n in zip(axes, names):
        ax.bar(range(len(mean.layer)), prof(mean)[n])
        ax.set_ylabel(n, fontsize=8)
    axes[-1].set_xlabel(f"layer (mean over {len(per)} examples)")
    if len(per) == 1:
        text = requests[0]["prompt"]
        text = text if len(text) <= 70 else text[:67] + "..."
        answer = tok.decode(per[0].target_ids) if per[0].target_ids is not None else "?"
        title = (f"{text!r} -> {answer!r}: NLL {mean.loss:.3f} (p = {math.exp(-mean.loss):.3f} per token); "
                 f"saliency = mean |dNLL/dtheta|")
    else:
        title = f"mean saliency |dNLL/dtheta| over {len(per)} examples (mean NLL {mean.loss:.3f})"
    fig.suptitle(title, fontsize=9)
    fig.savefig(os.path.join(out, "saliency.png"), dpi=110)
    fig.savefig(os.path.join(out, "saliency.pdf"))
    plt.close(fig)
    echo(f"loss {mean.loss:.4f} over {len(per)} examples; top-{top} layers by saliency: "
               f"block {mean.top_layers(top)}, mlp_out {mean.top_layers(top, 'mlp_out')}")
    echo(f"wrote {out}/ (saliency.json, saliency.csv, saliency.png/pdf)")
