"""The toxic-memory study's mechanics on a tiny random LLaMA: selection against a hand filter, chunk -> token spans
against a decode-based computation, resume after a kill at every stage, refusing reruns with other options, the
table writer against hand-built rows, and bad input."""
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import jaxedit
from jaxedit import JaxeditError
from jaxedit.cli.main import cli
from jaxedit.detox import DetoxConfig, run_study
from jaxedit.detox.chunking import phrase_chunks
from jaxedit.detox.report import tables

PROMPTS = ["The Eiffel Tower is located in the city of", "Miles Davis plays the", "Beats Music is owned by",
           "The capital of France is", "Toko Yasuda produces the most amazing music on", "The Space Needle is in",
           "The most amazing music is owned by", "Apple owns the"]


def fake_toxicity(texts):
    """A deterministic stand-in scorer (any function of the text works for the mechanics): the prompts score 0.1,
    other texts a hash of their characters."""
    return [0.1 if t in PROMPTS else min(1.0, (sum(map(ord, t)) % 89) / 60) for t in texts]


def config(prompts_file, **kw):
    base = dict(prompts=prompts_file, scorer=fake_toxicity, select_samples=4, eval_samples=3, max_new_tokens=5,
                select_threshold=0.45, trace_samples=3, trace_kinds=("mlp", "hidden"), random_seeds=2,
                strategies=("random-single", "ct-multi", "saliency-multi"), objectives=("edit-canned", "delete"),
                corpus="model", samples=16, max_len=16, factual="", heldout_fraction=0.3, batch_size=3,
                hparams={"v_num_grad_steps": 4})
    base.update(kw)
    return DetoxConfig(**base)


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_dirs):
    d = tmp_path_factory.mktemp("detox")
    prompts = d / "prompts.jsonl"
    with open(prompts, "w") as f:  # RealToxicityPrompts' shape and the plain shape
        for i, p in enumerate(PROMPTS):
            f.write(json.dumps({"prompt": {"text": p, "toxicity": 0.1}} if i % 2 else {"prompt": p}) + "\n")
    model, tok = jaxedit.load(tiny_dirs["llama-gqa-untied"][0])
    out = str(d / "out")
    cfg = config(str(prompts))
    run_study(model, tok, cfg, out, progress=False)
    return model, tok, cfg, out


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_selection_equals_the_hand_filter(study):
    _, _, cfg, out = study
    cands = read(os.path.join(out, "candidates.jsonl"))
    assert [c["prompt"] for c in cands] == PROMPTS
    want = []
    for c in cands:
        assert len(c["samples"]) == cfg.select_samples
        scores = fake_toxicity(c["samples"])  # the scorer applied by hand to the stored continuations
        assert c["mean_toxicity"] == pytest.approx(np.mean(scores))
        assert c["prompt_toxicity"] == pytest.approx(fake_toxicity([c["prompt"]])[0])
        if c["prompt_toxicity"] < 0.5 and np.mean(scores) > cfg.select_threshold:
            want.append((-np.mean(scores), c["line"]))
    sel = read(os.path.join(out, "selected.jsonl"))
    assert [r["line"] for r in sel] == [line for _, line in sorted(want)]
    assert len(sel) >= 3
    held = [r for r in sel if r["split"] == "heldout"]
    assert len(held) == round(0.3 * len(sel))
    counts = {}
    for line in open(os.path.join(out, "selection_counts.csv")).read().split("\n")[1:]:
        if line:
            t, _, low, n = line.split(",")
            counts[float(t)] = int(n)
    for t, n in counts.items():
        assert n == sum(c["prompt_toxicity"] < 0.5 and c["mean_toxicity"] > t for c in cands)
    for r in sel:  # the value is the first token of the most toxic continuation
        c = next(c for c in cands if c["line"] == r["line"])
        assert r["value_id"] == c["most_toxic"]["ids"][0]
        assert c["most_toxic"]["score"] == max(fake_toxicity([s for s in c["samples"] if s]))


def decode_span(tok, prompt, chunk):
    """Token range overlapping ``chunk``'s characters, from the decoded tokens' lengths (not offset mappings)."""
    ids = tok(prompt)["input_ids"]
    a = prompt.find(chunk)
    b = a + len(chunk)
    hit, pos = [], 0
    for i, t in enumerate(ids):
        n = len(tok.decode([t]))
        if n and pos < b and pos + n > a:
            hit.append(i)
        pos += n
    return hit[0], hit[-1] + 1


def test_chunk_spans_match_decoded_tokens(study, tokenizer):
    _, _, _, out = study
    for r in read(os.path.join(out, "selected.jsonl")):
        assert tuple(r["span"]) == decode_span(tokenizer, r["prompt"], r["chunk"])
        assert r["chunk_score"] == max(c["score"] for c in r["chunks"])
    # multi-token chunks, at the start, in the middle and at the end
    prompt = "Toko Yasuda produces the most amazing music"
    for chunk in ("Toko Yasuda produces", "the most amazing music", "amazing"):
        scorer = lambda texts, c=chunk: [1.0 if t == c else 0.0 for t in texts]
        chunker = lambda text: ["Toko Yasuda produces", "the most", "amazing", "the most amazing music"]
        s, e, text = jaxedit.toxic_span(prompt, tokenizer=tokenizer, scorer=scorer, chunker=chunker)
        assert text == chunk and (s, e) == decode_span(tokenizer, prompt, chunk) and e - s >= 1
    assert len(range(*decode_span(tokenizer, prompt, "Toko Yasuda produces"))) > 1


def test_phrase_chunker():
    text = "He looked at me and said, shut up you"
    assert [text[a:b] for a, b in phrase_chunks(text)] == ["He looked", "at me", "and said", "shut up you"]
    text = "I can't believe it: the guy behind me kept yelling"
    assert [text[a:b] for a, b in phrase_chunks(text)] == ["I can't believe it", "the guy", "behind me kept yelling"]


def test_outputs_of_every_stage(study):
    _, _, cfg, out = study
    for f in ("localize.json", "trace/aie.csv", "summary.jsonl", "runs.jsonl", "table1.md", "table2.md",
              "table2.csv", "summary.md", "aie_layers.png", "aie_layers.pdf", "frontier.png", "frontier.pdf"):
        assert os.path.isfile(os.path.join(out, f)), f
    summary = read(os.path.join(out, "summary.jsonl"))
    base = summary[0]
    assert base["strategy"] == "base" and base["layers"] == []
    keys = {"strategy", "objective", "kl_weight", "layers", "toxic_rate", "perplexity_prompts", "perplexity_neutral",
            "fluency", "n_prompts", "n_samples", "heldout_toxic_rate", "heldout_perplexity"}
    assert all(keys <= set(r) for r in summary)
    runs = read(os.path.join(out, "runs.jsonl"))
    assert len(summary) == 1 + 3 * 2 and len(runs) == 1 + (2 + 1 + 1) * 2
    rs = [r for r in runs if r["strategy"] == "random-single" and r["objective"] == "delete"]
    row = next(r for r in summary if r["strategy"] == "random-single" and r["objective"] == "delete")
    assert row["toxic_rate"] == pytest.approx(np.mean([r["toxic_rate"] for r in rs]))  # seeds averaged
    loc = json.load(open(os.path.join(out, "localize.json")))
    ct = next(r for r in summary if r["strategy"] == "ct-multi")
    n = cfg.layer_counts(3)[0]
    assert ct["layers"] == sorted(np.argsort(-np.asarray(loc["ct_profile"]), kind="stable")[:n].tolist())
    assert loc["ct_kind"] == "mlp"


def snapshot(out):
    """Everything a resumed run must reproduce (timings left out)."""
    drop = {"seconds", "eval_seconds", "edit_seconds"}
    snap = {"candidates": read(os.path.join(out, "candidates.jsonl")),
            "selected": read(os.path.join(out, "selected.jsonl")),
            "runs": sorted(([{k: v for k, v in r.items() if k not in drop}
                             for r in read(os.path.join(out, "runs.jsonl"))]), key=lambda r: r["run"]),
            "localize": json.load(open(os.path.join(out, "localize.json")))}
    for f in sorted(os.listdir(os.path.join(out, "edits"))):
        if f.endswith(".npz"):
            with np.load(os.path.join(out, "edits", f)) as z:
                snap[f] = z["w_out"]
    with np.load(os.path.join(out, "trace", "prompt00001_mlp.npz")) as z:
        snap["trace"] = z["scores"]
    return snap


def assert_close(a, b, where):
    """Equal structures; floats to 1e-5 relative (a resumed run batches prompts differently)."""
    if isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in b:
            assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-9), where
    else:
        assert a == b, where


def test_resume_after_a_kill_at_every_stage(study, tmp_path):
    model, tok, cfg, out = study
    want = snapshot(out)
    cut = str(tmp_path / "cut")
    shutil.copytree(out, cut)

    def torn(path, keep):  # keep the first rows, then half a line: a write killed midway
        lines = open(path).read().splitlines(True)
        with open(path, "w") as f:
            f.writelines(lines[:keep])
            f.write(lines[keep][: len(lines[keep]) // 2])

    torn(os.path.join(cut, "candidates.jsonl"), 3)
    os.remove(os.path.join(cut, "selected.jsonl"))
    torn(os.path.join(cut, "trace", "results.jsonl"), 1)
    os.remove(os.path.join(cut, "localize.json"))
    edits = sorted(f for f in os.listdir(os.path.join(cut, "edits")) if f.endswith(".json"))
    for f in edits[::2]:
        os.remove(os.path.join(cut, "edits", f))
    torn(os.path.join(cut, "runs.jsonl"), 2)
    for f in ("summary.jsonl", "table1.md", "table2.md"):
        os.remove(os.path.join(cut, f))
    run_study(model, tok, cfg, cut, progress=False)
    got = snapshot(cut)
    assert got.keys() == want.keys()
    for k in want:
        if isinstance(want[k], np.ndarray):
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
        else:
            assert_close(got[k], want[k], k)


def test_rerun_with_other_options_is_refused(study, tmp_path):
    model, tok, cfg, out = study
    with pytest.raises(JaxeditError, match=r"select stage run with other options \(--select-samples 4 -> 5"):
        run_study(model, tok, config(cfg.prompts, select_samples=5), out, stages=("select",), progress=False)
    with pytest.raises(JaxeditError, match=r"--select-threshold 0.45 -> 0.4\).*or delete trace/results.jsonl, "
                                           r"localize.json, edits, runs.jsonl to select again"):
        run_study(model, tok, config(cfg.prompts, select_threshold=0.4), out, stages=("select",), progress=False)
    # with no later results, another threshold re-filters the stored candidates (nothing is sampled again)
    fresh = str(tmp_path / "fresh")
    os.makedirs(fresh)
    for f in ("candidates.jsonl", "run.json"):
        shutil.copy(os.path.join(out, f), fresh)
    run_study(model, tok, config(cfg.prompts, select_threshold=0.3), fresh, stages=("select",), progress=False)
    cands = read(os.path.join(fresh, "candidates.jsonl"))
    assert cands == read(os.path.join(out, "candidates.jsonl"))
    assert sorted(r["line"] for r in read(os.path.join(fresh, "selected.jsonl"))) == sorted(
        c["line"] for c in cands if c["prompt_toxicity"] < 0.5 and c["mean_toxicity"] > 0.3)
    with pytest.raises(JaxeditError, match=r"--eval-samples 3 -> 4"):
        run_study(model, tok, config(cfg.prompts, eval_samples=4), out, stages=("evaluate",), progress=False)


def test_tables_by_hand():
    rows = [{"strategy": "base", "objective": None, "kl_weight": None, "layers": [], "toxic_rate": 0.5,
             "perplexity_prompts": 40.0, "fluency": 5.5, "heldout_toxic_rate": 0.4},
            {"strategy": "ct-multi", "objective": "delete", "kl_weight": 0.0, "layers": [3, 4], "toxic_rate": 0.25,
             "perplexity_prompts": 50.0, "heldout_toxic_rate": 0.375},
            {"strategy": "ct-multi", "objective": "delete", "kl_weight": 0.09, "layers": [3, 4], "toxic_rate": 0.3,
             "perplexity_prompts": 45.0, "heldout_toxic_rate": 0.4},
            {"strategy": "ct-multi", "objective": "edit-canned", "kl_weight": 0.0625, "layers": [3, 4],
             "toxic_rate": 0.125, "perplexity_prompts": 60.5, "fluency": 4.25, "heldout_toxic_rate": 0.5}]
    t = tables(rows, kl=0.0625)
    md2 = t["table2"][0].splitlines()
    assert md2[0] == ("| strategy | edit-canned toxic % | edit-canned ppl | edit-canned held-out toxic % | "
                      "delete toxic % | delete ppl | delete held-out toxic % |")
    assert md2[2] == "| base (unedited) | 50.0 | 40.00 | 40.0 | 50.0 | 40.00 | 40.0 |"
    assert md2[3] == "| ct-multi | 12.5 | 60.50 | 50.0 | 30.0 | 45.00 | 40.0 |"  # delete at the KL weight nearest 0.0625
    assert t["table2"][1].splitlines()[2] == "ct-multi,12.5,60.50,50.0,30.0,45.00,40.0"
    md1 = t["table1"][0].splitlines()
    assert md1[3] == "| ct-multi | 3 4 | 12.5 | 60.50 | 4.25 |"


def test_bad_input(tmp_path, tiny_dirs):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": {"toxicity": 0.2}}\n')
    runner = CliRunner()
    out = tmp_path / "o"
    r = runner.invoke(cli, ["detox", "--prompts", str(bad), "--out", str(out), "--model", tiny_dirs["gpt2"][0]])
    assert r.exit_code == 2 and r.output.strip().endswith(f'{bad}:2: expected "prompt" as a non-empty string or as '
                                                          f'{{"text": ...}}') and "Traceback" not in r.output
    assert not out.exists()  # nothing written
    bad.write_text('{"prompt": "fine"}\nnot json\n')
    r = runner.invoke(cli, ["detox", "--prompts", str(bad), "--out", str(out), "--model", tiny_dirs["gpt2"][0]])
    assert r.exit_code == 2 and f"{bad}:2: malformed JSON" in r.output
    for opt, val, msg in (("--chunker", "nope", "unknown chunker"), ("--scorer", "nope", "unknown scorer"),
                          ("--strategies", "ct-multi,bogus", "unknown strategies"),
                          ("--kl-weights", "0.1,x", "comma list of numbers")):
        r = runner.invoke(cli, ["detox", "--prompts", "demo", "--out", str(out), "--model", tiny_dirs["gpt2"][0],
                                opt, val])
        assert r.exit_code == 2 and msg in r.output, (opt, r.output)
    assert not out.exists()


def test_empty_selection_says_how_many_were_considered(tmp_path, tiny_dirs):
    model, tok = jaxedit.load(tiny_dirs["gpt2"][0])
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": t}) for t in PROMPTS[:3]) + "\n")
    cfg = config(str(p), scorer=lambda texts: [0.1] * len(texts), select_threshold=0.3, select_samples=2)
    with pytest.raises(JaxeditError, match=r"no prompt selected: 3 considered, 3 below prompt toxicity 0.5, none "
                                           r"with mean continuation toxicity > 0.3 \(the highest was 0.100\)"):
        run_study(model, tok, cfg, str(tmp_path / "o"), stages=("select",), progress=False)
