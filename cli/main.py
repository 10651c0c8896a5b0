"""``jaxedit`` commands. Each parses its options, calls the library, and prints; errors are one line, exit 2."""
from __future__ import annotations

import functools
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


def main():
    cli(prog_name="jaxedit")


if __name__ == "__main__":
    main()
