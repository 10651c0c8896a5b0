"""The ``jaxedit`` command group and what every command shares.

Every command registered with ``@cli.command()`` is a :class:`JaxeditCommand`, which gives it, with no code of its
own:

* **one-line errors**: a :class:`~jaxedit.errors.JaxeditError` (or a missing / unreadable file) prints
  ``error: ...`` and exits with status 2, no traceback; so do bad options (click's usage errors, made one line);
* **status lines and bars**: :mod:`jaxedit.runtime`'s reporter prints the library's status lines ("loading ...",
  "compiling ...") to stderr, and its progress bars are on (``jaxedit --quiet`` turns both off); the heartbeat
  makes sure nothing stays silent for more than ``runtime.HEARTBEAT_SECS`` (4 s);
* **the compile cache**: JAX's persistent compilation cache under the jaxedit cache directory
  (``jaxedit --no-compile-cache`` or ``JAXEDIT_COMPILE_CACHE=0`` turns it off);
* **interrupts**: the command body runs in a worker thread while the main thread waits; Ctrl-C (SIGINT) or SIGTERM
  prints ``interrupted; <resume note>`` and ends the process at once (exit status 130 / 143), even in the middle
  of a compiled computation. Files are written atomically, so what was written stays intact; a command says what it
  keeps with ``jaxedit.runtime.set_resume_note``;
* **bad lines**: :func:`request_file` reads a JSONL file with ``FILE:LINE`` errors; with ``--skip-bad``
  (:data:`SKIP_BAD`) each bad line is reported and skipped, and the command ends with a count and exit status 1.

A new command (e.g. in ``cli/detox.py``)::

    import jaxedit
    from jaxedit import runtime
    from jaxedit.cli.app import MODEL_HELP, SKIP_BAD, cli, echo, request_file

    @cli.command()
    @click.option("--model", "model_name", default="smollm2", show_default=True, help=MODEL_HELP)
    @click.option("--requests", "requests_file", required=True, type=click.Path(dir_okay=False))
    @SKIP_BAD
    @click.option("--out", default="detox_out", show_default=True, type=click.Path(file_okay=False))
    def detox(model_name, requests_file, skip_bad, out):
        rf = request_file(requests_file, "requests", skip_bad, check=check_fields)  # no model needed yet
        model, tok = jaxedit.load(model_name)                                       # prints "loading ..."
        rf.check(lambda obj: check_with_tokenizer(obj, tok))                        # FILE:LINE errors again
        runtime.set_resume_note(lambda: f"{done} of {len(rf.items)} kept in {out}/, rerun to resume")
        ...                                                                         # library calls, writes
        echo(f"wrote {out}/")                  # results through echo: the heartbeat's terminal line goes first

and is imported in ``cli/main.py`` to register it. Long library work reports itself with ``runtime.stage(...)``,
``runtime.bar(...)`` and compiles through ``runtime.compiled(...)``.
"""
from __future__ import annotations

import functools
import os
import signal
import sys
import threading

import click

from jaxedit import runtime
from jaxedit.errors import JaxeditError
from jaxedit.request_files import RequestFile
from jaxedit.sharding import distributed_args, initialize, make_mesh, parse_mesh_spec

MODEL_HELP = "model: 'smollm2' (embedded default), a .gguf file, a HF directory or hub id, or a jaxedit directory"

# transformers is used for tokenizers and configs only: its "PyTorch was not found" advice is noise here. Set before
# transformers is imported (no jaxedit module imports it at import time: the loaders do, when they run).
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

ERRORS = (JaxeditError, FileNotFoundError, IsADirectoryError, PermissionError)
EXIT_ERROR, EXIT_SKIPPED = 2, 1


def clean_errors(fn):
    """Turn library errors (and bad files) into a one-line message and exit status 2, with no traceback. (Every
    command of the group gets this already; the decorator stays for functions called outside a command.)"""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ERRORS as e:
            _fail(e)
    return wrapper


def _fail(e):
    runtime.stop_heartbeat()  # its terminal line removed before the message
    click.echo(f"error: {e}", err=True)
    sys.exit(EXIT_ERROR)


class _OneLineUsageError(click.UsageError):
    def show(self, file=None):
        hint = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
        click.echo(f"error: {self.format_message()}{hint}", file=file or sys.stderr, err=True)


class Renamed(click.Option):
    """An option with old spellings: ``click.option("--noise-samples", "--samples", cls=Renamed)`` accepts both,
    while ``--help`` and error messages name only the first (the current name; docs/cli.md lists the old ones)."""

    def get_help_record(self, ctx):
        names = self.opts
        self.opts = names[:1]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = names

    def get_error_hint(self, ctx):
        return f"'{self.opts[0]}'"


def _describe_range(t) -> str:
    """click's IntRange / FloatRange bounds in the words every jaxedit range error uses: ">= 1", "> 0", "in [0, 1)"."""
    lo, hi = t.min, t.max
    if lo is not None and hi is not None:
        return f"in {'(' if t.min_open else '['}{lo}, {hi}{')' if t.max_open else ']'}"
    if lo is not None:
        return f"{'>' if t.min_open else '>='} {lo}"
    return f"{'<' if t.max_open else '<='} {hi}"


def usage_message(e: click.UsageError) -> str:
    """click's usage error in jaxedit's words: a number outside an option's range reads "--NAME must be >= 1 (got
    0)", the form the commands' own checks use; other errors keep click's message."""
    param = getattr(e, "param", None)
    if (isinstance(e, click.BadParameter) and isinstance(param, click.Option)
            and isinstance(param.type, (click.IntRange, click.FloatRange))
            and " is not in the range " in (e.message or "")):
        value = e.message.split(" is not in the range ")[0]
        return f"{param.opts[0]} must be {_describe_range(param.type)} (got {value})"
    return e.format_message()


class _Interrupted(BaseException):
    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


# what the running command has skipped (reset per command)
_skipped: list = []


class JaxeditCommand(click.Command):
    """A command with jaxedit's runtime (see the module docstring)."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            err = _OneLineUsageError(usage_message(e), ctx=e.ctx)
            err.exit_code = e.exit_code
            raise err from None

    def invoke(self, ctx):
        opts = ctx.find_root().obj or {}
        _skipped.clear()
        _start_runtime(quiet=opts.get("quiet", False), compile_cache=opts.get("compile_cache", True))
        try:
            result = run_interruptibly(super().invoke, ctx)
        except ERRORS as e:
            _fail(e)
        finally:
            runtime.stop_heartbeat()
        if _skipped:
            n = len(_skipped)
            click.echo(f"{n} bad line{'s' * (n != 1)} skipped (listed above); exit status {EXIT_SKIPPED}", err=True)
            sys.exit(EXIT_SKIPPED)
        return result


class JaxeditGroup(click.Group):
    command_class = JaxeditCommand


def _start_runtime(quiet: bool, compile_cache: bool) -> None:
    runtime.set_resume_note(None)
    runtime.set_reporter(None if quiet else status_line, bars=not quiet)
    if not quiet:  # never silent for more than a few seconds (runtime.HEARTBEAT_SECS)
        runtime.start_heartbeat()
    if compile_cache:
        runtime.enable_compile_cache()
    try:  # transformers may already be imported (tests, the Python API): quiet its advice there too
        import transformers

        transformers.utils.logging.set_verbosity_error()
    except Exception:
        pass


def echo(message=None, **kwargs) -> None:
    """``click.echo`` for what a command prints besides status lines and bars (results, tables, "wrote ..."):
    the heartbeat's terminal line is removed first, so the text never lands after it."""
    runtime.output_seen()
    click.echo(message, **kwargs)


def status_line(message: str) -> None:
    """Print one status line to stderr without breaking a progress bar that is on screen."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def run_interruptibly(fn, *args, **kwargs):
    """Run ``fn`` in a worker thread; on SIGINT / SIGTERM print ``interrupted; <resume note>`` and end the process
    at once with status 128 + signal (a compiled JAX call cannot be stopped from Python, and an ordinary exit would
    wait for it). Outside the main thread (no signal handlers there) ``fn`` simply runs."""
    if threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)
    box = {}

    def work():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the main thread as is
            box["error"] = e

    def on_signal(signum, frame):
        raise _Interrupted(signum)

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    worker = threading.Thread(target=work, name="jaxedit-command", daemon=True)
    try:
        for s in previous:
            signal.signal(s, on_signal)
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
    except (_Interrupted, KeyboardInterrupt) as e:
        _exit_interrupted(getattr(e, "signum", signal.SIGINT))
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _exit_interrupted(signum) -> None:
    runtime.run_interrupt_hooks()
    note = runtime.resume_note()
    try:
        from tqdm import tqdm

        fresh_line = "\n" if list(getattr(tqdm, "_instances", ())) else ""
    except Exception:
        fresh_line = ""
    try:
        sys.stdout.flush()
    except Exception:
        pass
    name = "interrupted" if signum == signal.SIGINT else "terminated"
    sys.stderr.write(f"{fresh_line}{name}" + (f"; {note}" if note else "") + "\n")
    sys.stderr.flush()
    os._exit(128 + int(signum))


@click.group(cls=JaxeditGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="jaxedit")
@click.option("-q", "--quiet", is_flag=True, help="no status lines or progress bars (results and errors only)")
@click.option("--no-compile-cache", is_flag=True,
              help="do not keep compiled programs on disk (default: kept under the jaxedit cache directory, "
                   "$JAXEDIT_CACHE/xla; JAXEDIT_COMPILE_CACHE=0 also turns it off)")
@click.pass_context
def cli(ctx, quiet, no_compile_cache):
    """Locate and edit memories in language models (GPT-2, LLaMA) with JAX."""
    ctx.obj = {"quiet": quiet, "compile_cache": not no_compile_cache}


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


class PlannedMesh:
    """A ``--mesh`` in a dry run: its axis sizes (``.shape``, as a Mesh has), with no devices behind it (the
    devices of a multi-host run, or of a bigger machine, need not be visible to plan it)."""

    def __init__(self, spec: str):
        sizes = parse_mesh_spec(spec)
        self.spec = spec
        self.shape = {"data": sizes.get("data", 1), "model": sizes.get("model", 1)}
        self.devices = None

    def __bool__(self):
        return True


def planned_mesh(spec: str):
    """The mesh a run would build on this machine's devices, or, when they do not fit it, a :class:`PlannedMesh`
    (a dry run plans for the machine the command names, not this one)."""
    try:
        return make_mesh(spec)
    except JaxeditError:
        return PlannedMesh(spec)


def with_mesh(fn):
    """Add the shared --mesh / multi-host options to a command; the command receives ``mesh`` (a
    :class:`jax.sharding.Mesh`, or None for one device). jax.distributed starts before anything touches a device."""
    @functools.wraps(fn)
    @clean_errors
    def wrapper(*args, mesh=None, coordinator=None, num_processes=None, process_id=None, **kwargs):
        if kwargs.get("dry_run"):  # nothing started: the options are checked, the mesh described, not built
            distributed_args(coordinator, num_processes, process_id)
            return fn(*args, mesh=planned_mesh(mesh) if mesh else None, **kwargs)
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


DRY_RUN = click.option("--dry-run", is_flag=True,
                       help="check the options and input files and print the plan, then stop before loading the "
                            "model's weights (nothing written)")
DRY_RUN_END = "dry run: nothing loaded, nothing written"  # the last line every command's dry run prints


class output_folder:
    """Context manager around a command's work on its output folders: a folder that did not exist before is removed
    again when the command fails or is interrupted before any file was written into it (no empty folders left)."""

    def __init__(self, *paths):
        self.new = [p for p in paths if p and not os.path.exists(p)]
        self.hook = runtime.on_interrupt(self.clean)

    def clean(self):
        import shutil

        for p in self.new:
            if os.path.isdir(p) and not any(files for _, _, files in os.walk(p)):
                shutil.rmtree(p, ignore_errors=True)

    def __enter__(self):
        self.hook.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.hook.__exit__(exc_type, exc, tb)
        if exc_type is not None:
            self.clean()
        return False


SKIP_BAD = click.option("--skip-bad", is_flag=True,
                        help="report and skip bad lines of the input file (FILE:LINE each, a count at the end, "
                             "exit status 1) instead of stopping at the first")


def request_file(path, what: str = "requests", skip_bad: bool = False, check=None):
    """Read a JSONL input file for a command: a :class:`jaxedit.request_files.RequestFile` whose bad lines are
    errors (``FILE:LINE: ...``) or, with ``skip_bad``, printed as ``skipped FILE:LINE: ...`` and counted for the
    command's closing summary. ``check`` is a first pass over the objects (see ``RequestFile.check``)."""
    def on_skip(text):
        _skipped.append(text)
        runtime.output_seen()
        status_line(f"skipped {text}")

    rf = RequestFile(path, what, skip_bad=skip_bad, on_skip=on_skip)
    if check is not None:
        rf.check(check)
    return rf
