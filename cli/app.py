"""The ``jaxedit`` command group and what every command shares: the one-line error wrapper, option helpers."""
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




MESH_OPTIONS = [
    click.option("--mesh", default=None, metavar="SPEC",
                 help="run on a device mesh, e.g. data=4,model=2 (data: prompts/texts/examples/requests split over "
                      "devices; model: the weights split over devices); an axis left out takes the remaining "
                      "devices [default: one device]"),
    click.option("--coordinator", default=None, metavar="HOST:PORT|auto",
                 help="several hosts: process 0's address (with --num-processes, --process-id), or auto (SLURM, "
                      "Open MPI, TPU pod slices); also read from JAX_COORDINATOR_ADDRESS"),
    click.option("--num-processes", type=int, default=None, help="several hosts: how many processes in all"),
    click.option("--process-id", type=int, default=None, help="several hosts: this process's index (0 writes)"),
]


def with_mesh(fn):
    """Add the shared --mesh / multi-host options to a command; the command receives ``mesh`` (a
    :class:`jax.sharding.Mesh`, or None for one device). jax.distributed starts before anything touches a device."""
    @functools.wraps(fn)
    @clean_errors
    def wrapper(*args, mesh=None, coordinator=None, num_processes=None, process_id=None, **kwargs):
        from jaxedit.sharding import initialize, make_mesh

        several = initialize(coordinator, num_processes, process_id)
        return fn(*args, mesh=make_mesh(mesh) if (mesh or several) else None, **kwargs)

    return with_options(MESH_OPTIONS)(wrapper)


def with_options(options):
    """Apply a list of click options (shared between commands) to a command function."""
    def deco(fn):
        for opt in reversed(options):
            fn = opt(fn)
        return fn
    return deco
