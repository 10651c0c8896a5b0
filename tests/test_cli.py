"""The CLI skin: `jaxedit info` end to end, and one-line errors."""
from click.testing import CliRunner

from jaxedit.cli.main import cli


def test_info_on_tiny_checkpoint(tiny_dirs):
    res = CliRunner().invoke(cli, ["info", tiny_dirs["llama-gqa-untied"][0]])
    assert res.exit_code == 0, res.output
    lines = dict(line.split(None, 1) for line in res.output.strip().splitlines())
    assert lines["family"] == "llama" and lines["layers"] == "3" and lines["d_model"] == "48"
    assert lines["heads"].startswith("6 (kv 2")
    # 320*48 (embed) + 48*320 (head) + 48 (norm) + 3 * (2*48 + 48*48*2 + 48*16*2 + 3*48*80)
    assert lines["parameters"] == f"{320*48*2 + 48 + 3*(2*48 + 2*48*48 + 2*48*16 + 3*48*80):,}"


def test_bad_model_is_one_line_error(tmp_path):
    res = CliRunner().invoke(cli, ["info", str(tmp_path / "missing.gguf")])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()  # a status line ("loading ..."), then the error
    assert lines[-1].startswith("error: no such GGUF file") and not any(l.startswith("error") for l in lines[:-1])
    assert "Traceback" not in res.output
    quiet = CliRunner().invoke(cli, ["-q", "info", str(tmp_path / "missing.gguf")])  # --quiet: the error alone
    assert quiet.exit_code == 2 and quiet.output.strip() == lines[-1]


# ------------------------------------------------------------------------------------------------------- dry runs
def _refuse_load(monkeypatch):
    import jaxedit

    monkeypatch.setattr(jaxedit, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("a dry run loaded")))


def test_info_dry_run_reads_the_config_alone(tiny_dirs, tmp_path, monkeypatch):
    from jaxedit.cli.app import DRY_RUN_END

    _refuse_load(monkeypatch)
    d = tiny_dirs["llama-gqa-untied"][0]
    res = CliRunner().invoke(cli, ["-q", "info", "--model", d, "--dry-run"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == [
        f"plan: load {d} (llama, 3 layers, d_model 48, vocab 320, context 64) in float32 on one device, print its "
        f"architecture and parameter count", DRY_RUN_END]
    res = CliRunner().invoke(cli, ["-q", "info", "some-org/not-cached-here", "--dry-run"])  # a hub id: named only
    assert res.exit_code == 0 and "some-org/not-cached-here (a hub id not in the local cache" in res.output
    res = CliRunner().invoke(cli, ["-q", "info", "--model", str(tmp_path / "missing"), "--dry-run"])
    assert res.exit_code == 2 and res.output == f"error: no such model directory or file: {tmp_path / 'missing'}\n"


def test_trace_and_saliency_dry_runs_check_the_inputs_and_write_nothing(tiny_dirs, tmp_path, monkeypatch):
    import json

    from jaxedit.cli.app import DRY_RUN_END

    _refuse_load(monkeypatch)
    d = tiny_dirs["gpt2"][0]
    good = [{"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower"},
            {"prompt": "Miles Davis plays the", "subject": "Miles Davis", "target": " trumpet"}]
    batch = tmp_path / "prompts.jsonl"
    batch.write_text("".join(json.dumps(r) + "\n" for r in good))
    out = tmp_path / "t"

    def run(*args):
        return CliRunner().invoke(cli, ["-q", *args, "--model", d, "--out", str(out), "--dry-run"])

    res = run("trace", "--batch", str(batch), "--kinds", "mlp", "--noise-samples", "3")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == f"plan for {out}/ with {d} (gpt2, 3 layers), on one device"
    assert lines[1] == f"trace: 2 prompts from {batch}"
    assert lines[2].startswith("kinds mlp: 3 noisy copies per prompt, noise s3, window 10")
    assert lines[-1] == DRY_RUN_END and not out.exists()
    res = run("trace", "--prompt", good[0]["prompt"], "--subject", "Eiffel")
    assert res.exit_code == 0 and res.output.splitlines()[1] == "trace: 1 prompt (--prompt)", res.output
    res = run("saliency", "--batch", str(batch))
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[1].startswith(f"saliency: 2 examples from {batch}")
    assert res.output.splitlines()[-1] == DRY_RUN_END and not out.exists()

    # a line an earlier run traced is counted as reused; the folder is left as it was
    out.mkdir()
    (out / "results.jsonl").write_text(json.dumps({"line": 2, "prompt": good[1]["prompt"]}) + "\n")
    res = run("trace", "--batch", str(batch))
    assert res.exit_code == 0 and f"; 1 done earlier in {out}/results.jsonl (reused)" in res.output, res.output
    assert sorted(p.name for p in out.iterdir()) == ["results.jsonl"]
    (out / "results.jsonl").unlink()
    out.rmdir()

    # bad lines: FILE:LINE and exit status 2, before anything loads (the JSON, then what the tokenizer finds)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good[0]) + "\n" + '{"prompt": "no subject here"\n')
    for cmd in ("trace", "saliency"):
        res = run(cmd, "--batch", str(bad))
        assert res.exit_code == 2 and res.output.startswith(f"error: {bad}:2: malformed JSON"), res.output
    bad.write_text(json.dumps(good[0]) + "\n" + json.dumps({"prompt": "Miles Davis plays the", "subject": "Paris"})
                   + "\n")
    res = run("trace", "--batch", str(bad))
    assert res.exit_code == 2 and res.output.startswith(f"error: {bad}:2: "), res.output
    res = run("trace", "--batch", str(bad), "--skip-bad")  # listed, the plan without it, exit status 1
    assert res.exit_code == 1, res.output
    assert f"skipped {bad}:2: " in res.output and f"trace: 1 prompt from {bad}" in res.output
    assert DRY_RUN_END in res.output
    bad.write_text(json.dumps({"prompt": "Miles Davis plays the", "target": ""}) + "\n")
    res = run("saliency", "--batch", str(bad))
    assert res.exit_code == 2 and res.output.startswith(f"error: {bad}:1: "), res.output
    res = run("trace", "--prompt", good[0]["prompt"], "--subject", "Rome")  # a --prompt is checked the same way
    assert res.exit_code == 2 and res.output.startswith("error: "), res.output
    (tmp_path / "file").write_text("")
    res = CliRunner().invoke(cli, ["-q", "trace", "--batch", str(batch), "--model", d, "--out", str(tmp_path / "file"),
                                   "--dry-run"])
    assert res.exit_code == 2 and res.output.startswith("error: Invalid value for '--out'") and "is a file" in res.output
    assert not out.exists()


def test_dry_run_plans_a_mesh_it_cannot_build_and_starts_nothing(tiny_dirs, monkeypatch):
    """A dry run names a mesh bigger than this machine (8 devices here: 1) without building it, checks the
    multi-host options without starting jax.distributed, and still refuses a malformed mesh or coordinator."""
    import jax

    from jaxedit.cli import app

    monkeypatch.setattr(jax.distributed, "initialize", lambda **k: (_ for _ in ()).throw(AssertionError("started")))
    base = ["-q", "trace", "--model", tiny_dirs["gpt2"][0], "--prompt", "Miles Davis plays the", "--subject",
            "Miles Davis", "--dry-run"]
    res = CliRunner().invoke(cli, base + ["--mesh", "data=4,model=2", "--coordinator", "10.0.0.1:1234",
                                          "--num-processes", "2", "--process-id", "0"])
    assert res.exit_code == 0 and "on data=4,model=2" in res.output, res.output
    assert isinstance(app.planned_mesh("data=4,model=2"), app.PlannedMesh)
    for extra, msg in ((["--mesh", "data=x"], "bad mesh 'data=x'"),
                       (["--coordinator", "nohost"], "bad coordinator 'nohost'"),
                       (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "5"],
                        "process id 5 is not within 0..1")):
        res = CliRunner().invoke(cli, base + extra)
        assert res.exit_code == 2 and msg in res.output, (extra, res.output)
