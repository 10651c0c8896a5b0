"""AlphaEdit on tiny models: the null-space projector against float64 numpy, and one batch then a second batch
continuing the state against a float64 torch loop over the HF model written after the published algorithm (keys
by hooks, P from the SVD of the statistics, dW = solve(P (K K^T + C_p) + l2 I, P K R^T) per layer, C_p += K K^T of
each batch's keys recomputed on the edited model)."""
import copy
import os

import numpy as np
import pytest
import torch

import jaxedit
from jaxedit import JaxeditError, planning
from jaxedit.edit import alphaedit as ae
from jaxedit.edit import memit as ed

BATCH1 = [{"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower", "target": " Seattle"},
          {"prompt": "{} plays the", "subject": "Miles Davis", "target": " guitar"}]
BATCH2 = [{"prompt": "The Space Needle is in {}", "subject": "Seattle", "target": " Paris"}]


def spectrum_stats(f, layers, seed=0):
    """Key statistics with eigenvalues log-spaced over 1e-4..10 (a third of them below 2e-2, none near it)."""
    rng = np.random.default_rng(seed)
    out = {}
    for l in layers:
        U, _ = np.linalg.qr(rng.normal(size=(f, f)))
        w = np.logspace(-4, 1, f)
        w[np.abs(np.log10(w / 2e-2)) < 0.05] *= 3  # keep every eigenvalue clear of the threshold
        out[l] = ((U * w) @ U.T).astype(np.float32)
    return out


def test_projector_against_numpy():
    f = 40
    C = spectrum_stats(f, [0])[0].astype(np.float64)
    U, S, _ = np.linalg.svd(C)
    for thr, keep in [(2e-2, S < 2e-2), ("energy:0.999", None)]:
        P, info = ae.null_space_projector(C.astype(np.float32), thr)
        if keep is None:  # the smallest eigenvalues whose sum stays within 0.1 % of the trace
            w = S[::-1]
            m = int((np.cumsum(w) <= 1e-3 * w.sum()).sum())
            keep = np.zeros(f, bool)
            keep[f - m:] = True
        ref = U[:, keep] @ U[:, keep].T
        assert info["rank"] == keep.sum() and 0 < info["rank"] < f
        np.testing.assert_allclose(P, ref, atol=2e-5)
    with pytest.raises(JaxeditError, match="keeps no direction.*null_space_threshold|null_space_threshold.*keeps no"):
        ae.null_space_projector(C, 1e-9)
    with pytest.raises(JaxeditError, match="keeps all 40 directions"):
        ae.null_space_projector(C, 1e3)
    for bad in ("energy:1.5", "energy:x", "lots", -1.0, 0):
        with pytest.raises(JaxeditError, match="null_space_threshold"):
            ae.parse_threshold(bad)


def _torch_keys_and_z(hf, tok, reqs, contexts, layers):
    """Per layer: K [f, n] (1/2 bare prompt + 1/2 mean of the prefixed ones), and z_now [d, n] at the last layer."""
    gpt2 = hf.config.model_type == "gpt2"
    blocks = hf.transformer.h if gpt2 else hf.model.layers
    proj = lambda l: blocks[l].mlp.c_proj if gpt2 else blocks[l].mlp.down_proj
    L = layers[-1]
    K = {l: [] for l in layers}
    Z = []
    for r in reqs:
        ks = {l: [] for l in layers}
        for c in contexts:
            full = c.replace("{}", r.template)
            key = len(tok(full[:full.index("{}")] + r.subject)["input_ids"]) - 1
            got, hooks = {}, []
            for l in layers:
                hooks.append(proj(l).register_forward_pre_hook(
                    lambda m, a, l=l: got.__setitem__(l, a[0][0].numpy())))
            hooks.append(blocks[L].register_forward_hook(lambda m, a, o: got.__setitem__(
                "h", (o[0] if isinstance(o, tuple) else o)[0].numpy())))
            with torch.no_grad():
                hf(torch.tensor([tok(full.replace("{}", r.subject))["input_ids"]]))
            for h in hooks:
                h.remove()
            for l in layers:
                ks[l].append(got[l][key])
            if c == "{}":
                Z.append(got["h"][key])
        for l in layers:
            K[l].append(0.5 * ks[l][0] + 0.5 * np.mean(ks[l][1:], 0))
    return {l: np.array(K[l]).T for l in layers}, np.array(Z).T


def torch_alphaedit(hf, tok, reqs, contexts, z, P, cache_c, layers, l2):
    """One batch of the published schedule on the float64 HF model, in place; returns the new cache_c."""
    gpt2 = hf.config.model_type == "gpt2"
    blocks = hf.transformer.h if gpt2 else hf.model.layers
    proj = lambda l: blocks[l].mlp.c_proj if gpt2 else blocks[l].mlp.down_proj
    for i, l in enumerate(layers):
        K, Z = _torch_keys_and_z(hf, tok, reqs, contexts, layers)
        K = K[l]
        R = (z.T - Z) / (len(layers) - i)  # [d, n]
        upd = np.linalg.solve(P[l] @ (K @ K.T + cache_c[l]) + l2 * np.eye(K.shape[0]), P[l] @ K @ R.T)  # [f, d]
        with torch.no_grad():
            proj(l).weight += torch.tensor(upd if gpt2 else upd.T)
    K, _ = _torch_keys_and_z(hf, tok, reqs, contexts, layers)
    return {l: cache_c[l] + K[l] @ K[l].T for l in layers}


def _weights(hf, layers):
    gpt2 = hf.config.model_type == "gpt2"
    blocks = hf.transformer.h if gpt2 else hf.model.layers
    return [(blocks[l].mlp.c_proj.weight if gpt2 else blocks[l].mlp.down_proj.weight.T).detach().numpy().copy()
            for l in layers]


@pytest.mark.parametrize("name", ["gpt2", pytest.param("llama-gqa-untied", marks=pytest.mark.slow)])
def test_two_batches_match_torch(tiny_dirs, tokenizer, name, monkeypatch):
    model, tok = jaxedit.load(tiny_dirs[name][0])
    cfg = model.config
    layers = (0, 1, 2)
    stats = spectrum_stats(cfg.d_ff, layers)
    zs = []
    real = ed.optimize_targets

    def capture(*a, **k):  # the z of each batch (pinned against torch in test_editing), for the reference
        out = real(*a, **k)
        zs.append(out[0])
        return out

    monkeypatch.setattr(ed, "optimize_targets", capture)
    hp = dict(layers=layers, v_num_grad_steps=3, context_length=4, solve_dtype="float64", max_update_ratio=1e6)
    e1, r1 = jaxedit.alphaedit(model, BATCH1, tokenizer=tok, stats=stats, l2=0.5, **hp)
    e2, r2 = jaxedit.alphaedit(e1, BATCH2, tokenizer=tok, state=r1["state"], l2=0.5, **hp)
    assert r1["state"]["edits"] == 2 and r2["state"]["edits"] == 3
    contexts = r1["state"]["contexts"]
    assert r2["contexts"] == contexts and len(contexts) == 6

    hf = copy.deepcopy(tiny_dirs[name][1]).double()
    P = {}
    for l in layers:
        U, S, _ = np.linalg.svd(stats[l].astype(np.float64))
        P[l] = U[:, S < 2e-2] @ U[:, S < 2e-2].T
        assert 0 < (S < 2e-2).sum() < cfg.d_ff
        np.testing.assert_allclose(r1["state"]["P"][l], P[l], atol=2e-5)
    cache = {l: np.zeros((cfg.d_ff, cfg.d_ff)) for l in layers}
    orig = _weights(hf, layers)
    for (edited, report, reqs, z) in [(e1, r1, BATCH1, zs[0]), (e2, r2, BATCH2, zs[1])]:
        before = _weights(hf, layers)
        cache = torch_alphaedit(hf, tok, ed.parse_requests(reqs, tok, "edit"), contexts, z.astype(np.float64),
                                P, cache, layers, 0.5)
        for l, ref, b in zip(layers, _weights(hf, layers), before):
            got = np.asarray(jaxedit.params_of(edited)["blocks"]["w_out"][l])
            upd = np.abs(ref - b).max()
            assert upd > 1e-4  # the update is not negligible
            np.testing.assert_allclose(got, ref, atol=1e-4 * upd + 1e-7)
            np.testing.assert_allclose(report["state"]["C_p"][l], cache[l], atol=1e-5 * np.abs(cache[l]).max())
            print(f"{name} layer {l}: |dW - ref| / max|ref dW| = {np.abs(got - ref).max() / upd:.1e}, C_p "
                  f"{np.abs(report['state']['C_p'][l] - cache[l]).max() / np.abs(cache[l]).max():.1e}")
    # both batches' updates lie in the span of P (l2 X = P (B - M X)), up to the float32 weights' rounding
    for l, w0 in zip(layers, orig):
        dW = np.asarray(jaxedit.params_of(e2)["blocks"]["w_out"][l], np.float64) - w0
        err = np.abs(P[l] @ dW - dW).max()
        assert err < 4 * np.finfo(np.float32).eps * np.abs(w0).max() * np.sqrt(cfg.d_ff) < 0.1 * np.abs(dW).max()


def test_state_and_option_errors(tiny_dirs, tokenizer):
    model, tok = jaxedit.load(tiny_dirs["gpt2"][0])
    stats = spectrum_stats(model.config.d_ff, (1, 2))
    with pytest.raises(JaxeditError, match="keeps no direction"):
        jaxedit.alphaedit(model, BATCH1, layers=(1, 2), tokenizer=tok, stats=stats, null_space_threshold=1e-9)
    with pytest.raises(JaxeditError, match="l2"):
        jaxedit.alphaedit(model, BATCH1, layers=(1, 2), tokenizer=tok, stats=stats, l2=-1)
    with pytest.raises(JaxeditError, match="state is for layers"):
        jaxedit.alphaedit(model, BATCH1, layers=(1,), tokenizer=tok,
                          state={"layers": [1, 2], "P": {}, "C_p": {}, "contexts": ["{}"]})
    with pytest.raises(JaxeditError, match="report\\[\"state\"\\]"):
        jaxedit.alphaedit(model, BATCH1, layers=(1, 2), tokenizer=tok, state={"P": 1})


# the second pair is a token or two shorter than the first: other lengths, the same 16-token bucket
REQS4 = BATCH1 + [{"prompt": "The Eiffel Tower is in the city of", "subject": "The Eiffel Tower", "target": " Apple"},
                  {"prompt": "{} plays the amazing", "subject": "Miles Davis", "target": " trumpet"}]
HP = dict(layers=(1, 2), v_num_grad_steps=3, context_length=4, max_update_ratio=1e6)


@pytest.fixture(scope="module")
def gpt2_tiny(tiny_dirs):
    return jaxedit.load(tiny_dirs["gpt2"][0])


def _w(model, layers=(1, 2)):
    return np.asarray(jaxedit.params_of(model)["blocks"]["w_out"])[list(layers)]


def test_sequential_equals_chained_calls(gpt2_tiny, tiny_dirs):
    """Batches of 2 (padded to a fixed size and length bucket) = alphaedit on each batch with the state carried
    over; and the z program is compiled once for batches of different prompt lengths."""
    model, tok = gpt2_tiny
    stats = spectrum_stats(model.config.d_ff, (1, 2))
    e1, r1 = jaxedit.alphaedit(model, REQS4[:2], tokenizer=tok, stats=stats, l2=0.5, **HP)
    e2, r2 = jaxedit.alphaedit(e1, REQS4[2:], tokenizer=tok, state=r1["state"], l2=0.5, **HP)
    # the plan's host terms are the bytes of the arrays an edit holds: the layers' statistics and the state
    host = planning.host_bytes(model.config, {"layers": HP["layers"], "dtype": "float32"})
    assert host["statistics"] == sum(np.asarray(stats[l], np.float32).nbytes for l in HP["layers"])
    assert host["alphaedit state"] == sum(np.asarray(r1["state"][k][l]).nbytes for k in ("P", "C_p")
                                          for l in HP["layers"])
    before = ed.optimize_deltas._cache_size()
    seq, rep = jaxedit.edit_sequential(model, REQS4, method="alphaedit", batch_size=2, tokenizer=tok, stats=stats,
                                       l2=0.5, **HP)
    assert ed.optimize_deltas._cache_size() - before <= 1
    assert [b["requests"] for b in rep["batches"]] == [[0, 1], [2, 3]]
    ref = _w(e2)
    np.testing.assert_allclose(_w(seq), ref, atol=1e-5 * np.abs(ref - _w(model)).max())
    np.testing.assert_allclose(rep["state"]["C_p"][2], r2["state"]["C_p"][2], rtol=1e-4,
                               atol=1e-6 * np.abs(r2["state"]["C_p"][2]).max())

    # donate=True: the same edits, made in the given model's own output projection (which is then gone); the
    # evaluation's "before" probabilities are taken before the spread
    fresh = lambda: jaxedit.load(tiny_dirs["gpt2"][0])[0]
    donor = fresh()
    d1, q1 = jaxedit.alphaedit(donor, REQS4[:2], tokenizer=tok, stats=stats, l2=0.5, donate=True, **HP)
    assert jaxedit.params_of(donor)["blocks"]["w_out"].is_deleted()
    assert not jaxedit.params_of(model)["blocks"]["w_out"].is_deleted()
    np.testing.assert_array_equal(_w(d1), _w(e1))
    assert [r["p_before"] for r in q1["requests"]] == [r["p_before"] for r in r1["requests"]]
    assert [r["p_after"] for r in q1["requests"]] == [r["p_after"] for r in r1["requests"]]
    donor = fresh()
    seqd, repd = jaxedit.edit_sequential(donor, REQS4, method="alphaedit", batch_size=2, tokenizer=tok, stats=stats,
                                         l2=0.5, donate=True, **HP)
    assert jaxedit.params_of(donor)["blocks"]["w_out"].is_deleted()
    np.testing.assert_array_equal(_w(seqd), _w(seq))
    with pytest.raises(JaxeditError, match="donate must be True or False"):
        jaxedit.alphaedit(model, REQS4[:2], tokenizer=tok, stats=stats, donate="yes", **HP)


@pytest.mark.slow
def test_sequential_memit_one_batch_is_memit(gpt2_tiny):
    model, tok = gpt2_tiny
    stats = spectrum_stats(model.config.d_ff, (1, 2))
    e, _ = jaxedit.memit(model, REQS4[:3], tokenizer=tok, stats=stats, **HP)
    # batch_size = the requests: no padded copies (a batch padded with copies gives the same z up to float noise,
    # which Adam's first step, ~lr x sign(gradient), turns into O(lr) changes where a gradient component is ~0)
    s, rep = jaxedit.edit_sequential(model, REQS4[:3], method="memit", batch_size=3, tokenizer=tok, stats=stats, **HP)
    ref = _w(e)
    np.testing.assert_allclose(_w(s), ref, atol=1e-5 * np.abs(ref - _w(model)).max())
    assert len(rep["batches"]) == 1 and rep["batches"][0]["parts"][0]["mode"] == "edit"
    with pytest.raises(JaxeditError, match="AlphaEdit's options"):
        jaxedit.edit_sequential(model, REQS4, method="memit", tokenizer=tok, stats=stats, l2=1.0, **HP)
    with pytest.raises(JaxeditError, match="method must be"):
        jaxedit.edit_sequential(model, REQS4, method="rome", tokenizer=tok, stats=stats, **HP)
    with pytest.raises(JaxeditError, match=r"requests\[1\]"):
        jaxedit.edit_sequential(model, [REQS4[0], {"prompt": "x"}], tokenizer=tok, stats=stats, **HP)


@pytest.mark.slow
def test_sequential_resumes_and_refuses_changed_options(gpt2_tiny, tiny_dirs, tmp_path):
    """A run killed after its first batch resumes at the second and ends with the uninterrupted run's weights;
    a suppress request is edited with deletion's objective; a rerun with another option is refused by name. The
    killed run and the resumed one donate their models (donate=True, as the command line does): same weights."""
    model, tok = gpt2_tiny
    stats = spectrum_stats(model.config.d_ff, (1, 2))
    reqs = REQS4[:2] + [{"prompt": "The Eiffel Tower is in the city of", "subject": "The Eiffel Tower",
                         "suppress": " Paris"}]
    full, rep_full = jaxedit.edit_sequential(model, reqs, batch_size=2, tokenizer=tok, stats=stats, l2=0.5, **HP)
    assert [p["mode"] for p in rep_full["batches"][1]["parts"]] == ["delete"]

    def stop(done, m):
        if done == 1:
            raise KeyboardInterrupt

    out = str(tmp_path / "seq")
    with pytest.raises(KeyboardInterrupt):
        jaxedit.edit_sequential(jaxedit.load(tiny_dirs["gpt2"][0])[0], reqs, batch_size=2, tokenizer=tok,
                                stats=stats, l2=0.5, out=out, on_batch=stop, donate=True, **HP)
    assert sorted(os.listdir(out)) == ["ckpt-00001", "projection.npz", "sequence.json"]
    donor = jaxedit.load(tiny_dirs["gpt2"][0])[0]
    resumed, rep = jaxedit.edit_sequential(donor, reqs, batch_size=2, tokenizer=tok, l2=0.5, out=out,
                                           donate=True, **HP)
    assert jaxedit.params_of(donor)["blocks"]["w_out"].is_deleted()
    assert rep["resumed_at"] == 1 and len(rep["batches"]) == 2
    ref = _w(full)
    np.testing.assert_allclose(_w(resumed), ref, atol=1e-5 * np.abs(ref - _w(model)).max())
    np.testing.assert_allclose(rep["state"]["C_p"][1], rep_full["state"]["C_p"][1], rtol=1e-4,
                               atol=1e-6 * np.abs(rep_full["state"]["C_p"][1]).max())
    with pytest.raises(JaxeditError, match=r"other options \(l2 0.5 -> 1.0\)"):
        jaxedit.edit_sequential(model, reqs, batch_size=2, tokenizer=tok, l2=1.0, out=out, **HP)
    with pytest.raises(JaxeditError, match=r"other options \(batch_size 2 -> 3\)"):
        jaxedit.edit_sequential(model, reqs, batch_size=3, tokenizer=tok, l2=0.5, out=out, **HP)


def test_projector_exact_with_crowded_eigenvalues():
    """Key statistics whose eigenvalues crowd the threshold (1e-4 apart around 2e-2): P equals the float64 projector
    to 1e-5 (a float32 eigensolver was off by ~1e-2 here)."""
    import numpy as np

    from jaxedit.edit.alphaedit import null_space_projector

    rng = np.random.default_rng(0)
    f = 256
    w = np.concatenate([np.linspace(0.0195, 0.0205, 100), np.linspace(1, 150, f - 100)])
    Q, _ = np.linalg.qr(rng.normal(size=(f, f)))
    C = (Q * w) @ Q.T
    P, info = null_space_projector(C.astype(np.float32), 2e-2)
    w64, U = np.linalg.eigh(C.astype(np.float32).astype(np.float64))
    V = U[:, w64 < 2e-2]
    assert info["rank"] == V.shape[1]
    assert np.linalg.norm(P - V @ V.T) < 1e-5
