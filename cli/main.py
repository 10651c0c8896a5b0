"""``jaxedit`` commands. Each parses its options, calls the library, and prints; errors are one line, exit 2."""
from __future__ import annotations

import functools
import json
import sys

import click

from jaxedit.errors import JaxeditError

MODEL_HELP = "model: 'smollm2' (embedded default), a .gguf file, a HF directory or hub id, or a jaxedit directory"


def clean_errors(fn):
    """Turn library errors (and bad files) into a one-line message and exit status 2, with no traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (JaxeditError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="jaxedit")
def cli():
    """Locate and edit memories in language models (GPT-2, LLaMA) with JAX."""


@cli.command()
@click.argument("model", default="smollm2")
@click.option("--dtype", default="float32", type=click.Choice(["float32", "bfloat16"]), show_default=True)
@click.option("--allow-pickle", is_flag=True, help="allow reading pytorch_model.bin pickles (unsafe)")
@clean_errors
def info(model, dtype, allow_pickle):
    """Print the architecture, layer count, dimensions and parameter count of MODEL."""
    import jaxedit

    m, tok = jaxedit.load(model, dtype=dtype, allow_pickle=allow_pickle)
    c = m.config
    rows = [
        ("model", model), ("family", c.family), ("layers", c.n_layers), ("d_model", c.d_model),
        ("heads", f"{c.n_heads} (kv {c.n_kv_heads}, head_dim {c.head_dim})"), ("d_ff", c.d_ff),
        ("vocab", c.vocab_size), ("context", c.max_positions), ("tied head", c.tie_embeddings),
        ("dtype", dtype), ("parameters", f"{jaxedit.count_params(m):,}"),
    ]
    if c.family == "llama":
        rows.insert(7, ("rope", f"theta {c.rope_theta:g}" + (f", {dict(c.rope_scaling)}" if c.rope_scaling else "")))
    for k, v in rows:
        click.echo(f"{k:<11} {v}")


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
@clean_errors
def trace(model_name, prompt, subject, span_str, target, batch_file, out, kinds, samples, noise, noise_file, uniform,
          replace, window, seed, dtype, precision_highest, batch_size, method, skip_bad, no_plots):
    """Causal tracing: corrupt a span, restore each (token, layer) state, measure p(answer).

    Writes per prompt and kind an .npz (scores [T, L], low_score, high_score, ...), results.jsonl, heatmaps
    (PNG/PDF) and the aggregate AIE per layer and token group (aie.csv, aie.md, aie.png/pdf).
    """
    import os

    import jax
    import numpy as np

    import jaxedit
    from jaxedit import trace_files as tf
    from jaxedit.tracing import check_options, prepare_inputs, resolve_noise_level, trace_batch

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

    model, tok = jaxedit.load(model_name, dtype=dtype)
    valid, spans = [], []
    for line, req in requests:  # validate everything before computing anything
        try:
            ids, span = prepare_inputs(model, tok, req["prompt"], None, req.get("span", req.get("subject")))
        except JaxeditError as e:
            where = f"{batch_file}:{line}: " if batch_file else ""
            if not skip_bad:
                raise JaxeditError(f"{where}{e}") from None
            click.echo(f"skipped {where}{e}", err=True)
            continue
        valid.append((line, req, len(ids)))
        spans.append(ids[span[0]:span[1]])
    if not valid:
        raise JaxeditError("no valid request to trace")
    level = resolve_noise_level(model, tok, noise, spans)

    os.makedirs(out, exist_ok=True)
    options = {"model": model_name, "kinds": list(kinds_t), "samples": samples, "noise": noise, "level": level,
               "uniform": uniform, "replace": replace, "window": window, "seed": seed, "dtype": dtype,
               "batch": os.path.abspath(batch_file) if batch_file else None, "prompt": prompt}
    run_file = os.path.join(out, "run.json")
    done = tf.read_done(out)
    if done and os.path.isfile(run_file):
        with open(run_file) as f:
            earlier = json.load(f)
        if {k: v for k, v in earlier.items() if k != "level"} != {k: v for k, v in options.items() if k != "level"}:
            raise JaxeditError(f"{out} holds a run with other options; choose another --out or delete it")
    with open(run_file, "w") as f:
        json.dump(options, f, indent=1)
    pending = sorted([v for v in valid if v[0] not in done], key=lambda v: v[2])
    bucket = 1 if len(valid) == 1 else 4  # one prompt: no padding; many: lengths rounded up to multiples of 4
    rows = dict(done)
    from tqdm import tqdm

    with tqdm(total=len(valid), initial=len(valid) - len(pending), unit="prompt", desc="tracing",
              disable=len(valid) == 1 and not batch_file) as bar:
        for i in range(0, len(pending), batch_size):
            chunk = pending[i:i + batch_size]
            results = trace_batch(model, [r for _, r, _ in chunk], kinds=kinds_t, samples=samples,
                                  noise=level,  # a request's own "noise" array (--noise-file) overrides it
                                  window=window, tokenizer=tok, seed=seed, uniform=uniform, replace=replace,
                                  method=method, batch_size=batch_size, fixed_batch=len(valid) > batch_size,
                                  bucket=bucket)
            for (line, req, _), res in zip(chunk, results):
                row = tf.save_prompt(out, line, req, res, plots=not no_plots)
                tf.append_row(out, row)
                rows[line] = row
            bar.update(len(chunk))
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
@clean_errors
def saliency(model_name, prompt, target, batch_file, out, top, dtype):
    """Saliency profiles: |dNLL/dtheta| per layer (whole block, attention, MLP, MLP output projection).

    Writes saliency.json (per-example and mean profiles), saliency.csv (the mean) and saliency.png/pdf (bars).
    """
    import os

    import jaxedit
    from jaxedit.saliency import saliency_batch

    if (prompt is None) == (batch_file is None):
        raise JaxeditError("give either --prompt or --batch FILE")
    if batch_file:
        if target:
            raise JaxeditError("--target goes with --prompt; in --batch it is per line")
        requests = []
        from jaxedit.trace_files import read_jsonl

        for no, req in read_jsonl(batch_file, "examples"):
            if not isinstance(req.get("prompt"), str):
                raise JaxeditError(f"{batch_file}:{no}: expected a \"prompt\" string")
            requests.append({"prompt": req["prompt"], "target": req.get("target")})
    else:
        requests = [{"prompt": prompt, "target": target}]
    model, tok = jaxedit.load(model_name, dtype=dtype)
    per, mean = saliency_batch(model, requests, tokenizer=tok)
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
    click.option("--corpus", default=None, help="key-statistics corpus: a .txt/.jsonl file or folder, 'model' "
                 "(text sampled from the model; works offline), or a datasets name[:config] "
                 "[default: wikitext:wikitext-103-raw-v1]"),
    click.option("--samples", "n_samples", type=int, default=None, help="texts for the statistics [100000]"),
    click.option("--max-len", type=int, default=None, help="tokens per text [the model's context, <= 1024]"),
    click.option("--stats-float64", is_flag=True, help="accumulate the statistics in float64"),
]


def _with(options):
    def deco(fn):
        for opt in reversed(options):
            fn = opt(fn)
        return fn
    return deco


def _edit_command(mode, model_name, requests_file, layers, out, export_hf_dir, corpus, n_samples, max_len,
                  stats_float64, preset, solve_float64, hparam, dtype, kl_weight=None, objective=None):
    import os

    import jaxedit

    from jaxedit.trace_files import read_jsonl

    reqs = [obj for _, obj in read_jsonl(requests_file, "requests")]
    hp = parse_hparams(hparam)
    if corpus is not None:
        hp["mom2_corpus"] = corpus
    if n_samples is not None:
        hp["mom2_samples"] = n_samples
    if max_len is not None:
        hp["mom2_max_len"] = max_len
    if stats_float64:
        hp["mom2_precision"] = "float64"
    if solve_float64:
        hp["solve_dtype"] = "float64"
    if preset:
        hp["preset"] = preset
    if objective:
        hp["delete_objective"] = objective
    for d in (out, export_hf_dir):
        if d and os.path.isfile(d):
            raise JaxeditError(f"{d} is a file, not a directory")
    model, tok = jaxedit.load(model_name, dtype=dtype)
    lay = parse_layers(layers) if layers else None
    if mode == "edit":
        edited, report = jaxedit.memit(model, reqs, layers=lay, tokenizer=tok, **hp)
    else:
        edited, report = jaxedit.delete(model, reqs, layers=lay, kl_weight=kl_weight, tokenizer=tok, **hp)
    report["model"] = model_name
    jaxedit.save(edited, out, tokenizer=tok)
    tmp = os.path.join(out, ".report.json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, os.path.join(out, "report.json"))
    if export_hf_dir:
        jaxedit.export_hf(edited, tok, export_hf_dir)
    tracked = "target" if mode == "edit" else "suppressed"
    for r in report["requests"]:
        toks = ", ".join(f"{t!r} {b:.4f} -> {a:.4f}" for t, b, a in zip(r["tokens"], r["p_before"], r["p_after"]))
        click.echo(f"{r['prompt']!r}: {tracked} {toks}; original {r['original_argmax']!r} "
                   f"{r['p_original_before']:.4f} -> {r['p_original_after']:.4f}; now argmax {r['argmax_after']!r}")
    click.echo(f"edited layers {report['layers']} in {report['seconds']:.1f} s; wrote {out}/ (orbax checkpoint, "
               f"report.json){'; exported ' + export_hf_dir if export_hf_dir else ''}")


_EDIT_OPTIONS = [
    click.option("--model", "model_name", default="smollm2", show_default=True, help=MODEL_HELP),
    click.option("--requests", "requests_file", required=True, type=click.Path(dir_okay=False),
                 help="JSONL, one request a line: {\"prompt\", \"subject\" or \"span\", \"target\" (edit) or "
                      "\"suppress\" (delete), optional \"paraphrases\", \"neighborhood\"}"),
    click.option("--layers", help="layers to edit, e.g. 13-17 or 4,5,6 [the preset's / derived from depth]"),
    click.option("--out", required=True, type=click.Path(file_okay=False),
                 help="folder for the edited model (jaxedit.load reads it) and report.json"),
    click.option("--export-hf", "export_hf_dir", type=click.Path(file_okay=False),
                 help="also write a Hugging Face checkpoint folder"),
    *_STATS_OPTIONS,
    click.option("--preset", type=click.Choice(["gpt2-xl", "llama-7b"]), help="hyperparameter preset"),
    click.option("--solve-float64", is_flag=True, help="solve in float64 on the host (the reference's way)"),
    click.option("--hparam", multiple=True, help="override one hyperparameter: NAME=VALUE (repeatable)"),
    click.option("--dtype", default="float32", type=click.Choice(["float32", "bfloat16"]), show_default=True),
]


@cli.command()
@_with(_EDIT_OPTIONS)
@clean_errors
def edit(**kw):
    """MEMIT: rewrite subject -> target associations (all requests in one batch edit)."""
    _edit_command("edit", **kw)


@cli.command()
@_with(_EDIT_OPTIONS)
@click.option("--kl-weight", default=0.0625, show_default=True, type=float,
              help="weight of KL(P_orig || P_edited) on '{subject} is a'")
@click.option("--objective", type=click.Choice(["logp", "unlikelihood"]), default="logp", show_default=True,
              help="logp: the reference's mean log P (no floor); unlikelihood: -log(1 - P), which the KL weight "
                   "balances (docs/editing.md)")
@clean_errors
def delete(kl_weight, objective, **kw):
    """Das et al.'s deletion: push the "suppress" token(s) away from each prompt."""
    _edit_command("delete", kl_weight=kl_weight, objective=objective, **kw)


@cli.command()
@click.option("--model", "model_name", default="smollm2", show_default=True, help=MODEL_HELP)
@click.option("--layers", required=True, help="e.g. 13-17 or 4,5,6 (all in one pass)")
@_with(_STATS_OPTIONS)
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--dtype", default="float32", type=click.Choice(["float32", "bfloat16"]), show_default=True)
@clean_errors
def stats(model_name, layers, corpus, n_samples, max_len, stats_float64, batch_size, dtype):
    """Key statistics E[k k^T] of the MLP output projection's input, for MEMIT (cached; a killed run resumes)."""
    import numpy as np

    import jaxedit
    from jaxedit.stats import DEFAULT_CORPUS

    model, tok = jaxedit.load(model_name, dtype=dtype)
    res = jaxedit.layer_stats(model, tok, parse_layers(layers), corpus=corpus or DEFAULT_CORPUS,
                              n_samples=n_samples or 100_000, max_len=max_len, batch_size=batch_size,
                              precision="float64" if stats_float64 else "float32")
    for l, c in sorted(res.items()):
        click.echo(f"layer {l}: [{c.shape[0]} x {c.shape[1]}], trace {float(np.trace(c)):.4g}")
    from jaxedit.loading import cache_dir

    click.echo(f"cached under {cache_dir()}/stats/")


@cli.command()
@click.option("--model", "model_name", required=True, help=MODEL_HELP)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Hugging Face checkpoint folder")
@clean_errors
def export(model_name, out):
    """Write a model (e.g. an edited one saved by `jaxedit edit`) as a Hugging Face checkpoint folder."""
    import jaxedit

    model, tok = jaxedit.load(model_name)
    jaxedit.export_hf(model, tok, out)
    click.echo(f"wrote {out}/ (config.json, model.safetensors, tokenizer)")


def main():
    cli(prog_name="jaxedit")


if __name__ == "__main__":
    main()
