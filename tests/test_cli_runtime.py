"""What every command shares (cli/app.py, jaxedit/runtime.py): interrupts, status lines, the compile cache, --skip-bad,
reruns into the same folder, input order, the noise level, transformers' advice, offline statistics."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

from jaxedit.cli.main import cli

PROMPTS = [{"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower"},
           {"prompt": "Miles Davis plays the", "subject": "Miles Davis"},
           {"prompt": "The Space Needle is in", "subject": "Space Needle"}]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def rows_of(out):
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def gpt2_dir(tiny_dirs):
    return tiny_dirs["gpt2"][0]


class Process:
    """A ``jaxedit`` command in a subprocess, its output collected line by line as it comes."""

    def __init__(self, args, env_extra):
        env = dict(os.environ, **env_extra)
        self.proc = subprocess.Popen([sys.executable, "-c", "from jaxedit.cli.main import main; main()",
                                      *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        self.lines = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")),
                                       daemon=True)
        self.reader.start()

    @property
    def output(self):
        return "".join(self.lines)

    def wait_for(self, ready, timeout=180):
        t0 = time.time()
        while not ready():
            if self.proc.poll() is not None or time.time() - t0 > timeout:
                raise AssertionError(f"not ready (exit {self.proc.poll()}): {self.output}")
            time.sleep(0.05)

    def stop(self, signum):
        """Send ``signum``; return the seconds until the process ended."""
        t0 = time.time()
        self.proc.send_signal(signum)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:  # still running: the assertion on the time reports it
            pass
        finally:
            self.proc.kill()
        took = time.time() - t0
        self.reader.join(5)
        return took


@pytest.fixture(scope="module")
def gpt2_native(tiny_dirs, tmp_path_factory):
    """The tiny GPT-2 as a jaxedit directory: a new process loads it (and its tokenizer) faster."""
    import jaxedit
    from jaxedit.loading.native import save_native

    path = str(tmp_path_factory.mktemp("native") / "gpt2")
    save_native(*jaxedit.load(tiny_dirs["gpt2"][0]), path)
    return path


@pytest.mark.slow
def test_interrupt_ends_at_once_keeps_results_and_resumes(gpt2_native, tmp_path):
    """Ctrl-C, then SIGTERM, in the middle of a compiled call (many noisy samples: several seconds): the process
    ends within 2 s with the finished prompt kept; the second process resumes from it and loads its program from
    the compile cache the first one wrote. The first prompt's span is late in the prompt, so its grid has few rows
    and is quick; the others' spans start at the first token: their calls are the long ones, never run to the end."""
    src = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "Miles Davis plays the", "span": [9, 10]},
                                             {"prompt": "Miles Davis plays a", "span": [0, 2]},
                                             {"prompt": "Miles Davis plays my", "span": [0, 2]}])
    out = tmp_path / "o"
    args = ["trace", "--model", gpt2_native, "--batch", src, "--out", out, "--kinds", "hidden", "--samples", 20000,
            "--no-plots", "--batch-size", 1]
    # every program is written to the cache, however fast it compiled: JAX keeps only those whose XLA compile (not
    # counting tracing and lowering) took JAXEDIT_COMPILE_CACHE_MIN_SECS, which the test process passes on (0.5 s,
    # the library's default, in CI and in a run without a kept folder), and the second prompt's program takes about
    # that long: on a fast machine the first process would not write it, and the second one would compile it again
    env = {"JAXEDIT_COMPILE_CACHE": str(tmp_path / "xla"), "JAXEDIT_COMPILE_CACHE_MIN_SECS": "0"}
    results = out / "results.jsonl"
    for signum in (signal.SIGINT, signal.SIGTERM):
        p = Process(args, env)
        if signum == signal.SIGINT:  # the first prompt written, the second one's program compiled: it runs
            p.wait_for(lambda: results.is_file() and p.output.count("compiled in") == 2)
        else:  # the stored prompt reused, the second one's program loaded from the compile cache: it runs
            p.wait_for(lambda: "loaded from the compile cache" in p.output)
        time.sleep(0.3)
        took = p.stop(signum)
        assert took < 2.0, (took, p.output)
        assert p.proc.returncode == 128 + signum, p.output
        name = "interrupted" if signum == signal.SIGINT else "terminated"
        assert f"{name}; 1 of 3 prompts kept in {out}/, rerun to resume" in p.output, p.output
        assert [json.loads(x)["line"] for x in results.read_text().splitlines()] == [1]  # intact, nothing torn
        assert json.loads((out / "run.json").read_text())["samples"] == 20000
    assert "reusing 1 stored result from" in p.output, p.output


def test_transformers_advice_is_silenced():
    """transformers' "PyTorch was not found" advice (printed when torch is absent) does not reach the user."""
    hide_torch = ("import importlib.util as u; f = u.find_spec; "
                  "u.find_spec = lambda n, *a, **k: None if n == 'torch' else f(n, *a, **k); ")
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    out = subprocess.run([sys.executable, "-c", hide_torch + "import jaxedit.cli.main, transformers"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "PyTorch was not found" not in out.stderr + out.stdout, out.stderr


@pytest.mark.slow
def test_transformers_advice_is_silenced_in_library_use():
    """`import jaxedit` alone (no CLI, no environment variable) drops the "PyTorch was not found" notice of a
    transformers imported without torch, and only that: its other warnings still show."""
    hide_torch = ("import importlib.util as u; f = u.find_spec; "
                  "u.find_spec = lambda n, *a, **k: None if n == 'torch' else f(n, *a, **k); ")
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    other = "; transformers.utils.logging.get_logger('transformers').warning('another transformers warning')"
    for pre, notice in (("", True), ("import jaxedit; ", False)):
        out = subprocess.run([sys.executable, "-c", hide_torch + pre + "import transformers" + other],
                             capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        assert ("PyTorch was not found" in out.stderr) == notice, out.stderr  # without jaxedit: shown (test can fail)
        assert "another transformers warning" in out.stderr


@pytest.mark.slow
def test_skip_bad_reports_every_bad_line(gpt2_dir, tmp_path):
    bad = ["{not json", json.dumps({"subject": "Miles"}), json.dumps({"prompt": "Miles Davis plays the"}),
           json.dumps({"prompt": "Miles Davis plays the", "subject": "Coltrane"}), "[1, 2]"]
    src = write_jsonl(tmp_path / "r.jsonl", [PROMPTS[1]] + bad)
    out = tmp_path / "o"
    res = CliRunner().invoke(cli, ["trace", "--model", gpt2_dir, "--batch", src, "--out", str(out), "--samples", 2,
                                   "--kinds", "hidden", "--no-plots", "--skip-bad"])
    assert res.exit_code == 1, res.output
    for line, msg in [(2, "malformed JSON"), (3, "missing \"prompt\""), (4, "give \"subject\""),
                      (5, "span 'Coltrane' does not occur"), (6, "expected a JSON object")]:
        assert f"skipped {src}:{line}: {msg}" in res.output, res.output
    assert "5 bad lines skipped (listed above); exit status 1" in res.output
    assert [r["line"] for r in rows_of(out)] == [1]
    # without --skip-bad the first bad line stops the run before anything is written
    res = CliRunner().invoke(cli, ["trace", "--model", gpt2_dir, "--batch", src, "--out", str(tmp_path / "p")])
    assert res.exit_code == 2 and res.output.strip().splitlines()[-1].startswith(f"error: {src}:2: malformed JSON")
    assert not (tmp_path / "p").exists()
    # saliency and edit files the same way; a file with no good line is an error
    res = CliRunner().invoke(cli, ["saliency", "--model", gpt2_dir, "--batch", src, "--out", str(tmp_path / "s"),
                                   "--skip-bad"])
    assert res.exit_code == 1 and f"skipped {src}:2: malformed JSON" in res.output, res.output
    assert [e["line"] for e in json.loads((tmp_path / "s" / "saliency.json").read_text())["examples"]] == [1, 4, 5]
    edits = write_jsonl(tmp_path / "e.jsonl", bad + [{"prompt": "Miles Davis plays the", "subject": "Miles",
                                                      "suppress": " trumpet"}])
    res = CliRunner().invoke(cli, ["edit", "--model", gpt2_dir, "--requests", edits, "--out", str(tmp_path / "e"),
                                   "--skip-bad", "--layers", "0"])
    assert res.exit_code == 2, res.output
    assert f"skipped {edits}:6: needs \"target\" (\"suppress\" is for jaxedit delete)" in res.output
    assert res.output.strip().splitlines()[-1] == f"error: {edits}: no valid requests (6 bad lines skipped)"


def test_rerun_into_the_same_folder(gpt2_dir, tmp_path):
    out = str(tmp_path / "o")
    base = ["trace", "--model", gpt2_dir, "--out", out, "--samples", 2, "--kinds", "hidden", "--no-plots"]
    first = CliRunner().invoke(cli, base + ["--prompt", PROMPTS[1]["prompt"], "--subject", "Miles Davis"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(cli, base + ["--prompt", PROMPTS[1]["prompt"], "--subject", "Miles Davis"])
    assert again.exit_code == 0 and f"reusing 1 stored result from {out}/results.jsonl" in again.output
    assert again.output.count("answer ") == 1  # the stored result is still summarised
    other = CliRunner().invoke(cli, base + ["--prompt", "Miles Davis plays a", "--subject", "Miles Davis",
                                            "--samples", 3])
    assert other.exit_code == 2
    assert (f"error: {out} holds a run with other options (--prompt 'Miles Davis plays a' here, "
            f"'Miles Davis plays the' there; --noise-samples 3 here, 2 there)") in other.output, other.output


@pytest.mark.slow
def test_input_order_line_numbers_and_noise_level(gpt2_dir, tmp_path):
    """Rows come out in input order with their line numbers; the noise level is recorded; with --noise-per-prompt
    a prompt gets the same level and scores alone and in a batch; without it, the level is the batch's."""
    src = write_jsonl(tmp_path / "r.jsonl", PROMPTS)  # lengths 9+, 4+, 5+ tokens: batched shortest first
    common = ["--model", gpt2_dir, "--samples", 2, "--kinds", "hidden", "--no-plots"]
    res = CliRunner().invoke(cli, ["trace", *common, "--batch", src, "--out", str(tmp_path / "b"), "--batch-size", 2,
                                   "--noise-per-prompt"])
    assert res.exit_code == 0, res.output
    rows = rows_of(tmp_path / "b")
    assert [r["line"] for r in rows] == [1, 2, 3] and all(r["noise_per_prompt"] for r in rows)
    alone = CliRunner().invoke(cli, ["trace", *common, "--prompt", PROMPTS[1]["prompt"], "--subject", "Miles Davis",
                                     "--out", str(tmp_path / "a"), "--noise-per-prompt"])
    assert alone.exit_code == 0, alone.output
    a = rows_of(tmp_path / "a")[0]
    assert a["noise_level"] == pytest.approx(rows[1]["noise_level"], rel=1e-6)
    za, zb = (np.load(tmp_path / d / f) for d, f in (("a", "prompt00001_hidden.npz"), ("b", "prompt00002_hidden.npz")))
    np.testing.assert_allclose(za["scores"], zb["scores"], atol=1e-5)
    assert f"noise level {a['noise_level']:.4g} = s3" in alone.output
    shared = CliRunner().invoke(cli, ["trace", *common, "--batch", src, "--out", str(tmp_path / "c"),
                                      "--batch-size", 2])  # the programs of the first run
    assert shared.exit_code == 0, shared.output
    levels = {r["noise_level"] for r in rows_of(tmp_path / "c")}
    assert len(levels) == 1 and levels.pop() == pytest.approx(json.loads((tmp_path / "c" / "run.json").read_text())
                                                              ["level"])
    assert "all 3 prompts' spans; --noise-per-prompt for one level per prompt" in shared.output
    assert len({r["noise_level"] for r in rows}) == 3
    # the file's spans changed: resuming would mix two noise levels in one run
    write_jsonl(tmp_path / "r.jsonl", PROMPTS[:2] + [dict(PROMPTS[2], subject="Needle")])
    again = CliRunner().invoke(cli, ["trace", *common, "--batch", src, "--out", str(tmp_path / "c"),
                                     "--batch-size", 2])
    assert again.exit_code == 2 and "(the spans traced together changed)" in again.output, again.output


def test_default_corpus_falls_back_to_cached_statistics(tiny_dirs, tmp_path, monkeypatch):
    """Offline, the default corpus is unreachable: statistics cached from another corpus for the same model and
    layers are used, with a line saying which; none cached: the error names --corpus model."""
    import jaxedit
    from jaxedit.edit import stats as st

    monkeypatch.setenv("JAXEDIT_CACHE", str(tmp_path / "cache"))

    def unreachable(name):
        raise jaxedit.JaxeditError(f"cannot reach corpus {name!r} (offline); use ... --corpus model")
        yield  # a generator, as the real one

    monkeypatch.setattr(st, "_dataset_texts", unreachable)
    model_dir = tiny_dirs["llama-mha-tied"][0]
    args = ["stats", "--model", model_dir, "--layers", "0-1", "--samples", 4, "--max-len", 16]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2 and "--corpus model" in res.output.strip().splitlines()[-1], res.output
    corpus = tmp_path / "texts.txt"
    corpus.write_text("The Eiffel Tower is in Paris.\nMiles Davis plays the trumpet.\n")
    assert CliRunner().invoke(cli, args + ["--corpus", str(corpus), "--samples", 2]).exit_code == 0
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    key = st.corpus_key(str(corpus), 0, 8)
    assert ("the default corpus wikitext:wikitext-103-raw-v1 is unreachable; using the key statistics cached from "
            f"corpus {key} (2 texts of <= 16 tokens, float32) for layers [0, 1]") in res.output, res.output


def test_a_killed_writers_temporary_folder_is_removed(tmp_path):
    """Model folders are written into a temporary sibling and renamed; one left by a killed process (its pid is in
    the name and no longer runs) is removed by the next writer, a live process's is left alone."""
    from jaxedit.loading.native import atomic_dir

    dead, live = tmp_path / ".tmp-999999999-abc", tmp_path / f".tmp-{os.getpid()}-xyz"
    dead.mkdir()
    live.mkdir()
    with atomic_dir(str(tmp_path / "model")) as tmp:
        (tmp_path / "model-was-here").write_text(tmp)
    assert (tmp_path / "model").is_dir() and not dead.exists() and live.exists()


def test_plots_have_titles(tmp_path, monkeypatch):
    """Per-prompt heatmaps name the prompt, the answer and its clean / corrupted p."""
    import matplotlib.figure

    from jaxedit.locate import trace_files as tf
    from jaxedit.locate.tracing import TraceResult

    titles = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: titles.append(fig._suptitle.get_text() if fig._suptitle else None))
    r = TraceResult(kind="hidden", scores=np.full((3, 2), 0.1), low_score=0.05, high_score=0.7, answer_id=7,
                    answer=" Paris", input_ids=np.arange(3), tokens=["The", " Tower", " is"], span=(0, 2), window=10,
                    samples=10, noise_level=0.1)
    tf.plot_heatmaps({"hidden": r}, str(tmp_path / "p"), title=tf.heatmap_title("The Tower is", r))
    # png and pdf; a long title is wrapped to the figure's width (the words and their order are what count)
    want = "'The Tower is' -> ' Paris': clean p = 0.700, corrupted p = 0.050"
    assert [" ".join(t.split()) for t in titles] == [want] * 2


def test_clear_compiled_releases_the_programs_memory_mappings():
    """runtime.clear_compiled drops the programs of runtime.compiled and of jax.jit (a long test session would
    otherwise reach Linux's per-process mapping limit): the mapping count, read from /proc/self/maps by hand, falls
    back by at least half of what compiling 16 distinct programs added, and a cleared program compiles again."""
    import gc

    import jax
    import jax.numpy as jnp

    from jaxedit import runtime

    def count():
        with open("/proc/self/maps") as f:
            return len(f.readlines())

    gc.collect()
    before = count()
    assert runtime.memory_mappings() == pytest.approx(before, abs=5)
    fns = [jax.jit(lambda x, i=i: jnp.tanh(x @ x.T + i).sum()) for i in range(16)]
    exe = runtime.compiled(fns[0], jnp.ones((3, 8)), what="a test program")
    for i, f in enumerate(fns):
        f(jnp.ones((i + 2, 8))).block_until_ready()
    grown = count()
    assert grown - before >= 16, (before, grown)
    del exe
    runtime.clear_compiled()
    gc.collect()
    after = count()
    assert after - before <= (grown - before) / 2, (before, grown, after)
    assert not runtime._compiled
    np.testing.assert_allclose(float(fns[1](jnp.ones((3, 8)))), 9 * np.tanh(9.0), rtol=1e-6)


def test_one_vocabulary_old_spellings_accepted_not_shown(tiny_dirs):
    """docs/cli.md's shared names: --help shows the current name only; the old spelling still parses (a value out
    of range is reported under the current name, in the one range form); info takes --model like every command."""
    import re

    renamed = [("trace", "--noise-samples", "--samples"), ("edit", "--stats-samples", "--samples"),
               ("stats", "--stats-samples", "--samples"), ("detox", "--stats-samples", "--samples"),
               ("delete", "--delete-objective", "--objective"), ("detox", "--kl-weights", "--kl-weight"),
               ("detox", "--profs-rank", "--profs-ranks")]
    for cmd, new, old in renamed:
        text = CliRunner().invoke(cli, [cmd, "--help"], terminal_width=200).output
        assert re.search(rf"(?<![\w-]){new}(?![\w-])", text), (cmd, new)
        assert not re.search(rf"(?<![\w-]){old}(?![\w-])", text), (cmd, old, text)
    for args, msg in [(["trace", "--samples", "0"], "error: --noise-samples must be >= 1 (got 0)"),
                      (["stats", "--layers", "0", "--samples", "-3"], "error: --stats-samples must be >= 1 (got -3)"),
                      (["dinm", "--cases", "demo", "--lr", "0"], "error: --lr must be > 0 (got 0.0)"),
                      (["detox", "--prompts", "demo", "--top-p", "0"], "error: --top-p must be in (0, 1] (got 0.0)"),
                      (["delete", "--requests", "r.jsonl", "--objective", "x"],
                       "error: Invalid value for '--delete-objective': 'x' is not one of")]:
        res = CliRunner().invoke(cli, ["-q", *args])
        assert res.exit_code == 2 and res.output.startswith(msg) and res.output.count("\n") == 1, (args, res.output)
    for cmd, out in [("trace", "trace_out"), ("detox", "detox_out"), ("dinm", "dinm_out"), ("saliency", "saliency_out")]:
        assert f"[default: {out}]" in CliRunner().invoke(cli, [cmd, "--help"], terminal_width=200).output, cmd
    model = tiny_dirs["gpt2"][0]
    by_option = CliRunner().invoke(cli, ["info", "--model", model])
    assert by_option.exit_code == 0 and by_option.output == CliRunner().invoke(cli, ["info", model]).output
    assert f"model       {model}" in by_option.output
    both = CliRunner().invoke(cli, ["info", "smollm2", "--model", model])
    assert both.exit_code == 2 and both.output.startswith("error: two models given"), both.output


@pytest.mark.slow
def test_never_silent_for_more_than_a_few_seconds(gpt2_native, tmp_path):
    """From its first output to its end, a command's output (stderr and stdout, read as it comes) never pauses for
    more than ~5 s: not after the model loads (a 7 s step added there: silent without the heartbeat), not in
    a long compiled call under a bar (6,000 noisy samples: ~6 s), not in a compile."""
    src = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "Miles Davis plays the", "span": [0, 2]}])
    slow_load = ("import time, jaxedit; load = jaxedit.load; "
                 "jaxedit.load = lambda *a, **k: (load(*a, **k), time.sleep(7))[0]; " + os.environ.get("_PRE", ""))
    env = dict(os.environ, JAXEDIT_COMPILE_CACHE="0", JAXEDIT_HEARTBEAT_SECS="4")  # the default (off in tests)
    proc = subprocess.Popen([sys.executable, "-c", slow_load + "from jaxedit.cli.main import main; main()", "trace",
                             "--model", gpt2_native, "--batch", src, "--out", str(tmp_path / "o"), "--kinds", "hidden",
                             "--noise-samples", "6000", "--no-plots", "--batch-size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    chunks = []  # (arrival time, bytes)
    while True:
        data = os.read(proc.stdout.fileno(), 65536)
        if not data:
            break
        chunks.append((time.monotonic(), data))
    end = time.monotonic()
    assert proc.wait() == 0, b"".join(c for _, c in chunks).decode()
    text = b"".join(c for _, c in chunks).decode()
    times = [t for t, _ in chunks] + [end]
    gaps = np.diff(times)
    worst = int(np.argmax(gaps))
    assert gaps.max() <= 6.0, (gaps.max(), text[:2000], chunks[worst][1])
    assert "still working" in text and "loading" in text, text  # the slow load was reported, not silent
    assert text.count("\r") > 2, text  # the bar redrawn while the long calls ran


def test_heartbeat_line_on_a_terminal_and_in_a_log(monkeypatch, capsys):
    """The heartbeat's two forms, driven by hand: into a pipe, a "still working" line naming the last status; on a
    terminal, one line redrawn in place (a tqdm line) and removed before the next status line; nothing while a bar
    is open or after the command ends."""
    from jaxedit import runtime

    lines = []
    with runtime._lock:  # no heartbeat thread of another test fires meanwhile (the lock is re-entrant)
        monkeypatch.setattr(runtime, "_reporter", lines.append)
        monkeypatch.setitem(runtime._activity, "every", 4.0)
        runtime.stage("compiling the sampler")
        runtime._beat()
        assert lines == ["compiling the sampler"]  # not silent for 4 s yet
        monkeypatch.setitem(runtime._activity, "last", time.monotonic() - 5)
        monkeypatch.setattr(runtime, "_stderr_isatty", lambda: False)
        runtime._beat()
        assert len(lines) == 2 and lines[1].startswith("  ... still working, ") and lines[1].endswith(
            "s since: compiling the sampler"), lines
        monkeypatch.setitem(runtime._activity, "last", time.monotonic() - 5)
        monkeypatch.setitem(runtime._activity, "bars", 1)  # an open bar redraws itself
        runtime._beat()
        assert len(lines) == 2
        monkeypatch.setitem(runtime._activity, "bars", 0)
        monkeypatch.setattr(runtime, "_stderr_isatty", lambda: True)
        monkeypatch.setitem(runtime._activity, "since", time.monotonic() - 12)
        runtime._beat()
        spinner = runtime._activity["spinner"]
        assert spinner is not None and "still working (compiling the sampler)" in str(spinner) and len(lines) == 2
        assert 12 <= spinner.format_dict["elapsed"] < 20  # counted from the status line, as into a pipe
        runtime.output_seen()  # a printed result removes the line too
        assert runtime._activity["spinner"] is None and spinner.disable is True
        monkeypatch.setitem(runtime._activity, "last", time.monotonic() - 5)
        runtime._beat()
        spinner = runtime._activity["spinner"]
        runtime.stage("compiled in 9.0 s")
        assert runtime._activity["spinner"] is None and spinner.disable is True  # closed before the next line
        assert lines[-1] == "compiled in 9.0 s"
        runtime.stop_heartbeat()
        monkeypatch.setitem(runtime._activity, "last", time.monotonic() - 50)
        runtime._beat()
        assert len(lines) == 3 and runtime._activity["spinner"] is None
