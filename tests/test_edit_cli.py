"""The edit / delete / stats / export commands on a tiny model: outputs, reload, and one-line errors."""
import json
import os

import numpy as np
import pytest
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


@pytest.mark.slow
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
         "--kl-weight must be >= 0 (got -1.0)"),
        (["edit", "--model", model_dir, "--requests", good, "--out", "o", "--layers", "7-9"], "outside"),
        (["edit", "--model", model_dir, "--requests", good, "--out", "o", "--layers", "a-b"], "--layers"),
        (["edit", "--model", model_dir, "--requests", good, "--out", "o", "--layers", "0", "--corpus", "nope.txt"],
         "no such corpus"),
        (["edit", "--model", model_dir, "--requests", good, "--out", "o", "--hparam", "bogus=1"],
         "unknown hyperparameter"),
        (["stats", "--model", model_dir, "--layers", "0", "--corpus", "no-such-dataset-xyz"], "--corpus model"),
        (["stats", "--model", model_dir, "--layers", "0", "--samples", "0"], "--stats-samples must be >= 1 (got 0)"),
        (["delete", "--model", model_dir, "--requests", good, "--objective", "x"], "'--delete-objective': 'x' is not"),
        (["edit", "--model", model_dir, "--out", "o"], "Missing option '--requests'"),
    ]
    for args, msg in cases:
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2, (args, res.output)
        lines = res.output.strip().splitlines()  # status lines ("loading ..."), then the one error line
        assert lines[-1].startswith("error: ") and msg in lines[-1], (args, res.output)
        assert not any(l.startswith("error") for l in lines[:-1]) and "Traceback" not in res.output, (args, res.output)
    assert not os.path.exists("o")  # nothing written on error


CF = [{"case_id": i, "requested_rewrite": {"prompt": p, "subject": s, "target_new": {"str": new},
                                           "target_true": {"str": true}},
       "paraphrase_prompts": [para], "neighborhood_prompts": [nb]}
      for i, (p, s, new, true, para, nb) in enumerate([
          ("The Space Needle is in {}", "Seattle", "Paris", "Seattle", "Seattle. The Space Needle is in",
           "The Eiffel Tower is located in the city of"),
          ("{} plays the", "Miles Davis", "guitar", "trumpet", "Miles Davis produces music on the",
           "Toko Yasuda produces the most amazing music on the")])]


@pytest.mark.slow
def test_sequential_alphaedit_with_eval(tiny_dirs, tmp_path, monkeypatch):
    """A CounterFact file edited by AlphaEdit one record a batch: the summary in eval.json is the metrics of the
    saved model (recomputed here), the curve holds the unedited model and each batch, a rerun resumes."""
    monkeypatch.setenv("JAXEDIT_CACHE", str(tmp_path / "cache"))
    model_dir = tiny_dirs["llama-mha-tied"][0]
    cf = tmp_path / "cf.json"
    cf.write_text(json.dumps(CF))
    out = tmp_path / "seq"
    args = ["edit", "--model", model_dir, "--layers", "0-1", "--corpus", corpus(tmp_path), "--samples", "4",
            "--max-len", "16", "--requests", str(cf), "--method", "alphaedit", "--batch-size", "1", "--eval",
            "--eval-every", "1", "--null-space-threshold", "energy:0.5", "--hparam", "v_num_grad_steps=3",
            "--out", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "alphaedit: 2 edits in 2 batches of 1" in res.output and "efficacy" in res.output
    ev = json.load(open(out / "eval.json"))
    edited, tok = jaxedit.load(str(out / "model"))
    again = jaxedit.counterfact_eval(edited, CF, tokenizer=tok)
    for k in ("efficacy", "generalization", "specificity", "efficacy_magnitude"):
        np.testing.assert_allclose(ev["summary"][k], again["summary"][k], atol=1e-6)
    points = [json.loads(line) for line in open(out / "curve.jsonl")]
    assert [(p["batches"], p["edits"]) for p in points] == [(0, 0), (1, 1), (2, 2)]
    assert (out / "curve.png").exists() and (out / "curve.pdf").exists()
    seq = json.load(open(out / "sequence" / "sequence.json"))
    assert seq["done"] == 2 and seq["options"]["method"] == "alphaedit"
    res = CliRunner().invoke(cli, args)  # everything done: resumes at the end, same model
    assert res.exit_code == 0 and "(every batch was done earlier)" in res.output, res.output
    assert "all 2 batches were done earlier" in res.output and "resuming at batch 3 of 2" not in res.output
    res = CliRunner().invoke(cli, [a if a != "energy:0.5" else "energy:0.6" for a in args])
    assert res.exit_code == 2 and "other options (null_space_threshold" in res.output, res.output


def test_sequential_option_errors_before_loading(tmp_path):
    """Option errors come before the model is loaded (the model path does not exist)."""
    req = write(tmp_path / "r.jsonl", REQS)
    cf = tmp_path / "cf.json"
    cf.write_text(json.dumps(CF))
    base = ["edit", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    for extra, msg in [(["--requests", req, "--eval"], "--eval needs a CounterFact or zsRE file"),
                       (["--requests", str(cf), "--eval-every", "2"], "--eval-every needs --eval"),
                       (["--requests", str(cf), "--l2", "1"], "AlphaEdit's options"),
                       (["--requests", str(cf), "--method", "alphaedit", "--null-space-threshold", "energy:2"],
                        "energy:F needs 0 < F < 1"),
                       (["--requests", str(cf), "--method", "alphaedit", "--null-space-threshold", "x"],
                        "null_space_threshold must be a number")]:
        res = CliRunner().invoke(cli, base + extra)
        assert res.exit_code == 2 and msg in res.output, (extra, res.output)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([CF[0], {"requested_rewrite": {"prompt": "no placeholder"}}]))
    res = CliRunner().invoke(cli, base + ["--requests", str(bad)])
    assert res.exit_code == 2 and f"{bad}" in res.output and "record 1" in res.output, res.output


def test_demo_limit_dry_run_and_checks_before_loading(tiny_dirs, tmp_path, monkeypatch):
    """--requests demo and --limit as the other commands have them; --dry-run prints the plan and writes nothing
    (AlphaEdit's documented command without --null-space-threshold included); layers out of range are refused
    before the model loads; an error after the output folder was made leaves no empty folder behind."""
    from jaxedit.cli.app import DRY_RUN_END

    monkeypatch.setenv("JAXEDIT_CACHE", str(tmp_path / "cache"))
    model_dir = tiny_dirs["gpt2"][0]
    out = tmp_path / "o"
    run = CliRunner().invoke
    res = run(cli, ["edit", "--model", model_dir, "--requests", "demo", "--limit", "3", "--method", "alphaedit",
                    "--batch-size", "2", "--eval", "--out", str(out), "--corpus", "model", "--dry-run"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines[0] == f"model: {model_dir} (gpt2, 3 layers)"
    assert lines[1] == "alphaedit: 3 edits from demo (counterfact), 2 batches of 2; then the metrics of all edits"
    assert lines[2] == "layers: [1]" and lines[-1] == DRY_RUN_END and "loading" not in res.output
    assert not out.exists()
    req = write(tmp_path / "r.jsonl", REQS * 3)
    res = run(cli, ["edit", "--model", model_dir, "--requests", req, "--limit", "2", "--layers", "0-1", "--dry-run"])
    assert res.exit_code == 0 and "edit 2 requests" in res.output and "layers: [0, 1]" in res.output, res.output
    res = run(cli, ["stats", "--model", model_dir, "--layers", "0-1", "--corpus", "model", "--stats-samples", "8",
                    "--dry-run"])
    assert res.exit_code == 0 and res.output.strip().splitlines()[-1] == DRY_RUN_END, res.output
    assert "key statistics of layers [0, 1]: 8 texts of model" in res.output
    for args, msg in [(["edit", "--requests", "demo", "--layers", "2-4"], "layers [3, 4] are outside 0..2"),
                      (["stats", "--layers", "9"], "layers [9] are outside 0..2"),
                      (["delete", "--requests", "demo"], "--requests demo is the demo CounterFact set"),
                      (["edit", "--requests", "demo", "--hparam", "mom2_sample=3"],
                       "--hparam: unknown hyperparameter 'mom2_sample' (did you mean stats_samples?)")]:
        res = run(cli, [args[0], "--model", model_dir, "--out", str(out)] + args[1:] if args[0] != "stats" else
                  [args[0], "--model", model_dir] + args[1:])
        assert res.exit_code == 2 and msg in res.output.strip().splitlines()[-1], (args, res.output)
        assert "loading" not in res.output and not out.exists(), (args, res.output)
    # refused after the load (the z optimization needs a step), once the sequence's folder was made: removed again
    res = run(cli, ["edit", "--model", model_dir, "--requests", "demo", "--limit", "2", "--batch-size", "1",
                    "--corpus", "model", "--hparam", "v_num_grad_steps=0", "--out", str(out)])
    assert res.exit_code == 2 and "v_num_grad_steps must be >= 1" in res.output, res.output
    assert not out.exists()
