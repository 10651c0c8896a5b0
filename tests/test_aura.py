"""AurA against independent computations: the AUROC against the pairwise definition (double loop, ties counted
half) in float64; the pooled responses against a float64 torch forward of the same tiny HF model with forward hooks
on the MLP modules and the authors' pooling (left-padded batch, padding set to NaN, NaN -> dtype min, max over the
tokens); the folded edit against the authors' dampening hooks (module output times alpha) on the torch model; the
edited weights by hand; save/load; the one-line errors."""
import copy

import numpy as np
import pytest
import torch

import jaxedit
from jaxedit import JaxeditError
from jaxedit.calls import CallError
from jaxedit.edit.aura import _responses, alpha_of, aura, auroc

TEXTS = [
    "The Eiffel Tower is located in the city of Paris.",
    "Miles Davis plays the trumpet.",
    "The Space Needle is in Seattle.",
    "Toko Yasuda produces the most amazing music on the guitar.",
    "Beats Music is owned by Apple.",
    "The capital of France is Paris. Miles Davis plays.",
    "music on the guitar",
    "Toko Yasuda produces music.",
    "The city of Seattle.",
    "Apple owns Beats Music. The trumpet.",
]
LABELS = [0, 1, 0, 1, 1, 0, 1, 0, 0, 1]


def pairwise_auroc(x, y):
    """P(x_pos > x_neg) + 0.5 P(x_pos == x_neg) over all (positive, negative) pairs, by a double loop."""
    pos = [float(v) for v, t in zip(x, y) if t == 1]
    neg = [float(v) for v, t in zip(x, y) if t == 0]
    s = 0.0
    for a in pos:
        for b in neg:
            s += 1.0 if a > b else (0.5 if a == b else 0.0)
    return s / (len(pos) * len(neg))


def test_auroc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    for n, levels in ((7, 3), (20, 4), (31, 1000), (12, 1)):
        y = np.r_[np.ones(3), np.zeros(n - 3)].astype(int)
        rng.shuffle(y)
        x = rng.integers(0, levels, size=(n, 6)).astype(np.float64)  # few levels: many ties
        got = auroc(x, y)
        ref = [pairwise_auroc(x[:, u], y) for u in range(x.shape[1])]
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-15)
    assert auroc(np.array([1.0, 2, 3, 4]), [0, 0, 1, 1])[0] == 1.0
    assert auroc(np.array([4.0, 3, 2, 1]), [0, 0, 1, 1])[0] == 0.0
    np.testing.assert_array_equal(alpha_of([0.2, 0.5, 0.75, 1.0]), [1.0, 1.0, 0.5, 0.0])


def _mlp_modules(hf, l):
    """{module name: (torch module, "in" or "out")}: where the unit lives in transformers' layer l."""
    if hf.config.model_type == "gpt2":
        m = hf.transformer.h[l].mlp
        return {"keys": (m.c_proj, "in"), "up": (m.c_fc, "out"), "out": (m.c_proj, "out")}
    m = hf.model.layers[l].mlp
    return {"keys": (m.down_proj, "in"), "up": (m.up_proj, "out"), "gate": (m.gate_proj, "out"),
            "out": (m.down_proj, "out")}


def torch_pooled(hf, tok, texts, module, layers, pooling="max"):
    """[len(layers), N, units] float64: the authors' responses: one left-padded batch, forward hooks on the
    module, padding -> NaN -> the dtype's min, max over the tokens ("mean": over the real tokens)."""
    hf = copy.deepcopy(hf).double()
    t = copy.copy(tok)
    t.padding_side = "left"
    enc = t(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
    mask = enc["attention_mask"]
    assert mask.sum() < mask.numel()  # the batch pads
    got, handles = {}, []
    for l in layers:
        mod, where = _mlp_modules(hf, l)[module]
        handles.append(mod.register_forward_hook(
            lambda m, i, o, l=l, where=where: got.__setitem__(l, (i[0] if where == "in" else o).detach().clone())))
    try:
        with torch.no_grad():  # positions counted from each text's first real token
            hf(input_ids=enc["input_ids"], attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
    finally:
        for h in handles:
            h.remove()
    out = []
    for l in layers:
        h = got[l]
        if pooling == "max":
            h[~mask.bool()] = torch.nan
            out.append(h.nan_to_num(torch.finfo(h.dtype).min).max(dim=1).values.numpy())
        else:
            m = mask[..., None].double()
            out.append(((h * m).sum(1) / m.sum(1)).numpy())
    return np.stack(out)


@pytest.fixture(scope="module")
def loaded(tiny_dirs):
    return {name: jaxedit.load(tiny_dirs[name][0]) for name in ("gpt2", "llama-gqa-untied")}


@pytest.mark.parametrize("name,module", [("gpt2", "keys"), ("gpt2", "up"), ("gpt2", "out"),
                                         ("llama-gqa-untied", "keys"), ("llama-gqa-untied", "up"),
                                         ("llama-gqa-untied", "gate")])
@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_pooled_responses_and_auroc_match_torch(tiny_dirs, tokenizer, loaded, name, module, pooling):
    model, tok = loaded[name]
    layers = list(range(model.config.n_layers))
    rows = [list(r) for r in tok(TEXTS)["input_ids"]]
    params = jaxedit.params_of(model)
    with jaxedit.runtime.bar(len(rows), "t", enabled=False) as bar:
        got = _responses(model.config, params, rows, tok.pad_token_id, (module,), pooling, layers, 128, 4, bar)[module]
    ref = torch_pooled(tiny_dirs[name][1], tokenizer, TEXTS, module, layers, pooling)
    assert got.shape == ref.shape
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < 2e-5, err
    _, report = aura(model, TEXTS, LABELS, tokenizer=tok, module=module, pooling=pooling, progress=False)
    n1, n0 = sum(LABELS), len(LABELS) - sum(LABELS)
    ties = 0
    for k, l in enumerate(layers):
        mine = np.asarray(report["auroc"][l])
        # the AUROC of the responses themselves, ties included (max pooling ties texts whose maximum is at the same
        # first token), against the double loop
        own = np.array([pairwise_auroc(got[k][:, u], LABELS) for u in range(got.shape[2])])
        np.testing.assert_allclose(mine, own, rtol=0, atol=1e-12)
        ties += sum(len(np.unique(got[k][:, u])) < len(LABELS) for u in range(got.shape[2]))
        # against torch's float64 responses: a float32 rounding can break or make an exact tie (half a pair) or
        # swap a near-tie (one pair), on a few units only
        ref_auc = np.array([pairwise_auroc(ref[k][:, u], LABELS) for u in range(ref.shape[2])])
        assert np.mean(np.abs(mine - ref_auc) < 1e-9) > 0.8 and np.abs(mine - ref_auc).max() <= 1.0 / (n1 * n0) + 1e-12
        assert report["dampened"][l] == int((mine > 0.5).sum())
    if pooling == "max" and name == "gpt2":
        assert ties > 0  # real ties were exercised


def hooked_logits(hf, tok, texts, alphas):
    """The authors' intervention on the torch model: each hooked module's output (or, for "keys", the output
    projection's input) multiplied by its alpha; float64 logits [N][T, V] of each text alone."""
    hf = copy.deepcopy(hf).double()
    handles = []
    for (module, l), a in alphas.items():
        mod, where = _mlp_modules(hf, l)[module]
        a = torch.as_tensor(a, dtype=torch.float64)
        if where == "in":
            handles.append(mod.register_forward_pre_hook(lambda m, i, a=a: (i[0] * a,)))
        else:
            handles.append(mod.register_forward_hook(lambda m, i, o, a=a: o * a))
    try:
        with torch.no_grad():
            return [hf(input_ids=torch.tensor([ids])).logits[0].numpy() for ids in tok(texts)["input_ids"]]
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("name,module", [("gpt2", ("up", "out")), ("gpt2", "keys"),
                                         ("llama-gqa-untied", "keys"), ("llama-gqa-untied", ("gate", "up", "out"))])
def test_folded_edit_equals_the_authors_hooks(tiny_dirs, tokenizer, loaded, name, module):
    model, tok = loaded[name]
    edited, report = aura(model, TEXTS, LABELS, tokenizer=tok, module=module, layers=[0, 2], progress=False)
    modules = (module,) if isinstance(module, str) else module
    auc = report["auroc"] if isinstance(module, str) else None
    alphas = {}
    for m in modules:
        for l in (0, 2):
            a = alpha_of((auc if auc is not None else report["auroc"][m])[l])
            assert (a < 1).any()
            alphas[(m, l)] = a
    ref = hooked_logits(tiny_dirs[name][1], tokenizer, TEXTS[:3], alphas)
    plain = hooked_logits(tiny_dirs[name][1], tokenizer, TEXTS[:3], {})
    for ids, r, p in zip(tok(TEXTS[:3])["input_ids"], ref, plain):
        got = np.asarray(jaxedit.forward(edited, [ids]).logits[0], np.float64)
        assert np.abs(got - r).max() < 1e-4 * np.abs(r).max()
        assert np.abs(p - r).max() > 1e-3 * np.abs(r).max()  # the edit matters beyond the tolerance


def test_edited_rows_by_hand_and_save_load(loaded, tmp_path):
    model, tok = loaded["gpt2"]
    records = [{"text": t, "toxic": y} for t, y in zip(TEXTS, LABELS)]
    edited, report = aura(model, records, tokenizer=tok, layers=[1, 2], progress=False)
    assert report["layers"] == [1, 2] and report["pooling"] == "max" and report["module"] == "keys"
    assert report["texts"] == 10 and report["toxic"] == 5 and set(report["dampened"]) == {1, 2}
    p0, p1 = jaxedit.params_of(model)["blocks"], jaxedit.params_of(edited)["blocks"]
    w0, w1 = np.asarray(p0["w_out"], np.float64), np.asarray(p1["w_out"], np.float64)
    for l in (1, 2):
        a = alpha_of(report["auroc"][l])
        assert report["dampened"][l] == int((a < 1).sum()) > 0
        for j in range(w0.shape[1]):
            np.testing.assert_allclose(w1[l, j], w0[l, j] * a[j], rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(w1[0], w0[0])
    # min_auroc: only the units above the threshold, by the same alpha; "chance:Z" = 0.5 + Z sd of a chance AUROC
    sd = np.sqrt((5 + 5 + 1) / (12 * 5 * 5))
    for setting, m in ((0.7, 0.7), ("chance:1", 0.5 + sd)):
        e2, r2 = aura(model, records, tokenizer=tok, layers=[1, 2], progress=False, min_auroc=setting)
        assert r2["min_auroc"] == pytest.approx(m, abs=1e-12) and r2["chance_sd"] == pytest.approx(sd, abs=1e-12)
        w2 = np.asarray(jaxedit.params_of(e2)["blocks"]["w_out"], np.float64)
        for l in (1, 2):
            auc = np.asarray(report["auroc"][l])
            a = np.where(auc > m, 1 - 2 * (auc - 0.5), 1.0)
            assert r2["dampened"][l] == int((auc > m).sum()) < report["dampened"][l]
            np.testing.assert_allclose(w2[l], w0[l] * a[:, None], rtol=1e-6, atol=1e-9)
    for k in p0:
        if k != "w_out":
            np.testing.assert_array_equal(np.asarray(p0[k]), np.asarray(p1[k]))
    path = str(tmp_path / "aura")
    jaxedit.save(edited, path, tokenizer=tok)
    back, _ = jaxedit.load(path)
    ids = tok(TEXTS[:2])["input_ids"]
    for i in ids:
        np.testing.assert_array_equal(np.asarray(jaxedit.forward(back, [i]).logits),
                                      np.asarray(jaxedit.forward(edited, [i]).logits))


def test_bad_inputs_one_line(loaded):
    model, tok = loaded["gpt2"]
    cases = [
        (lambda: aura(model, TEXTS, [0, 1, 2] + LABELS[3:], tokenizer=tok), "label 2 is not 0 or 1"),
        (lambda: aura(model, TEXTS, [0.5] + LABELS[1:], tokenizer=tok), "is not 0 or 1"),
        (lambda: aura(model, TEXTS, LABELS[:-1], tokenizer=tok), "10 texts but 9 labels"),
        (lambda: aura(model, [""] + TEXTS[1:], LABELS, tokenizer=tok), "text 0: tokenizes to no tokens"),
        (lambda: aura(model, TEXTS, LABELS, tokenizer=tok, layers=[7]), "outside 0..2"),
        (lambda: aura(model, TEXTS, [1] + [0] * 9, tokenizer=tok), "at least 2 toxic texts (got 1)"),
        (lambda: aura(model, TEXTS, [1] * 9 + [0], tokenizer=tok), "at least 2 non-toxic texts (got 1)"),
        (lambda: aura(model, TEXTS, tokenizer=tok), "dict with 'text' and 'toxic'"),
        (lambda: aura(model, TEXTS, LABELS, tokenizer=tok, pooling="median"), "pooling must be"),
        (lambda: aura(model, TEXTS, LABELS, tokenizer=tok, module="gate"), "LLaMA-family"),
        (lambda: aura(model, TEXTS, LABELS, tokenizer=tok, poolin="max"), "did you mean pooling"),
        (lambda: aura(model, TEXTS, LABELS), "needs a tokenizer"),
        (lambda: aura(model, TEXTS, LABELS, tokenizer=tok, min_auroc=1.0), "min_auroc must be in [0.5, 1)"),
    ]
    for call, text in cases:
        with pytest.raises(JaxeditError) as e:
            call()
        msg = str(e.value)
        assert text in msg and "\n" not in msg, msg
    for call in (lambda: aura(model, tok, TEXTS), lambda: aura(model, TEXTS, tok),
                 lambda: aura(model, TEXTS, LABELS, tok)):
        with pytest.raises(CallError) as e:
            call()
        assert "tokenizer=tokenizer" in str(e.value) and "\n" not in str(e.value)
