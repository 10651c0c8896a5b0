"""The public API as a new user meets it: one calling convention (``fn(model, data, *, tokenizer=...)``, the old
positional forms refused with the call to write), one vocabulary for the key statistics (aliases accepted, unknown
names answered with the closest), CounterFact / zsRE records accepted by edit_sequential, and progress from Python
(status lines and the heartbeat on stderr; ``progress=False`` and ``jaxedit.set_progress(False)`` silence them)."""
import copy
import time

import numpy as np
import pytest

import jaxedit
from jaxedit import runtime
from jaxedit.calls import CallError, check_names, public
from jaxedit.edit.memit import EditHparams, hparams_for
from jaxedit.edit.sequential import as_requests, dataset_requests
from jaxedit.errors import JaxeditError
from test_editing import random_stats

CF = [{"case_id": 7, "requested_rewrite": {"prompt": "{} plays the", "subject": "Miles Davis",
                                           "target_new": {"str": "guitar"}, "target_true": {"str": "trumpet"}},
       "paraphrase_prompts": ["Miles Davis is known for the"], "neighborhood_prompts": ["John Coltrane plays the"]}]
ZSRE = [{"subject": "Eiffel Tower", "src": "Where is Eiffel Tower?", "answers": ["Rome"], "rephrase": "Eiffel Tower "
         "is in which city?", "loc": "nq question: who wrote it", "loc_ans": "Paris"}]


@pytest.fixture(scope="module")
def gpt2(tiny_dirs):
    return jaxedit.load(tiny_dirs["gpt2"][0])


def test_old_positional_forms_are_refused_with_the_new_call(gpt2):
    model, tok = gpt2
    req = [{"prompt": "{} plays the", "subject": "Miles Davis", "target": " guitar"}]
    cases = [
        (lambda: jaxedit.memit(model, req, tok),
         "jaxedit.memit: only the model and the requests are positional; call jaxedit.memit(model, requests, "
         "tokenizer=tokenizer, ...)"),
        (lambda: jaxedit.memit(model, req, [1], tok),
         "jaxedit.memit: only the model and the requests are positional; call jaxedit.memit(model, requests, "
         "layers=..., tokenizer=tokenizer, ...)"),
        (lambda: jaxedit.alphaedit(model, req, tok),
         "jaxedit.alphaedit: only the model and the requests are positional; call jaxedit.alphaedit(model, "
         "requests, tokenizer=tokenizer, ...)"),
        (lambda: jaxedit.delete(model, req, [1], 0.5),
         "jaxedit.delete: only the model and the requests are positional; call jaxedit.delete(model, requests, "
         "layers=..., kl_weight=..., ...)"),
        (lambda: jaxedit.layer_stats(model, tok, [1]),
         "jaxedit.layer_stats: the tokenizer goes by keyword, after the layers; call jaxedit.layer_stats(model, "
         "layers, tokenizer=tokenizer, ...)"),
        (lambda: jaxedit.counterfact_eval(model, CF, tok),
         "jaxedit.counterfact_eval: only the model and the records are positional; call "
         "jaxedit.counterfact_eval(model, records, tokenizer=tokenizer, ...)"),
        (lambda: jaxedit.zsre_eval(model, ZSRE, tok),
         "jaxedit.zsre_eval: only the model and the records are positional; call jaxedit.zsre_eval(model, "
         "records, tokenizer=tokenizer, ...)"),
        (lambda: jaxedit.profs(model, [("a", "b")], tok),
         "jaxedit.profs: only the model and the pairs are positional; call jaxedit.profs(model, pairs, "
         "tokenizer=tokenizer, ...)"),
        (lambda: jaxedit.dinm(model, "demo", tok),
         "jaxedit.dinm: only the model and the cases are positional; call jaxedit.dinm(model, cases, "
         "tokenizer=tokenizer, ...)"),
        (lambda: jaxedit.perplexity(model, ["a text"], tok),
         "jaxedit.perplexity: only the model and the texts are positional; call jaxedit.perplexity(model, texts, "
         "tokenizer=tokenizer, ...)"),
        (lambda: jaxedit.edit_sequential(model, tok),
         "jaxedit.edit_sequential: the tokenizer goes by keyword, after the requests; call "
         "jaxedit.edit_sequential(model, requests, tokenizer=tokenizer, ...)"),
    ]
    from jaxedit.detox import DetoxConfig, run_study

    cases.append((lambda: run_study(model, tok, DetoxConfig(prompts="demo"), "out"),
                  "jaxedit.detox.run_study: the tokenizer goes by keyword, after the cfg, out; call "
                  "jaxedit.detox.run_study(model, cfg, out, tokenizer=tokenizer, ...)"))
    for call, msg in cases:
        with pytest.raises(CallError) as err:
            call()
        assert str(err.value) == msg
        assert isinstance(err.value, TypeError) and isinstance(err.value, JaxeditError)


def test_signatures_follow_one_convention():
    """Every editing, evaluation and statistics function: the model, one data positional, the rest keyword-only,
    tokenizer among them (inspect sees the real signature through the decorator)."""
    import inspect

    from jaxedit.evaluate import safeedit

    fns = {"memit": "requests", "delete": "requests", "alphaedit": "requests", "edit_sequential": "requests",
           "layer_stats": "layers", "counterfact_eval": "records", "zsre_eval": "records", "profs": "pairs",
           "dinm": "cases", "dinm_locate": "cases", "perplexity": "texts", "toxic_rate": "prompts"}
    for name, data in fns.items():
        params = list(inspect.signature(getattr(jaxedit, name)).parameters.values())
        assert [p.name for p in params[:2]] == ["model", data], name
        assert all(p.kind in (p.POSITIONAL_OR_KEYWORD,) for p in params[:2]), name
        assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in params[2:]), name
        assert "tokenizer" in [p.name for p in params[2:]], name
    params = list(inspect.signature(safeedit.evaluate).parameters)
    assert params[:3] == ["model", "cases", "tokenizer"] and jaxedit.evaluate_safeedit is safeedit.evaluate


def test_statistics_vocabulary_and_aliases(gpt2, tmp_path):
    """corpus / stats_samples / max_len in layer_stats and the editing hyperparameters; the MEMIT paper's mom2_*
    names are aliases that give the same statistics (the cached file, from the first call); unknown names are
    answered with the closest valid ones."""
    model, tok = gpt2
    kw = dict(corpus="model", max_len=12, batch_size=2, cache_dir=str(tmp_path), progress=False)
    a = jaxedit.layer_stats(model, [1], tokenizer=tok, stats_samples=3, **kw)
    b = jaxedit.layer_stats(model, [1], tokenizer=tok, mom2_samples=3, **kw)
    c = jaxedit.layer_stats(model, [1], tokenizer=tok, stats_samples=4, **kw)
    np.testing.assert_array_equal(a[1], b[1])
    assert a.source["samples"] == b.source["samples"] == 3 and c.source["samples"] == 4
    assert np.abs(a[1] - c[1]).max() > 0  # the count is honoured, not ignored
    hp = hparams_for(model.config, mom2_corpus="model", mom2_samples=5, mom2_max_len=9, mom2_precision="float64")
    assert (hp.corpus, hp.stats_samples, hp.max_len, hp.stats_precision) == ("model", 5, 9, "float64")
    assert hparams_for(model.config, corpus="model", stats_samples=5, max_len=9) == hp.replace(
        stats_precision="float32")
    with pytest.raises(JaxeditError) as err:
        EditHparams(layers=(1,)).replace(corpuss="model")
    assert str(err.value) == "unknown hyperparameter 'corpuss' (did you mean corpus?)"
    with pytest.raises(JaxeditError) as err:
        jaxedit.layer_stats(model, [1], tokenizer=tok, n_sample=3, **kw)
    assert str(err.value) == "unknown argument 'n_sample' (did you mean stats_samples?)"
    with pytest.raises(JaxeditError) as err:
        check_names({"corpus": 1, "mom2_corpus": 2}, ["corpus"], {"mom2_corpus": "corpus"})
    assert str(err.value) == "hyperparameter 'corpus' given twice (as corpus and an alias)"


def test_edit_sequential_takes_counterfact_and_zsre_records(gpt2):
    """Records become the requests the published evaluations edit (the target after a space), and editing the
    records gives the same weights as editing those requests."""
    model, tok = gpt2
    assert as_requests(CF) == dataset_requests(CF, "counterfact") == [
        {"prompt": "{} plays the", "subject": "Miles Davis", "target": " guitar", "case_id": 7}]
    assert as_requests(ZSRE) == [{"prompt": "Where is {}?", "subject": "Eiffel Tower", "target": " Rome",
                                  "case_id": 0}]
    mixed = as_requests([CF[0], {"prompt": "x {}", "subject": "y", "target": " z"}])
    assert mixed[1] == {"prompt": "x {}", "subject": "y", "target": " z"}
    bad = copy.deepcopy(CF)
    del bad[0]["requested_rewrite"]["subject"]
    with pytest.raises(JaxeditError, match=r"^requests\[0\] \(counterfact record\): missing or malformed field"):
        as_requests(bad)
    kw = dict(tokenizer=tok, method="memit", batch_size=1, layers=[1], stats=random_stats(model.config, [1]),
              v_num_grad_steps=2, context_prefixes=(), progress=False)
    a, _ = jaxedit.edit_sequential(model, CF, **kw)
    b, _ = jaxedit.edit_sequential(model, dataset_requests(CF, "counterfact"), **kw)
    wa, wb = (np.asarray(jaxedit.params_of(m)["blocks"]["w_out"]) for m in (a, b))
    np.testing.assert_array_equal(wa, wb)
    assert np.abs(wa - np.asarray(jaxedit.params_of(model)["blocks"]["w_out"])).max() > 0


@public("items")
def _slow_public(model, items, *, progress=True, wait_for=None):
    runtime.stage("working on it")
    deadline = time.monotonic() + 60
    while wait_for is not None and not wait_for() and time.monotonic() < deadline:
        time.sleep(0.01)
    runtime.stage("done")
    return items


def test_progress_from_python(monkeypatch, capfd):
    """Used from Python the library prints its status lines to stderr, and the heartbeat runs while a public call
    lasts (and stops with it); progress=False and jaxedit.set_progress(False) silence both."""
    monkeypatch.setattr(runtime, "_explicit", False)
    monkeypatch.setattr(runtime, "_reporter", None)
    monkeypatch.setitem(runtime._library, "on", True)
    monkeypatch.setenv(runtime.HEARTBEAT_ENV, "0.05")
    seen = []

    def beat_seen():  # the heartbeat's line, read as it reaches stderr
        seen.append(capfd.readouterr().err)
        return "still working" in "".join(seen)

    _slow_public(None, [1], wait_for=beat_seen)
    seen.append(capfd.readouterr().err)
    err = "".join(seen)
    assert "working on it\n" in err and "done\n" in err
    assert "... still working" in err and "since: working on it" in err
    assert runtime._activity["every"] == 0  # the heartbeat stopped with the call
    _slow_public(None, [1], progress=False)
    assert capfd.readouterr().err == ""
    jaxedit.set_progress(False)
    try:
        _slow_public(None, [1])
        assert capfd.readouterr().err == ""
    finally:
        jaxedit.set_progress(True)
    _slow_public(None, [1])
    assert capfd.readouterr().err == "working on it\ndone\n"


@public("items")
def _quiet_public(model, items):  # no progress parameter of its own
    runtime.stage("working on it")
    return items


def test_every_public_call_takes_progress(monkeypatch, capfd):
    """progress= is accepted by every public function, also one without a parameter of that name (the wrapper
    takes it, and shows it in the signature)."""
    import inspect

    monkeypatch.setattr(runtime, "_explicit", False)
    monkeypatch.setattr(runtime, "_reporter", None)
    monkeypatch.setitem(runtime._library, "on", True)
    assert _quiet_public(None, [2], progress=False) == [2] and capfd.readouterr().err == ""
    assert _quiet_public(None, [2]) == [2] and "working on it" in capfd.readouterr().err
    names = [n for n in dir(jaxedit) if hasattr(getattr(jaxedit, n), "__wrapped__")]
    assert {"memit", "zsre_eval", "counterfact_eval", "ultraedit", "aura"} <= set(names)
    for n in names:
        params = inspect.signature(getattr(jaxedit, n)).parameters
        assert "progress" in params or any(p.kind == p.VAR_KEYWORD for p in params.values()), n
