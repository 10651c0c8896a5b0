"""ProFS against a torch float64 computation written after the public implementation (DeToxEdit): transformers'
hidden states of each right-padded set, the last block's raw output recomputed as the public code does (GPT-2: the
block called on the previous hidden state without an attention mask; LLaMA: the block's own output inside the
model's forward, with its causal and padding mask), the preference matrix, centering, SVD, W (I - P) on the
output projection; both means (real tokens, padded positions); the edited MLP outputs' component in the subspace;
the errors."""
import copy

import numpy as np
import pytest
import torch

import jaxedit
from jaxedit.batching import pad_rows
from jaxedit import JaxeditError
from jaxedit.edit.profs import default_layers, profs

# sentences the tiny tokenizer knows, of different lengths (every set pads); (non-toxic, toxic)
PAIRS = [
    ("The Eiffel Tower is located in the city of Paris.", "Miles Davis plays the trumpet."),
    ("The Space Needle is in Seattle.", "Toko Yasuda produces the most amazing music on the guitar."),
    ("Beats Music is owned by Apple.", "The capital of France is Paris. Miles Davis plays."),
    ("Miles Davis plays the trumpet in Seattle.", "music on the guitar"),
    ("The capital of France is Paris.", "Toko Yasuda produces music."),
]
REL = 1e-5


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def torch_embeddings(hf, tok, texts, mean_over, max_len=128):
    """[L, N, d] float64: the public implementation's sentence embeddings (``mean_over="padded"``: its mean over the
    whole padded length; ``"tokens"``: over the real tokens)."""
    t = copy.copy(tok)
    t.padding_side = "right"
    enc = t(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_len)
    gpt2 = hf.config.model_type == "gpt2"
    blocks = hf.transformer.h if gpt2 else hf.model.layers
    own = {}
    hook = blocks[-1].register_forward_hook(lambda m, i, o: own.__setitem__("out", o[0] if isinstance(o, tuple)
                                                                            else o))
    try:
        with torch.no_grad():
            hs = list(hf(**enc, output_hidden_states=True).hidden_states[1:])
            if gpt2:  # the public code: the last block again, on the previous hidden state, without the mask
                last = blocks[-1](hs[-2])
                last = last[0] if isinstance(last, tuple) else last
                real = enc["attention_mask"].bool()
                # a causal block: at the real tokens it equals the block's output inside the forward
                np.testing.assert_allclose(last[real].numpy(), own["out"][real].numpy(), rtol=0, atol=1e-10)
                hs[-1] = last
            else:
                hs[-1] = own["out"]
    finally:
        hook.remove()
    H = torch.stack(hs)  # [L, N, T, d]
    if mean_over == "padded":
        return H.mean(2).numpy(), enc["attention_mask"].numpy()
    m = enc["attention_mask"].to(H.dtype)[None, :, :, None]
    return ((H * m).sum(2) / m.sum(2)).numpy(), enc["attention_mask"].numpy()


def torch_profs(hf, tok, pairs, layers, rank, centering, mean_over="padded"):
    """(subspaces {l: [d, rank]}, edited output projections {l: [d_ff, d] in x @ W orientation}) as DeToxEdit
    computes them (preference matrix from hidden_states[l + 1], centering by the preferred embeddings' first right
    singular vector, SVD, P = V V^T, weight @ (I - P) on the value projection of layer l), in float64."""
    hf = copy.deepcopy(hf).double()
    gpt2 = hf.config.model_type == "gpt2"
    good, gmask = torch_embeddings(hf, tok, [p[0] for p in pairs], mean_over)
    bad, bmask = torch_embeddings(hf, tok, [p[1] for p in pairs], mean_over)
    assert gmask.sum() < gmask.size and bmask.sum() < bmask.size  # both sets have padding
    pref = torch.from_numpy((good - bad) / 2)
    subspaces, weights = {}, {}
    for l in layers:
        D = pref[l]
        if centering:
            mu = torch.linalg.svd(torch.from_numpy(good[l]), full_matrices=False)[2][0][:, None]
            D = D @ (torch.eye(D.shape[1], dtype=D.dtype) - mu @ mu.T)
        V = torch.linalg.svd(D, full_matrices=False)[2].T[:, :rank]
        P = sum(V[:, r:r + 1] @ V[:, r:r + 1].T for r in range(rank))
        mlp = hf.transformer.h[l].mlp if gpt2 else hf.model.layers[l].mlp
        W = mlp.c_proj.weight.detach() if gpt2 else mlp.down_proj.weight.detach().T  # [d_ff, d]
        subspaces[l] = V.numpy()
        weights[l] = (W @ (torch.eye(P.shape[0], dtype=P.dtype) - P)).numpy()
    return subspaces, weights


def sign_aligned(got, ref):
    """``got`` [rank, d] with each row's sign matched to ``ref`` [d, rank]'s column."""
    return got * np.sign(np.sum(got * ref.T, 1))[:, None]


@pytest.fixture(scope="module")
def loaded(tiny_dirs):
    return {name: jaxedit.load(tiny_dirs[name][0]) for name in ("gpt2", "llama-gqa-untied")}


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-untied"])
@pytest.mark.parametrize("centering", [True, False])
@pytest.mark.parametrize("mean_over", ["tokens", "padded"])
def test_matches_torch(tiny_dirs, tokenizer, loaded, name, centering, mean_over):
    model, tok = loaded[name]
    L = model.config.n_layers
    layers = list(range(L))
    edited, report = profs(model, PAIRS, tokenizer=tok, layers=layers, rank=2, centering=centering, mean_over=mean_over,
                           progress=False)
    ref_v, ref_w = torch_profs(tiny_dirs[name][1], tokenizer, PAIRS, layers, 2, centering, mean_over)
    w0 = np.asarray(jaxedit.params_of(model)["blocks"]["w_out"])
    w1 = np.asarray(jaxedit.params_of(edited)["blocks"]["w_out"])
    errs = {}
    for l in layers:
        V = report["subspace"][l]
        assert V.shape == (2, model.config.d_model)
        errs[("v", l)] = rel(sign_aligned(V, ref_v[l]), ref_v[l].T)
        errs[("w", l)] = rel(w1[l], ref_w[l])
        assert rel(w0[l], ref_w[l]) > 1e-3  # the edit changes the weights well beyond the tolerance
    worst = max(errs.values())
    print(f"{name} centering={centering} {mean_over}: max rel error subspace "
          f"{max(v for k, v in errs.items() if k[0] == 'v'):.1e}, weights {max(v for k, v in errs.items() if k[0] == 'w'):.1e}")
    assert worst < REL, errs


def test_means_and_centering_matter(loaded):
    """The options change the result (so the parity above tells them apart)."""
    model, tok = loaded["gpt2"]
    runs = {(c, m): profs(model, PAIRS, tokenizer=tok, layers=[2], centering=c, mean_over=m, progress=False)[1]["subspace"][2]
            for c in (True, False) for m in ("tokens", "padded")}
    for a in runs:
        for b in runs:
            if a != b:  # subspaces differ: the projectors are not equal
                assert np.abs(runs[a].T @ runs[a] - runs[b].T @ runs[b]).max() > 1e-2, (a, b)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-untied"])
def test_mlp_outputs_leave_the_subspace(loaded, name):
    """In the edited model, the MLP outputs (without their bias) of the edited layers have no component along that
    layer's subspace; the unedited layers and the unedited model have one."""
    model, tok = loaded[name]
    cfg = model.config
    layers = default_layers(cfg.n_layers)
    assert layers == list(range(round(cfg.n_layers * 10 / 24), cfg.n_layers))
    edited, report = profs(model, PAIRS, tokenizer=tok, progress=False)
    assert report["layers"] == layers and sorted(report["subspace"]) == layers
    ids, mask = pad_rows([tok(t)["input_ids"] for t in ("Paris is the capital of France.",
                                                                         "Miles Davis plays the trumpet.")])
    real = mask.astype(bool)
    bias = np.asarray(jaxedit.params_of(model)["blocks"].get("b_out", np.zeros((cfg.n_layers, cfg.d_model))))
    outs = {}
    for tag, m in (("before", model), ("after", edited)):
        mlp = np.asarray(jaxedit.forward(m, ids, mask, capture=("mlp",)).mlp, np.float64)  # [B, L, T, d]
        outs[tag] = mlp - bias[None, :, None]
    for l in layers:
        V = report["subspace"][l]
        np.testing.assert_allclose(V @ V.T, np.eye(2), atol=1e-10)
        after = np.abs(outs["after"][:, l][real] @ V.T).max()
        before = np.abs(outs["before"][:, l][real] @ V.T).max()
        scale = np.abs(outs["after"][:, l][real]).max()
        assert after < 1e-5 * scale and before > 1e-2 * scale, (l, after, before, scale)
    for l in set(range(cfg.n_layers)) - set(layers):
        np.testing.assert_array_equal(outs["after"][:, l], outs["before"][:, l])
    # the biases and everything else are untouched
    p0, p1 = jaxedit.params_of(model), jaxedit.params_of(edited)
    for path, a in jax_leaves(p0):
        if path != ("blocks", "w_out"):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(dict_at(p1, path)))


def jax_leaves(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from jax_leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def dict_at(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def test_pair_forms_and_report(loaded):
    model, tok = loaded["gpt2"]
    as_dicts = [{"preferred": a, "non_preferred": b} for a, b in PAIRS]
    _, r1 = profs(model, PAIRS, tokenizer=tok, layers=[1], progress=False)
    _, r2 = profs(model, as_dicts, tokenizer=tok, layers=1, batch_size=2, progress=False)  # several batches
    np.testing.assert_allclose(r2["subspace"][1], r1["subspace"][1], rtol=0, atol=1e-6)
    assert r1["singular_values"][1].shape == (len(PAIRS),)
    assert np.all(np.diff(r1["singular_values"][1]) <= 0)
    assert r1["rank"] == 2 and r1["centering"] and r1["mean_over"] == "tokens" and r1["n_pairs"] == len(PAIRS)
    assert r1["truncated"] == 0 and r1["seconds"] > 0
    _, r3 = profs(model, PAIRS, tokenizer=tok, layers=[1], max_len=4, progress=False)
    assert r3["truncated"] == 2 * len(PAIRS)
    assert np.abs(r3["subspace"][1].T @ r3["subspace"][1] - r1["subspace"][1].T @ r1["subspace"][1]).max() > 1e-2


@pytest.mark.parametrize("kwargs,pairs,message", [
    ({}, [], "at least one"),
    ({}, "The Space Needle", "list of"),
    ({}, [("Paris", "Seattle", "Apple")], "pair 0: expected"),
    ({}, [("Paris", "Seattle"), {"preferred": "Paris"}], "pair 1: missing 'non_preferred'"),
    ({}, [("Paris", "")], "pair 0: each text must be a non-empty string"),
    ({"rank": 0}, PAIRS, "rank must be an integer >= 1"),
    ({"rank": len(PAIRS) + 1}, PAIRS, f"at most {len(PAIRS)}"),
    ({"layers": [3]}, PAIRS, "outside 0..2"),
    ({"layers": []}, PAIRS, "no layers given"),
    ({"mean_over": "all"}, PAIRS, "mean_over must be"),
    ({"max_len": 0}, PAIRS, "max_len must be"),
])
def test_errors(loaded, kwargs, pairs, message):
    model, tok = loaded["gpt2"]
    with pytest.raises(JaxeditError, match=message) as e:
        profs(model, pairs, tokenizer=tok, progress=False, **kwargs)
    assert "\n" not in str(e.value)


def test_needs_tokenizer(loaded):
    with pytest.raises(JaxeditError, match="needs a tokenizer"):
        profs(loaded["gpt2"][0], PAIRS)
