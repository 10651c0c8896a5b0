"""What every long jaxedit operation shares, in the library and on the command line.

* **Status lines**: :func:`stage` announces a step that may take a while ("loading smollm2", "compiling ...",
  "tracing hidden"). The ``jaxedit`` command installs its reporter with :func:`set_reporter`; used from Python,
  the library prints the same lines to stderr, and during a call of a public function (:func:`reports`) the
  heartbeat runs too, so that no call stays silent for more than :data:`HEARTBEAT_SECS`. ``progress=False`` on a
  call, :func:`set_progress` (``jaxedit.set_progress(False)``) or ``JAXEDIT_PROGRESS=0`` silences them.
* **Progress bars**: :func:`bar` is a tqdm bar when bars are on (the default; ``jaxedit --quiet`` turns them
  off), a silent stand-in otherwise. An open bar is redrawn by a background thread (every second on a terminal,
  every :data:`HEARTBEAT_SECS` into a file or pipe), so its elapsed time moves during a long compiled call.
* **Never silent**: :func:`start_heartbeat` (the ``jaxedit`` command starts it) makes sure a command never stays
  quiet for more than :data:`HEARTBEAT_SECS` while a reporter is installed: when nothing was printed for that long
  (status lines, bars, and what the command line prints through :func:`output_seen`) and no bar is open, it shows
  the time since the last status line (on a terminal, one line redrawn in place, removed before the next status
  line, bar or printed result; into a file or pipe, a line ``... still working, 12 s since: <status>``).
* **Resume notes**: :func:`set_resume_note` records what an interrupted run keeps (a string, or a callable that
  returns one); the command line prints it when Ctrl-C or SIGTERM ends a command.
* **Compilation**: :func:`enable_compile_cache` turns on JAX's persistent compilation cache in the jaxedit cache
  directory (a second process loads compiled programs instead of compiling them again); :func:`compiled` compiles a
  jitted function ahead of time, once per argument shapes, with a status line saying so.
* **Memory budget**: :func:`default_memory_budget`, the bytes one chunk of a batched computation may use (tracing,
  sampling and perplexity size their batches to it with :func:`jaxedit.batching.rows_within`).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, Optional, Union

from jaxedit.cache import cache_dir

COMPILE_CACHE_ENV = "JAXEDIT_COMPILE_CACHE"  # "0" turns the persistent compilation cache off; a path moves it
MIN_COMPILE_SECS = 0.5  # programs that compile faster than this are not written to the cache

_reporter: Optional[Callable[[str], None]] = None
_explicit = False  # a reporter was installed with set_reporter (the command line); else the library's own
_bars = True  # the library's bars (key statistics) show unless turned off
PROGRESS_ENV = "JAXEDIT_PROGRESS"  # "0" / off: the library is silent from Python (status lines, bars, heartbeat)
_library = {"on": os.environ.get(PROGRESS_ENV, "1").strip().lower() not in ("0", "off", "false", "no"),
            "silenced": 0, "depth": 0, "heartbeat": False}
_note: Union[None, str, Callable[[], Optional[str]]] = None
_compiled: dict = {}
_cache_events = {"hits": 0}
HEARTBEAT_SECS = 4.0  # the longest a command with a reporter stays silent (start_heartbeat)
HEARTBEAT_ENV = "JAXEDIT_HEARTBEAT_SECS"  # overrides it; 0 turns the heartbeat off
_lock = threading.RLock()
_wake = threading.Event()
_activity = {"last": time.monotonic(), "status": None, "since": time.monotonic(), "bars": 0, "spinner": None,
             "every": 0.0, "thread": None}


# ---------------------------------------------------------------------------------------------- status

def set_reporter(reporter: Optional[Callable[[str], None]], bars: bool = True) -> None:
    """Install ``reporter(line)`` for status lines (None: silent) and turn progress bars on or off. This replaces
    the library's own reporting (stderr) for the rest of the process, as the command line does."""
    global _reporter, _bars, _explicit
    _reporter, _bars, _explicit = reporter, bool(bars), True


def set_progress(enabled: bool) -> None:
    """Turn the library's status lines, progress bars and heartbeat on or off for Python use (the module switch;
    ``progress=False`` on a call silences that call only; ``JAXEDIT_PROGRESS=0`` sets the default off)."""
    _library["on"] = bool(enabled)


def _print_stderr(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)  # above an open bar, never through it


def _current_reporter() -> Optional[Callable[[str], None]]:
    if _explicit:
        return _reporter
    if _library["on"] and not _library["silenced"]:
        return _print_stderr
    return None


def _bars_on() -> bool:
    return _bars and (_explicit or (_library["on"] and not _library["silenced"]))


def stage(message: str) -> None:
    """Announce a step (one line, no trailing period)."""
    reporter = _current_reporter()
    if reporter is not None:
        with _lock:
            _end_spinner()
            reporter(message)
            now = time.monotonic()
            _activity.update(last=now, status=message, since=now)


class progress_scope:
    """The extent of one call of a public library function: with ``progress=False`` its status lines and bars are
    off; from Python (no command-line reporter), the outermost call runs the heartbeat while it lasts."""

    def __init__(self, progress=True):
        self.progress = progress is not False

    def __enter__(self):
        with _lock:
            if not self.progress:
                _library["silenced"] += 1
            _library["depth"] += 1
            if _library["depth"] == 1 and not _explicit and _current_reporter() is not None:
                _library["heartbeat"] = True
                start_heartbeat()
        return self

    def __exit__(self, *exc):
        with _lock:
            _library["depth"] -= 1
            if not self.progress:
                _library["silenced"] -= 1
            if _library["depth"] == 0 and _library["heartbeat"]:
                _library["heartbeat"] = False
                if not _explicit:
                    stop_heartbeat()
        return False


def reports(fn):
    """Decorator for a public library function: its call is a :class:`progress_scope` (its ``progress=`` keyword,
    when it has one, is honoured)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with progress_scope(kwargs.get("progress", True)):
            return fn(*args, **kwargs)

    return wrapper


def _stderr_isatty() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def start_heartbeat(every: Optional[float] = None) -> None:
    """From now on, never stay silent for more than ``every`` seconds (default :data:`HEARTBEAT_SECS`, or
    ``$JAXEDIT_HEARTBEAT_SECS``) while a reporter is installed (see the module docstring; 0 turns it off). One
    background thread per process, asleep while the heartbeat is off."""
    if every is None:
        try:
            every = float(os.environ.get(HEARTBEAT_ENV, HEARTBEAT_SECS))
        except ValueError:
            every = HEARTBEAT_SECS
    with _lock:
        now = time.monotonic()
        _activity.update(every=float(every), last=now, since=now, status=None)
        if every > 0:
            if _activity["thread"] is None:
                t = threading.Thread(target=_heartbeat_loop, name="jaxedit-heartbeat", daemon=True)
                _activity["thread"] = t
                t.start()
            _wake.set()


def _heartbeat_loop() -> None:
    while True:
        every = _activity["every"]
        if every <= 0:  # off: sleep until start_heartbeat wakes the thread
            _wake.wait()
            _wake.clear()
            continue
        time.sleep(min(every / 4, 1.0))
        try:
            _beat()
        except Exception:  # never let the heartbeat stop a command
            pass


def output_seen() -> None:
    """Something was just printed (a result, a skipped line): remove the heartbeat's terminal line first and restart
    its silence count. The command line calls it for everything it prints besides status lines and bars."""
    with _lock:
        _end_spinner()
        _activity["last"] = time.monotonic()


def _beat() -> None:
    with _lock:
        every, now = _activity["every"], time.monotonic()
        reporter = _current_reporter()
        if reporter is None or every <= 0 or _activity["bars"] > 0:  # an open bar redraws itself
            return
        spinner = _activity["spinner"]
        if spinner is not None:  # on a terminal: redraw the elapsed time in place
            spinner.refresh()
            _activity["last"] = now
            return
        if now - _activity["last"] < every:
            return
        status = _activity["status"]
        if _stderr_isatty():
            from tqdm import tqdm

            spinner = tqdm(total=None, desc="  still working" + (f" ({status})" if status else ""),
                           bar_format="{desc}: {elapsed}", leave=False, file=sys.stderr, initial=0,
                           dynamic_ncols=True)
            spinner.start_t -= now - _activity["since"]  # the time since the last status line, as into a pipe
            spinner.refresh()
            _activity["spinner"] = spinner
        else:
            reporter(f"  ... still working, {now - _activity['since']:.0f} s since: {status or 'the start'}")
        _activity["last"] = now


def _end_spinner() -> None:
    """Remove the heartbeat's line from the terminal (before other output)."""
    with _lock:
        spinner, _activity["spinner"] = _activity["spinner"], None
        if spinner is not None:
            try:
                spinner.close()
            except Exception:
                pass


def stop_heartbeat() -> None:
    """Turn the heartbeat off and clear its terminal line, if shown (a command calls it when it ends)."""
    with _lock:
        _activity["every"] = 0.0
        _end_spinner()


def bars_enabled() -> bool:
    return _bars_on()


class _NoBar:
    n = 0

    def update(self, n=1):
        self.n += n

    def set_postfix_str(self, *a, **k):
        pass

    def write(self, s, *a, **k):  # what tqdm.write would print above the bar: a status line
        stage(s)

    def set_description_str(self, *a, **k):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _TickingBar:
    """A tqdm bar redrawn every ``every`` seconds by a background thread, so that its elapsed time keeps moving
    during a long compiled call (tqdm itself redraws only when updated). While it is open the heartbeat is quiet."""

    def __init__(self, bar, every: float):
        self._bar, self._every, self._stop = bar, every, threading.Event()
        with _lock:
            _activity["bars"] += 1
        threading.Thread(target=self._tick, name="jaxedit-bar", daemon=True).start()

    def _tick(self):
        while not self._stop.wait(self._every):
            try:
                self._bar.refresh()
            except Exception:  # closed meanwhile
                return

    def __getattr__(self, name):
        return getattr(self._bar, name)

    def close(self):
        if not self._stop.is_set():
            self._stop.set()
            with _lock:
                _activity["bars"] -= 1
                _activity["last"] = time.monotonic()
        self._bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def bar(total: int, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True, tick: float = 1.0):
    """A progress bar (tqdm on stderr) when bars are on and ``enabled``; a silent object with the same methods
    otherwise. Use as a context manager. The bar is redrawn every ``tick`` seconds on a terminal, at the heartbeat's
    interval (:data:`HEARTBEAT_SECS` when it is off) into a file or pipe (its elapsed time moves while a long call
    runs). Its rate counts this run's units only (``initial`` units were done earlier)."""
    if not (_bars_on() and enabled):
        nb = _NoBar()
        nb.n = initial
        return nb
    from tqdm import tqdm

    with _lock:  # no heartbeat line may appear between clearing it and the bar being counted as open
        _end_spinner()
        b = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
        return _TickingBar(b, (tick or 1.0) if _stderr_isatty() else _activity["every"] or HEARTBEAT_SECS)


def set_resume_note(note: Union[None, str, Callable[[], Optional[str]]]) -> None:
    """What an interrupted run keeps, e.g. ``lambda: f"{done} of {total} prompts kept in {out}/, rerun to resume"``."""
    global _note
    _note = note


class resume_note_while:
    """Context manager: ``note`` is the resume note inside the block; the one before it is restored after."""

    def __init__(self, note):
        self.note = note

    def __enter__(self):
        global _note
        self.previous, _note = _note, self.note
        return self

    def __exit__(self, *exc):
        global _note
        _note = self.previous
        return False


_interrupt_hooks: list = []


class on_interrupt:
    """Context manager: ``fn()`` runs if the command is interrupted inside the block (before the process ends; the
    CLI calls :func:`run_interrupt_hooks`), e.g. to record the time a stage had spent."""

    def __init__(self, fn: Callable[[], None]):
        self.fn = fn

    def __enter__(self):
        _interrupt_hooks.append(self.fn)
        return self

    def __exit__(self, *exc):
        if self.fn in _interrupt_hooks:
            _interrupt_hooks.remove(self.fn)
        return False


def run_interrupt_hooks() -> None:
    """Run the :class:`on_interrupt` functions in force, innermost first (errors ignored: never let them stop an
    interrupt)."""
    for fn in reversed(list(_interrupt_hooks)):
        try:
            fn()
        except Exception:
            pass


def resume_note() -> Optional[str]:
    note = _note
    try:
        return note() if callable(note) else note
    except Exception:  # never let the note stop an interrupt
        return None


# ---------------------------------------------------------------------------------------------- compilation

def compile_cache_env_path() -> Optional[str]:
    """The folder ``$JAXEDIT_COMPILE_CACHE`` names (absolute); None when it is unset or a switch (0 / off / false /
    no, 1 / on / true / yes)."""
    env = os.environ.get(COMPILE_CACHE_ENV, "").strip()
    if env.lower() in ("", "0", "off", "false", "no", "1", "on", "true", "yes"):
        return None
    return os.path.abspath(os.path.expanduser(env))


def compile_cache_dir() -> Optional[str]:
    """Where compiled programs are kept: ``$JAXEDIT_COMPILE_CACHE`` when it is a path, else ``<cache>/xla``; None
    when ``$JAXEDIT_COMPILE_CACHE`` is 0 / off / false."""
    if os.environ.get(COMPILE_CACHE_ENV, "").strip().lower() in ("0", "off", "false", "no"):
        return None
    return compile_cache_env_path() or os.path.join(cache_dir(), "xla")


def enable_compile_cache(path: Optional[str] = None, min_compile_secs: Optional[float] = None) -> Optional[str]:
    """Turn on JAX's persistent compilation cache (programs that took at least ``min_compile_secs`` to compile are
    written to ``path``, default :func:`compile_cache_dir`). Does nothing when the cache is turned off or when the
    process already has a cache directory. Returns the directory in use (None: off)."""
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    path = path or compile_cache_dir()
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None  # an unwritable cache directory only costs compile time
    jax.config.update("jax_compilation_cache_dir", path)
    if min_compile_secs is None:
        min_compile_secs = float(os.environ.get("JAXEDIT_COMPILE_CACHE_MIN_SECS", MIN_COMPILE_SECS))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _listen_for_cache_hits()
    return path


def _listen_for_cache_hits() -> None:
    if _cache_events.get("listening"):
        return
    try:
        from jax import monitoring

        def on_event(event, **kwargs):
            if event == "/jax/compilation_cache/cache_hits":
                _cache_events["hits"] += 1

        monitoring.register_event_listener(on_event)
        _cache_events["listening"] = True
    except Exception:  # monitoring is an optional nicety
        pass


def compiled(jitted, *args, what: str, **static):
    """``jitted`` compiled for these arguments (static ones by keyword), once per process for each combination of
    static values and argument shapes; the first time, a status line says it is compiling ``what`` and how long it
    took (or that it came from the persistent cache). Call the result with the non-static arguments."""
    import jax

    leaves, tree = jax.tree.flatten(args)
    key = (id(jitted), tree, tuple((a.shape, str(a.dtype), getattr(a, "sharding", None))  # placed on a mesh or not
                                   if hasattr(a, "shape") and hasattr(a, "dtype") else a for a in leaves),
           tuple(sorted(static.items())))
    exe = _compiled.get(key)
    if exe is None:
        stage(f"compiling {what}")
        t0, hits = time.perf_counter(), _cache_events["hits"]
        exe = jitted.lower(*args, **static).compile()
        dt = time.perf_counter() - t0
        source = "loaded from the compile cache" if _cache_events["hits"] > hits else "compiled"
        stage(f"{source} in {dt:.1f} s")
        _compiled[key] = exe
    return exe


def clear_compiled() -> None:
    """Drop every compiled program this process holds (:func:`compiled`'s and JAX's own caches). Each XLA:CPU
    program keeps a few memory mappings alive, and Linux allows a process about 65,000 (``vm.max_map_count``):
    a long-lived process that compiles thousands of distinct programs (a test session, a notebook trying many
    shapes) crashes inside XLA when it runs out. Programs compile again when next needed."""
    import jax

    _compiled.clear()
    jax.clear_caches()


def memory_mappings() -> Optional[int]:
    """How many memory mappings this process holds (Linux; None elsewhere)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------- memory

def default_memory_budget() -> float:
    """Bytes of working memory one chunk of a batched computation may use: a quarter of the accelerator's, or
    2 GiB on CPU."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" in stats:
            return stats["bytes_limit"] / 4
    except Exception:
        pass
    return 2 * 2**30
