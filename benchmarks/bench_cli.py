"""How the command line feels: seconds before the first output, the longest silence, seconds to exit after Ctrl-C,
seconds until the first result is on disk, and a second process's time with and without the compile cache.

Each measurement runs ``jaxedit`` in a pseudo-terminal (as a user sees it: progress bars redraw in place) and
timestamps every line of output. Examples (``--jaxedit`` picks the executable, e.g. another checkout's venv)::

    python benchmarks/bench_cli.py timeline -- trace --prompt "The Eiffel Tower is located in the city of" \\
        --subject "The Eiffel Tower" --out /tmp/t1
    python benchmarks/bench_cli.py timeline --signal-after 40 -- trace --batch facts.jsonl --kinds hidden --out /tmp/t2
    python benchmarks/bench_cli.py cache --repeat 2 -- trace --prompt ... --subject ... --out /tmp/t3

``cache`` runs the command once to fill a fresh compile cache, then alternates runs without the cache
(``JAXEDIT_COMPILE_CACHE=0``) and with it, and prints a table (an ``{out}`` in the command is replaced by a fresh
folder per run).
"""
from __future__ import annotations

import argparse
import fcntl
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time


def timeline(cmd, env=None, signal_after=None, first_file=None, echo=True):
    """Run ``cmd`` in a pty. Returns a dict: lines [(t, text)], exit code, wall seconds, seconds from the signal
    to the exit, the first output, the longest silence, and when ``first_file`` first existed with a line in it."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    buf, lines, sent, first_row = b"", [], None, None
    while True:
        ready, _, _ = select.select([master], [], [], 0.05)
        now = time.time()
        if ready:
            try:
                data = os.read(master, 4096)
            except OSError:
                data = b""
            if not data and proc.poll() is not None:
                break
            buf += data
            parts = re.split(rb"[\r\n]", buf)
            buf = parts.pop()
            for part in parts:
                text = part.decode(errors="replace").strip()
                if text:
                    lines.append((now - t0, text))
                    if echo:
                        print(f"{now - t0:8.2f}s | {text[:150]}", flush=True)
        elif proc.poll() is not None:
            break
        if first_file and first_row is None and os.path.isfile(first_file) and os.path.getsize(first_file) > 0:
            first_row = now - t0
        if signal_after is not None and sent is None and now - t0 >= signal_after:
            os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole foreground group
            sent = now
            if echo:
                print(f"{now - t0:8.2f}s >>> Ctrl-C", flush=True)
    rc = proc.wait()
    end = time.time()
    marks = [0.0] + [t for t, _ in lines] + [end - t0]
    gaps = [(b - a, b) for a, b in zip(marks, marks[1:])]
    return {"lines": lines, "rc": rc, "wall": end - t0, "after_signal": None if sent is None else end - sent,
            "first_output": lines[0][0] if lines else None, "longest_silence": max(gaps)[0],
            "first_row": first_row}


def summary(r):
    out = [f"exit {r['rc']} after {r['wall']:.1f} s"]
    if r["after_signal"] is not None:
        out.append(f"{r['after_signal']:.2f} s after Ctrl-C")
    if r["first_output"] is not None:
        out.append(f"first output at {r['first_output']:.1f} s")
    out.append(f"longest silence {r['longest_silence']:.1f} s")
    if r["first_row"] is not None:
        out.append(f"first result on disk at {r['first_row']:.1f} s")
    return "; ".join(out)


def load():
    return os.getloadavg()[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["timeline", "cache"])
    ap.add_argument("--jaxedit", default=shutil.which("jaxedit") or "jaxedit")
    ap.add_argument("--signal-after", type=float, help="timeline: send Ctrl-C after this many seconds")
    ap.add_argument("--first-file", help="timeline: report when this file first holds something")
    ap.add_argument("--repeat", type=int, default=2, help="cache: runs of each kind after the warm-up")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:split])
    args = argv[split + 1:]
    if a.mode == "timeline":
        print(f"load average {load():.1f}")
        print(summary(timeline([a.jaxedit, *args], signal_after=a.signal_after, first_file=a.first_file)))
        return
    work = tempfile.mkdtemp(prefix="bench-cli-")
    cache = os.path.join(work, "xla")
    rows = []

    def run(label, cache_value, i):
        cmd = [a.jaxedit, *[x.replace("{out}", os.path.join(work, f"{label}{i}")) for x in args]]
        env = dict(os.environ, JAXEDIT_COMPILE_CACHE=cache_value)
        before = load()
        r = timeline(cmd, env=env, echo=False)
        compiled = [t for _, t in r["lines"] if re.match(r"(compiled|loaded from the compile cache) in", t)]
        rows.append((label, r["wall"], before, r["rc"], compiled))
        print(f"{label:<8} {r['wall']:7.1f} s (load {before:.1f}, exit {r['rc']}): {'; '.join(compiled)}",
              flush=True)

    run("warm-up", cache, 0)
    for i in range(1, a.repeat + 1):
        run("cold", "0", i)
        run("cached", cache, i)
    for label in ("cold", "cached"):
        walls = [w for l, w, *_ in rows if l == label]
        print(f"{label}: mean {sum(walls) / len(walls):.1f} s over {len(walls)} runs")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
