"""Commands of the locate stage: ``jaxedit trace`` (causal tracing) and ``jaxedit saliency``."""
from __future__ import annotations

import json

import click

from jaxedit.cli.app import MODEL_HELP, clean_errors, cli, with_mesh
from jaxedit.errors import JaxeditError


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
@click.option("--samples", default=10, show_default=True, type=int, help="noisy copies per prompt")
@click.option("--noise", default="s3", show_default=True, help="a level, or s<k> = k x std of the spans' embeddings")
@click.option("--noise-file", type=click.Path(exists=True, dir_okay=False),
              help="explicit noise .npy [samples, span_len, d] (one prompt; reproduces a run bit for bit)")
@click.option("--uniform", is_flag=True, help="uniform U(-1,1) x level noise instead of Gaussian")
@click.option("--replace", is_flag=True, help="noise replaces the span's embeddings instead of being added")
@click.option("--window", default=10, show_default=True, type=int, help="layers restored together (mlp, attn)")
@click.option("--seed", default=1, show_default=True, type=int, help="noise seed (1 = the reference's draw)")
@click.option("--dtype", default="float32", type=click.Choice(["float32", "bfloat16"]), show_default=True)
@click.option("--precision-highest", is_flag=True, help="full-precision float32 matmuls (GPUs default to TF32)")
@click.option("--batch-size", default=8, show_default=True, type=int, help="prompts per jit call")
@click.option("--method", default="shared", type=click.Choice(["shared", "dense"]), show_default=True,
              help="shared: prefix sharing (fast); dense: one full forward per cell")
@click.option("--skip-bad", is_flag=True, help="--batch: skip and report bad lines instead of stopping")
@click.option("--no-plots", is_flag=True, help="skip the per-prompt heatmaps")
@with_mesh
@clean_errors
def trace(model_name, prompt, subject, span_str, target, batch_file, out, kinds, samples, noise, noise_file, uniform,
          replace, window, seed, dtype, precision_highest, batch_size, method, skip_bad, no_plots, mesh=None):
    """Causal tracing: corrupt a span, restore each (token, layer) state, measure p(answer).

    Writes per prompt and kind an .npz (scores [T, L], low_score, high_score, ...), results.jsonl, heatmaps
    (PNG/PDF) and the aggregate AIE per layer and token group (aie.csv, aie.md, aie.png/pdf).
    """
    import os

    import jax
    import numpy as np

    import jaxedit
    from jaxedit.locate import trace_files as tf
    from jaxedit.locate.tracing import check_options, prepare_inputs, resolve_noise_level, trace_batch

    kinds_t = check_options(tuple(k.strip() for k in kinds.split(",") if k.strip()), samples, window)
    if batch_size < 1:
        raise JaxeditError(f"--batch-size must be >= 1 (got {batch_size})")
    if (prompt is None) == (batch_file is None):
        raise JaxeditError("give either --prompt (with --subject or --span) or --batch FILE")
    if batch_file:
        if subject or span_str or target or noise_file:
            raise JaxeditError("--subject/--span/--target/--noise-file go with --prompt; in --batch they are per line")
        requests = tf.read_requests(batch_file)
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
        requests = [(1, req)]
    if precision_highest:
        jax.config.update("jax_default_matmul_precision", "highest")

    from jaxedit.sharding import broadcast_json, is_main_process

    main = is_main_process()  # several processes: all compute, process 0 writes
    model, tok = jaxedit.load(model_name, dtype=dtype, mesh=mesh)
    valid, spans = [], []
    for line, req in requests:  # validate everything before computing anything
        try:
            ids, span = prepare_inputs(model, tok, req["prompt"], None, req.get("span", req.get("subject")))
        except JaxeditError as e:
            where = f"{batch_file}:{line}: " if batch_file else ""
            if not skip_bad:
                raise JaxeditError(f"{where}{e}") from None
            if main:
                click.echo(f"skipped {where}{e}", err=True)
            continue
        valid.append((line, req, len(ids)))
        spans.append(ids[span[0]:span[1]])
    if not valid:
        raise JaxeditError("no valid request to trace")
    level = resolve_noise_level(model, tok, noise, spans)

    options = {"model": model_name, "kinds": list(kinds_t), "samples": samples, "noise": noise, "level": level,
               "uniform": uniform, "replace": replace, "window": window, "seed": seed, "dtype": dtype,
               "batch": os.path.abspath(batch_file) if batch_file else None, "prompt": prompt}
    run_file = os.path.join(out, "run.json")
    state = {"done": {}, "error": None}
    if main:
        os.makedirs(out, exist_ok=True)
        state["done"] = tf.read_done(out)
        if state["done"] and os.path.isfile(run_file):
            with open(run_file) as f:
                earlier = json.load(f)
            if ({k: v for k, v in earlier.items() if k != "level"} !=
                    {k: v for k, v in options.items() if k != "level"}):
                state["error"] = f"{out} holds a run with other options; choose another --out or delete it"
    state = broadcast_json(state)  # every process resumes from process 0's results.jsonl
    if state["error"]:
        raise JaxeditError(state["error"])
    done = {int(k): v for k, v in state["done"].items()}
    if main:
        with open(run_file, "w") as f:
            json.dump(options, f, indent=1)
    pending = sorted([v for v in valid if v[0] not in done], key=lambda v: v[2])
    bucket = 1 if len(valid) == 1 else 4  # one prompt: no padding; many: lengths rounded up to multiples of 4
    rows = dict(done)
    from tqdm import tqdm

    with tqdm(total=len(valid), initial=len(valid) - len(pending), unit="prompt", desc="tracing",
              disable=(len(valid) == 1 and not batch_file) or not main) as bar:
        for i in range(0, len(pending), batch_size):
            chunk = pending[i:i + batch_size]
            results = trace_batch(model, [r for _, r, _ in chunk], kinds=kinds_t, samples=samples,
                                  noise=level,  # a request's own "noise" array (--noise-file) overrides it
                                  window=window, tokenizer=tok, seed=seed, uniform=uniform, replace=replace,
                                  method=method, batch_size=batch_size, fixed_batch=len(valid) > batch_size,
                                  bucket=bucket)
            for (line, req, _), res in zip(chunk, results):
                if main:
                    row = tf.save_prompt(out, line, req, res, plots=not no_plots)
                    tf.append_row(out, row)
                    rows[line] = row
            bar.update(len(chunk))
    if not main:
        return
    ordered = [rows[line] for line, _, _ in valid if line in rows]
    tf.write_aggregate(out, tf.aggregate_aie(out, ordered, kinds_t), len(ordered))
    if not batch_file:
        row = ordered[0]
        click.echo(f"answer {row['answer']!r}: clean p = {row['high_score']:.4f}, corrupted p = {row['low_score']:.4f}")
        for k in kinds_t:
            best = row[k]
            tokens = np.load(os.path.join(out, row["files"][k]))["input_tokens"]
            click.echo(f"  {k:<6} max IE {best['max_ie']:+.4f} at token {best['token']} "
                       f"({str(tokens[best['token']])!r}), layer {best['layer']}")
    click.echo(f"wrote {out}/ ({len(ordered)} prompts: results.jsonl, .npz per prompt and kind, "
               f"{'' if no_plots else 'heatmaps, '}aie.csv/md/png)")


@cli.command()
@click.option("--model", "model_name", default="smollm2", show_default=True, help=MODEL_HELP)
@click.option("--prompt", help="one prompt")
@click.option("--target", help="the continuation whose NLL is differentiated (default: the model's argmax token)")
@click.option("--batch", "batch_file", type=click.Path(dir_okay=False),
              help="JSONL file, one example a line: {\"prompt\", optional \"target\"}")
@click.option("--out", default="saliency_out", show_default=True, type=click.Path(file_okay=False))
@click.option("--top", default=5, show_default=True, type=int, help="how many top layers to print")
@click.option("--dtype", default="float32", type=click.Choice(["float32", "bfloat16"]), show_default=True)
@with_mesh
@clean_errors
def saliency(model_name, prompt, target, batch_file, out, top, dtype, mesh=None):
    """Saliency profiles: |dNLL/dtheta| per layer (whole block, attention, MLP, MLP output projection).

    Writes saliency.json (per-example and mean profiles), saliency.csv (the mean) and saliency.png/pdf (bars).
    """
    import os

    import jaxedit
    from jaxedit.locate.saliency import saliency_batch

    if (prompt is None) == (batch_file is None):
        raise JaxeditError("give either --prompt or --batch FILE")
    if batch_file:
        if target:
            raise JaxeditError("--target goes with --prompt; in --batch it is per line")
        requests = []
        from jaxedit.locate.trace_files import read_jsonl

        for no, req in read_jsonl(batch_file, "examples"):
            if not isinstance(req.get("prompt"), str):
                raise JaxeditError(f"{batch_file}:{no}: expected a \"prompt\" string")
            requests.append({"prompt": req["prompt"], "target": req.get("target")})
    else:
        requests = [{"prompt": prompt, "target": target}]
    model, tok = jaxedit.load(model_name, dtype=dtype, mesh=mesh)
    per, mean = saliency_batch(model, requests, tokenizer=tok)
    from jaxedit.sharding import is_main_process

    if not is_main_process():  # several processes: process 0 writes
        return
    os.makedirs(out, exist_ok=True)
    names = ["block"] + list(mean.modules)

    def prof(r):
        return {"block": r.layer.tolist(), **{m: v.tolist() for m, v in r.modules.items()}}

    with open(os.path.join(out, "saliency.json"), "w") as f:
        json.dump({"mean": prof(mean), "loss": mean.loss,
                   "examples": [{"prompt": q["prompt"], "target": q["target"], "loss": r.loss, **prof(r)}
                                for q, r in zip(requests, per)]}, f)
    with open(os.path.join(out, "saliency.csv"), "w") as f:
        f.write("layer," + ",".join(names) + "\n")
        for l in range(len(mean.layer)):
            f.write(f"{l}," + ",".join(f"{prof(mean)[n][l]:.6g}" for n in names) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(names), 1, figsize=(7, 1.6 * len(names)), sharex=True, constrained_layout=True)
    for ax, n in zip(axes, names):
        ax.bar(range(len(mean.layer)), prof(mean)[n])
        ax.set_ylabel(n, fontsize=8)
    axes[-1].set_xlabel(f"layer (mean over {len(per)} examples)")
    fig.savefig(os.path.join(out, "saliency.png"), dpi=110)
    fig.savefig(os.path.join(out, "saliency.pdf"))
    plt.close(fig)
    click.echo(f"loss {mean.loss:.4f} over {len(per)} examples; top-{top} layers by saliency: "
               f"block {mean.top_layers(top)}, mlp_out {mean.top_layers(top, 'mlp_out')}")
    click.echo(f"wrote {out}/ (saliency.json, saliency.csv, saliency.png/pdf)")
