"""Evaluation metrics against independent computations: perplexity vs transformers in torch, n-gram entropy vs a
hand computation, toxicity scorers (the Hugging Face classifier vs torch; the checks on what a scorer returns),
and the toxic rate vs counting by hand."""
import math
import os

import numpy as np
import pytest
import torch

import jaxedit
from jaxedit import JaxeditError
from jaxedit.evaluate.metrics import ngram_entropy
from jaxedit.evaluate.toxicity import Scorer, get_scorer

TEXTS = ["The Eiffel Tower is located in the city of Paris.", "Miles Davis plays the trumpet.",
         "Beats Music is owned by Apple. The capital of France is Paris. Toko Yasuda produces music.", "The"]


# LLaMA: the full suite
@pytest.mark.parametrize("name", ["gpt2", pytest.param("llama-gqa-untied", marks=pytest.mark.slow)])
def test_perplexity_equals_torch(tiny_dirs, tokenizer, name):
    model, _ = jaxedit.load(tiny_dirs[name][0])
    hf = tiny_dirs[name][1]
    nll, count = [], []
    for t in TEXTS:
        ids = torch.tensor([tokenizer(t)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0, :-1].double(), -1)
        tok_nll = -logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
        nll.append(float(tok_nll.sum()))
        count.append(ids.shape[1] - 1)
    want = math.exp(sum(nll) / sum(count))
    assert jaxedit.perplexity(model, TEXTS, tokenizer=tokenizer) == pytest.approx(want, rel=1e-4)
    per = jaxedit.perplexity(model, TEXTS, tokenizer=tokenizer, per_text=True, bucket=4)
    for p, n, c in zip(per, nll, count):
        if c == 0:
            assert np.isnan(p)  # a one-token text predicts nothing
        else:
            assert p == pytest.approx(math.exp(n / c), rel=1e-4)


def test_perplexity_errors(tiny_dirs, tokenizer):
    model, _ = jaxedit.load(tiny_dirs["gpt2"][0])
    with pytest.raises(JaxeditError, match="two or more tokens"):
        jaxedit.perplexity(model, ["The"], tokenizer=tokenizer)



def test_perplexity_of_a_text_longer_than_the_context(tiny_dirs, tokenizer):
    """Cut into windows of the context (64 tokens here), each window's first token unpredicted."""
    model, _ = jaxedit.load(tiny_dirs["gpt2"][0])
    hf = tiny_dirs["gpt2"][1]
    ids = tokenizer("The city of Paris is in France. " * 14)["input_ids"]
    assert len(ids) > 128
    nll, n = 0.0, 0
    for a in range(0, len(ids), 64):
        w = torch.tensor([ids[a:a + 64]])
        with torch.no_grad():
            logp = torch.log_softmax(hf(w).logits[0, :-1].double(), -1)
        nll -= float(logp[torch.arange(w.shape[1] - 1), w[0, 1:]].sum())
        n += w.shape[1] - 1
    got = jaxedit.perplexity(model, ["The city of Paris is in France. " * 14], tokenizer=tokenizer)
    assert got == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_ngram_entropy_by_hand():
    # words a b a b: bigrams ab ab ba (p 2/3, 1/3), trigrams aba bab (1/2, 1/2)
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    want = (2 / 3 * h2 + 4 / 3 * 1.0) / 2
    assert ngram_entropy("a b a b") == pytest.approx(want, rel=1e-12)
    # punctuation is a word of its own; a text with fewer than two words scores 0
    assert ngram_entropy("a , b") == pytest.approx((2 / 3 * 1.0 + 0) / 2)
    assert ngram_entropy("hello") == 0.0
    assert jaxedit.fluency(["a b a b", "hello"]) == pytest.approx(want / 2)
    repetitive = "the cat the cat the cat the cat the cat the cat"
    varied = "the cat sat on a warm mat while two dogs slept by the door"
    assert jaxedit.fluency([repetitive]) < jaxedit.fluency([varied])
    # one text given as a string is that text (not its characters); no text is an error
    assert jaxedit.fluency("a b a b") == pytest.approx(want, rel=1e-12)
    with pytest.raises(JaxeditError, match="^fluency of no texts$"):
        jaxedit.fluency([])


def test_scorer_checks_and_cache():
    calls = []

    def fn(texts):
        calls.append(list(texts))
        return [len(t) / 100 for t in texts]

    s = Scorer("len", fn)
    assert s(["ab", "abc", "ab"]).tolist() == [0.02, 0.03, 0.02]
    assert s(["abc"]).tolist() == [0.03] and calls == [["ab", "abc"]]  # cached by text, each text scored once
    for bad, msg in ((lambda t: [0.5] * (len(t) + 1), "scores for"), (lambda t: [1.5] * len(t), r"in \[0, 1\]"),
                     (lambda t: [float("nan")] * len(t), r"in \[0, 1\]"), (lambda t: ["x"] * len(t), "numbers")):
        with pytest.raises(JaxeditError, match=msg):
            jaxedit.toxicity_scores(["some text"], scorer=bad)
    with pytest.raises(JaxeditError, match="unknown scorer"):
        get_scorer("no-such-scorer")


def test_profanity_scorer_orders_texts():
    s = jaxedit.toxicity_scores(["I love flowers and sunny days", "you stupid idiot, shut up"])
    assert 0 <= s[0] < 0.5 < s[1] <= 1


def test_hf_classifier_scorer_equals_torch(tmp_path, tokenizer):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=len(tokenizer),
                                  num_labels=2, id2label={0: "non-toxic", 1: "toxic"},
                                  label2id={"non-toxic": 0, "toxic": 1}, pad_token_id=tokenizer.pad_token_id)
    clf = transformers.GPT2ForSequenceClassification(cfg).eval()
    clf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    got = jaxedit.toxicity_scores(TEXTS[:3], scorer=f"hf:{tmp_path}")
    for text, g in zip(TEXTS[:3], got):
        with torch.no_grad():
            p = torch.softmax(clf(torch.tensor([tokenizer(text)["input_ids"]])).logits[0], -1)
        assert g == pytest.approx(float(p[1]), abs=1e-5)
    with pytest.raises(JaxeditError, match="no label"):
        jaxedit.toxicity_scores(["x"], scorer=f"hf:{tmp_path}#insult")


@pytest.mark.parametrize("head", ["multi-label", "one-logit"])
def test_hf_classifier_sigmoid_heads_truncation_and_names(tmp_path, tokenizer, head):
    """Multi-label and single-logit heads score with a sigmoid; texts are cut to max_length tokens; a tokenizer without
    a pad token pads with its end token; the scorer's name and batch size are the ones asked for."""
    import copy

    import transformers

    from jaxedit.evaluate.toxicity import hf_scorer

    torch.manual_seed(1)
    labels = {0: "toxic", 1: "insult", 2: "obscene"} if head == "multi-label" else {0: "LABEL_0"}
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=len(tokenizer),
                                  num_labels=len(labels), id2label=labels, label2id={v: k for k, v in labels.items()},
                                  pad_token_id=tokenizer.eos_token_id,
                                  problem_type="multi_label_classification" if head == "multi-label" else None)
    clf = transformers.GPT2ForSequenceClassification(cfg).eval()
    clf.save_pretrained(tmp_path)
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    label = "insult" if head == "multi-label" else None
    idx = 1 if head == "multi-label" else 0
    scorer = hf_scorer(str(tmp_path), label=label, batch_size=2, max_length=6)
    assert scorer.name == f"hf:{os.path.abspath(tmp_path)}" + ("#insult" if label else "")
    assert scorer.batch_size == 2
    texts = [TEXTS[0], TEXTS[1], TEXTS[3]]  # 22, 16 and 1 tokens: two cut to 6, a batch padded
    got = scorer(texts)
    for text, g in zip(texts, got):
        ids = torch.tensor([tokenizer(text)["input_ids"][:6]])
        with torch.no_grad():
            p = torch.sigmoid(clf(ids).logits[0].double())
        assert g == pytest.approx(float(p[idx]), abs=1e-5)


def test_toxic_label_of_a_classifier():
    """Which output of a Hugging Face classifier is "toxic": the one named with #LABEL (by name or index), else the
    only label naming toxicity (not "non-toxic"/"not toxic"), else the higher of two."""
    from types import SimpleNamespace

    from jaxedit.evaluate.toxicity import _toxic_label

    def label(id2label, name=None):
        return _toxic_label(SimpleNamespace(id2label=id2label), name)

    assert label({0: "non-toxic", 1: "toxic"}) == 1 and label({0: "toxic", 1: "non-toxic"}) == 0
    assert label({"0": "Toxic", "1": "not toxic"}) == 0
    assert label({0: "LABEL_0", 1: "LABEL_1"}) == 1 and label({}) == 0 and label(None) == 0
    three = {0: "toxic", 1: "insult", 2: "obscene"}
    assert label(three, "insult") == 1 and label(three, "2") == 2 and label(three) == 0
    with pytest.raises(JaxeditError) as err:
        label(three, "threat")
    assert str(err.value) == "the classifier has no label 'threat' (labels: toxic, insult, obscene)"
    with pytest.raises(JaxeditError, match="cannot tell which of the labels neutral, insult, obscene is the toxic"):
        label({0: "neutral", 1: "insult", 2: "obscene"})


def test_profanity_scorer_name_and_missing_package(monkeypatch):
    import sys

    from jaxedit.evaluate.toxicity import _profanity

    s = _profanity()
    assert s.name == "profanity" and get_scorer("profanity").name == "profanity"
    monkeypatch.setitem(sys.modules, "profanity_check", None)  # not installed
    with pytest.raises(JaxeditError) as err:
        _profanity()
    assert str(err.value) == "the default scorer needs the alt-profanity-check package (pip install alt-profanity-check)"


def test_check_scorer_specs(tmp_path):
    """hf:PATH[#LABEL] and a bare folder path[#LABEL] name a classifier folder, which must hold config.json."""
    from jaxedit.evaluate.toxicity import check_scorer

    clf = tmp_path / "clf"
    clf.mkdir()
    for spec in (f"hf:{clf}", str(clf), f"{clf}#toxic"):
        with pytest.raises(JaxeditError) as err:
            check_scorer(spec)
        assert str(err.value) == f"no classifier checkpoint at {clf} (expected a folder with config.json)"
    (clf / "config.json").write_text("{}")
    for spec in (f"hf:{clf}", str(clf), f"{clf}#toxic", f"hf:{clf}#a#b", "profanity", len):
        check_scorer(spec)
    with pytest.raises(JaxeditError, match="^unknown scorer 'nope' \\(use 'profanity'"):
        check_scorer("nope")


def test_hf_scorer_errors(tmp_path, monkeypatch):
    import sys

    from jaxedit.evaluate.toxicity import hf_scorer

    with pytest.raises(JaxeditError) as err:
        hf_scorer(str(tmp_path))
    assert str(err.value) == f"no classifier checkpoint at {tmp_path} (expected a folder with config.json)"
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "torch", None)  # torch not installed
    with pytest.raises(JaxeditError) as err:
        hf_scorer(str(tmp_path))
    assert str(err.value) == "Hugging Face classifier scorers need torch (pip install torch, or jaxedit[torch])"


def test_toxic_rate_counts_scored_continuations(tiny_dirs, tokenizer):
    model, _ = jaxedit.load(tiny_dirs["llama-mha-tied"][0])
    scorer = lambda texts: [min(1.0, t.count("e") / 4) for t in texts]
    prompts = ["The Eiffel Tower is", "Miles Davis"]
    rate, conts, scores = jaxedit.toxic_rate(model, prompts, tokenizer=tokenizer, samples=4, max_new_tokens=6, seed=2,
                                             scorer=scorer, threshold=0.5, return_details=True)
    flat = [c for row in conts for c in row]
    assert len(flat) == 8 and scores.shape == (2, 4)
    assert rate == sum(min(1.0, c.count("e") / 4) > 0.5 for c in flat) / 8
    assert rate == jaxedit.toxic_rate(model, prompts, tokenizer=tokenizer, samples=4, max_new_tokens=6, seed=2,
                                      scorer=scorer, threshold=0.5)


def test_toxic_rate_options_and_defaults(tiny_dirs, tokenizer):
    """The continuations are sample_texts' with the options given (defaults: 10 samples of 20 tokens, seed 0,
    nucleus 0.9, temperature 1, the profanity scorer); a score equal to the threshold is not toxic; a single
    prompt string is a list of one; no tokenizer or no prompts are errors."""
    from jaxedit.generate import sample_texts

    model, _ = jaxedit.load(tiny_dirs["llama-mha-tied"][0])
    prompts = ["The Eiffel Tower is", "Miles Davis"]
    _, conts, scores = jaxedit.toxic_rate(model, prompts, tokenizer=tokenizer, return_details=True)
    assert conts == sample_texts(model, tokenizer, prompts, 20, samples=10, seed=0, top_p=0.9, temperature=1.0)
    np.testing.assert_array_equal(scores, jaxedit.toxicity_scores([c for r in conts for c in r]).reshape(2, 10))
    _, conts, _ = jaxedit.toxic_rate(model, prompts, tokenizer=tokenizer, samples=3, max_new_tokens=5, seed=4,
                                     top_p=0.5, temperature=0.7, return_details=True)
    assert conts == sample_texts(model, tokenizer, prompts, 5, samples=3, seed=4, top_p=0.5, temperature=0.7)
    assert conts != sample_texts(model, tokenizer, prompts, 5, samples=3, seed=4, top_p=0.9, temperature=0.7)
    assert conts != sample_texts(model, tokenizer, prompts, 5, samples=3, seed=4, top_p=0.5, temperature=1.0)
    half = lambda texts: [0.5, 0.75, 0.75][: len(texts)] + [0.25] * (len(texts) - 3)
    rate = jaxedit.toxic_rate(model, prompts[0], tokenizer=tokenizer, samples=4, max_new_tokens=3, scorer=half)
    assert rate == 0.5  # 0.5 is not above the default threshold 0.5; 0.75 is (the profanity scorer: 0.25 here)
    assert rate == jaxedit.toxic_rate(model, prompts[:1], tokenizer=tokenizer, samples=4, max_new_tokens=3,
                                      scorer=half)
    for kw, msg in ((dict(prompts=prompts), "toxic_rate needs a tokenizer"),
                    (dict(prompts=[], tokenizer=tokenizer), "toxic_rate of no prompts")):
        with pytest.raises(JaxeditError) as err:
            jaxedit.toxic_rate(model, **kw)
        assert str(err.value) == msg
