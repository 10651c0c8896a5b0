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
