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




def with_options(options):
    """Apply a list of click options (shared between commands) to a command function."""
    def deco(fn):
        for opt in reversed(options):
            fn = opt(fn)
        return fn
    return deco
