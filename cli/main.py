"""``jaxedit`` commands. Each parses its options, calls the library, and prints; errors are one line, exit 2.

The commands live in one module per pipeline stage (locate.py, edit.py, ...); importing them registers them on the
group defined in app.py.
"""
from __future__ import annotations

import click

from jaxedit.cli.app import clean_errors, cli

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




from jaxedit.cli import detox, dinm, edit, locate  # noqa: E402,F401  (registers the commands)


def main():
    cli(prog_name="jaxedit")


if __name__ == "__main__":
    main()
