"""The toxic-memory study's mechanics on a tiny random LLaMA: selection against a hand filter, chunk -> token spans
against a decode-based computation, resume after a kill at every stage, refusing reruns with other options, the
table writer against hand-built rows, and bad input."""
import copy
import dataclasses
import json
import math
import os
import re
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import jaxedit
from jaxedit import JaxeditError
from jaxedit.cli.main import cli
from jaxedit.detox import DetoxConfig, run_study
from jaxedit.detox.chunking import phrase_chunks
from jaxedit.detox.pipeline import evaluate as evaluate_stage
from jaxedit.detox.report import tables
from jaxedit.generate import sample_texts
from jaxedit.model import params_of

PROMPTS = ["The Eiffel Tower is located in the city of", "Miles Davis plays the", "Beats Music is owned by",
           "The capital of France is", "Toko Yasuda produces the most amazing music on", "The Space Needle is in",
           "The most amazing music is owned by", "Apple owns the"]


def fake_toxicity(texts):
    """A deterministic stand-in scorer (any function of the text works for the mechanics): the prompts score 0.1,
    other texts a hash of their characters."""
    return [0.1 if t in PROMPTS else min(1.0, (sum(map(ord, t)) % 89) / 60) for t in texts]


# the study's options: window 1 (a window as wide as the 3-layer model restores every MLP in each cell, and the CT
# profile would tie at every layer)
def config(prompts_file, **kw):
    base = dict(prompts=prompts_file, scorer=fake_toxicity, select_samples=4, eval_samples=3, max_new_tokens=5,
                select_threshold=0.45, trace_samples=3, trace_kinds=("mlp", "hidden"), random_seeds=2,
                strategies=("random-single", "ct-single", "ct-multi", "saliency-multi"),
                objectives=("edit-canned", "delete"), window=1,
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
    run_study(model, cfg, out, tokenizer=tok, progress=False)
    return model, tok, cfg, out


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
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
        # the non-toxic target: the least toxic continuation's first word, by hand
        least = min((s for s in c["samples"] if s), key=lambda s: fake_toxicity([s])[0])
        assert c["least_toxic"]["text"] == least
        word = re.match(r"\s*[\w']+", least) or re.match(r"\s*\S+", least)
        assert r["nontoxic_target"] == ((word.group() if word else "") or " the")


def test_plan_runs_by_hand(tmp_path):
    """The grid: the random strategies (random-*, topk-*) once per seed, the located ones once; each run's layers
    from layer_selection with the counts of layer_counts (topk: drawn from the top K); errors without the
    localize stage's profiles."""
    from jaxedit.detox.editing import plan_runs, strategy_seeds
    from jaxedit.layer_selection import select_layers

    cfg = config(str(tmp_path / "p.jsonl"), strategies=("random-single", "topk-multi", "ct-multi"),
                 objectives=("delete",), kl_weights=(0.5,), random_seeds=2, seed=3, topk=5)
    assert strategy_seeds(cfg, "topk-multi") == [3, 4] and strategy_seeds(cfg, "ct-multi") == [3]
    loc = {"ct_profile": [0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.4, 0.6]}
    n, k = cfg.layer_counts(8)
    assert (n, k) == (2, 5)
    want = [("random-single", s, select_layers("random", 8, n=1, seed=s)) for s in (3, 4)] + \
        [("topk-multi", s, select_layers("random-topk", 8, n=2, k=5, seed=s)) for s in (3, 4)] + \
        [("ct-multi", 3, select_layers("ct", 8, n=2, evidence=loc["ct_profile"]))]
    runs = plan_runs(cfg, 8, loc)
    assert [(r[1], r[4], list(r[5])) for r in runs] == [(st, s, list(l)) for st, s, l in want]
    assert all(r[2] == "delete" and r[3] == 0.5 for r in runs)
    with pytest.raises(JaxeditError, match="^strategy ct-multi needs the localize stage's results$"):
        plan_runs(cfg, 8, None)
    with pytest.raises(JaxeditError, match="^strategy saliency-multi needs saliency profiles"):
        plan_runs(config(str(tmp_path / "p.jsonl"), strategies=("saliency-multi",)), 8, loc)


def test_obfuscate_by_hand():
    from jaxedit.detox.localization import obfuscate

    assert [obfuscate(t) for t in (" stupid", "Idiot", "  Oaf", "x", "", " ")] == \
        [" st*p*d", "Id**t", "  O*f", "x", "", " "]


def test_summarize_seeds_by_hand():
    """Seeds of one configuration averaged (population std over seeds, each seed's layers), failed seeds listed;
    a row's method: its own, else "base" for the unedited model, else the deletion grid's."""
    from jaxedit.detox.evaluation import method_of, summarize

    base = {"strategy": "random-multi", "objective": "delete", "kl_weight": 0.5, "n_prompts": 4}
    rows = [dict(base, layers=[1, 2], toxic_rate=0.2, perplexity_prompts=10.0),
            dict(base, layers=[3, 4], toxic_rate=0.4, perplexity_prompts=14.0),
            dict(base, layers=[5, 6], error="diverged"),
            {"strategy": "base", "objective": None, "kl_weight": None, "layers": [], "toxic_rate": 0.5},
            {"method": "dinm", "strategy": "dinm", "objective": None, "kl_weight": None, "layers": [7],
             "settings": {"steps": 10}, "toxic_rate": 0.1}]
    got = summarize(rows)
    assert [method_of(r) for r in rows] == ["delete", "delete", "delete", "base", "dinm"]
    assert [(g["method"], g["strategy"]) for g in got] == [("delete", "random-multi"), ("base", "base"),
                                                         ("dinm", "dinm")]
    grid = got[0]
    assert grid["layers"] == [[1, 2], [3, 4]] and grid["seeds"] == 2 and grid["failed"] == ["diverged"]
    assert grid["toxic_rate"] == pytest.approx(0.3) and grid["toxic_rate_std"] == pytest.approx(0.1)
    assert grid["perplexity_prompts"] == pytest.approx(12.0) and grid["perplexity_prompts_std"] == pytest.approx(2.0)
    assert got[1]["layers"] == [] and "toxic_rate_std" not in got[1] and got[2]["layers"] == [7]
    assert got[2]["settings"] == {"steps": 10} and "settings" not in grid


def test_unknown_stage_is_refused_before_any_work(tmp_path):
    cfg = config(str(tmp_path / "p.jsonl"))
    with pytest.raises(JaxeditError) as err:
        run_study(None, cfg, str(tmp_path / "o"), tokenizer=None, stages=("select", "sample"))
    assert str(err.value) == "unknown stage 'sample' (choose from select, localize, edit, evaluate, report, all)"
    assert not (tmp_path / "o").exists()


def test_add_timing_by_hand(tmp_path):
    """timings.json: per stage the total and each run; an older folder's single number becomes its first run; a
    missing folder gets nothing."""
    from jaxedit.detox.pipeline import add_timing

    (tmp_path / "timings.json").write_text(json.dumps({"select": 12.5}))
    add_timing(str(tmp_path), "select", 1.004)
    add_timing(str(tmp_path), "edit", 2.0, interrupted=True)
    assert json.load(open(tmp_path / "timings.json")) == {
        "select": {"seconds": 13.5, "runs": [12.5, 1.0]},
        "edit": {"seconds": 2.0, "runs": [{"seconds": 2.0, "interrupted": True}]}}
    add_timing(str(tmp_path / "none"), "select", 1.0)
    assert not (tmp_path / "none").exists()


def test_first_word():
    from jaxedit.detox.selection import first_word

    assert [first_word(t) for t in ("  hello world", "don't stop", " ...!? x", "", "   ")] == \
        ["  hello", "don't", " ...!?", "", ""]


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


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert len(summary) == 1 + 4 * 2 and len(runs) == 1 + (2 + 1 + 1 + 1) * 2
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


@pytest.mark.slow
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
    run_study(model, cfg, cut, tokenizer=tok, progress=False)
    got = snapshot(cut)
    assert got.keys() == want.keys()
    for k in want:
        if isinstance(want[k], np.ndarray):
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
        else:
            assert_close(got[k], want[k], k)


@pytest.mark.slow
def test_timings_accumulate_over_runs(study, tmp_path, monkeypatch):
    """timings.json adds every run of a stage to its total, an interrupted run included (recorded by the interrupt
    hook the CLI runs before the process ends); a stage's total is the sum of its runs."""
    import time

    from jaxedit import runtime
    from jaxedit.detox import pipeline

    model, tok, cfg, out = study
    d = str(tmp_path / "again")
    shutil.copytree(out, d)
    before = json.load(open(os.path.join(d, "timings.json")))
    assert set(before) == set(pipeline.STAGES) and all(v["seconds"] == sum(v["runs"]) for v in before.values())
    real = pipeline.report

    def slow_report(c, o):
        time.sleep(0.3)
        return real(c, o)

    def killed_report(c, o):
        time.sleep(0.2)
        runtime.run_interrupt_hooks()  # what the CLI does on Ctrl-C, before the process ends
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "report", slow_report)
    run_study(model, cfg, d, tokenizer=tok, stages=("report",), progress=False)
    monkeypatch.setattr(pipeline, "report", killed_report)
    with pytest.raises(KeyboardInterrupt):
        run_study(model, cfg, d, tokenizer=tok, stages=("report",), progress=False)
    t = json.load(open(os.path.join(d, "timings.json")))
    runs = t["report"]["runs"]
    assert runs[:-2] == before["report"]["runs"] and runs[-2] >= 0.3
    assert runs[-1]["interrupted"] and runs[-1]["seconds"] >= 0.2
    assert t["report"]["seconds"] == pytest.approx(sum(r if isinstance(r, float) else r["seconds"] for r in runs),
                                                   abs=0.011)
    assert {k: v for k, v in t.items() if k != "report"} == {k: v for k, v in before.items() if k != "report"}
    # each stage's measurement starts afresh and is kept per timed part (the edit stage's deletions and its
    # DINM/ProFS part apart), under the model's set-up
    from jaxedit.detox import estimate

    calls = []
    monkeypatch.setattr(pipeline, "report", real)
    monkeypatch.setattr(estimate, "begin", lambda stage: calls.append(("begin", stage)))
    monkeypatch.setattr(estimate, "record", lambda c, part, setup: calls.append(("record", part, setup)))
    run_study(model, cfg, d, tokenizer=tok, stages=("edit", "report"), progress=False)
    setup = estimate.model_setup(model)
    assert calls == [("begin", "edit"), ("record", "edit", setup), ("record", "edit-methods", setup),
                     ("begin", "report"), ("record", "report", setup)]


@pytest.mark.slow
def test_edit_stage_computes_statistics_of_the_edited_layers_only(study, tmp_path, monkeypatch):
    """The edit stage asks for the key statistics of the layers its remaining runs edit (random draws included),
    and a layer's statistics are the same whether its pass covers every layer or only the edited ones."""
    from jaxedit.detox import editing

    model, tok, cfg, out = study
    d = str(tmp_path / "again")
    shutil.copytree(out, d)
    redo = ["random-single__delete__kl0.0625__s1", "ct-single__edit-canned__kl0.0625__s0"]
    want = {}
    for rid in redo:
        want[rid] = json.load(open(os.path.join(d, "edits", rid + ".json")))["layers"]
        os.remove(os.path.join(d, "edits", rid + ".json"))
    asked = []
    real = editing.layer_stats
    monkeypatch.setattr(editing, "layer_stats", lambda m, layers, **k: asked.append(list(layers)) or real(
        m, layers, **k))
    editing.edit(model, tok, cfg, d, progress=False)
    assert asked == [sorted({l for v in want.values() for l in v})] and len(asked[0]) < model.config.n_layers
    kw = dict(corpus="model", stats_samples=4, max_len=16, progress=False)
    some = jaxedit.layer_stats(model, [1], tokenizer=tok, cache_dir=str(tmp_path / "a"), **kw)
    every = jaxedit.layer_stats(model, [0, 1, 2], tokenizer=tok, cache_dir=str(tmp_path / "b"), **kw)
    np.testing.assert_array_equal(some[1], every[1])


@pytest.mark.slow
def test_rerun_with_other_options_is_refused(study, tmp_path):
    model, tok, cfg, out = study
    with pytest.raises(JaxeditError, match=r"select stage run with other options \(--select-samples 4 -> 5"):
        run_study(model, config(cfg.prompts, select_samples=5), out, tokenizer=tok, stages=("select",), progress=False)
    with pytest.raises(JaxeditError, match=r"--select-threshold 0.45 -> 0.4\).*or delete trace/results.jsonl, "
                                           r"localize.json, edits, runs.jsonl to select again"):
        run_study(model, config(cfg.prompts, select_threshold=0.4), out,
                  tokenizer=tok, stages=("select",), progress=False)
    # with no later results, another threshold re-filters the stored candidates (nothing is sampled again)
    fresh = str(tmp_path / "fresh")
    os.makedirs(fresh)
    for f in ("candidates.jsonl", "run.json"):
        shutil.copy(os.path.join(out, f), fresh)
    run_study(model, config(cfg.prompts, select_threshold=0.3), fresh,
              tokenizer=tok, stages=("select",), progress=False)
    cands = read(os.path.join(fresh, "candidates.jsonl"))
    assert cands == read(os.path.join(out, "candidates.jsonl"))
    assert sorted(r["line"] for r in read(os.path.join(fresh, "selected.jsonl"))) == sorted(
        c["line"] for c in cands if c["prompt_toxicity"] < 0.5 and c["mean_toxicity"] > 0.3)
    with pytest.raises(JaxeditError, match=r"--eval-samples 3 -> 4"):
        run_study(model, config(cfg.prompts, eval_samples=4), out, tokenizer=tok, stages=("evaluate",), progress=False)
    # --limit shrinks (or grows) the selection without sampling again what is done: with later results it is
    # refused like any filter option; with none, the stored candidates of the first N prompts are re-filtered
    with pytest.raises(JaxeditError, match=r"--limit None -> 3\).*to select again"):
        run_study(model, config(cfg.prompts, limit=3), out, tokenizer=tok, stages=("select",), progress=False)
    import jaxedit.detox.selection as selection

    def no_sampling(*a, **k):
        raise AssertionError("sampled again")

    monkey = pytest.MonkeyPatch()
    monkey.setattr(selection, "sample", no_sampling)
    try:
        run_study(model, config(cfg.prompts, select_threshold=0.3, limit=3), fresh, tokenizer=tok, stages=("select",),
                  progress=False)
    finally:
        monkey.undo()
    # a study written before --limit moved to the filter options (it was recorded with the sampling ones) is
    # checked against its old limit, and its record is brought up to date
    old = str(tmp_path / "old")
    os.makedirs(old)
    shutil.copy(os.path.join(out, "candidates.jsonl"), old)
    with open(os.path.join(out, "run.json")) as f:
        stored = json.load(f)
    stored["sample"]["limit"] = 5
    del stored["filter"]["limit"]
    with open(os.path.join(old, "run.json"), "w") as f:
        json.dump(stored, f)
    open(os.path.join(old, "localize.json"), "w").write("{}")  # a later stage has results
    with pytest.raises(JaxeditError, match=r"--limit 5 -> None\)"):
        run_study(model, cfg, old, tokenizer=tok, stages=("select",), progress=False)
    first3 = [c for c in cands if c["line"] <= 3]
    assert len(first3) == 3
    assert sorted(r["line"] for r in read(os.path.join(fresh, "selected.jsonl"))) == sorted(
        c["line"] for c in first3 if c["prompt_toxicity"] < 0.5 and c["mean_toxicity"] > 0.3)


@pytest.mark.slow
def test_fewer_samples_on_a_rerun_reuse_the_first_ones(study, tmp_path):
    """A smaller --select-samples on a rerun with no later results: the stored candidates are cut to their first N
    continuations (nothing sampled again) and equal a fresh selection with N samples (each sample's random stream is
    its own); with later results it is refused, and so is a larger one."""
    import jaxedit.detox.selection as selection

    model, tok, cfg, out = study
    with pytest.raises(JaxeditError, match=r"--select-samples 4 -> 2\).*or delete .*to select again"):
        run_study(model, config(cfg.prompts, select_samples=2), out, tokenizer=tok, stages=("select",), progress=False)
    fewer = str(tmp_path / "fewer")
    os.makedirs(fewer)
    for f in ("candidates.jsonl", "run.json"):
        shutil.copy(os.path.join(out, f), fewer)
    monkey = pytest.MonkeyPatch()
    monkey.setattr(selection, "sample", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampled again")))
    try:
        run_study(model, config(cfg.prompts, select_samples=2), fewer,
                  tokenizer=tok, stages=("select",), progress=False)
    finally:
        monkey.undo()
    full = {c["line"]: c for c in read(os.path.join(out, "candidates.jsonl"))}
    cut = read(os.path.join(fewer, "candidates.jsonl"))
    assert sorted(c["line"] for c in cut) == sorted(full)
    for c in cut:
        f = full[c["line"]]
        assert c["samples"] == f["samples"][:2] and c["scores"] == f["scores"][:2]
        assert c["mean_toxicity"] == pytest.approx(np.mean(f["scores"][:2]), abs=1e-12)
        hi = max((j for j in range(2) if f["ids"][j]), key=lambda j: (f["scores"][j], -j))  # by hand
        assert c["most_toxic"]["text"] == f["samples"][hi] and c["most_toxic"]["ids"] == f["ids"][hi]
    direct = str(tmp_path / "direct")
    run_study(model, config(cfg.prompts, select_samples=2), direct, tokenizer=tok, stages=("select",), progress=False)
    fresh = {c["line"]: c for c in read(os.path.join(direct, "candidates.jsonl"))}
    assert {c["line"]: c for c in cut} == fresh  # every field, as a fresh run with 2 samples writes it
    assert read(os.path.join(fewer, "selected.jsonl")) == read(os.path.join(direct, "selected.jsonl"))
    with pytest.raises(JaxeditError, match=r"--select-samples 2 -> 4\)"):
        run_study(model, cfg, fewer, tokenizer=tok, stages=("select",), progress=False)


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


def drawn_texts(monkeypatch):
    """Patch Figure.savefig to draw the figure and record, per saved figure, [(text, inside the figure)] of every
    visible non-empty Text artist (titles, labels, tick labels, colorbar titles, annotations, legends); tick labels
    count as inside (matplotlib keeps the labels of ticks beyond the axis limits, undrawn)."""
    import matplotlib.figure
    import matplotlib.text

    figures = []

    def record(fig, *a, **k):
        fig.canvas.draw()
        box = fig.bbox
        ticks = {id(lab) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
                 for tick in axis.get_major_ticks() + axis.get_minor_ticks() for lab in (tick.label1, tick.label2)}
        texts = []
        for t in fig.findobj(matplotlib.text.Text):
            if t.get_visible() and t.get_text().strip():
                e = t.get_window_extent()
                inside = id(t) in ticks or e.x0 >= box.x0 - 1 and e.x1 <= box.x1 + 1 and e.y0 >= box.y0 - 1 and e.y1 <= box.y1 + 1
                texts.append((t.get_text(), inside))
        figures.append(texts)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    return figures


@pytest.mark.slow
def test_figures_keep_the_toxic_words_hidden_and_fit(study, tmp_path, monkeypatch):
    """With obfuscation on (the default) no figure text spells the toxic value or chunk in clear: not the heatmap
    titles, not the colorbars' p(...); every text lies inside its figure; the frontier labels its points with their
    KL weights; table1.md names what it leaves to table2.md."""
    from jaxedit.detox.localization import obfuscate, plot_prompt
    from jaxedit.detox.report import report
    from jaxedit.locate.tracing import TraceResult

    _, _, cfg, out = study
    figures = drawn_texts(monkeypatch)
    tokens = ["You", " know", " what", " he", " said", " about", " the", " neighbours", ",", " stupid", " and",
              " lazy", " and", " stupid"]
    res = {k: TraceResult(kind=k, scores=np.full((len(tokens), 3), 0.1), low_score=0.05, high_score=0.7,
                          answer_id=7, answer=" stupid", input_ids=np.arange(len(tokens)), tokens=tokens,
                          span=(9, 12), window=1, samples=3, noise_level=0.1) for k in ("mlp", "hidden")}
    row = {"span": [9, 12], "value": " stupid"}
    plot_prompt(res, row, str(tmp_path / "shown"), hide=False)
    assert any("stupid" in t for t, _ in figures[0])  # the check below can see the word
    figures.clear()
    plot_prompt(res, row, str(tmp_path / "hidden"))
    report(cfg, out)
    assert len(figures) == 2 * 3  # the heatmaps, aie_layers, frontier (PNG and PDF each)
    texts = [t for fig in figures for t, _ in fig]
    assert not [t for t in texts if "stupid" in t or "lazy" in t], texts
    assert any(obfuscate(" stupid").strip() in t for t in texts)
    assert any(t == f"p({obfuscate(' stupid').strip()})" for t in texts)  # the colorbars' title, hidden
    assert not [t for fig in figures for t, inside in fig if not inside]  # nothing clipped
    frontier = figures[-1]
    n_points = len([r for r in read(os.path.join(out, "summary.jsonl")) if r["strategy"] != "base"
                    and r.get("toxic_rate") is not None])
    assert sum(t == f"{cfg.kl_weights[0]:g}" for t, _ in frontier) == n_points
    table1 = open(os.path.join(out, "table1.md")).read()
    assert "| edit-canned toxic % |" in table1 and "Not run: edit-nontoxic." in table1 and "table2.md" in table1


def test_frontier_draws_the_goal_region(tmp_path, monkeypatch):
    """The frontier shades the goal (the unedited toxic rate halved at <= +31 % perplexity): by hand, 7.5 % at
    perplexity 100 gives the region up to perplexity 131 and 3.75 % toxic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxedit.detox.report import goal_region, plot_frontier

    base = {"strategy": "base", "perplexity_prompts": 100.0, "toxic_rate": 0.075}
    assert goal_region(base) == pytest.approx((131.0, 3.75))
    rows = [base, {"strategy": "topk-multi", "objective": "delete", "kl_weight": 1.0, "perplexity_prompts": 160.0,
                   "toxic_rate": 0.05}]
    kept, close = [], plt.close
    monkeypatch.setattr(plt, "close", kept.append)
    plot_frontier(rows, str(tmp_path / "frontier"))
    (ax,) = kept[0].axes
    region = [c for c in ax.collections if c.get_label().startswith("toxic % halved")]
    assert len(region) == 1 and region[0].get_label() == "toxic % halved at <= +31% ppl"
    xy = region[0].get_paths()[0].vertices
    assert xy[:, 0].max() == pytest.approx(131.0) and xy[:, 1].max() == pytest.approx(3.75)
    assert ax.get_ylim()[0] <= 0.9 * 3.75 and (tmp_path / "frontier.png").exists()
    close(kept[0])


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


def test_options_are_checked_before_the_model_loads(tmp_path, tiny_dirs, monkeypatch):
    """Every bad option or input file is one line, exit 2, with nothing written and the model never loaded (its
    config is read to check layer counts and hyperparameters); a model path that does not exist comes after."""
    loads = []
    monkeypatch.setattr(jaxedit, "load", lambda *a, **k: loads.append(a) or (_ for _ in ()).throw(
        AssertionError("the model was loaded")))
    out = tmp_path / "o"
    neutral_empty = tmp_path / "empty.txt"
    neutral_empty.write_text("\n")
    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"prompt": "fine"}\n{"prompt": "unterminated')
    cases = [(["--trace-kinds", "hidden,bogus"], "error: unknown trace kinds ['bogus'] (choose from hidden, mlp, attn)"),
             (["--objectives", "delete,nope"], "error: unknown objectives ['nope']"),
             (["--select-threshold", "1.5"], "error: --select-threshold must be in [0, 1] (got 1.5)"),
             (["--max-prompts", "0"], "error: --max-prompts must be >= 1 (got 0)"),
             (["--trace-samples", "0"], "error: --trace-samples must be >= 1 (got 0)"),
             (["--kl-weight", "x"], "error: --kl-weights must be a comma list of numbers"),  # the old spelling
             (["--neutral", str(tmp_path / "nope.txt")], f"error: cannot read {tmp_path / 'nope.txt'}: No such file"),
             (["--neutral", str(neutral_empty)], f"error: {neutral_empty}: no text"),
             (["--factual", str(facts)], f"error: {facts}:2: malformed JSON (Unterminated string starting at column 12)"),
             (["--prompts", str(tmp_path / "none.jsonl")], f"error: cannot read {tmp_path / 'none.jsonl'}"),
             (["--scorer", "hf:" + str(tmp_path)], f"error: no classifier checkpoint at {tmp_path}"),
             (["--hparam", "layers=[1]"], "error: --hparam layers is set by the study (--strategies chooses the layers)"),
             # these need the model's config (3 layers), read without the weights
             (["--n-layers", "4"], "error: n-layers must be within 1..3"),
             (["--topk", "1", "--n-layers", "2"], "error: topk must be within n-layers (2)..3 (got 1)"),
             (["--hparam", "bogus=1"], "error: --hparam: unknown hyperparameter 'bogus'; valid: clamp_norm_factor, "
                                       "context_length,"),
             (["--hparam", "mom2_sample=3"],
              "error: --hparam: unknown hyperparameter 'mom2_sample' (did you mean stats_samples?)"),
             (["--hparam", "v_num_grad_steps=2.5"], "error: --hparam v_num_grad_steps=2.5: expected int")]
    for args, msg in cases:
        r = CliRunner().invoke(cli, ["-q", "detox", "--prompts", "demo", "--out", str(out), "--model",
                                     tiny_dirs["gpt2"][0], *args])
        assert r.exit_code == 2 and r.output.startswith(msg) and r.output.count("\n") == 1, (args, r.output)
    # an option error comes before a model that does not exist, which comes before loading
    r = CliRunner().invoke(cli, ["-q", "detox", "--prompts", "demo", "--out", str(out), "--model",
                                 str(tmp_path / "no-model"), "--trace-kinds", "bogus"])
    assert r.exit_code == 2 and r.output.startswith("error: unknown trace kinds"), r.output
    r = CliRunner().invoke(cli, ["-q", "detox", "--prompts", "demo", "--out", str(out), "--model",
                                 str(tmp_path / "no-model")])
    assert r.exit_code == 2 and r.output == f"error: no such model directory or file: {tmp_path / 'no-model'}\n"
    assert not loads and not out.exists()


def test_dry_run_prints_the_plan_without_loading(tmp_path, tiny_dirs, monkeypatch):
    monkeypatch.setattr(jaxedit, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    out = tmp_path / "o"
    r = CliRunner().invoke(cli, ["-q", "detox", "--prompts", "demo", "--out", str(out), "--model", tiny_dirs["gpt2"][0],
                                 "--strategies", "random-single,ct-multi", "--objectives", "delete", "--random-seeds",
                                 "2", "--kl-weights", "0,0.1", "--limit", "5", "--dry-run"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == f"plan for {out}/ with {tiny_dirs['gpt2'][0]} (3 layers)"
    assert lines[1] == "select: 5 prompts x 25 continuations of 20 tokens (125 samples)"
    assert lines[3].startswith("edit: 6 runs (2 strategies x 1 objective x 2 KL weights; random strategies x 2 seeds)")
    assert lines[-1] == "dry run: nothing loaded, nothing written" and not out.exists()


def test_plan_counts_only_this_configurations_runs(tmp_path, monkeypatch):
    """A folder that holds runs of other KL weights and ranks (a sweep grown over several commands): the plan's units
    left are this configuration's runs without an edit / an evaluation, not the folder's counts."""
    import cli.detox as cli_detox

    out = tmp_path / "study"
    (out / "edits").mkdir(parents=True)
    cfg = config("demo", strategies=("topk-multi", "ct-multi"), objectives=("delete",), kl_weights=(0.0, 1.0),
                 methods=("delete", "profs"), profs_ranks=(1, 2))
    edited = ["topk-multi__delete__kl0.25__s0", "topk-multi__delete__kl0.25__s1", "ct-multi__delete__kl0.25__s0",
              "ct-multi__delete__kl1__s0", "profs__rank1__pairs100", "profs__rank4__pairs100"]
    for rid in edited:
        (out / "edits" / f"{rid}.json").write_text("{}")
    (out / "runs.jsonl").write_text("".join(json.dumps({"run": r}) + "\n" for r in ["base"] + edited[2:4] + edited[5:]))
    seen = {}
    monkeypatch.setattr(cli_detox, "estimate_lines", lambda cfg, units, setup, *a: seen.update(units) or [])
    lines = cli_detox.plan(cfg, None, str(out), ("edit", "evaluate"))
    # this configuration: topk-multi 2 seeds x KL 0, 1 and ct-multi x KL 0, 1 (6), ProFS ranks 1, 2 (2); of them
    # ct-multi KL 1 and rank 1 are edited, and base and ct-multi KL 1 evaluated
    assert seen == {"edit": 5, "edit-methods": 1, "evaluate": 7}
    assert lines[1].endswith("each one batched edit of the selected prompts; 1 done earlier"), lines[1]
    # the deletions and the other methods' runs are extrapolated from their own times: fixed 200 s, then 240 s a
    # deletion; fixed 20 s, then 10 s a ProFS run
    from jaxedit.detox import estimate

    cal = {"edit": {"first": 440.0, "first_units": 1, "per_unit": 240.0, "unit_size": 1.0, "date": "2026-12-06"},
           "edit-methods": {"first": 30.0, "first_units": 1, "per_unit": 10.0, "unit_size": 1.0, "date": "2026-12-06"}}
    monkeypatch.setattr(estimate, "load_calibration", lambda cfg, setup: cal)
    line = estimate.estimate_lines(cfg, {"edit": 5, "edit-methods": 1}, "float32")[0]
    assert line == ("time: ~24 min (edit (deletions) ~23 min, edit (DINM / ProFS / AurA) ~30 s; from runs on this machine, "
                    "2026-12-06)"), line


@pytest.mark.slow
def test_plan_estimates_time_from_the_measured_units(study, tmp_path, monkeypatch):
    """The stage bars time their first update from the stage's start (compile included) and the later units; the
    plan extrapolates: by hand, 10 s for the first 3 prompts, then 4 s for 5 more (0.8 s each), so a fixed part of
    10 - 3 x 0.8 = 7.6 s; 13 prompts at twice the samples: 7.6 + 0.8 x 2 x 13 = 28.4 s. A study's run records
    every stage it ran."""
    from jaxedit import calibration
    from jaxedit.detox import estimate
    from jaxedit.runtime import _NoBar

    _, _, cfg, _ = study
    assert {"select", "localize", "edit", "evaluate"} <= set(estimate.load_calibration(cfg))  # the fixture's run
    monkeypatch.setenv("JAXEDIT_CACHE", str(tmp_path / "cache"))
    assert estimate.estimate_lines(cfg, {"select": 5})[0].startswith("time: no estimate yet")
    clock = iter([100.0, 110.0, 112.0, 114.0])
    monkeypatch.setattr(calibration, "_clock", lambda: next(clock))
    estimate.begin("select")  # the stage starts at 100 s
    with estimate.TimedBar(_NoBar(), "select") as bar:
        for n in (3, 3, 2):
            bar.update(n)
    estimate.record(cfg, "select")
    c = estimate.load_calibration(cfg)["select"]
    assert (c["first"], c["first_units"], c["per_unit"], c["unit_size"]) == (10.0, 3, 0.8, 20.0)
    doubled = dataclasses.replace(cfg, select_samples=2 * cfg.select_samples)
    assert estimate.stage_seconds(estimate.load_calibration(cfg), doubled, "select", 13) == pytest.approx(28.4)
    line = estimate.estimate_lines(doubled, {"select": 13, "localize": None})[0]
    assert line.startswith("time: ~28 s + localize (not measured yet") and "select ~28 s" in line, line
    # edit runs are not scaled by the prompts they edit (one batched edit each): fixed 30 - 5, then 5 s a run
    cal = {"edit": {"first": 30.0, "first_units": 1, "per_unit": 5.0, "unit_size": 1.0}}
    assert estimate.stage_seconds(cal, cfg, "edit", 3) == pytest.approx(25 + 3 * 5)
    assert estimate.stage_seconds(cal, cfg, "edit", None) is None and estimate.stage_seconds(cal, cfg, "edit", 0) == 0


def test_empty_selection_says_how_many_were_considered(tmp_path, tiny_dirs):
    model, tok = jaxedit.load(tiny_dirs["gpt2"][0])
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": t}) for t in PROMPTS[:3]) + "\n")
    cfg = config(str(p), scorer=lambda texts: [0.1] * len(texts), select_threshold=0.3, select_samples=2)
    with pytest.raises(JaxeditError, match=r"no prompt selected: 3 considered, 3 below prompt toxicity 0.5, none "
                                           r"with mean continuation toxicity > 0.3 \(the highest was 0.100\)"):
        run_study(model, cfg, str(tmp_path / "o"), tokenizer=tok, stages=("select",), progress=False)
    # every prompt itself above the prompt threshold: none below it, no highest mean to report
    cfg = config(str(p), scorer=lambda texts: [0.9] * len(texts), select_threshold=0.3, select_samples=2)
    with pytest.raises(JaxeditError, match=r"no prompt selected: 3 considered, 0 below prompt toxicity 0.5, none "
                                           r"with mean continuation toxicity > 0.3 \(the highest was nan\)"):
        run_study(model, cfg, str(tmp_path / "o2"), tokenizer=tok, stages=("select",), progress=False)


def test_selection_samples_follow_the_seed(tmp_path, tiny_dirs):
    model, tok = jaxedit.load(tiny_dirs["gpt2"][0])
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": t}) for t in PROMPTS[:2]) + "\n")
    samples = {}
    for seed in (0, 5, 5):
        cfg = config(str(p), scorer=lambda texts: [0.9] * len(texts), select_samples=2, seed=seed)
        out = tmp_path / f"o{len(samples)}-{seed}"
        with pytest.raises(JaxeditError, match="no prompt selected"):  # every prompt too toxic itself: stops there
            run_study(model, cfg, str(out), tokenizer=tok, stages=("select",), progress=False)
        samples.setdefault(seed, []).append([c["samples"] for c in read(out / "candidates.jsonl")])
    assert samples[5][0] == samples[5][1] and samples[5][0] != samples[0][0]


def test_toxic_word_value_mode(tmp_path, tiny_dirs):
    """--value toxic-word: the value is the first token of the most toxic word (by the scorer) of the most toxic
    continuation, found by hand from the decoded prefixes."""
    model, tok = jaxedit.load(tiny_dirs["gpt2"][0])
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": t}) for t in PROMPTS) + "\n")
    out = tmp_path / "o"
    run_study(model, config(str(p), value="toxic-word"), str(out), tokenizer=tok, stages=("select",), progress=False)
    cands = {c["line"]: c for c in read(out / "candidates.jsonl")}
    sel = read(out / "selected.jsonl")
    assert sel and all(r["value_mode"] == "toxic-word" for r in sel)
    moved = 0
    for r in sel:
        most = cands[r["line"]]["most_toxic"]
        words = list(re.finditer(r"[\w']+", most["text"]))
        scores = fake_toxicity([m.group() for m in words])
        m = words[scores.index(max(scores))]
        k = next(k for k in range(len(most["ids"])) if len(tok.decode(most["ids"][:k + 1])) > m.start())
        assert (r["value_word"], r["value_id"]) == (m.group(), most["ids"][k])
        moved += k > 0
    assert moved  # some values are not the continuation's first token


# ---------------------------------------------------------------------------------------------- torch references


@pytest.fixture
def one_thread():
    """torch on one thread while a test runs (two threads on a shared 2-core machine run the tiny model 50x
    slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

DATA = os.path.join(os.path.dirname(jaxedit.__file__), "data")


def torch_edited(hf, out, rid):
    """A copy of the torch model with run ``rid``'s stored output projections (edits/RID.npz, jaxedit's [d_ff, d]
    layout) put into its down_proj weights ([d, d_ff])."""
    m = copy.deepcopy(hf)
    if rid == "base":
        return m
    with np.load(os.path.join(out, "edits", rid + ".npz")) as z:
        layers, w = z["layers"], z["w_out"]
    with torch.no_grad():
        for l, wl in zip(layers.tolist(), w):
            m.model.layers[l].mlp.down_proj.weight.copy_(torch.from_numpy(np.ascontiguousarray(wl.T)))
    return m


def torch_logprobs(hf, ids):
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)


def torch_perplexity(hf, tok, texts):
    """exp(total NLL / predicted tokens), a text longer than the model's positions cut into consecutive windows of
    that length (each window's first token not predicted)."""
    n_pos = hf.config.max_position_embeddings
    nll, n = 0.0, 0
    for t in texts:
        ids = tok(t)["input_ids"]
        for a in range(0, len(ids), n_pos):
            w = ids[a:a + n_pos]
            if len(w) > 1:
                lp = torch_logprobs(hf, w)
                nll -= float(lp[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum())
                n += len(w) - 1
    return math.exp(nll / n)


def torch_greedy(hf, tok, prompt, n_new):
    """The argmax continuation (stopped at the end-of-text token), decoded."""
    ids, new = tok(prompt)["input_ids"], []
    for _ in range(n_new):
        t = int(torch_logprobs(hf, ids + new)[-1].argmax())
        if t == tok.eos_token_id:
            break
        new.append(t)
    return tok.decode(new, skip_special_tokens=True)


def ngram_fluency(texts):
    """ROME's n-gram entropy: per text, 2/3 x the entropy (bits) of its word bigrams' frequencies and 4/3 x its
    trigrams', averaged; then the mean over texts. Words from NLTK's word tokenizer."""
    import nltk

    try:
        words_of = nltk.word_tokenize
        words_of("A. B.")
    except LookupError:  # no Punkt data: an untrained sentence splitter, then the same word tokenizer
        from nltk.tokenize import NLTKWordTokenizer
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        words_of = lambda t: [w for s in PunktSentenceTokenizer().tokenize(t) for w in NLTKWordTokenizer().tokenize(s)]
    per_text = []
    for t in texts:
        w = words_of(t)
        ents = []
        for n, weight in ((2, 2 / 3), (3, 4 / 3)):
            counts = Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
            total = sum(counts.values())
            ents.append(weight * -sum(c / total * math.log2(c / total) for c in counts.values()))
        per_text.append(sum(ents) / 2)
    return sum(per_text) / len(per_text)


@pytest.mark.slow
def test_perplexities_of_every_run_against_torch(study, tiny_dirs, tokenizer, one_thread):
    """summary.jsonl's perplexities (prompts, neutral text, held-out prompts; seeds averaged) against the torch
    model with each run's stored weights put back; every edit moves them by more than the tolerance."""
    _, _, cfg, out = study
    hf = tiny_dirs["llama-gqa-untied"][1]
    sel = read(os.path.join(out, "selected.jsonl"))
    edit_p = [r["prompt"] for r in sel if r["split"] == "edit"]
    held_p = [r["prompt"] for r in sel if r["split"] == "heldout"]
    assert edit_p and held_p
    with open(os.path.join(DATA, "neutral.txt")) as f:
        neutral = [line.strip() for line in f if line.strip()]
    runs = {r["run"]: r for r in read(os.path.join(out, "runs.jsonl"))}
    base = [torch_perplexity(hf, tokenizer, t) for t in (edit_p, neutral, held_p)]
    for row in read(os.path.join(out, "summary.jsonl")):
        rids = [r for r, x in runs.items()
                if (x["strategy"], x["objective"], x["kl_weight"]) == (row["strategy"], row["objective"], row["kl_weight"])]
        assert len(rids) == (cfg.random_seeds if row["strategy"] == "random-single" else 1)
        per_run = [[torch_perplexity(m, tokenizer, t) for t in (edit_p, neutral, held_p)]
                   for m in (torch_edited(hf, out, rid) for rid in rids)]
        got = [row["perplexity_prompts"], row["perplexity_neutral"], row["heldout_perplexity"]]
        # measured: within 2e-7 of torch (float32 both)
        np.testing.assert_allclose(got, np.mean(per_run, 0), rtol=1e-6, err_msg=str(rids))
        if rids != ["base"]:  # the stored weights matter: each edit moves a perplexity by 2.4e-5 to 5e-4 (measured)
            assert all(np.abs(np.asarray(w) / base - 1).max() > 1e-5 for w in per_run), rids


@pytest.fixture(scope="module")
def greedy_eval(study, tmp_path_factory):
    """The evaluate stage rerun on a copy of the study's selection and two of its edits, with a nucleus so small
    that sampling is argmax decoding (so torch can regenerate every continuation) and the shipped factual prompts
    on (the study leaves them out)."""
    model, tok, cfg, out = study
    d = tmp_path_factory.mktemp("greedy")
    shutil.copy(os.path.join(out, "selected.jsonl"), d)
    os.makedirs(d / "edits")
    rids = ["ct-multi__edit-canned__kl0.0625__s0", "saliency-multi__delete__kl0.0625__s0"]
    for rid in rids:
        for ext in (".json", ".npz"):
            shutil.copy(os.path.join(out, "edits", rid + ext), d / "edits")
    ecfg = dataclasses.replace(cfg, top_p=1e-6, factual="facts", factual_samples=1)
    evaluate_stage(model, tok, ecfg, str(d), progress=False)
    return ecfg, str(d), ["base"] + rids


@pytest.mark.slow
def test_evaluate_against_torch(greedy_eval, study, tiny_dirs, tokenizer, one_thread):
    """Every metric of the evaluate stage for the unedited model and two edits, recomputed with torch: argmax
    continuations regenerated on the torch model with the stored weights put back and scored by hand (toxic rate,
    fluency), perplexities, and the factual prompts' toxic rate, perplexity and kept argmax."""
    cfg, d, rids = greedy_eval
    hf = tiny_dirs["llama-gqa-untied"][1]
    sel = read(os.path.join(d, "selected.jsonl"))
    with open(os.path.join(DATA, "facts.jsonl")) as f:
        facts = [json.loads(line)["prompt"] for line in f if line.strip()]
    sets = {"": [r["prompt"] for r in sel if r["split"] == "edit"],
            "heldout_": [r["prompt"] for r in sel if r["split"] == "heldout"], "factual_": facts}
    summary = {(r["strategy"], r["objective"]): r for r in read(os.path.join(d, "summary.jsonl"))}
    assert len(summary) == 3 and len(facts) >= 20
    base_arg = None
    moved = 0
    for rid in rids:
        m = torch_edited(hf, d, rid)
        row = summary[("base", None)] if rid == "base" else summary[tuple(rid.split("__")[:2])]
        for prefix, prompts in sets.items():
            conts = [torch_greedy(m, tokenizer, p, cfg.max_new_tokens) for p in prompts]
            scores = fake_toxicity(conts)
            assert row[prefix + "toxic_rate"] == pytest.approx(np.mean([s > 0.5 for s in scores]), abs=1e-12), \
                (rid, prefix)
            if prefix != "factual_":
                assert row[prefix + "fluency"] == pytest.approx(ngram_fluency(conts), rel=1e-9, abs=1e-12), (rid, prefix)
            ppl = row["perplexity_prompts" if not prefix else prefix + "perplexity"]
            assert ppl == pytest.approx(torch_perplexity(m, tokenizer, prompts), rel=2e-5), (rid, prefix)
        arg = [int(torch_logprobs(m, tokenizer(p)["input_ids"])[-1].argmax()) for p in facts]
        if base_arg is None:
            base_arg = arg
            assert "factual_argmax_kept" not in row
        else:
            kept = np.mean(np.asarray(arg) == np.asarray(base_arg))
            assert row["factual_argmax_kept"] == pytest.approx(kept, abs=1e-12), rid
            moved += kept < 1
    assert moved  # an edit changed some factual prompt's argmax: the kept fraction is not 1 by construction


@pytest.mark.slow
def test_layer_choice_against_hand_aie_and_torch_saliency(study, tiny_dirs, tokenizer, one_thread):
    """The layers of ct-single / ct-multi against a hand computation of the AIE at the chunk's last token (the
    stored per-prompt MLP grids' IE, averaged over the edited prompts in float64, ranked by hand), and those of
    saliency-multi against the mean |dNLL/dW| of each layer's down_proj (torch autograd, the value token's NLL
    after each edited prompt, averaged over the prompts)."""
    _, _, cfg, out = study
    hf = tiny_dirs["llama-gqa-untied"][1]
    L = hf.config.num_hidden_layers
    n_multi = max(2, round(6 * L / 48))  # the paper's 6 of GPT-2-XL's 48 layers, scaled, at least 2
    rows = [r for r in read(os.path.join(out, "selected.jsonl")) if r["split"] == "edit"]
    ie = []
    for r in rows:
        with np.load(os.path.join(out, "trace", f"prompt{r['line']:05d}_mlp.npz")) as z:
            assert [int(v) for v in z["subject_range"]] == r["span"] and str(z["kind"]) == "mlp"
            assert int(z["answer_id"]) == r["value_id"]
            ie.append(np.asarray(z["scores"], np.float64)[r["span"][1] - 1] - float(z["low_score"]))
    aie = [sum(x[l] for x in ie) / len(ie) for l in range(L)]
    ct_rank = sorted(range(L), key=lambda l: -aie[l])
    assert all(aie[a] - aie[b] > 1e-7 for a, b in zip(ct_rank, ct_rank[1:]))  # no near-tie decides the choice

    model = copy.deepcopy(hf).double()
    sal = np.zeros(L)
    for r in rows:
        model.zero_grad()
        lp = torch.log_softmax(model(torch.tensor([tokenizer(r["prompt"])["input_ids"]])).logits[0, -1], -1)
        (-lp[r["value_id"]]).backward()
        sal += [model.model.layers[l].mlp.down_proj.weight.grad.abs().mean().item() / len(rows) for l in range(L)]
    sal_rank = sorted(range(L), key=lambda l: -sal[l])
    assert all(sal[a] / sal[b] > 1 + 1e-3 for a, b in zip(sal_rank, sal_rank[1:]))

    loc = json.load(open(os.path.join(out, "localize.json")))
    assert loc["ct_ranking"] == ct_rank and loc["saliency_ranking"] == sal_rank
    np.testing.assert_allclose(loc["ct_profile"], aie, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(loc["saliency_profile"], sal, rtol=1e-4)
    want = {"ct-single": [ct_rank[0]], "ct-multi": sorted(ct_rank[:n_multi]), "saliency-multi": sorted(sal_rank[:n_multi])}
    assert want["ct-multi"] != sorted(ct_rank[-n_multi:])  # the least causal layers would differ
    summary = read(os.path.join(out, "summary.jsonl"))
    for strategy, layers in want.items():
        for objective in cfg.objectives:
            (row,) = [x for x in summary if (x["strategy"], x["objective"]) == (strategy, objective)]
            assert row["layers"] == layers, (strategy, objective)
            rid = f"{strategy}__{objective}__kl{cfg.kl_weights[0]:g}__s{cfg.seed}"
            with np.load(os.path.join(out, "edits", rid + ".npz")) as z:
                assert z["layers"].tolist() == layers, rid


# ---------------------------------------------------------------------------------------------- DINM and ProFS

def methods_config(cfg, **kw):
    return dataclasses.replace(cfg, methods=("delete", "dinm", "profs", "aura"), dinm_steps=(2,), profs_ranks=(1, 2),
                               profs_pairs=(20,), aura_layers=("all", "1-2"), **kw)


METHOD_RUNS = ["dinm__steps2", "profs__rank1__pairs20", "profs__rank2__pairs20", "aura__all", "aura__1-2"]


@pytest.fixture(scope="module")
def methods_study(study, tmp_path_factory):
    """The study's folder with DINM, ProFS (ranks 1 and 2 from 20 pairs: more samples than the selection's) and
    AurA (all layers, layers 1-2) added by a rerun with more methods."""
    model, tok, cfg, out = study
    d = str(tmp_path_factory.mktemp("methods") / "out")
    shutil.copytree(out, d)
    mcfg = methods_config(cfg)
    run_study(model, mcfg, d, tokenizer=tok, progress=False)
    return model, tok, mcfg, d


def hand_extremes(out):
    """(line, prompt, least toxic, most toxic non-blank sample) of the edited prompts, scored again by hand."""
    cands = {c["line"]: c for c in read(os.path.join(out, "candidates.jsonl"))}
    rows = []
    for r in read(os.path.join(out, "selected.jsonl")):
        if r["split"] == "edit":
            samples = [s for s in cands[r["line"]]["samples"] if s.strip()]
            scores = fake_toxicity(samples)
            lo = samples[int(np.argmin(scores))]
            hi = samples[int(np.argmax(scores))]
            rows.append((r["line"], r["prompt"], lo, hi))
    return rows


@pytest.mark.slow
def test_methods_runs_and_table(study, methods_study):
    """Adding methods to a study keeps the deletion rows as they were and adds one row per DINM / ProFS run, with
    its method, to runs.jsonl, summary.jsonl and table_methods.md."""
    out0 = study[3]
    _, _, cfg, out = methods_study
    before = {r["run"]: r for r in read(os.path.join(out0, "runs.jsonl"))}
    runs = {r["run"]: r for r in read(os.path.join(out, "runs.jsonl"))}
    assert set(runs) == set(before) | set(METHOD_RUNS)
    for rid, r in before.items():  # the deletion grid is not evaluated again
        assert runs[rid] == r and r["method"] == ("base" if rid == "base" else "delete")
    for rid in METHOD_RUNS:
        r = runs[rid]
        assert r["method"] == rid.split("__")[0] and "error" not in r and r["edit_seconds"] > 0
        assert 0 <= r["toxic_rate"] <= 1 and r["perplexity_prompts"] > 1 and r["layers"]
    assert runs["profs__rank2__pairs20"]["settings"] == {"rank": 2, "pairs": 20}
    assert runs["dinm__steps2"]["settings"] == {"steps": 2, "lr": 5e-4, "edit_weight": 0.1}
    assert runs["aura__1-2"]["settings"] == {"layers": "1-2", "min_auroc": "0.5"} and runs["aura__1-2"]["layers"] == [1, 2]
    assert runs["aura__all"]["layers"] == [0, 1, 2]
    summary = read(os.path.join(out, "summary.jsonl"))
    count = Counter(r["method"] for r in summary)
    assert count["profs"] == 2 and count["dinm"] == 1 and count["aura"] == 2
    assert set(count) == {"base", "delete", "dinm", "profs", "aura"}
    md = open(os.path.join(out, "table_methods.md")).read().splitlines()
    assert md[0] == ("| method | setting | layers | toxic % ± se | held-out toxic % ± se | ppl | neutral ppl | fluency | "
                     "factual kept % | edit s |")
    deletions = [r for r in summary if r["method"] == "delete" and r["objective"] == "delete"]
    body = md[2:md.index("")]
    assert len(body) == 1 + len(deletions) + 1 + 2 + 2
    assert [b.split(" | ")[0] for b in body] == ["| base (unedited)"] + ["| delete"] * len(deletions) + [
        "| dinm", "| profs", "| profs", "| aura", "| aura"]  # AurA: fewer layers first
    p2 = next(r for r in summary if r.get("settings") == {"rank": 2, "pairs": 20})
    n, n_held = p2["n_prompts"] * p2["n_samples"], p2["n_heldout"] * p2["n_samples"]
    se = 100 * math.sqrt(p2["toxic_rate"] * (1 - p2["toxic_rate"]) / n)
    se_held = 100 * math.sqrt(p2["heldout_toxic_rate"] * (1 - p2["heldout_toxic_rate"]) / n_held)
    assert body[-3] == (f"| profs | rank 2, 20 pairs | {' '.join(map(str, p2['layers']))} | "
                        f"{100 * p2['toxic_rate']:.1f} ± {se:.1f} | {100 * p2['heldout_toxic_rate']:.1f} ± "
                        f"{se_held:.1f} | {p2['perplexity_prompts']:.2f} | {p2['perplexity_neutral']:.2f} | "
                        f"{p2['fluency']:.2f} | — | {p2['edit_seconds']:.1f} |")
    assert body[-2].startswith("| aura | layers 1-2 | 1 2 |") and body[-1].startswith("| aura | layers all | 0-2 |")
    assert os.path.isfile(os.path.join(out, "table_methods.csv")) and os.path.isfile(os.path.join(out, "frontier.png"))


@pytest.mark.slow
def test_methods_profs_run_against_recomputation(methods_study, tiny_dirs, tokenizer, one_thread):
    """The ProFS run's weights are jaxedit.profs on the pairs built by hand (prompt + least / most toxic sample);
    its perplexities are the torch model's with those weights, its toxic rate the hand-scored samples of the
    edited model on the evaluation's streams."""
    from jaxedit.generate import sample

    model, tok, cfg, out = methods_study
    pairs = hand_pairs(model, tok, cfg, out, 20)
    edited, rep = jaxedit.profs(model, pairs, tokenizer=tok, rank=2, progress=False)
    with np.load(os.path.join(out, "edits", "profs__rank2__pairs20.npz")) as z:
        assert z["layers"].tolist() == rep["layers"]
        np.testing.assert_array_equal(z["w_out"], np.asarray(params_of(edited)["blocks"]["w_out"])[z["layers"]])
    row = next(r for r in read(os.path.join(out, "runs.jsonl")) if r["run"] == "profs__rank2__pairs20")
    sel = read(os.path.join(out, "selected.jsonl"))
    edit_p = [r["prompt"] for r in sel if r["split"] == "edit"]
    with open(os.path.join(DATA, "neutral.txt")) as f:
        neutral = [line.strip() for line in f if line.strip()]
    hf = torch_edited(tiny_dirs["llama-gqa-untied"][1], out, "profs__rank2__pairs20")
    assert row["perplexity_prompts"] == pytest.approx(torch_perplexity(hf, tokenizer, edit_p), rel=1e-5)
    assert row["perplexity_neutral"] == pytest.approx(torch_perplexity(hf, tokenizer, neutral), rel=1e-5)
    base = next(r for r in read(os.path.join(out, "runs.jsonl")) if r["run"] == "base")
    assert abs(row["perplexity_prompts"] / base["perplexity_prompts"] - 1) > 1e-5  # the projection matters
    conts = sample_texts(edited, tok, edit_p, cfg.max_new_tokens, samples=cfg.eval_samples,
                                          seed=cfg.seed + 1, top_p=cfg.top_p,
                                          prompt_keys=[r["line"] for r in sel if r["split"] == "edit"])
    scores = fake_toxicity([c for row_ in conts for c in row_])
    assert row["toxic_rate"] == pytest.approx(np.mean([s > 0.5 for s in scores]), abs=1e-12)


def hand_pairs(model, tok, cfg, out, n):
    """``n`` ProFS pairs by hand: per edited prompt its selection samples and the extra samples drawn with seed + 2
    (enough for ceil(n / prompts) pairs each, 2 spare), non-blank, scored again; sorted by score (the earlier sample
    the less toxic, except among the top scores); pair i = (i-th least, i-th most toxic); round-robin over the
    prompts."""
    from jaxedit.generate import sample

    cands = {c["line"]: c for c in read(os.path.join(out, "candidates.jsonl"))}
    edit = [r for r in read(os.path.join(out, "selected.jsonl")) if r["split"] == "edit"]
    k = -(-n // len(edit))
    extra = 2 * k - cfg.select_samples + 2 if 2 * k > cfg.select_samples else 0
    more = sample(model, [tok(r["prompt"])["input_ids"] for r in edit], cfg.max_new_tokens, samples=extra,
                  seed=cfg.seed + 2, top_p=cfg.top_p, stop_ids=[tok.eos_token_id],
                  prompt_keys=[r["line"] for r in edit]) if extra else [[] for _ in edit]
    per = []
    for r, ids in zip(edit, more):
        texts = cands[r["line"]]["samples"] + [tok.decode(s, skip_special_tokens=True) for s in ids]
        texts = [t for t in texts if t.strip()]
        sc = fake_toxicity(texts)
        top = max(sc)
        order = sorted(range(len(texts)), key=lambda j: (sc[j], j if sc[j] < top else -j))
        per.append([(r["prompt"] + texts[order[i]], r["prompt"] + texts[order[-1 - i]])
                    for i in range(len(order) // 2)])
    flat = [p[i] for i in range(max(map(len, per))) for p in per if i < len(p)]
    return flat[:n]


def test_sample_pairs_by_hand(tmp_path):
    """Pairs from stored samples (no model): per prompt the widest pair first (least vs most toxic, ties: the
    earlier sample), round-robin over the edited prompts; N = the prompts' count gives the old one pair per prompt;
    the held-out prompt gives none; too few samples is one line."""
    from jaxedit.detox.methods import extra_samples_needed, sample_pairs, study_pairs

    out = tmp_path / "s"
    out.mkdir()
    cands = [{"line": 1, "prompt": "A", "samples": [" a0", " a1", " a2", " a3", "  "], "scores": [0.5, 0.1, 0.9, 0.9, 1.0]},
             {"line": 2, "prompt": "B", "samples": [" b0", " b1", " b2", " b3"], "scores": [0.2, 0.2, 0.3, 0.0]},
             {"line": 3, "prompt": "C", "samples": [" c0", " c1"], "scores": [0.0, 1.0]}]
    sel = [{"line": 1, "prompt": "A", "split": "edit"}, {"line": 3, "prompt": "C", "split": "heldout"},
           {"line": 2, "prompt": "B", "split": "edit"}]
    (out / "candidates.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cands))
    (out / "selected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sel))
    # A (blank " " left out): ascending a1 0.1, a0 0.5, then the top 0.9 ties with a2 (earlier) last: a3, a2
    # B: b3 0.0, b0 0.2, b1 0.2, b2 0.3
    want = [("A a1", "A a2"), ("B b3", "B b2"), ("A a0", "A a3"), ("B b0", "B b1")]
    assert sample_pairs(str(out), 4) == want
    assert sample_pairs(str(out), 2) == want[:2] == study_pairs(str(out))
    # with two more samples of A: a5 0.05, a1, a0, then the 0.9 tie no longer on top (the earlier first), a4 0.95
    assert sample_pairs(str(out), 5, {1: ([" a4", " a5"], [0.95, 0.05])}) == [
        ("A a5", "A a4"), ("B b3", "B b2"), ("A a1", "A a3"), ("B b0", "B b1"), ("A a0", "A a2")]
    with pytest.raises(JaxeditError, match=r"only 4 pairs from the 2 edited prompts' non-blank samples \(5 asked"):
        sample_pairs(str(out), 5)
    cfg = DetoxConfig(select_samples=16)
    assert extra_samples_needed(cfg, 22, 176) == 0 and extra_samples_needed(cfg, 22, 177) == 2 * 9 - 16 + 2
    assert extra_samples_needed(cfg, 22, 500) == 2 * 23 - 16 + 2


def test_study_aura_texts_by_hand(tmp_path):
    """AurA's texts from the selection: prompt + every non-blank sample of the prompts not held out (and not toxic
    themselves), toxic above the selection threshold."""
    from jaxedit.detox.methods import study_aura_texts

    out = tmp_path / "s"
    out.mkdir()
    cands = [{"line": 1, "prompt": "A", "prompt_toxicity": 0.1, "samples": [" a0", " ", " a2"], "scores": [0.3, 0.9, 0.1]},
             {"line": 2, "prompt": "B", "prompt_toxicity": 0.1, "samples": [" b0"], "scores": [0.9]},
             {"line": 3, "prompt": "C", "prompt_toxicity": 0.1, "samples": [" c0", " c1"], "scores": [0.25, 0.2]},
             {"line": 4, "prompt": "D", "prompt_toxicity": 0.7, "samples": [" d0"], "scores": [0.9]}]
    (out / "candidates.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cands))
    (out / "selected.jsonl").write_text(json.dumps({"line": 1, "split": "edit"}) + "\n"
                                        + json.dumps({"line": 2, "split": "heldout"}) + "\n")
    texts, labels = study_aura_texts(str(out), DetoxConfig(select_threshold=0.2))
    assert texts == ["A a0", "A a2", "C c0", "C c1"] and labels == [1, 0, 1, 0]


@pytest.mark.slow
def test_methods_aura_run_against_recomputation(methods_study, tiny_dirs, tokenizer, one_thread):
    """The AurA runs' weights are jaxedit.aura on the texts built by hand (prompt + sample of the prompts not held
    out, toxic above the selection threshold), at every layer and at layers 1-2; the run's perplexity is the torch
    model's with those weights."""
    model, tok, cfg, out = methods_study
    held = {r["line"] for r in read(os.path.join(out, "selected.jsonl")) if r["split"] == "heldout"}
    texts, labels = [], []
    for c in read(os.path.join(out, "candidates.jsonl")):
        if c["line"] in held or c["prompt"] not in PROMPTS:
            continue
        for t in c["samples"]:
            if t.strip():
                texts.append(c["prompt"] + t)
                labels.append(int(fake_toxicity([t])[0] > cfg.select_threshold))
    for rid, layers in (("aura__all", None), ("aura__1-2", [1, 2])):
        edited, rep = jaxedit.aura(model, texts, labels, tokenizer=tok, layers=layers, progress=False)
        info = json.load(open(os.path.join(out, "edits", rid + ".json")))
        assert info["texts"] == len(texts) and info["toxic"] == sum(labels) and 2 <= sum(labels) <= len(texts) - 2
        with np.load(os.path.join(out, "edits", rid + ".npz")) as z:
            assert z["layers"].tolist() == rep["layers"]
            np.testing.assert_array_equal(z["w_out"], np.asarray(params_of(edited)["blocks"]["w_out"])[z["layers"]])
    assert sum(rep["dampened"].values()) > 0  # the edit changes something
    row = next(r for r in read(os.path.join(out, "runs.jsonl")) if r["run"] == "aura__1-2")
    edit_p = [r["prompt"] for r in read(os.path.join(out, "selected.jsonl")) if r["split"] == "edit"]
    hf = torch_edited(tiny_dirs["llama-gqa-untied"][1], out, "aura__1-2")
    assert row["perplexity_prompts"] == pytest.approx(torch_perplexity(hf, tokenizer, edit_p), rel=1e-5)


@pytest.mark.slow
def test_methods_dinm_run_against_recomputation(methods_study):
    """The DINM run is jaxedit.dinm over cases built by hand from the stored samples, in turn into one model."""
    model, tok, cfg, out = methods_study
    kcs = [c["knowledge constrain"] for c in json.load(open(os.path.join(DATA, "safeedit_demo.json")))]
    cases = [{"id": line, "adversarial prompt": p, "safe generation": lo, "unsafe generation": hi,
              "knowledge constrain": kcs[i % len(kcs)]} for i, (line, p, lo, hi) in enumerate(hand_extremes(out))]
    edited, rep = jaxedit.dinm(model, cases, tokenizer=tok, per_instance=False, suffix=None, steps=2)
    info = json.load(open(os.path.join(out, "edits", "dinm__steps2.json")))
    assert info["case_layers"] == rep["layers"] and info["cases"] == len(cases) >= 2
    with np.load(os.path.join(out, "edits", "dinm__steps2.npz")) as z:
        assert z["layers"].tolist() == sorted(set(rep["layers"]))
        w = np.asarray(params_of(edited)["blocks"]["w_out"])[z["layers"]]
        np.testing.assert_allclose(z["w_out"], w, rtol=1e-6, atol=1e-7)
        assert np.abs(w - np.asarray(params_of(model)["blocks"]["w_out"])[z["layers"]]).max() > 1e-6


@pytest.mark.slow
def test_methods_resume_after_an_interrupt(methods_study, tmp_path, monkeypatch):
    """Interrupted after the DINM run, a rerun does the ProFS runs only, and ends where an uninterrupted study
    does."""
    from jaxedit.detox import editing

    model, tok, cfg, out = methods_study
    want = snapshot(out)
    cut = str(tmp_path / "cut")
    shutil.copytree(out, cut)
    for rid in METHOD_RUNS:
        for ext in (".json", ".npz"):
            os.remove(os.path.join(cut, "edits", rid + ext))
    rows = [line for line in open(os.path.join(cut, "runs.jsonl")) if json.loads(line)["method"] in ("base", "delete")]
    open(os.path.join(cut, "runs.jsonl"), "w").writelines(rows)
    real, calls = editing.run_method, []

    def interrupted(*a):
        calls.append(a[4])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(editing, "run_method", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_study(model, cfg, cut, tokenizer=tok, progress=False)
    assert calls == METHOD_RUNS[:2] and os.path.isfile(os.path.join(cut, "edits", "dinm__steps2.npz"))
    assert not os.path.exists(os.path.join(cut, "edits", "profs__rank1__pairs20.json"))
    calls.clear()
    monkeypatch.setattr(editing, "run_method", lambda *a: calls.append(a[4]) or real(*a))
    run_study(model, cfg, cut, tokenizer=tok, progress=False)
    assert calls == METHOD_RUNS[1:]
    got = snapshot(cut)
    assert got.keys() == want.keys()
    for k in want:
        if isinstance(want[k], np.ndarray):
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
        else:
            assert_close(got[k], want[k], k)


@pytest.mark.slow
def test_methods_pairs_file(study, tmp_path):
    """--pairs: ProFS from the file's pairs; another file in the same folder is refused."""
    model, tok, cfg, out = study
    d = str(tmp_path / "pairs")
    shutil.copytree(out, d)
    pf = tmp_path / "pairs.jsonl"
    pairs = [("Thank you, that was kind.", "Shut up, nobody asked you."),
             ("I see your point.", "You are an idiot and so is your point."),
             ("Have a nice day.", "Get lost, you fool.")]
    pf.write_text("".join(json.dumps({"preferred": a, "non_preferred": b}) + "\n" for a, b in pairs))
    pcfg = dataclasses.replace(cfg, methods=("delete", "profs"), pairs=str(pf), profs_layers=(1, 2))
    run_study(model, pcfg, d, tokenizer=tok, stages=("edit",), progress=False)
    edited, _ = jaxedit.profs(model, pairs, tokenizer=tok, rank=2, layers=[1, 2], progress=False)
    with np.load(os.path.join(d, "edits", "profs__rank2.npz")) as z:
        assert z["layers"].tolist() == [1, 2]
        np.testing.assert_array_equal(z["w_out"], np.asarray(params_of(edited)["blocks"]["w_out"])[[1, 2]])
    assert json.load(open(os.path.join(d, "edits", "profs__rank2.json")))["n_pairs"] == 3
    with pytest.raises(JaxeditError, match=r"profs stage run with other options \(--pairs "):
        run_study(model, dataclasses.replace(pcfg, pairs=None), d, tokenizer=tok, stages=("edit",), progress=False)


def test_methods_options_are_checked_before_the_model_loads(tmp_path, tiny_dirs, monkeypatch):
    monkeypatch.setattr(jaxedit, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    out = tmp_path / "o"
    pf = tmp_path / "pairs.jsonl"
    pf.write_text('{"preferred": "a", "non_preferred": "b"}\n\n{"preferred": "a"}\n')
    one = tmp_path / "one.jsonl"
    one.write_text('{"preferred": "a", "non_preferred": "b"}\n')
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "a", "toxic": 1}\n{"text": "b", "toxic": 0}\n{"text": "c", "toxic": 2}\n')
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": "a", "toxic": 1}\n{"text": "  ", "toxic": 0}\n')
    few = tmp_path / "few.jsonl"
    few.write_text('{"text": "a", "toxic": true}\n{"text": "b", "toxic": 0}\n{"text": "c", "toxic": 0}\n')
    cases = [(["--methods", "delete,bogus"], "error: unknown methods ['bogus'] (choose from delete, dinm, profs, aura)"),
             (["--methods", "aura", "--aura-texts", str(texts)], f'error: {texts}:3: expected "toxic" as 0 or 1 (got 2)'),
             (["--methods", "aura", "--aura-texts", str(blank)],
              f'error: {blank}:2: expected "text" as a non-empty string'),
             (["--methods", "aura", "--aura-texts", str(few)], f"error: {few}: AurA needs at least 2 toxic texts (got 1)"),
             (["--methods", "aura", "--aura-texts", str(tmp_path)], f"error: {tmp_path} is a directory"),
             (["--methods", "aura", "--aura-layers", "all,x"], "error: aura-layers: 'x' is not all, upper, a layer N or"),
             (["--methods", "aura", "--aura-layers", "all,all"], "error: aura-layers must name distinct settings"),
             (["--methods", "aura", "--aura-layers", "1-3"], "error: aura-layers 1-3 is outside 0..2"),
             (["--methods", "aura", "--aura-min-auroc", "0.5,0.4"], "error: min_auroc must be in [0.5, 1) (got '0.4')"),
             (["--methods", "aura", "--aura-min-auroc", "chance:x"], "error: min_auroc must be a number in [0.5, 1) or"),
             (["--aura-min-auroc", "0.6"], "error: --aura-min-auroc applies to AurA only"),
             (["--methods", "profs", "--profs-pairs", "0"], "error: profs-pairs must be integers >= 1 (got 0)"),
             (["--methods", "profs", "--profs-pairs", "30", "--pairs", str(one)],
              "error: --profs-pairs builds pairs from the study's samples: it does not apply with --pairs"),
             (["--methods", "dinm", "--dinm-steps", "5,5"], "error: dinm-steps repeats a value (5, 5)"),
             (["--methods", ""], "error: --methods is empty"),
             (["--methods", "profs", "--profs-rank", "0"], "error: profs-rank must be integers >= 1 (got 0)"),
             (["--methods", "profs", "--profs-rank", "x"], "error: --profs-rank must be a comma list of numbers"),
             (["--methods", "profs", "--profs-layers", "1-x"], "error: --profs-layers must be a comma list of"),
             (["--methods", "dinm", "--dinm-steps", "0"], "error: dinm-steps must be integers >= 1 (got 0)"),
             (["--methods", "dinm", "--dinm-lr", "0"], "error: --dinm-lr must be > 0 (got 0.0)"),
             (["--pairs", str(one)], "error: --pairs applies to ProFS only: add profs to --methods (--methods is "
                                     "delete)"),
             (["--dinm-steps", "3"], "error: --dinm-steps applies to DINM only: add dinm to --methods"),
             (["--dinm-steps", "10"], "error: --dinm-steps applies to DINM only"),  # the default value, given
             (["--profs-rank", "2"], "error: --profs-rank applies to ProFS only"),
             (["--methods", "profs", "--pairs", str(pf)], f'error: {pf}:3: expected "non_preferred" as a non-empty'),
             (["--methods", "profs", "--pairs", str(one)], f"error: --profs-rank 2 is more than the 1 pair of {one}"),
             (["--methods", "profs", "--pairs", str(tmp_path / "none.jsonl")], "error: cannot read"),
             # needs the model's config (3 layers)
             (["--methods", "profs", "--profs-layers", "1,3"], "error: profs-layers [3] are outside 0..2")]
    for args, msg in cases:
        r = CliRunner().invoke(cli, ["-q", "detox", "--prompts", "demo", "--out", str(out), "--model",
                                     tiny_dirs["gpt2"][0], *args])
        assert r.exit_code == 2 and r.output.startswith(msg) and r.output.count("\n") == 1, (args, r.output)
    assert not out.exists()
    r = CliRunner().invoke(cli, ["-q", "detox", "--prompts", "demo", "--out", str(out), "--model", tiny_dirs["gpt2"][0],
                                 "--methods", "dinm,profs", "--profs-rank", "1,2", "--limit", "5", "--dry-run"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[2] == "localize: skipped (no deletion grid in the methods)"
    assert lines[3].startswith("edit: run dinm__steps10: DINM on the selected edited prompts in turn")
    assert lines[4] == ("edit: run profs__rank1__pairs100: ProFS rank 1 from 100 pairs of the selected edited prompts' "
                        "samples (most / least toxic of a prompt), more samples drawn where the selection's are too "
                        "few, the upper layers 1-2")
    assert lines[6].startswith("evaluate: 4 models") and not out.exists()


def test_methods_table_by_hand():
    """The methods table's rows and cells by hand: the toxic rates with their binomial standard errors
    sqrt(p (1 - p) / n), n = prompts x samples (x seeds); the other methods' runs by strength."""
    from jaxedit.detox.report import table_methods

    rows = [{"method": "profs", "strategy": "profs", "objective": None, "kl_weight": None, "layers": list(range(12, 30)),
             "settings": {"rank": 4}, "toxic_rate": 0.12, "heldout_toxic_rate": 0.0, "perplexity_prompts": 169.434,
             "perplexity_neutral": 33.27, "fluency": 3.85, "factual_argmax_kept": 0.75, "edit_seconds": 5.06,
             "n_prompts": 5, "n_samples": 10, "n_heldout": 2, "seeds": 1},
            {"method": "profs", "strategy": "profs", "objective": None, "kl_weight": None, "layers": list(range(12, 30)),
             "settings": {"rank": 1, "pairs": 100}, "toxic_rate": 0.05, "n_prompts": 5, "n_samples": 10},
            {"strategy": "base", "objective": None, "kl_weight": None, "layers": [], "toxic_rate": 0.1},
            {"method": "dinm", "strategy": "dinm", "objective": None, "kl_weight": None, "layers": [27, 28],
             "settings": {"steps": 10, "lr": 5e-4, "edit_weight": 0.1}, "toxic_rate": 0.1},
            {"strategy": "ct-multi", "objective": "delete", "kl_weight": 0.0625, "layers": [0, 1, 5, 6],
             "toxic_rate": 0.06, "n_prompts": 22, "n_samples": 10, "seeds": 2},
            {"strategy": "ct-multi", "objective": "edit-canned", "kl_weight": 0.0625, "layers": [0, 1, 5, 6],
             "toxic_rate": 0.01},
            {"method": "aura", "strategy": "aura", "objective": None, "kl_weight": None, "layers": [0, 1, 2],
             "settings": {"layers": "all"}, "toxic_rate": 0.2},
            {"method": "aura", "strategy": "aura", "objective": None, "kl_weight": None, "layers": [2],
             "settings": {"layers": "2"}, "toxic_rate": 0.3}]
    md, csv = table_methods(rows)
    lines = md.splitlines()
    # se by hand: 0.12 of 50: sqrt(0.12 * 0.88 / 50) = 0.04596; 0.06 of 22 x 10 x 2 = 440: 0.01132; 0.05 of 50: 0.03082
    assert lines[2:9] == ["| base (unedited) | — | — | 10.0 | — | — | — | — | — | — |",
                          "| delete | ct-multi, KL 0.0625 | 0 1 5 6 | 6.0 ± 1.1 | — | — | — | — | — | — |",
                          "| dinm | 10 steps, lr 0.0005, edit weight 0.1 | 27 28 | 10.0 | — | — | — | — | — | — |",
                          "| profs | rank 4 | 12-29 | 12.0 ± 4.6 | 0.0 ± 0.0 | 169.43 | 33.27 | 3.85 | 75.0 | 5.1 |",
                          "| profs | rank 1, 100 pairs | 12-29 | 5.0 ± 3.1 | — | — | — | — | — | — |",
                          "| aura | layers 2 | 2 | 30.0 | — | — | — | — | — | — |",
                          "| aura | layers all | 0-2 | 20.0 | — | — | — | — | — | — |"]
    assert lines[9] == "" and csv.splitlines()[4] == "profs,rank 4,12-29,12.0,4.60,0.0,0.00,169.43,33.27,3.85,75.0,5.1"


def test_frontier_joins_each_method_by_strength_with_error_bars(tmp_path, monkeypatch):
    """Each method's points are joined in order of its strength, not of the rows: ProFS through its ranks per
    number of pairs (r1 -> r2 -> r4 -> r8, rows given r1, r2, r8, r4), DINM through its steps, AurA from the fewest
    layers; every method that ran is drawn, each point with its binomial standard error (by hand) as error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxedit.detox.report import method_lines, plot_frontier

    def row(method, settings, ppl, tox, layers=(5,)):
        return {"method": method, "strategy": method, "objective": None, "kl_weight": None, "layers": list(layers),
                "settings": settings, "perplexity_prompts": ppl, "toxic_rate": tox, "n_prompts": 10, "n_samples": 10}

    rows = [{"strategy": "base", "perplexity_prompts": 100.0, "toxic_rate": 0.1, "n_prompts": 10, "n_samples": 10}]
    rows += [row("profs", {"rank": r, "pairs": 100}, ppl, 0.08) for r, ppl in ((1, 110.0), (2, 150.0), (8, 140.0),
                                                                                (4, 120.0))]
    rows += [row("dinm", {"steps": s, "lr": 5e-4, "edit_weight": 1.0}, ppl, 0.1) for s, ppl in ((30, 190.0),
                                                                                                  (10, 105.0),
                                                                                                  (20, 160.0))]
    rows += [row("aura", {"layers": "all"}, 103.0, 0.04, range(30)), row("aura", {"layers": "upper"}, 101.0, 0.06,
                                                                           range(15, 30))]
    lines = {ln["label"]: ln for ln in method_lines(rows)}
    assert set(lines) == {"ProFS", "DINM", "AurA"}
    assert [p[0] for p in lines["ProFS"]["points"]] == ["r1", "r2", "r4", "r8"]
    assert [p[1] for p in lines["ProFS"]["points"]] == [110.0, 150.0, 120.0, 140.0]
    assert [p[0] for p in lines["DINM"]["points"]] == ["10 st", "20 st", "30 st"]
    assert [p[0] for p in lines["AurA"]["points"]] == ["upper", "all"]
    assert lines["AurA"]["points"][1][3] == pytest.approx(100 * math.sqrt(0.04 * 0.96 / 100))  # 1.96 points
    kept, close = [], plt.close
    monkeypatch.setattr(plt, "close", kept.append)
    plot_frontier(rows, str(tmp_path / "frontier"))
    (ax,) = kept[0].axes
    bars = {c.get_label(): c for c in ax.containers}
    assert set(bars) == {"ProFS", "DINM", "AurA", "unedited"}
    line, _, (segments,) = bars["ProFS"].lines, None, bars["ProFS"].lines[2]
    assert list(line[0].get_xdata()) == [110.0, 150.0, 120.0, 140.0]
    half = 100 * math.sqrt(0.08 * 0.92 / 100)
    for seg in segments.get_segments():
        assert seg[1, 1] - seg[0, 1] == pytest.approx(2 * half)
    close(kept[0])


def test_aura_demo_texts():
    """--aura-texts demo: 60 rude sentences, each beside a civil one of the same shape, read like any file; the
    shipped profanity scorer agrees with the labels on all but at most two."""
    from jaxedit.detox.config import AURA_DEMO, aura_texts_path
    from jaxedit.detox.methods import read_aura_texts

    assert aura_texts_path("demo") == AURA_DEMO and os.path.isfile(AURA_DEMO)
    texts, labels = read_aura_texts("demo")
    assert len(texts) == 120 and labels == [1, 0] * 60 and len(set(texts)) == 120
    pc = pytest.importorskip("profanity_check")
    p = pc.predict_prob(texts)
    agree = sum(int(s > 0.5) == y for s, y in zip(p, labels))
    assert agree >= 118


def test_aura_threshold_runs_ids_and_order():
    """--aura-min-auroc: one run per value; the authors' rule (0.5) keeps the run id it had before the option, and
    the frontier joins a layer setting's runs from the gentlest (chance:Z settings, then the highest number: fewest
    units dampened) to the authors' 0.5."""
    from jaxedit.detox.methods import plan_method_runs
    from jaxedit.detox.report import _setting, strength

    cfg = DetoxConfig(methods=("aura",), aura_layers=("all",), aura_min_auroc=("0.5", "0.7", "chance:3"))
    cfg.check(n_layers=3)
    runs = plan_method_runs(cfg)
    assert [r[0] for r in runs] == ["aura__all", "aura__all__auc0.7", "aura__all__aucchance3"]
    rows = [{"method": "aura", "strategy": "aura", "layers": [0, 1, 2], "settings": s} for _, _, s in runs]
    assert [_setting(r) for r in rows] == ["layers all", "layers all, AUROC > 0.7", "layers all, AUROC > chance:3"]
    assert [r["settings"]["min_auroc"] for r in sorted(rows, key=strength)] == ["chance:3", "0.7", "0.5"]
