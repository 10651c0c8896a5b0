"""The offline edit stream (jaxedit.synthetic_edits), the zsRE-like readers (WikiBigEdit, UltraEditBench), the
generative scores against a naive torch greedy loop on a tiny model, and the protocol record."""
from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest
import torch

import jaxedit
from jaxedit.errors import JaxeditError
from jaxedit.evaluate import editing
from jaxedit.synthetic import (RELATIONS, parse_synthetic, read_known_facts, stream_statistics, synthetic_edits)


@pytest.fixture(scope="module")
def stream():
    return synthetic_edits(20_000, seed=0)


def test_stream_is_deterministic():
    a = synthetic_edits(300, seed=0)
    assert a == synthetic_edits(300, seed=0)
    assert synthetic_edits(40, seed=0) == a[:40]  # a shorter stream is the longer one's prefix
    b = synthetic_edits(300, seed=1)
    assert b != a and not {d["subject"] for d in a} & {d["subject"] for d in b}


def test_stream_records_are_valid(stream):
    _, facts = read_known_facts()
    known = {(f["prompt"], f["answer"]) for f in facts}
    rel = {r: (t, answers) for r, _, t, answers in RELATIONS}
    templates_seen = defaultdict(set)
    for i, d in enumerate(stream):
        editing.check_zsre(d, f"record {i}")
        t, answers = rel[d["relation"]]
        assert d["subject"] in d["src"] and d["subject"] in d["rephrase"] and d["src"] != d["rephrase"]
        assert d["src"] == t[d["templates"][0]].format(d["subject"])
        assert d["rephrase"] == t[d["templates"][1]].format(d["subject"])
        assert d["answers"][0] in answers and (d["loc"], d["loc_ans"]) in known and d["loc_suffix"] == ""
        templates_seen[d["relation"]].update(d["templates"])
    assert len({d["subject"] for d in stream}) == len(stream)  # no subject twice: no conflicting edits
    assert len(templates_seen) >= 15 and all(len(v) >= 2 for v in templates_seen.values())
    assert len({(d["src"], d["answers"][0]) for d in stream}) == len(stream)
    reqs = jaxedit.edit.sequential.dataset_requests(stream[:100], "zsre")
    assert reqs[0] == {"prompt": stream[0]["src"].replace(stream[0]["subject"], "{}"), "subject": stream[0]["subject"],
                       "target": " " + stream[0]["answers"][0], "case_id": 0}
    st = stream_statistics()
    assert st["relations"] == len(RELATIONS) >= 15 and min(st["templates"].values()) >= 2
    assert st["distinct_records"] >= 20_000 and st["known_facts"] == len(facts)


def test_names_are_pronounceable_and_several_tokens(stream, tokenizer):
    for d in stream[:2000]:
        for word in d["subject"].split():
            assert re.fullmatch(r"[A-Z][a-z]+", word), word
            low = word.lower()
            assert re.search(r"[aeiou]", low)
            assert max(len(c) for c in re.findall(r"[^aeiou]+", low) or [""]) <= 3, word  # no long clusters
            assert max(len(v) for v in re.findall(r"[aeiou]+", low)) <= 3, word
        assert len(tokenizer(d["subject"])["input_ids"]) >= 2
    people = [d for d in stream[:2000] if d["relation"] == "P19"]
    assert people and all(len(d["subject"].split()) == 2 for d in people)


def test_synthetic_spec_and_cli_reading():
    from jaxedit.cli.sequence import detect_kind, read_edit_file

    assert parse_synthetic("synthetic:100") == (100, 0) and parse_synthetic("synthetic:5:7") == (5, 7)
    for bad in ("synthetic:", "synthetic:x", "synthetic:0", "synthetic:1:2:3", "synthetic:3:-1"):
        with pytest.raises(JaxeditError):
            parse_synthetic(bad)
    assert detect_kind("synthetic:12:3") == "zsre"
    kind, records, requests, wheres = read_edit_file("synthetic:12:3", "zsre", False, limit=5)
    assert kind == "zsre" and records == synthetic_edits(5, seed=3) and len(requests) == 5
    assert wheres[4] == "synthetic:12:3: record 4"
    with pytest.raises(JaxeditError, match="must be integers"):
        detect_kind("synthetic:ten")
    with pytest.raises(JaxeditError):
        synthetic_edits(0)


def test_wikibigedit_and_ultraeditbench_records(tmp_path):
    from jaxedit.cli.sequence import detect_kind

    wbe = [{"tag": "update", "subject": "Ada Lovelace", "update": "Ada Lovelace was born in",
            "rephrase": "The birthplace of Ada Lovelace is", "personas": "x", "ans": "London",
            "loc": "The capital of France is", "loc_ans": "Paris", "mhop": "m", "mhop_ans": "n"}]
    ueb = [{"prompt": "Ada Lovelace was born in", "rephrase_prompt": "The birthplace of Ada Lovelace is",
            "ans": "London", "loc": "The capital of France is", "loc_ans": "Paris"}]
    for name, recs in (("wbe.json", wbe), ("ueb.json", ueb)):
        path = tmp_path / name
        path.write_text(json.dumps(recs))
        got = jaxedit.load_zsre(str(path))[0]
        assert (got["src"], got["rephrase"], got["answers"], got["loc_suffix"]) == (
            "Ada Lovelace was born in", "The birthplace of Ada Lovelace is", ["London"], "")
        assert detect_kind(str(path)) == "zsre"
    uz = tmp_path / "uz.json"  # UltraEdit's zsRE files: "ans" for "answers"
    uz.write_text(json.dumps([{"src": "a?", "rephrase": "b?", "ans": "c", "loc": "d", "loc_ans": "e"}]))
    assert jaxedit.load_zsre(str(uz))[0]["answers"] == ["c"]


# ---- generative scores ----

def test_generative_match_rule():
    m = editing.generative_match
    assert m(" Paris, France", "Paris") and m(" paris", "Paris") and m("  New   York is", "New York")
    assert m(" Paris", " Paris ") and m("Paris.\n\nThe", "Paris")
    assert not m(" Parisian", "Paris") and not m(" the capital", "Paris") and not m("", "Paris")
    assert not m(" Paris", "") and not m(" Pa", "Paris")


def _naive_greedy(hf, tok, prompt, n):
    ids = list(tok(prompt)["input_ids"])
    start = len(ids)
    for _ in range(n):
        with torch.no_grad():
            nxt = int(hf(torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        ids.append(nxt)
    return tok.decode(ids[start:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    d, hf = tiny_dirs["llama-gqa-untied"]
    model, tok = jaxedit.load(d)
    return model, tok, hf.eval()


def test_generative_scores_by_hand(tiny):
    """Targets taken from a naive torch greedy loop (so some records succeed): the summary's shares equal the ones
    counted by hand from that loop's continuations."""
    model, tok, hf = tiny
    prompts = ["The Eiffel Tower is", "Miles Davis plays the", "The capital of France is", "Apple is owned by",
               "The Space Needle is in", "Paris is"]
    conts = {p: _naive_greedy(hf, tok, p, 4) for p in prompts}
    first = {p: c.split()[0] if c.split() else "zzz" for p, c in conts.items()}
    records = [  # rewrite target: the greedy word for records 0 and 2, a wrong one for record 1
        {"src": prompts[0], "rephrase": prompts[1], "answers": [first[prompts[0]]], "loc": prompts[2],
         "loc_ans": first[prompts[2]], "loc_suffix": ""},
        {"src": prompts[3], "rephrase": prompts[4], "answers": ["Toko"], "loc": prompts[5], "loc_ans": "Seattle",
         "loc_suffix": ""},
        {"src": prompts[1], "rephrase": prompts[0], "answers": [first[prompts[1]]], "loc": prompts[4],
         "loc_ans": first[prompts[4]], "loc_suffix": ""},
    ]
    res = jaxedit.zsre_eval(model, records, tokenizer=tok, generative=True)
    # the documented decoding length: one more than the longest target's tokens, rounded up to a power of two
    longest = max(len(tok(" " + t, add_special_tokens=False)["input_ids"])
                  for d in records for t in (d["answers"][0], d["loc_ans"]))
    n_new = 1 << longest.bit_length()
    conts = {p: _naive_greedy(hf, tok, p, n_new) for p in prompts}
    for d, row in zip(records, res["rows"]):  # the decoded continuations are the naive loop's
        for kind, p in (("rewrite", d["src"]), ("paraphrase", d["rephrase"]), ("neighborhood", d["loc"])):
            assert row["continuations"][kind] == [conts[p]]
    want = {"gen_efficacy": [], "gen_generalization": [], "gen_specificity": []}
    for d in records:
        for key, p, t in (("gen_efficacy", d["src"], d["answers"][0]), ("gen_generalization", d["rephrase"],
                          d["answers"][0]), ("gen_specificity", d["loc"], d["loc_ans"])):
            c = " ".join(conts[p].split()).lower()
            t = t.lower()
            want[key].append(float(c.startswith(t) and (len(c) == len(t) or not c[len(t)].isalnum())))
    for key, hits in want.items():
        assert res["summary"][key] == pytest.approx(sum(hits) / len(hits)), key
    assert res["summary"]["gen_efficacy"] >= 2 / 3  # records 0 and 2 succeed by construction
    assert res["rows"][1]["gen_efficacy"] == 0.0
    # teacher-forced numbers unchanged by the option
    plain = jaxedit.zsre_eval(model, records, tokenizer=tok)
    assert {k: res["summary"][k] for k in plain["summary"]} == plain["summary"]


def test_counterfact_generative_keys(tiny):
    model, tok, hf = tiny
    p = "The Eiffel Tower is"
    word = _naive_greedy(hf, tok, p, 3).split()[0]
    rec = {"requested_rewrite": {"prompt": "{} is", "subject": "The Eiffel Tower", "target_new": {"str": word},
                                 "target_true": {"str": "Seattle"}},
           "paraphrase_prompts": [p, "Miles Davis plays the"], "neighborhood_prompts": [p]}
    res = jaxedit.counterfact_eval(model, [rec], tokenizer=tok, generative=True)
    s = res["summary"]
    assert s["gen_efficacy"] == 1.0 and s["gen_generalization"] == 0.5 and s["gen_specificity"] == 0.0
    assert "gen. eff." in editing.format_summary(s)


def test_protocol_record(tiny):
    model, tok, _ = tiny
    recs = synthetic_edits(10, seed=2)
    pr = jaxedit.protocol_record(model, recs, kind="zsre", edits_per_turn=5, evaluated="turn", generative=True,
                                 source="synthetic:10:2", model_name="tiny", edits_so_far=5, evaluated_records=5)
    assert pr["benchmark"] == "zsre" and pr["edits_per_turn"] == 5 and pr["evaluated"] == "turn"
    assert pr["evaluated_when"] == "after each turn, on that turn's edits" and pr["evaluated_records"] == 5
    assert set(pr["metrics"]) == {"efficacy", "generalization", "specificity", "gen_efficacy",
                                  "gen_generalization", "gen_specificity"}
    assert pr["model"]["name"] == "tiny" and len(pr["model"]["fingerprint"]) == 16
    assert pr["stream"] == {"source": "synthetic:10:2", "records": 10,
                            "fingerprint": editing.stream_fingerprint(synthetic_edits(10, seed=2))}
    other = jaxedit.protocol_record(model, synthetic_edits(10, seed=3), kind="zsre")
    assert other["stream"]["fingerprint"] != pr["stream"]["fingerprint"]
    assert other["model"]["fingerprint"] == pr["model"]["fingerprint"] and other["evaluated"] == "stream"
    assert "gen_efficacy" not in other["metrics"]
    json.dumps(pr)
    with pytest.raises(JaxeditError):
        jaxedit.protocol_record(model, recs, kind="zsre", evaluated="sometimes")
    with pytest.raises(TypeError):
        jaxedit.protocol_record(model, recs, tok)


@pytest.mark.slow
def test_cli_synthetic_stream_with_protocol(tiny_dirs, tmp_path, monkeypatch):
    """`jaxedit edit --requests synthetic:4:1` edited in two batches and evaluated: eval.json, every curve point
    and report.json carry the protocol record; the summary has the generative keys."""
    from click.testing import CliRunner

    from jaxedit.cli.main import cli

    monkeypatch.setenv("JAXEDIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "syn"
    args = ["edit", "--model", tiny_dirs["llama-mha-tied"][0], "--layers", "0-1", "--corpus", "model",
            "--samples", "4", "--max-len", "16", "--requests", "synthetic:4:1", "--batch-size", "2", "--eval",
            "--eval-every", "1", "--eval-generative", "--hparam", "v_num_grad_steps=2", "--out", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    ev = json.load(open(out / "eval.json"))
    stream = synthetic_edits(4, seed=1)
    assert {"gen_efficacy", "gen_generalization", "gen_specificity"} <= set(ev["summary"])
    pr = ev["protocol"]
    assert (pr["benchmark"], pr["edits_per_turn"], pr["evaluated"], pr["evaluated_records"], pr["edits_so_far"],
            pr["generative"]) == ("zsre", 2, "stream", 4, 4, True)
    assert pr["stream"] == {"source": "synthetic:4:1", "records": 4,
                            "fingerprint": editing.stream_fingerprint(stream)}
    edited, _ = jaxedit.load(str(out / "model"))
    from jaxedit.edit.stats import model_fingerprint

    assert pr["model"]["fingerprint"] == model_fingerprint(edited)
    points = [json.loads(line) for line in open(out / "curve.jsonl")]
    assert [(p["edits"], p["protocol"]["evaluated_records"], p["protocol"]["edits_so_far"]) for p in points] == [
        (0, 2, 0), (2, 2, 2), (4, 4, 4)]
    rep = json.load(open(out / "report.json"))
    assert rep["protocol"] == pr
