"""The edit / delete / stats / export commands on a tiny model: outputs, reload, and one-line errors."""
import json
import os

import numpy as np
from click.testing import CliRunner

import jaxedit
from jaxedit.cli.main import cli

REQS = [{"prompt": "The Space Needle is in {}", "subject": "Seattle", "target": " Paris",
         "neighborhood": ["Miles Davis plays the"]}]


def write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("The Eiffel Tower is located in the city of Paris.\nMiles Davis plays the trumpet.\n"
                 "Beats Music is owned by Apple.\nThe Space Needle is in Seattle.\n")
    return str(p)


def test_edit_delete_stats_export(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXEDIT_CACHE", str(tmp_path / "cache"))
    model_dir = tiny_dirs["llama-mha-tied"][0]
    req = write(tmp_path / "r.jsonl", REQS)
    common = ["--model", model_dir, "--layers", "0-1", "--corpus", corpus(tmp_path), "--samples", "4",
              "--max-len", "16"]
    run = CliRunner().invoke
    res = run(cli, ["stats", *common[:4], "--corpus", corpus(tmp_path), "--samples", "4", "--max-len", "16"])
    assert res.exit_code == 0, res.output
    assert "layer 0: [48 x 48]" in res.output and "layer 1: [48 x 48]" in res.output
    res = run(cli, ["edit", *common, "--requests", req, "--out", str(tmp_path / "ed"), "--export-hf",
                    str(tmp_path / "hf"), "--hparam", "v_num_grad_steps=5"])
    assert res.exit_code == 0, res.output
    assert "target ' Paris'" in res.output and "edited layers [0, 1]" in res.output
    report = json.load(open(tmp_path / "ed" / "report.json"))
    assert report["layers"] == [0, 1] and report["hparams"]["v_num_grad_steps"] == 5
    edited, tok = jaxedit.load(str(tmp_path / "ed"))
    p_after = report["requests"][0]["p_after"][0]
    from jaxedit.edit.memit import next_token_probs

    (p,), _ = next_token_probs(edited, tok, ["The Space Needle is in Seattle"], [[tok(" Paris")["input_ids"][0]]])
    np.testing.assert_allclose(p, p_after, rtol=1e-5)  # the saved model is the edited one
    res = run(cli, ["export", "--model", str(tmp_path / "ed"), "--out", str(tmp_path / "hf2")])
    assert res.exit_code == 0, res.output
    assert sorted(os.listdir(tmp_path / "hf2")) == sorted(os.listdir(tmp_path / "hf"))

    dreq = write(tmp_path / "d.jsonl", [{"prompt": "The Space Needle is in {}", "subject": "Seattle",
                                         "suppress": " Paris"}])
    res = run(cli, ["delete", *common, "--requests", dreq, "--out", str(tmp_path / "del"), "--kl-weight", "0.1",
                    "--objective", "unlikelihood"])
    assert res.exit_code == 0, res.output
    hp = json.load(open(tmp_path / "del" / "report.json"))["hparams"]
    assert hp["kl_factor"] == 0.1 and hp["delete_objective"] == "unlikelihood"


def test_edit_errors(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXEDIT_CACHE", str(tmp_path / "cache"))
    model_dir = tiny_dirs["gpt2"][0]
    good = write(tmp_path / "r.jsonl", REQS)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "x"\n')
    no_subject = write(tmp_path / "ns.jsonl", [{"prompt": "Miles Davis plays", "subject": "John", "target": " x"}])
    cases = [
        (["edit", "--model", model_dir, "--requests", str(tmp_path / "missing.jsonl"), "--out", "o"], "cannot read"),
        (["edit", "--model", model_dir, "--requests", str(bad_json), "--out", "o"], "malformed JSON"),
        (["edit", "--model", model_dir, "--requests", no_subject, "--out", "o", "--layers", "0"],
         f"{no_subject}:1: subject 'John' does not occur"),
        (["delete", "--model", model_dir, "--requests", good, "--out", "o", "--layers", "0"],
         f"{good}:1: needs \"suppress\" (\"target\" is for jaxedit edit)"),
        (["delete", "--model", model_dir, "--requests", good, "--out", "o", "--kl-weight", "-1"],
         "'--kl-weight': -1.0 is not in the range"),
        (["edit", "--model", model_dir, "--requests", good, "--out", "o", "--layers", "7-9"], "outside"),
        (["edit", "--model", model_dir, "--requests", good, "--out", "o", "--layers", "a-b"], "--layers"),
        (["edit", "--model", model_dir, "--requests", good, "--out", "o", "--layers", "0", "--corpus", "nope.txt"],
         "no such corpus"),
        (["edit", "--model", model_dir, "--requests", good, "--out", "o", "--hparam", "bogus=1"],
         "unknown hyperparameter"),
        (["stats", "--model", model_dir, "--layers", "0", "--corpus", "no-such-dataset-xyz"], "--corpus model"),
        (["stats", "--model", model_dir, "--layers", "0", "--samples", "0"], "'--samples': 0 is not in the range"),
        (["edit", "--model", model_dir, "--out", "o"], "Missing option '--requests'"),
    ]
    for args, msg in cases:
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2, (args, res.output)
        lines = res.output.strip().splitlines()  # status lines ("loading ..."), then the one error line
        assert lines[-1].startswith("error: ") and msg in lines[-1], (args, res.output)
        assert not any(l.startswith("error") for l in lines[:-1]) and "Traceback" not in res.output, (args, res.output)
    assert not os.path.exists("o")  # nothing written on error
