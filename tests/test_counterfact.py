"""CounterFact's and zsRE's editing metrics against a torch reference written after MEMIT's evaluation code (one
prompt at a time, float64), on the tiny checkpoints (random and with one MLP perturbed), a hand-checkable unigram
case, the readers, the generation metrics, and the demo set on SmolLM2 (slow)."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

import jaxedit
from jaxedit.errors import JaxeditError
from jaxedit.evaluate import editing
from jaxedit.evaluate.metrics import ngram_entropy

from tiny_models import bos_tokenizer, build_hf_model

# facts in the tiny tokenizer's vocabulary (its corpus: the Eiffel Tower, Paris, Seattle, Miles Davis, Apple...)
RECORDS = [
    {"case_id": 0,
     "requested_rewrite": {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
                           "relation_id": "P131", "target_new": {"str": "Seattle", "id": "Q5083"},
                           "target_true": {"str": "Paris", "id": "Q90"}},
     "paraphrase_prompts": ["The Eiffel Tower is in", "The tower of Paris is located in the city of"],
     "neighborhood_prompts": ["The capital of France is", "The city of France is", "Miles Davis is in"],
     "attribute_prompts": [], "generation_prompts": ["The Eiffel Tower is", "The city of Paris"]},
    {"case_id": 1,
     "requested_rewrite": {"prompt": "{} plays the", "subject": "Miles Davis", "relation_id": "P1303",
                           "target_new": {"str": "guitar", "id": "Q6607"},
                           "target_true": {"str": "trumpet", "id": "Q8338"}},
     "paraphrase_prompts": ["The music of Miles Davis is on the"],
     "neighborhood_prompts": ["Toko Yasuda plays the", "The most amazing music is on the"],
     "attribute_prompts": [], "generation_prompts": ["Miles Davis plays"]},
    {"case_id": 2,
     "requested_rewrite": {"prompt": "{} is owned by", "subject": "Beats Music", "relation_id": "P127",
                           "target_new": {"str": "Toko Yasuda", "id": "Q1"},
                           "target_true": {"str": "Apple", "id": "Q312"}},
     "paraphrase_prompts": ["The owner of Beats Music is"],
     "neighborhood_prompts": ["The Space Needle is owned by", "The trumpet of Miles Davis is owned by"],
     "attribute_prompts": [], "generation_prompts": []},
]

ZSRE = [
    {"subject": "Eiffel Tower", "src": "In which city is the Eiffel Tower?", "rephrase": "Where is the Eiffel Tower?",
     "answers": ["Paris"], "alt": "Seattle", "loc": "nq question: who plays the trumpet",
     "loc_ans": "Miles Davis"},
    {"subject": "Beats Music", "src": "Who owns Beats Music?", "rephrase": "Beats Music is owned by which company?",
     "answers": ["Apple Music"], "alt": "Toko Yasuda", "loc": "nq question: where is the space needle",
     "loc_ans": "in Seattle"},
    {"subject": "Miles Davis", "src": "What does Miles Davis play?", "rephrase": "Miles Davis plays which music?",
     "answers": ["the trumpet"], "alt": "the guitar", "loc": "nq question: what is the capital of France",
     "loc_ans": "Paris"},
]


# ---- the torch reference (after MEMIT's compute_rewrite_quality_counterfact / _zsre and summarize.py) ----

def ref_nll(model, tok, prefix, target):
    """Mean -log p of the target's tokens after the prefix, one prompt at a time: the prefix's length from tokenizing
    it alone, the joint text "prefix target", the target tokens from " target" (no special tokens)."""
    prefix_len = len(tok(prefix)["input_ids"])
    enc = tok(f"{prefix} {target}", return_tensors="pt")
    a_tok = tok(f" {target}", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(**enc).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return float(np.mean([-lp[prefix_len + j - 1, a_tok[j]].item() for j in range(len(a_tok))]))


def ref_counterfact(model, tok, records):
    rows = []
    for d in records:
        rr = d["requested_rewrite"]
        new, true = rr["target_new"]["str"], rr["target_true"]["str"]
        row = {}
        for kind, prompts in (("rewrite", [rr["prompt"].format(rr["subject"])]),
                              ("paraphrase", d["paraphrase_prompts"]), ("neighborhood", d["neighborhood_prompts"])):
            row[kind] = [{"target_new": ref_nll(model, tok, p, new), "target_true": ref_nll(model, tok, p, true)}
                         for p in prompts]
        rows.append(row)
    summary = {}
    for kind, key in (("rewrite", "efficacy"), ("paraphrase", "generalization"), ("neighborhood", "specificity")):
        if kind == "neighborhood":
            ok = [np.mean([x["target_true"] < x["target_new"] for x in r[kind]]) for r in rows]
            mag = [np.mean([np.exp(-x["target_true"]) - np.exp(-x["target_new"]) for x in r[kind]]) for r in rows]
        else:
            ok = [np.mean([x["target_true"] > x["target_new"] for x in r[kind]]) for r in rows]
            mag = [np.mean([np.exp(-x["target_new"]) - np.exp(-x["target_true"]) for x in r[kind]]) for r in rows]
        summary[key], summary[key + "_magnitude"] = float(np.mean(ok)), float(np.mean(mag))
    return summary, rows


def ref_acc(model, tok, prompts, targets):
    """MEMIT's test_batch_prediction_acc, one prompt at a time: the argmax after the prompt vs the first token of
    the target text."""
    out = []
    for p, t in zip(prompts, targets):
        with torch.no_grad():
            logits = model(**tok(p, return_tensors="pt")).logits[0, -1]
        out.append(int(logits.argmax().item()) == tok(t)["input_ids"][0])
    return out


def ref_zsre(model, tok, records):
    rows = []
    for d in records:
        target_tok = tok(" " + d["answers"][0])["input_ids"]
        row = {}
        for kind, q in (("rewrite", d["src"]), ("paraphrase", d["rephrase"])):
            row[kind] = ref_acc(model, tok, [q + tok.decode(target_tok[:i]) for i in range(len(target_tok))],
                                [tok.decode(target_tok[i]) for i in range(len(target_tok))])
        ans = tok(" " + d["loc_ans"])["input_ids"]
        row["neighborhood"] = ref_acc(model, tok, [d["loc"] + "?" + tok.decode(ans[:i]) for i in range(len(ans))],
                                      [tok.decode(ans[i]) for i in range(len(ans))])
        rows.append(row)
    summary = {key: float(np.mean([np.mean(r[kind]) for r in rows]))
               for kind, key in (("rewrite", "efficacy"), ("paraphrase", "generalization"),
                                 ("neighborhood", "specificity"))}
    return summary, rows


# ---- models ----

@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """name -> (jaxedit model, torch float64 model) for a random tiny GPT-2 and LLaMA (init std 0.3, so the
    targets' probabilities differ clearly) and the GPT-2 with its layer-1 MLP output weights perturbed."""
    out = {}
    for name in ("gpt2", "llama-gqa-untied"):
        base = build_hf_model(name, seed=1, init_std=0.3)
        variants = [(name, base)]
        if name == "gpt2":
            edited = copy.deepcopy(base)
            with torch.no_grad():
                torch.manual_seed(5)
                w = edited.transformer.h[1].mlp.c_proj.weight
                w.add_(torch.randn_like(w) * 1.5)
            variants.append(("gpt2-edited", edited))
        for key, m in variants:
            d = tmp_path_factory.mktemp(key)
            m.save_pretrained(d)
            tokenizer.save_pretrained(d)
            model, _ = jaxedit.load(str(d))
            out[key] = (model, m.double().eval())
    return out


def check_counterfact(result, ref_summary, ref_rows):
    for row, ref in zip(result["rows"], ref_rows):
        for kind in ("rewrite", "paraphrase", "neighborhood"):
            got = [(x["target_new"], x["target_true"]) for x in row[kind]]
            want = [(x["target_new"], x["target_true"]) for x in ref[kind]]
            np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    for key in ("efficacy", "generalization", "specificity"):
        assert result["summary"][key] == ref_summary[key], key
        assert result["summary"][key + "_magnitude"] == pytest.approx(ref_summary[key + "_magnitude"], abs=2e-6)


@pytest.mark.parametrize("name", [pytest.param("gpt2", marks=pytest.mark.slow), "llama-gqa-untied",
                                  "gpt2-edited"])  # GPT-2 edited in the fast tier, unedited in the full suite
def test_counterfact_matches_reference(models, tokenizer, name):
    model, ref_model = models[name]
    result = jaxedit.counterfact_eval(model, RECORDS, tokenizer=tokenizer)
    ref_summary, ref_rows = ref_counterfact(ref_model, tokenizer, RECORDS)
    check_counterfact(result, ref_summary, ref_rows)
    # the comparisons are clear of float noise, so equal shares are meaningful
    gaps = [abs(x["target_new"] - x["target_true"]) for r in ref_rows for k in r for x in r[k]]
    assert min(gaps) > 1e-4
    s = result["summary"]
    assert s["fluency"] is None and "consistency" not in s and s["records"] == len(RECORDS)
    assert [r["case_id"] for r in result["rows"]] == [0, 1, 2]


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt2"])
@pytest.mark.parametrize("pack,targets_per_pack", [(128, 32), (16, 32), (128, 2)])
def test_score_rows_against_torch_float64(models, tokenizer, name, pack, targets_per_pack):
    """Rows packed as prefix trees (shared beginnings, a row that is the beginning of another, equal prompts with
    other targets; ``pack=16`` splits them over several packed rows, as does a bound of 2 target tokens per packed
    row, which a 4-token target exceeds) score as each row alone in float64 torch."""
    model, ref = models[name]
    pairs = [("The Eiffel Tower is in", "Paris"), ("Miles Davis plays the", "trumpet and the guitar"),
             ("Miles Davis plays the", "guitar"), ("Miles Davis", "plays the trumpet"), ("The Eiffel Tower is", "in"),
             ("The city of", "Paris"), ("Miles Davis plays the", "trumpet and the guitar")]
    rows = [editing.prompt_target_ids(tokenizer, p, t) for p, t in pairs]
    size = max(pack, max(len(p) + len(t) - 1 for p, t in rows))  # as score_rows makes it (up to the bucket)
    packed = editing.pack_prefix_trees([p + t[:-1] for p, t in rows[:-1]], size)  # a target's last token not fed
    if pack == 128:
        assert len(packed) == 1 and len(packed[0][0]) < sum(len(p) + len(t) for p, t in rows[:-1])  # shared tokens
    else:
        assert len(packed) > 1 and all(len(tokens) <= size for tokens, _, _ in packed)
    if targets_per_pack == 2:
        assert max(len(t) for _, t in rows) > 2
        weights = [len(t) for _, t in rows[:-1]]
        bounded = editing.pack_prefix_trees([p + t[:-1] for p, t in rows[:-1]], size, weights=weights,
                                            max_weight=max(weights))
        assert len(bounded) > 1 and all(sum(weights[i] for i in paths) <= max(weights) for _, _, paths in bounded)
    for (p, t), (nll, hit) in zip(rows, editing.score_rows(model, rows, pack=pack,
                                                           targets_per_pack=targets_per_pack)):
        assert nll.dtype == np.float64 and hit.dtype == bool and len(nll) == len(t)
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([p + t])).logits[0].double(), -1)
        want = [-float(logp[len(p) - 1 + k, x]) for k, x in enumerate(t)]
        np.testing.assert_allclose(nll, want, atol=2e-5, rtol=0)
        assert hit.tolist() == [int(logp[len(p) - 1 + k].argmax()) == x for k, x in enumerate(t)]


def test_prefix_tree_packing_by_hand():
    packs = editing.pack_prefix_trees([[5, 6, 7], [5, 6, 8, 9], [1, 2], [5, 6]], 6)
    # sorted: [1, 2], [5, 6], [5, 6, 7], [5, 6, 8, 9]; [5, 6] shares both tokens with nothing before it in its pack
    assert packs[0][0] == [1, 2, 5, 6, 7] and packs[0][1] == [-1, 0, -1, 2, 3]
    assert packs[0][2] == {2: [0, 1], 3: [2, 3], 0: [2, 3, 4]}
    assert packs[1] == ([5, 6, 8, 9], [-1, 0, 1, 2], {1: [0, 1, 2, 3]})  # 5 + 2 new tokens would not fit in 6
    m = editing.tree_mask(packs[0][1], 5)
    assert m.astype(int).tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0],
                                      [0, 0, 1, 1, 1]]


def test_requested_rewrite_as_a_list(models, tokenizer):
    """MEMIT's files hold some rewrites as a one-element list: the same record as the plain form."""
    model = models["llama-gqa-untied"][0]
    listed = [dict(d, requested_rewrite=[d["requested_rewrite"]]) for d in RECORDS[:2]]
    assert jaxedit.counterfact_eval(model, listed, tokenizer=tokenizer) == jaxedit.counterfact_eval(model, RECORDS[:2], tokenizer=tokenizer)


def test_edit_changes_the_shares(models, tokenizer):
    """The perturbed model's numbers differ from the random one's, and not every share is 0 or 1."""
    a = jaxedit.counterfact_eval(models["gpt2"][0], RECORDS, tokenizer=tokenizer)["rows"]
    b = jaxedit.counterfact_eval(models["gpt2-edited"][0], RECORDS, tokenizer=tokenizer)["rows"]
    nll = lambda rows: np.array([[x["target_new"], x["target_true"]] for r in rows for k in ("rewrite", "paraphrase",
                                                                                              "neighborhood")
                                 for x in r[k]])
    assert np.abs(nll(a) - nll(b)).max() > 0.5
    keys = ("efficacy", "generalization", "specificity")
    assert [[r[k] for k in keys] for r in a] != [[r[k] for k in keys] for r in b]
    assert any(0 < r[k] < 1 for rows in (a, b) for r in rows for k in keys)


def zsre_records(ref_model, tok):
    """ZSRE with each answer followed by the model's own argmax token after the question and the answer (where the
    longer answer still tokenizes as the answer's tokens plus that one), so that some target tokens are hits."""
    def follow(prompt, answer):
        with torch.no_grad():
            nxt = int(ref_model(**tok(f"{prompt} {answer}", return_tensors="pt")).logits[0, -1].argmax())
        longer = answer + tok.decode([nxt])
        ok = tok(" " + longer)["input_ids"] == tok(" " + answer)["input_ids"] + [nxt]
        return longer if ok else answer
    return [dict(d, answers=[follow(d["src"], d["answers"][0])], loc_ans=follow(d["loc"] + "?", d["loc_ans"]))
            for d in ZSRE]


@pytest.mark.parametrize("name", [pytest.param("gpt2", marks=pytest.mark.slow),  # the unedited models: the full suite
                                  pytest.param("llama-gqa-untied", marks=pytest.mark.slow), "gpt2-edited"])
def test_zsre_matches_reference(models, tokenizer, name):
    model, ref_model = models[name]
    records = zsre_records(ref_model, tokenizer)
    # MEMIT's reference re-tokenizes prompt + decoded target prefix; for these words that is the same token row
    for d in records:
        t = tokenizer(" " + d["answers"][0])["input_ids"]
        for i in range(len(t)):
            assert tokenizer(d["src"] + tokenizer.decode(t[:i]))["input_ids"] == tokenizer(d["src"])["input_ids"] + t[:i]
    result = jaxedit.zsre_eval(model, records, tokenizer=tokenizer)
    ref_summary, ref_rows = ref_zsre(ref_model, tokenizer, records)
    for row, ref in zip(result["rows"], ref_rows):
        for kind in ("rewrite", "paraphrase", "neighborhood"):
            assert row[kind] == [int(x) for x in ref[kind]], kind
    assert {k: result["summary"][k] for k in ref_summary} == ref_summary
    hits = [h for row in result["rows"] for kind in ("rewrite", "paraphrase", "neighborhood") for h in row[kind]]
    assert 0 < np.mean(hits) < 1


def test_zsre_alt_target(models, tokenizer):
    model = models["gpt2"][0]
    alt = jaxedit.zsre_eval(model, [dict(d, answers=[d["alt"]]) for d in ZSRE], tokenizer=tokenizer)
    assert jaxedit.zsre_eval(model, ZSRE, tokenizer=tokenizer, target="alt")["rows"] == alt["rows"]
    with pytest.raises(JaxeditError, match="target"):
        jaxedit.zsre_eval(model, ZSRE, tokenizer=tokenizer, target="rephrase")


def test_check_zsre_by_hand():
    ok = dict(ZSRE[0])
    assert editing.check_zsre(ok, "r") is ok
    alt_only = {k: v for k, v in ok.items() if k != "answers"}
    assert editing.check_zsre(alt_only, "r") is alt_only
    no_target = {k: v for k, v in alt_only.items() if k != "alt"}
    for bad, msg in (("text", "a record must be a JSON object, not str"),
                     (no_target, 'missing field "answers" (or "alt")'),
                     (dict(ok, answers="Paris"), 'field "answers" must be a non-empty list of non-empty strings'),
                     (dict(ok, answers=[]), 'field "answers" must be a non-empty list of non-empty strings'),
                     (dict(ok, answers=["Paris", " "]), 'field "answers" must be a non-empty list of non-empty strings'),
                     (dict(ok, answers=["Paris", 3]), 'field "answers" must be a non-empty list of non-empty strings'),
                     (dict(ok, alt=""), 'field "alt" must be a non-empty string'),
                     ({k: v for k, v in ok.items() if k != "loc_ans"}, 'missing field "loc_ans"')):
        with pytest.raises(JaxeditError) as err:
            editing.check_zsre(bad, "f.jsonl:4")
        assert str(err.value) == f"f.jsonl:4: {msg}"


def test_zsre_eval_case_ids_and_errors(models, tokenizer):
    model = models["gpt2"][0]
    records = [dict(ZSRE[0], case_id=7), ZSRE[1]]
    assert [r["case_id"] for r in jaxedit.zsre_eval(model, records, tokenizer=tokenizer)["rows"]] == [7, 1]
    no_alt = [ZSRE[0], {k: v for k, v in ZSRE[1].items() if k != "alt"}]
    for args, kw, msg in (((ZSRE, None), {}, "zsre_eval needs a tokenizer (jaxedit.load returns it with the model)"),
                          (([], tokenizer), {}, "no zsRE records"),
                          ((3, tokenizer), {}, "zsRE records must be a file path or a list of dicts, not int"),
                          ((no_alt, tokenizer), dict(target="alt"), 'record 1: missing field "alt" (the target)')):
        with pytest.raises(JaxeditError) as err:
            jaxedit.zsre_eval(model, args[0], tokenizer=args[1], **kw)
        assert str(err.value) == msg


def test_bos_tokenizer(models, tokenizer):
    """With a tokenizer that adds BOS: the prompt starts with BOS and the target has none (MEMIT's tokenization of
    " target" with the defaults would put a BOS into it)."""
    tok = bos_tokenizer(tokenizer)
    bos = tok.bos_token_id
    p, t = editing.prompt_target_ids(tok, "The capital of France is", "Paris")
    assert p[0] == bos and bos not in t
    assert p[1:] + t == tokenizer("The capital of France is Paris")["input_ids"]
    model, ref_model = models["llama-gqa-untied"]
    result = jaxedit.counterfact_eval(model, RECORDS, tokenizer=tok)
    check_counterfact(result, *ref_counterfact(ref_model, tok, RECORDS))
    # BOS changes the numbers
    plain = jaxedit.counterfact_eval(model, RECORDS, tokenizer=tokenizer)
    assert plain["rows"][0]["rewrite"][0]["target_new"] != pytest.approx(result["rows"][0]["rewrite"][0]["target_new"],
                                                                         abs=1e-4)


# ---- a hand-checkable case: a unigram "model" over a word-level tokenizer ----

class WordTokenizer:
    """One id per word (a word-level vocabulary), no special tokens."""

    def __init__(self, words):
        self.ids = {w: i for i, w in enumerate(words)}

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [self.ids[w] for w in text.split()]}


def test_hand_checked_unigram(monkeypatch):
    """Logits that ignore the context: p(Paris) = 1/2, p(Rome) = 1/4, p(New) = p(York) = 1/8, so a target's NLL is
    its mean -log p and every share and magnitude can be worked out by hand."""
    words = ["Paris", "Rome", "New", "York", "the", "is", "of", "capital", "France", "city", "in", "Italy", "Italy?", "X"]
    tok = WordTokenizer(words)
    logp = np.full(len(words), -np.inf)
    logp[:4] = np.log([1 / 2, 1 / 4, 1 / 8, 1 / 8])

    def fake_scores(model, rows, bucket=16):
        return [(-logp[t].astype(np.float64), np.array([x == int(np.argmax(logp)) for x in t])) for p, t in rows]

    monkeypatch.setattr(editing, "score_rows", fake_scores)
    rec = {"requested_rewrite": {"prompt": "the capital of {} is", "subject": "France",
                                 "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
           "paraphrase_prompts": ["the city of France is", "France is"],
           "neighborhood_prompts": ["the capital of Italy is"]}
    rec2 = {"requested_rewrite": {"prompt": "the city in {} is", "subject": "X",
                                  "target_new": {"str": "Paris"}, "target_true": {"str": "New York"}},
            "paraphrase_prompts": ["X is"], "neighborhood_prompts": ["the city is", "the capital is"]}
    s = jaxedit.counterfact_eval(None, [rec, rec2], tokenizer=tok)["summary"]
    # rec: new Rome (NLL ln 4) vs true Paris (ln 2): the edit "fails" everywhere, neighborhood keeps Paris
    # rec2: new Paris (ln 2) vs true "New York" (ln 8): succeeds everywhere; neighborhood prefers the new target
    assert s["efficacy"] == 0.5 and s["generalization"] == 0.5 and s["specificity"] == 0.5
    m1, m2 = 1 / 4 - 1 / 2, 1 / 2 - 1 / 8
    assert s["efficacy_magnitude"] == pytest.approx((m1 + m2) / 2)
    assert s["generalization_magnitude"] == pytest.approx((m1 + m2) / 2)
    assert s["specificity_magnitude"] == pytest.approx((-m1 - m2) / 2)
    assert s["score"] == pytest.approx(0.5)
    # a tie (New vs York, 1/8 each) is a success nowhere: the definitions compare strictly; records without a
    # case_id are numbered by position
    tie = {"requested_rewrite": dict(rec["requested_rewrite"], target_new={"str": "New"}, target_true={"str": "York"}),
           "paraphrase_prompts": ["France is"], "neighborhood_prompts": ["the capital of Italy is"]}
    t = jaxedit.counterfact_eval(None, [rec, tie], tokenizer=tok)
    assert [r["case_id"] for r in t["rows"]] == [0, 1]
    assert [t["rows"][1][k] for k in ("efficacy", "generalization", "specificity")] == [0.0, 0.0, 0.0]
    assert t["rows"][1]["efficacy_magnitude"] == 0.0
    # zsRE: the argmax is always Paris, so "Paris" scores 1, "New York" 0, "Paris Rome" 1/2
    z = {"src": "the capital of France is", "rephrase": "France is", "answers": ["Paris Rome"],
         "loc": "the city of Italy", "loc_ans": "New York"}
    zs = jaxedit.zsre_eval(None, [z, dict(z, answers=["Paris"], loc_ans="Paris")], tokenizer=tok)["summary"]
    assert zs == {"efficacy": 0.75, "generalization": 0.75, "specificity": 0.5, "records": 2}


# ---- generation metrics ----

def test_generation_fluency_and_consistency(models, tokenizer, tmp_path):
    model = models["gpt2"][0]
    snippets = [{"relation_id": "P131", "target_id": "Q5083",
                 "samples": [{"name": "Space Needle", "text": "The Space Needle is in Seattle."}]},
                {"relation_id": "P1303", "target_id": "Q6607",
                 "samples": [{"name": "Toko Yasuda", "text": "Toko Yasuda plays the guitar."}]},
                {"relation_id": "P127", "target_id": "Q1", "samples": [{"name": "x", "text": "amazing music"}]}]
    res = jaxedit.counterfact_eval(model, RECORDS, tokenizer=tokenizer, generation=True, snippets=snippets, max_out_len=20)
    s, rows = res["summary"], res["rows"]
    assert [len(r["generations"]) for r in rows] == [2, 1, 0]
    for r, d in zip(rows, RECORDS):
        for text, prompt in zip(r["generations"], d["generation_prompts"]):
            assert text.startswith(prompt)
            assert len(tokenizer(text)["input_ids"]) > len(tokenizer(prompt)["input_ids"])
    assert rows[0]["fluency"] == pytest.approx(np.mean([ngram_entropy(t) for t in rows[0]["generations"]]))
    assert rows[2]["fluency"] is None and rows[2]["consistency"] is None
    assert s["fluency"] == pytest.approx(np.mean([rows[0]["fluency"], rows[1]["fluency"]]))
    assert s["fluency"] > 0 and 0 <= s["consistency"] <= 1
    # the same seed draws the same texts; another seed other texts
    again = jaxedit.counterfact_eval(model, RECORDS, tokenizer=tokenizer, generation=True, max_out_len=20)
    assert [r["generations"] for r in again["rows"]] == [r["generations"] for r in rows]
    assert "consistency" not in again["summary"]
    # IDF files whose vocabulary shares no word with the generations: consistency 0
    np.save(tmp_path / "idf.npy", np.array([1.0, 2.0]))
    (tmp_path / "tfidf_vocab.json").write_text(json.dumps({"zzzz": 0, "qqqq": 1}))
    zero = jaxedit.counterfact_eval(model, RECORDS, tokenizer=tokenizer, generation=True, snippets=snippets,
                                    idf=str(tmp_path), max_out_len=20)
    assert zero["summary"]["consistency"] == 0.0
    with pytest.raises(JaxeditError, match="generation=True"):
        jaxedit.counterfact_eval(model, RECORDS, tokenizer=tokenizer, snippets=snippets)
    with pytest.raises(JaxeditError, match="no snippets"):
        jaxedit.counterfact_eval(model, RECORDS, tokenizer=tokenizer, generation=True, snippets=snippets[:2], max_out_len=20)


def test_generate_texts_greedy_equals_torch(models, tokenizer):
    """generate_texts with top_k=1 is greedy decoding: every prompt continued to max_out_len tokens in all, equal to
    a torch argmax loop; an empty prompt starts from token 0 (this tokenizer has no BOS); no room is an error. The
    defaults are MEMIT's (100 tokens, top-5)."""
    import inspect

    model, hf = models["gpt2"]
    prompts = ["The Eiffel Tower is", "Miles Davis plays the trumpet and", "", "Paris\n\nis"]
    got = editing.generate_texts(model, tokenizer, prompts, max_out_len=14, top_k=1)
    assert tokenizer.bos_token_id is None
    for prompt, text in zip(prompts, got):
        ids = list(tokenizer(prompt)["input_ids"]) or [0]
        while len(ids) < 14:
            with torch.no_grad():
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
        want = tokenizer.decode(ids, skip_special_tokens=True)
        assert text == want.replace("\n\n", " ") and "\n" not in text
    assert got[3].startswith("Paris is")
    sampled = editing.generate_texts(model, tokenizer, prompts[:2] * 4, max_out_len=12, top_k=5, seed=3)
    assert len(set(sampled)) > 2  # top-5 draws differ between rows
    assert editing.generate_texts(model, tokenizer, prompts[:2] * 4, max_out_len=12, top_k=5, seed=3) == sampled
    assert editing.generate_texts(model, tokenizer, prompts[:2] * 4, max_out_len=12, top_k=5, seed=4) != sampled
    n = len(tokenizer(prompts[1])["input_ids"])
    with pytest.raises(JaxeditError) as err:
        editing.generate_texts(model, tokenizer, prompts[1:2], max_out_len=n)
    assert str(err.value) == f"max_out_len {n} leaves no room after prompts of {n} tokens"
    defaults = inspect.signature(editing.generate_texts).parameters
    assert (defaults["max_out_len"].default, defaults["top_k"].default) == (100, 5)


def test_read_snippets_and_idf_files(tmp_path):
    """MEMIT's attribute snippets from a file (its list form) or the nested dict; the IDF files from a folder or a
    pair of paths; each malformed input a one-line error naming it."""
    rows = [{"relation_id": "P131", "target_id": "Q5083", "samples": [{"name": "a", "text": "Seattle rain"}]},
            {"relation_id": "P131", "target_id": "Q5083", "samples": [{"name": "b", "text": "the Space Needle"}]},
            {"relation_id": 17, "target_id": 3, "samples": []}]
    f = tmp_path / "attribute_snippets.json"
    f.write_text(json.dumps(rows))
    want = {"P131": {"Q5083": ["Seattle rain", "the Space Needle"]}, "17": {"3": []}}
    assert editing.read_snippets(str(f)) == want and editing.read_snippets(rows) == want
    assert editing.read_snippets({"P1": {"Q2": ["plain text", {"text": "an object"}]}}) == \
        {"P1": {"Q2": ["plain text", "an object"]}}
    for bad, msg in ((str(tmp_path / "missing.json"), f"{tmp_path / 'missing.json'}: no such file"),
                     ([{"relation_id": "P1", "target_id": "Q1"}],
                      'snippets entry 0: needs "relation_id", "target_id" and "samples"'),
                     ([rows[0], "text"], 'snippets entry 1: needs "relation_id", "target_id" and "samples"'),
                     (3, "snippets must be a path, a list or a dict, not int")):
        with pytest.raises(JaxeditError) as err:
            editing.read_snippets(bad)
        assert str(err.value) == msg
    (tmp_path / "broken.json").write_text('[{"relation_id": 1,\n ]')
    with pytest.raises(JaxeditError, match=r"^.*broken\.json:2: not valid JSON \("):
        editing.read_snippets(str(tmp_path / "broken.json"))

    np.save(tmp_path / "idf.npy", np.array([1.0, 2.0], np.float32))
    (tmp_path / "tfidf_vocab.json").write_text(json.dumps({"paris": 0, "seattle": 1}))
    for where in (str(tmp_path), (str(tmp_path / "idf.npy"), str(tmp_path / "tfidf_vocab.json"))):
        t = editing.Tfidf.from_files(where)  # weights in float64 whatever the file holds, as scikit-learn's
        assert t.vocab == {"paris": 0, "seattle": 1} and t.idf.tolist() == [1.0, 2.0] and t.idf.dtype == np.float64
    with pytest.raises(JaxeditError) as err:
        editing.Tfidf({"paris": 0, "seattle": 1, "rome": 2}, [1.0, 2.0])
    assert str(err.value) == "IDF has 2 weights for a vocabulary of 3 terms"
    with pytest.raises(JaxeditError) as err:
        editing.Tfidf.from_files((str(tmp_path / "none.npy"), str(tmp_path / "tfidf_vocab.json")))
    assert str(err.value) == (f"{tmp_path / 'none.npy'}: no such file (consistency's IDF needs idf.npy and "
                              f"tfidf_vocab.json)")


def test_tfidf_by_hand():
    vec = editing.Tfidf.fit(["a paris paris", "paris rome"])  # one-letter words are not terms
    assert vec.vocab == {"paris": 0, "rome": 1}
    np.testing.assert_allclose(vec.idf, [1.0, math.log(3 / 2) + 1])
    # "Paris Rome" -> (1, idf_rome) normalized; "Paris" -> (1, 0)
    w = math.log(3 / 2) + 1
    assert vec.cosine("Paris Rome", "paris.") == pytest.approx(1 / math.hypot(1, w))
    assert vec.cosine("Rome rome", "ROME") == pytest.approx(1.0)
    assert vec.cosine("unknown words", "paris") == 0.0
    np.testing.assert_allclose(vec.vector("Paris rome, paris!"), np.array([2, w]) / math.hypot(2, w))


# ---- readers ----

def test_load_round_trip(tmp_path):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(RECORDS))
    assert jaxedit.load_counterfact(str(path)) == RECORDS
    jl = tmp_path / "cf.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    assert jaxedit.load_counterfact(str(jl)) == RECORDS
    z = tmp_path / "zsre.json"
    z.write_text(json.dumps(ZSRE))
    assert jaxedit.load_zsre(str(z)) == ZSRE


def test_record_checks_and_relative_paths(tmp_path, monkeypatch):
    rr = RECORDS[0]["requested_rewrite"]
    for change, msg in (({"requested_rewrite": dict(rr, target_true="Paris")},
                         'r requested_rewrite: field "target_true" must be an object with "str"'),
                        ({"paraphrase_prompts": None}, 'r: missing field "paraphrase_prompts"'),
                        ({"generation_prompts": None}, None)):
        d = dict(RECORDS[0], **change)
        d = {k: v for k, v in d.items() if v is not None}
        if msg is None:
            assert editing.check_counterfact(d, "r") is d  # generation prompts are optional
            continue
        with pytest.raises(JaxeditError) as err:
            editing.check_counterfact(d, "r")
        assert str(err.value) == msg
    monkeypatch.chdir(tmp_path)  # relative paths ending in .json/.jsonl are files, never hub names
    for name in ("missing.json", "missing.jsonl"):
        with pytest.raises(JaxeditError) as err:
            jaxedit.load_counterfact(name)
        assert str(err.value) == f"{name}: no such file"
    (tmp_path / "rows.jsonl").write_text(json.dumps(RECORDS[0]) + "\n{broken\n")
    with pytest.raises(JaxeditError) as err:
        jaxedit.load_counterfact("rows.jsonl")
    assert str(err.value).startswith("rows.jsonl:2: not valid JSON (Expecting property name")


class SpacesTok:
    """Characters as tokens, but a run of two spaces is one token: "ab " + " " + "cd" does not begin with the
    tokens of "ab "."""

    def __call__(self, text, add_special_tokens=True):
        ids, i = [], 0
        while i < len(text):
            if text[i:i + 2] == "  ":
                ids.append(1000)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_prompt_target_ids_when_the_joint_tokens_differ():
    tok = SpacesTok()
    assert editing.prompt_target_ids(tok, "ab", "cd") == ([1, 97, 98], [32, 99, 100])  # the joint row's tail
    assert editing.prompt_target_ids(tok, "ab ", "cd") == ([1, 97, 98, 32], [32, 99, 100])  # " cd" alone


def test_malformed_records(tmp_path):
    bad = copy.deepcopy(RECORDS)
    del bad[2]["requested_rewrite"]["target_new"]["str"]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(JaxeditError, match=r"cf\.json: record 2 .*target_new.*\"str\""):
        jaxedit.load_counterfact(str(path))
    bad = copy.deepcopy(RECORDS)
    bad[1]["requested_rewrite"]["prompt"] = "no placeholder"
    jl = tmp_path / "cf.jsonl"
    jl.write_text("\n" + "\n".join(json.dumps(r) for r in bad))
    with pytest.raises(JaxeditError, match=r"cf\.jsonl:3 .*\{\}"):
        jaxedit.load_counterfact(str(jl))
    bad = copy.deepcopy(RECORDS)
    bad[0]["neighborhood_prompts"] = "one string"
    with pytest.raises(JaxeditError, match=r"record 0: field \"neighborhood_prompts\""):
        jaxedit.counterfact_eval(None, bad, tokenizer=object())
    zbad = copy.deepcopy(ZSRE)
    del zbad[1]["loc_ans"]
    z = tmp_path / "zsre.json"
    z.write_text(json.dumps(zbad))
    with pytest.raises(JaxeditError, match=r"zsre\.json: record 1: missing field \"loc_ans\""):
        jaxedit.load_zsre(str(z))
    (tmp_path / "broken.json").write_text('[{"case_id": 0},\n {')
    with pytest.raises(JaxeditError, match=r"broken\.json:2: not valid JSON"):
        jaxedit.load_counterfact(str(tmp_path / "broken.json"))
    with pytest.raises(JaxeditError, match="no such file"):
        jaxedit.load_zsre(str(tmp_path / "missing.json"))


def test_hub_name_offline():
    with pytest.raises(JaxeditError) as err:
        jaxedit.load_counterfact("someone/counterfact")
    msg = str(err.value)
    assert msg.startswith("someone/counterfact: no such file") and "hub" in msg and "\n" not in msg


def test_hub_records_through_datasets(stand_in_datasets):
    """A hub name is read through datasets.load_dataset(NAME, split="train") and checked record by record; a hub
    failure is one line with the error's type and its first 200 characters, whitespace folded."""
    stand_in_datasets(None)  # not installed
    with pytest.raises(JaxeditError) as err:
        jaxedit.load_counterfact("someone/counterfact")
    assert str(err.value) == ("someone/counterfact: no such file, and reading it as a hub dataset needs the datasets "
                              "package (pip install datasets)")
    calls = []

    def fake_load(*args, **kw):
        calls.append((args, kw))
        return [dict(r) for r in ZSRE] if args[0] == "someone/zsre" else [dict(r) for r in RECORDS]

    stand_in_datasets(fake_load)
    assert jaxedit.load_counterfact("someone/counterfact") == RECORDS
    assert jaxedit.load_zsre("someone/zsre") == ZSRE
    assert calls == [(("someone/counterfact",), {"split": "train"}), (("someone/zsre",), {"split": "train"})]
    stand_in_datasets(lambda *a, **k: [{"subject": "x"}])
    with pytest.raises(JaxeditError, match=r"^someone/zsre: record 0: missing field"):
        jaxedit.load_zsre("someone/zsre")

    def offline(*a, **k):
        raise ConnectionError("no\n  network " + "x" * 300)

    stand_in_datasets(offline)
    with pytest.raises(JaxeditError) as err:
        jaxedit.load_counterfact("someone/counterfact")
    assert str(err.value) == ("someone/counterfact: no such file, and the hub dataset could not be read "
                              "(ConnectionError: no network " + "x" * 189 + ")")


def test_no_records_and_the_kind_in_messages(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    for load in (jaxedit.load_counterfact, jaxedit.load_zsre):
        with pytest.raises(JaxeditError) as err:
            load(str(empty))
        assert str(err.value) == f"{empty}: no records"
        with pytest.raises(JaxeditError) as err:
            load([])
        assert str(err.value) == "records: no records"
    for load, kind in ((jaxedit.load_counterfact, "CounterFact"), (jaxedit.load_zsre, "zsRE")):
        with pytest.raises(JaxeditError) as err:
            load(str(tmp_path))
        assert str(err.value) == f"{tmp_path} is a directory, not a {kind} JSON file"
        with pytest.raises(JaxeditError) as err:
            load(3)
        assert str(err.value) == f"{kind} records must be a file path or a list of dicts, not int"


def test_demo_set():
    recs = jaxedit.load_counterfact("demo")
    assert 20 <= len(recs) <= 30
    assert len({r["case_id"] for r in recs}) == len(recs)
    for r in recs:
        rr = r["requested_rewrite"]
        assert rr["target_new"]["str"] != rr["target_true"]["str"] and rr["target_new"]["id"]
        assert 1 <= len(r["paraphrase_prompts"]) <= 2 and 2 <= len(r["neighborhood_prompts"]) <= 3
        assert r["generation_prompts"]


def test_format_summary():
    table = editing.format_summary({"efficacy": 0.5, "generalization": 0.25, "specificity": 1.0, "fluency": 6.2,
                                    "consistency": None})
    head, vals = table.splitlines()
    assert head.split() == ["efficacy", "generalization", "specificity", "fluency"]
    assert vals.split() == ["50.0", "25.0", "100.0", "620.0"]
    # every column, its short name, the title and the right-aligned widths, written out by hand
    full = {"efficacy": 0.5, "generalization": 0.25, "specificity": 1.0, "efficacy_magnitude": 0.123,
            "generalization_magnitude": -0.05, "specificity_magnitude": 0.9, "score": 10.0, "fluency": 6.2,
            "consistency": 0.1}
    assert editing.format_summary(full, title="after 10 edits").splitlines() == [
        "after 10 edits",
        "efficacy  generalization  specificity  eff. mag.  gen. mag.  spec. mag.   score  fluency  consistency",
        "    50.0            25.0        100.0       12.3       -5.0        90.0  1000.0    620.0         10.0"]


@pytest.mark.slow
def test_demo_on_smollm2(smollm2):
    """The unedited SmolLM2 prefers the true targets: low efficacy and generalization, high specificity."""
    model, tok = smollm2
    s = jaxedit.counterfact_eval(model, "demo", tokenizer=tok)["summary"]
    assert s["efficacy"] <= 0.1 and s["generalization"] <= 0.1 and s["specificity"] >= 0.9
    assert s["efficacy_magnitude"] < -0.2
