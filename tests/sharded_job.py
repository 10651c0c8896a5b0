"""The background process of tests/sharded_checks.py (8 CPU devices), shared by the processes of one test run:
tests/conftest.py starts it when the tests that read its report are collected (in the only test process, or in
xdist's first worker) and stops it at the end of the run; tests/test_sharding.py's ``report`` fixture waits for it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
_job: dict = {}


def work_dir() -> str:
    """The checks' folder, the same in every process of one test run (xdist's workers inherit the run id that
    tests/conftest.py sets in the first process)."""
    return os.path.join(tempfile.gettempdir(), f"jaxedit-sharded-{os.environ['JAXEDIT_TEST_RUN']}")


def start(items, fast_meshes):
    """Start tests/sharded_checks.py for what the selected ``items`` of tests/test_sharding.py read: the meshes they name (the fast ones
    always) and the two-process run when its test is selected. One process of a run starts it (the only one, or
    xdist's first worker); any process's ``report`` fixture waits for it."""
    if _job:
        return
    items = [item for item in items if "report" in getattr(item, "fixturenames", ())]
    if not items:
        return
    meshes, multihost = set(fast_meshes), False
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        meshes.update([params["mesh"]] if "mesh" in params else [])
        multihost |= item.originalname == "test_two_processes_write_the_results_of_one"
    work = work_dir()
    os.makedirs(work)
    env = dict(os.environ, JAXEDIT_CHECKS_DUMP=os.path.join(work, "hlo"), JAXEDIT_CACHE=os.path.join(work, "cache"))
    env.pop("XLA_FLAGS", None)
    log = open(os.path.join(work, "checks.log"), "w")
    args = [a for m in sorted(meshes) for a in ("--mesh", m)] + (["--multihost"] if multihost else [])
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "sharded_checks.py"), work,
                             os.path.join(work, "report.json"), *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    with open(os.path.join(work, "pid"), "w") as f:
        f.write(str(proc.pid))
    _job.update(proc=proc, log=log)


def stop():
    """At the end of the run (in the process that runs the session: the only one, or xdist's controller): stop the
    checks if they still run and remove their folder."""
    work = work_dir()
    if _job:
        if _job["proc"].poll() is None:
            _job["proc"].kill()
        _job["proc"].wait()
        _job["log"].close()
        _job.clear()
    elif os.path.isfile(os.path.join(work, "pid")):  # started by a worker process that has ended
        try:
            os.kill(int(open(os.path.join(work, "pid")).read()), 9)
        except (OSError, ValueError):
            pass
    shutil.rmtree(work, ignore_errors=True)


def running(work) -> bool:
    if _job:
        return _job["proc"].poll() is None
    try:
        pid = int(open(os.path.join(work, "pid")).read())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return not os.path.isfile(os.path.join(work, "pid"))  # not started yet: the starting worker is collecting
    with open(f"/proc/{pid}/stat") as f:  # an ended child of another process stays as a zombie until reaped
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


