"""`jaxedit trace`: output files, resuming a killed --batch run, and one-line errors for bad input."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from jaxedit.cli.main import cli
from reference_torch import torch_trace

REQS = [{"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower"},
        {"prompt": "Miles Davis plays the", "subject": "Miles Davis"},
        {"prompt": "The Space Needle is in", "span": [1, 3], "target": " Seattle"}]


@pytest.fixture(scope="module")
def model_dir(tiny_dirs):
    return tiny_dirs["gpt2"][0]


def run(*args):
    return CliRunner().invoke(cli, ["trace", *map(str, args)])


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_single_prompt_outputs(model_dir, tiny_dirs, tmp_path):
    """The files of one prompt, and the numbers in them against the torch loop (reference_torch.torch_trace) with
    the noise drawn as documented: level x RandomState(1).randn(samples, span, d) (the level read from the row;
    its rule is pinned by test_tracing.py::test_s3_noise_is_three_embedding_stds)."""
    out = tmp_path / "o"
    res = run("--model", model_dir, "--prompt", REQS[0]["prompt"], "--subject", "Eiffel Tower", "--samples", 3,
              "--out", out)
    assert res.exit_code == 0, res.output
    assert "answer" in res.output and "max IE" in res.output
    for f in ["results.jsonl", "prompt00001.png", "prompt00001.pdf", "aie.csv", "aie.md", "aie.png", "aie.pdf"]:
        assert (out / f).is_file(), f
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    hf, row = tiny_dirs["gpt2"][1], rows[0]
    s, e = row["span"]
    for kind in ("hidden", "mlp", "attn"):
        z = np.load(out / f"prompt00001_{kind}.npz")
        T = len(z["input_ids"])
        assert tuple(z["subject_range"]) == (s, e) and z["input_tokens"].shape == (T,)
        noise = row["noise_level"] * np.random.RandomState(1).randn(3, e - s, hf.config.n_embd)
        ref, low, high = torch_trace(hf, z["input_ids"], (s, e), noise, row["answer_id"], kind, window=10)
        np.testing.assert_allclose(z["scores"], ref, rtol=1e-4, atol=1e-7)
        assert float(z["high_score"]) == pytest.approx(high, rel=1e-4) == row["high_score"]
        assert float(z["low_score"]) == pytest.approx(low, rel=1e-4)
        # the tiny random model's grid is nearly flat (p ~ 1/vocab) but its cells differ by more than the tolerance
        assert np.ptp(ref) > 5 * 1e-4 * high
    csv = (out / "aie.csv").read_text().splitlines()
    assert csv[0].startswith("kind,group,n,layer0") and len(csv) == 1 + 3 * 6


@pytest.mark.slow
def test_batch_resumes_after_a_kill(model_dir, tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", REQS)
    out = tmp_path / "o"
    args = ("--model", model_dir, "--batch", src, "--samples", 2, "--kinds", "hidden", "--no-plots", "--out", out,
            "--batch-size", 2)
    first = run(*args)
    assert first.exit_code == 0, first.output
    full = (out / "results.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["line"] for x in full) == [1, 2, 3]
    # simulate a kill: one finished row (marked, to see it is not recomputed) and a torn second line
    kept = json.loads(full[0])
    kept["marker"] = "kept"
    (out / "results.jsonl").write_text(json.dumps(kept) + "\n" + full[1][: len(full[1]) // 2])
    again = run(*args)
    assert again.exit_code == 0, again.output
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["line"] for r in rows) == [1, 2, 3]  # none duplicated, none lost
    assert [r for r in rows if r["line"] == kept["line"]][0].get("marker") == "kept"
    redone = {r["line"]: r for r in rows}
    for x in full:
        r = json.loads(x)
        assert redone[r["line"]]["high_score"] == pytest.approx(r["high_score"], abs=1e-6)
    # a third run finds nothing to do and changes nothing
    before = (out / "results.jsonl").read_text()
    assert run(*args).exit_code == 0
    assert (out / "results.jsonl").read_text() == before


def test_batch_bad_line_stops_before_anything_is_written(model_dir, tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", [REQS[0], "{not json", REQS[1]])
    out = tmp_path / "o"
    res = run("--model", model_dir, "--batch", src, "--out", out)
    assert res.exit_code == 2
    assert res.output.strip() == f"error: {src}:2: malformed JSON (Expecting property name enclosed in double quotes at column 2)"
    assert not out.exists()


def test_batch_skip_bad_reports_and_continues(model_dir, tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", [REQS[0], {"prompt": "Miles Davis plays the", "subject": "Coltrane"}])
    out = tmp_path / "o"
    res = run("--model", model_dir, "--batch", src, "--out", out, "--samples", 2, "--kinds", "hidden",
              "--no-plots", "--skip-bad")
    assert res.exit_code == 1, res.output  # done, but not everything: a script can tell
    assert f"skipped {src}:2: span 'Coltrane' does not occur" in res.output
    assert res.output.rstrip().endswith("1 bad line skipped (listed above); exit status 1")
    assert len((out / "results.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--prompt", "Miles Davis plays the", "--subject", "Coltrane"], "span 'Coltrane' does not occur"),
    (["--prompt", "", "--subject", "x"], "empty prompt"),
    (["--prompt", "Miles Davis plays the " * 20, "--subject", "Miles"], "longer than the model's context"),
    (["--prompt", "Miles Davis plays the", "--subject", "Miles", "--kinds", "hidden,ffn"], "unknown kind 'ffn'"),
    (["--prompt", "Miles Davis plays the", "--subject", "Miles", "--samples", "0"],
     "--noise-samples must be >= 1 (got 0)"),
    (["--prompt", "Miles Davis plays the"], "give the span to corrupt"),
    (["--subject", "Miles"], "give either --prompt"),
])
def test_bad_input_is_one_line_error(model_dir, tmp_path, args, message):
    res = run("--model", model_dir, "--out", tmp_path / "o", *args)
    assert_one_line_error(res, message)
    assert not (tmp_path / "o").exists()


def assert_one_line_error(res, message):
    """Exit status 2 and one "error: ..." line holding ``message``, last, after at most some status lines."""
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], res.output
    assert not any(l.startswith("error") for l in lines[:-1]) and "Traceback" not in res.output, res.output
