"""``jaxedit`` commands. Each parses its options, calls the library, and prints; errors are one line, exit 2.

The commands live in one module per pipeline stage (locate.py, edit.py, ...); importing them registers them on the
group defined in app.py.
"""
from __future__ import annotations

import click

import jaxedit
from jaxedit.cli.app import DRY_RUN, DRY_RUN_END, MODEL_HELP, clean_errors, cli, echo, with_mesh
from jaxedit.errors import JaxeditError
from jaxedit.loading.peek import peek
from jaxedit.sharding import bytes_per_device, describe, human_bytes, is_main_process


@cli.command()
@click.argument("model", required=False)
@click.option("--model", "model_name", help=f"{MODEL_HELP} [smollm2]; also accepted as the first argument")
@click.option("--dtype", default="float32", type=click.Choice(["float32", "bfloat16"]), show_default=True)
@click.option("--allow-pickle", is_flag=True, help="allow reading pytorch_model.bin pickles (unsafe)")
@DRY_RUN
@with_mesh
@clean_errors
def info(model, model_name, dtype, allow_pickle, dry_run=False, mesh=None):
    """Print the architecture, layer count, dimensions and parameter count of a model (--model, as in every
    command, or MODEL)."""
    import jax

    if model and model_name and model != model_name:
        raise JaxeditError(f"two models given: {model!r} and --model {model_name!r}")
    model = model_name or model or "smollm2"
    if dry_run:  # the config alone (a GGUF header, config.json, jaxedit.json): no weights read
        config, _ = peek(model, tokenizer=False)
        if config is None:
            about = "a hub id not in the local cache: not checked, fetched when run"
        else:
            about = (f"{config.family}, {config.n_layers} layers, d_model {config.d_model}, vocab "
                     f"{config.vocab_size}, context {config.max_positions}")
        echo("\n".join([f"plan: load {model} ({about}) in {dtype} on {describe(mesh)}, print its architecture "
                        f"and parameter count", DRY_RUN_END]))
        return
    m, tok = jaxedit.load(model, dtype=dtype, allow_pickle=allow_pickle, mesh=mesh)
    if not is_main_process():
        return
    c = m.config
    rows = [
        ("model", model), ("family", c.family), ("layers", c.n_layers), ("d_model", c.d_model),
        ("heads", f"{c.n_heads} (kv {c.n_kv_heads}, head_dim {c.head_dim})"), ("d_ff", c.d_ff),
        ("vocab", c.vocab_size), ("context", c.max_positions), ("tied head", c.tie_embeddings),
        ("dtype", dtype), ("parameters", f"{jaxedit.count_params(m):,}"),
    ]
    if c.family == "llama":
        rows.insert(7, ("rope", f"theta {c.rope_theta:g}" + (f", {dict(c.rope_scaling)}" if c.rope_scaling else "")))
    if mesh is not None:
        per = bytes_per_device(jaxedit.params_of(m))
        total = sum(int(x.nbytes) for x in jax.tree.leaves(jaxedit.params_of(m)))
        rows.append(("mesh", f"{describe(mesh)}: at most {human_bytes(max(per.values()))} of parameters per "
                             f"device (of {human_bytes(total)})"))
    for k, v in rows:
        echo(f"{k:<11} {v}")




from jaxedit.cli import detox, dinm, edit, locate  # noqa: E402,F401  (registers the commands)
from jaxedit.cli import plan  # noqa: E402,F401  (jaxedit plan)


def main():
    cli(prog_name="jaxedit")


if __name__ == "__main__":
    main()
