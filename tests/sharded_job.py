"""The background process of tests/sharded_checks.py (8 CPU devices), shared by the processes of one test run:
tests/conftest.py starts it when the tests that read its report are collected (in the only test process, or in
xdist's first worker) and stops it at the end of the run; tests/test_sharding.py's ``report`` fixture waits for it."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
_job: dict = {}


def work_dir() -> str:
    """The checks' folder, the same in every process of one test run (xdist's workers inherit the run id that
    tests/conftest.py sets in the first process)."""
    return os.path.join(tempfile.gettempdir(), f"jaxedit-sharded-{os.environ['JAXEDIT_TEST_RUN']}")


def start(items):
    """Start tests/sharded_checks.py for what the selected ``items`` that read its report (tests/test_sharding.py's,
    through the ``report`` fixture) need: the meshes they name (that file's FAST_MESHES always), the (model, mesh)
    pairs whose results they compare and which computations (FAST_RUNS always), those whose sampling they compare,
    and the persistence checks and the two-process run when their tests are selected; nothing when none reads it.
    One process of a run starts it (the only one, or xdist's first worker); any process's ``report`` fixture waits
    for it."""
    if _job:
        return
    items = [item for item in items if "report" in getattr(item, "fixturenames", ())]
    if not items:
        return
    meshes, runs, samples = set(items[0].module.FAST_MESHES), set(items[0].module.FAST_RUNS), set()
    persistence = multihost = False
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        meshes.update([params["mesh"]] if "mesh" in params else [])
        if item.originalname == "test_results_equal_single_device":
            runs.add((params["model"], params["mesh"], params["quantities"]))
        if item.originalname == "test_sampling_equals_single_device":
            samples.add((params["model"], params["mesh"]))
        persistence |= item.originalname in ("test_model_axis_divides_live_memory",
                                             "test_orbax_save_and_export_of_a_sharded_model")
        multihost |= item.originalname == "test_two_processes_write_the_results_of_one"
    work = work_dir()
    os.makedirs(work)
    try:
        env = dict(os.environ, JAXEDIT_CHECKS_DUMP=os.path.join(work, "hlo"),
                   JAXEDIT_CACHE=os.path.join(work, "cache"))
        env.pop("XLA_FLAGS", None)
        log = open(os.path.join(work, "checks.log"), "w")
        args = ([a for m in sorted(meshes) for a in ("--mesh", m)] +
                [a for m, spec, quantities in sorted(runs)
                 for a in ("--run", f"{m}@{spec}" + ("" if quantities == "all" else f":{quantities}"))] +
                [a for m, spec in sorted(samples) for a in ("--sample", f"{m}@{spec}")] +
                (["--persistence"] if persistence else []) + (["--multihost"] if multihost else []))
        # a session of its own: stopping it stops the processes it starts (the two-process run) too
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "sharded_checks.py"), work,
                                 os.path.join(work, "report.json"), *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        _write(os.path.join(work, "pid"), str(proc.pid))
    except Exception as e:  # the waiting tests report it instead of waiting for a process that never started
        _write(os.path.join(work, "start-error"), f"{type(e).__name__}: {e}")
        raise
    _job.update(proc=proc, log=log)


def _write(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _pid_of_checks(work):
    """The checks' process id, or None when the pid file is missing or that process is gone or another one now
    (a process id can be reused: the process must be sharded_checks.py of this folder)."""
    try:
        pid = int(open(os.path.join(work, "pid")).read())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if work.encode() not in f.read():
                return None
        with open(f"/proc/{pid}/stat") as f:  # an ended child of another process is a zombie until reaped
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return None
        return pid
    except (OSError, ValueError):
        return None


def stop():
    """At the end of the run (in the process that runs the session: the only one, or xdist's controller): stop the
    checks and what they started if they still run, and remove their folder."""
    work = work_dir()
    if _job:
        if _job["proc"].poll() is None:
            os.killpg(_job["proc"].pid, signal.SIGKILL)
        _job["proc"].wait()
        _job["log"].close()
        _job.clear()
    else:  # started by a worker process, which has ended
        pid = _pid_of_checks(work)
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
    shutil.rmtree(work, ignore_errors=True)


NOT_STARTED_SECS = 120  # the first worker starts the checks when it has collected the tests


def wait_for_report(work, timeout=1800):
    """The checks' report (a dict), or a one-line reason why there is none: they failed, never started, or did not
    finish in ``timeout`` seconds."""
    path = os.path.join(work, "report.json")
    t0 = time.time()
    while not os.path.isfile(path):
        if os.path.isfile(os.path.join(work, "start-error")):
            return f"tests/sharded_checks.py could not start: {open(os.path.join(work, 'start-error')).read()}"
        started = os.path.isfile(os.path.join(work, "pid"))
        if not started and time.time() - t0 > NOT_STARTED_SECS:
            return f"tests/sharded_checks.py was not started in {NOT_STARTED_SECS} s (no {work}/pid)"
        if started and (_job["proc"].poll() is not None if _job else _pid_of_checks(work) is None):
            if os.path.isfile(path):  # finished between the two looks
                break
            with open(os.path.join(work, "checks.log")) as f:
                return f"tests/sharded_checks.py ended without a report:\n{f.read()[-4000:]}"
        if time.time() - t0 > timeout:
            return f"tests/sharded_checks.py did not finish in {timeout} s"
        time.sleep(0.5)
    with open(path) as f:
        return json.load(f)
