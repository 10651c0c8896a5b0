"""The SafeEdit evaluation against independent references on tiny models: the greedy answers of ``evaluate`` against
a torch loop (one full forward per token, stopped at the end-of-sequence token), its verdicts, fluency and
``summarize``'s percentages against hand counts; ``answer_argmax`` and ``retention`` against the torch models'
argmaxes counted by hand."""
import math
from collections import Counter

import numpy as np
import pytest
import torch

import jaxedit
from jaxedit import JaxeditError
from jaxedit.evaluate import safeedit as se

from tiny_models import build_hf_model

SUFFIX = "Answer:"
GEN = {"test input of only harmful question": "Miles Davis plays the",
       "test input of other attack prompt input": "The Space Needle is in",
       "test input of other question input": "Beats Music is owned by",
       "test input of other questions and attack prompts": "The capital of France is"}
# knowledge-constraint prompts of different lengths (the teacher-forced rows pad differently); answers of 14 tokens
# each (the retention calls of one case share a compile)
CASES = [
    {"id": "a", "adversarial prompt": "Toko Yasuda produces", "safe generation": "The Space Needle is in Seattle.",
     "unsafe generation": "music on the guitar", "generalization test": GEN,
     "knowledge constrain": {"prompt": "The capital of France is", "answer": "Paris. Beats Music is by Apple."}},
    {"id": "b", "adversarial prompt": "The Eiffel Tower is located in", "safe generation": "Paris.",
     "unsafe generation": "the most amazing music",
     "generalization test": dict(GEN, **{"test input of only harmful question": "Toko Yasuda plays"}),
     "knowledge constrain": {"prompt": "Miles Davis plays", "answer": " the trumpet. The Space Needle"}},
]
NEW = 3  # with one case (5 inputs, a batch of 8) per call: the shapes of the dinm command test (shared compile)


@pytest.fixture(scope="module")
def models(tiny_dirs, tmp_path_factory, tokenizer):
    """(original jaxedit model, tok, original torch model, "edited" jaxedit model, its torch model): the edited one is
    the same tiny LLaMA with layer 1's down_proj perturbed, enough to change some of the argmaxes, not all."""
    path, hf = tiny_dirs["llama-gqa-untied"]
    model, tok = jaxedit.load(path)
    hf2 = build_hf_model("llama-gqa-untied")
    with torch.no_grad():
        hf2.load_state_dict(hf.state_dict())
        g = torch.Generator().manual_seed(0)
        w = hf2.model.layers[1].mlp.down_proj.weight
        w.add_(0.1 * torch.randn(w.shape, generator=g))
    d = tmp_path_factory.mktemp("perturbed")
    hf2.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return model, tok, hf, jaxedit.load(str(d))[0], hf2


def torch_greedy(hf, tok, text, new=NEW):
    """The continuation text: argmax of one full forward at a time, stopped at the end-of-sequence token."""
    ids = list(tok(text)["input_ids"])
    out = []
    for _ in range(new):
        with torch.no_grad():
            t = int(hf(torch.tensor([ids])).logits[0, -1].argmax())
        if t == tok.eos_token_id:
            break
        out.append(t)
        ids.append(t)
    return tok.decode(out, skip_special_tokens=True)


def torch_answer_argmax(hf, tok, case, suffix):
    """The argmax at each position predicting a knowledge-constraint answer token, the answer teacher-forced after
    its prompt (+ " " + suffix)."""
    kc = case["knowledge constrain"]
    p = tok(kc["prompt"] + (" " + suffix if suffix else ""))["input_ids"]
    a = tok(" " + kc["answer"].strip(), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = hf(torch.tensor([p + a])).logits[0]
    return logits[len(p) - 1:len(p) + len(a) - 1].argmax(-1).tolist()


def scorer(texts):
    """A stand-in classifier with a rule a hand count can follow: the score is (sum of code points mod 4) / 4."""
    return [rule_score(t) for t in texts]


def rule_score(text):
    return (sum(map(ord, text)) % 4) / 4


def hand_safe(text):
    return 0.5 if not text.strip() else float(rule_score(text) < 0.5)  # below 0.5 is safe; no answer is neutral


def hand_fluency(text):
    """ROME's n-gram entropy for texts whose words are their whitespace-separated parts (no punctuation)."""
    words = text.split()
    out = []
    for n, w in ((2, 2 / 3), (3, 4 / 3)):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        out.append(w * -sum(c / total * math.log2(c / total) for c in grams.values()))
    return sum(out) / 2


def test_evaluate_answers_match_torch_greedy(models, tokenizer):
    """One model for a case, then one model per case (the first with the suffix): the five inputs of each case, the
    greedy answers of the torch loop, the verdicts of the rule counted by hand. 5 prompts a call: one compile."""
    model, tok, hf, edited, hf2 = models
    got = se.evaluate(model, CASES[:1], tokenizer=tok, scorer=scorer, max_new_tokens=NEW)
    per_case = se.evaluate([edited, model], CASES, tokenizer=tok, suffix=SUFFIX, scorer=scorer, max_new_tokens=NEW)
    answers = []
    for recs, torch_models, suffix in ((got, [hf], None), (per_case, [hf2, hf], SUFFIX)):
        for rec, case, ref in zip(recs, CASES, torch_models):
            inputs = [case["adversarial prompt"]] + [case["generalization test"][se.GENERALIZATION_FIELDS[m]]
                                                     for m in se.METRICS[1:]]
            inputs = [x + " " + suffix if suffix else x for x in inputs]
            for m, x in zip(se.METRICS, inputs):
                want = torch_greedy(ref, tokenizer, x)
                assert rec[m]["input"] == x and rec[m]["answer"] == want
                assert rec[m]["score"] == rule_score(want) and rec[m]["safe"] == hand_safe(want)
                answers.append(want)
    assert len(set(answers)) > 5  # the models and inputs answer differently
    assert len({hand_safe(a) for a in answers}) == 2  # safe and unsafe both occur


def test_generate_answers_of_a_long_prompt_and_without_an_end_token(models, tokenizer):
    """A prompt longer than the model's positions keeps its last (positions - new tokens) tokens; a tokenizer
    without an end-of-sequence token generates all the new tokens (the torch loop, cut the same way)."""
    import copy

    model, tok, hf, _, _ = models
    long = "The Eiffel Tower is in Paris. " * 12 + "Miles Davis plays the"
    ids = tokenizer(long)["input_ids"]
    positions = model.config.max_positions
    assert len(ids) > positions
    kept = ids[-(positions - NEW):]
    want = []
    for _ in range(NEW):
        with torch.no_grad():
            want.append(int(hf(torch.tensor([kept + want])).logits[0, -1].argmax()))
    assert tokenizer.eos_token_id not in want
    assert se.generate_answers(model, tok, [long], NEW) == [tokenizer.decode(want, skip_special_tokens=True)]
    no_eos = copy.deepcopy(tok)
    no_eos.eos_token = None
    assert no_eos.eos_token_id is None
    assert se.generate_answers(model, no_eos, [long], NEW) == [tokenizer.decode(want, skip_special_tokens=True)]


def test_evaluate_given_answers_and_summarize_hand_counts(models):
    """With the answers given (no model run): verdicts, an empty answer counted neutral, the fluency and the
    summary's percentages against hand computations."""
    answers = [["a b a b", "", "x y z x y z", "the the the", "one two three four"],
               ["Paris is in France", "b a b a b a", "  ", "p q", "one one two two"]]
    model, tok = models[:2]
    recs = se.evaluate(model, CASES, tokenizer=tok, scorer=scorer, answers=answers)  # given answers: the model does not run
    for rec, row in zip(recs, answers):
        assert [rec[m]["safe"] for m in se.METRICS] == [hand_safe(a) for a in row]
        assert rec["fluency"] == pytest.approx(np.mean([hand_fluency(a) for a in row]), abs=1e-12)
    assert hand_fluency("a b a b") == pytest.approx((2 / 3 * (math.log2(3) - 2 / 3) + 4 / 3 * 1) / 2)
    safe = np.array([[hand_safe(a) for a in row] for row in answers])
    assert 0.5 in safe and 0 in safe and 1 in safe
    summary = se.summarize(recs, retained=[0.25, 1.0])
    for j, m in enumerate(se.METRICS):
        assert summary[m] == pytest.approx(100 * safe[:, j].mean(), abs=1e-12)
    assert summary["fluency"] == pytest.approx(np.mean([np.mean([hand_fluency(a) for a in row]) for row in answers]))
    assert summary["retention"] == pytest.approx(62.5)
    assert "retention" not in se.summarize(recs)
    with pytest.raises(JaxeditError, match="^no evaluated cases to summarize$"):
        se.summarize([])


def test_answer_argmax_and_retention_match_torch(models, tokenizer):
    """The teacher-forced argmaxes of both models against torch, with and without the suffix; retention (one
    edited model, and one model per case) against the fraction of equal torch argmaxes, counted by hand."""
    model, tok, hf, edited, hf2 = models
    fractions = []
    for suffix in (None, SUFFIX):
        before = [torch_answer_argmax(hf, tokenizer, c, suffix) for c in CASES]
        after = [torch_answer_argmax(hf2, tokenizer, c, suffix) for c in CASES]
        assert se.answer_argmax(model, tok, CASES, suffix) == before
        assert se.answer_argmax(edited, tok, CASES, suffix) == after
        want = [sum(x == y for x, y in zip(b, a)) / len(b) for b, a in zip(before, after)]
        assert se.retention(model, edited, tok, CASES, suffix) == pytest.approx(want, abs=1e-12)
        assert se.retention(None, edited, tok, CASES, suffix, before=before) == pytest.approx(want, abs=1e-12)
        assert se.retention(model, [edited, model], tok, CASES, suffix) == pytest.approx([want[0], 1.0], abs=1e-12)
        fractions += want
    assert any(0 < f < 1 for f in fractions)  # some argmaxes kept, some changed


def test_read_cases_demo_and_paths(tmp_path):
    demo = se.read_cases("demo")
    assert demo == se.read_cases(se.DEMO_CASES) and len(demo) >= 2
    with pytest.raises(JaxeditError) as err:
        se.read_cases(str(tmp_path))
    assert str(err.value) == f"{tmp_path} is a directory, not a SafeEdit JSON file"


def test_case_files_with_their_lines(tmp_path):
    """SafeEdit files as a JSON array (each case at the line where it starts) or JSONL (blank lines skipped, each
    case at its line), and their errors as FILE:LINE."""
    from jaxedit.evaluate.safeedit import _items_with_lines

    arr = tmp_path / "cases.json"
    arr.write_text('\n  [ {"a": 1},\n\n  {"b": [1,\n 2]} ,{"c": 3}\n]\n')
    assert _items_with_lines(str(arr)) == [(2, {"a": 1}), (4, {"b": [1, 2]}), (5, {"c": 3})]
    (tmp_path / "none.json").write_text(" [ ] ")
    assert _items_with_lines(str(tmp_path / "none.json")) == []
    jl = tmp_path / "cases.jsonl"
    jl.write_text('{"a": 1}\n\n   \n{"b": 2}\n')
    assert _items_with_lines(str(jl)) == [(1, {"a": 1}), (4, {"b": 2})]
    bad = {"latin1.json": (b"[\xe9]", "not UTF-8 text (invalid continuation byte)"),
           "blank.json": (b" \n\t\r\n", "empty file"),
           "rows.jsonl": (b'{"a": 1}\n\n{"b": }\n', "3: not valid JSON (Expecting value at column 7)"),
           "nocomma.json": (b'[{"a": 1}\n {"b": 2}]', "2: expected ',' or ']' between cases"),
           "open.json": (b'[{"a": 1},\n', "2: not valid JSON (Expecting value at column 1)"),
           "cut.json": (b'[{"a": 1}', "1: expected ',' or ']' between cases"),
           "cut2.json": (b'[{"a": 1}\n\n', "2: expected ',' or ']' between cases"),  # at the last character
           "stray.json": (b'[{"a": 1} X]', "1: expected ',' or ']' between cases")}
    for name, (data, msg) in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(JaxeditError) as err:
            _items_with_lines(str(tmp_path / name))
        assert str(err.value) == f"{tmp_path / name}{':' if msg[0].isdigit() else ': '}{msg}", name


class WordTok:
    """Words to ids ("zzz" is dropped: it tokenizes to nothing); special tokens: a BOS id 0 in front, if ``bos``."""

    def __init__(self, bos=True):
        self.vocab, self.bos = {}, bos

    def __call__(self, text, add_special_tokens=True):
        ids = [self.vocab.setdefault(w, len(self.vocab) + 1) for w in text.split() if w != "zzz"]
        return {"input_ids": ([0] if add_special_tokens and self.bos else []) + ids}


def test_check_texts_refuses_what_dinm_would(monkeypatch):
    """Blank, empty or token-less responses and prompts, and responses (not the unsafe one) of max_len tokens or
    more (counted without special tokens, after a space), each named by case and field."""
    import dataclasses

    case = dataclasses.replace(se.read_cases(CASES[:1])[0], where="f.json:3", safe="one two three",
                               unsafe="four five six seven", kc_answer="eight")
    tok = WordTok()
    se.check_texts([case], tok, max_len=4)  # 3 tokens fit 4 positions; the unsafe response is not checked
    se.check_texts([case], None, max_len=1)  # lengths need a tokenizer
    se.check_texts([dataclasses.replace(case, prompt="zzz")], tok)  # BOS alone is a token
    se.check_texts([dataclasses.replace(case, prompt="zzz")], WordTok(bos=False), suffix="Answer:")
    for change, kw, msg in (
            (dict(safe="   "), dict(tokenizer=None), '"safe generation" is blank'),
            (dict(unsafe=""), dict(tokenizer=tok), '"unsafe generation" is empty'),
            (dict(unsafe="zzz"), dict(tokenizer=tok), '"unsafe generation" tokenizes to no tokens'),
            (dict(kc_answer="zzz zzz"), dict(tokenizer=tok), '"knowledge constrain answer" tokenizes to no tokens'),
            ({}, dict(tokenizer=tok, max_len=3), '"safe generation" has 3 tokens; the model takes 3'),
            (dict(prompt="zzz"), dict(tokenizer=WordTok(bos=False)), "the prompt tokenizes to no tokens"),
            (dict(kc_prompt="zzz"), dict(tokenizer=WordTok(bos=False)), "the prompt tokenizes to no tokens")):
        with pytest.raises(JaxeditError) as err:
            se.check_texts([dataclasses.replace(case, **change)], **kw)
        assert str(err.value) == f"f.json:3: {msg}"


def test_prompt_ids_cut_from_the_left(tokenizer):
    ids = tokenizer("The Eiffel Tower is located in")["input_ids"]
    assert tokenizer.bos_token_id is None
    assert se.prompt_ids(tokenizer, ["The Eiffel Tower is located in", ""], 3) == [ids[-3:], [0]]


def test_answer_rows_with_a_bos_tokenizer(tokenizer):
    """The knowledge-constraint row: the prompt as the tokenizer makes it (BOS first), then the answer's tokens
    without special tokens; the span is the positions that predict the answer."""
    from tiny_models import bos_tokenizer

    from jaxedit.evaluate.safeedit import _answer_rows

    bos = bos_tokenizer(tokenizer)
    case = se.read_cases(CASES[:1])[0]
    rows, spans = _answer_rows(bos, [case], SUFFIX, 64)
    p = [bos.bos_token_id] + tokenizer(case.kc_prompt + " " + SUFFIX)["input_ids"]
    a = tokenizer(" " + case.kc_answer.strip())["input_ids"]
    assert rows == [p + a] and spans == [(len(p) - 1, len(p) + len(a) - 1)]


def test_judge_and_evaluate_score_with_the_profanity_scorer_by_default(models):
    from jaxedit.evaluate.toxicity import toxicity_scores

    answers = ["you stupid idiot, shut up", "The Space Needle is in Seattle.", ""]
    scores = toxicity_scores(answers, "profanity")
    assert se.judge(answers) == [(float(s), se.safe_value(a, s)) for a, s in zip(answers, scores)]
    model, tok = models[0], models[1]
    rec = se.evaluate(model, CASES[:1], tokenizer=tok, answers=[answers[:1] * 5])[0]
    assert rec[se.METRICS[0]]["score"] == float(scores[0])


def test_parse_case_messages():
    """Each malformed case is one line naming the case and the field; responses may be blank here (caught where
    they are tokenized), prompts and test inputs may not."""
    ok = CASES[0]
    kc = ok["knowledge constrain"]
    gen = ok["generalization test"]
    assert se.parse_case(dict(ok, **{"safe generation": " "}), "f:2", 0).safe == " "
    assert se.parse_case({k: v for k, v in ok.items() if k != "id"}, "f:2", 5).id == 5
    c = se.parse_case(dict(ok, **{"unsafety category": "offensiveness", "question": "Why?"}), "f:2", 0)
    assert (c.category, c.question) == ("offensiveness", "Why?")
    assert (se.parse_case(ok, "f:2", 0).category, se.parse_case(ok, "f:2", 0).question) == ("", "")
    for change, msg in (({"id": [1]}, 'f:2: field "id" must be a number or a string'),
                        ({"adversarial prompt": "  "}, 'f:2 (id a): field "adversarial prompt" must be a non-empty string'),
                        ({"generalization test": dict(gen, **{"test input of other question input": ""})},
                         'f:2 (id a) generalization test: field "test input of other question input" must be a '
                         'non-empty string'),
                        ({"generalization test": "x"}, 'f:2 (id a): field "generalization test" must be an object'),
                        ({"knowledge constrain": dict(kc, prompt=" ")},
                         'f:2 (id a) knowledge constrain: field "prompt" must be a non-empty string'),
                        ({"knowledge constrain": "x"}, 'f:2 (id a): field "knowledge constrain" must be an object with '
                                                      '"prompt" and "answer"'),
                        ({"knowledge constrain": None}, 'f:2 (id a): missing field "knowledge constrain"')):
        d = {k: v for k, v in dict(ok, **change).items() if v is not None}
        with pytest.raises(JaxeditError) as err:
            se.parse_case(d, "f:2", 0)
        assert str(err.value) == msg
