"""MEMIT / deletion machinery on tiny models: the closed-form solve against float64 numpy, the spreading schedule
against a torch loop over the HF model (hooks for keys and hidden states, weights updated in place), and the z
optimization (objective at every step, Adam, clamp) against a float64 torch loop."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxedit
from jaxedit import JaxeditError
from jaxedit.edit import memit as ed

REQ = {"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower", "target": " Seattle"}
REQ2 = {"prompt": "{} plays the", "subject": "Miles Davis", "target": " guitar"}
# subjects at the end of the prompt: in a 3-layer random model, a change at an earlier token barely reaches the last
END1 = {"prompt": "The Space Needle is in {}", "subject": "Seattle", "target": " Paris"}
END2 = {"prompt": "Toko Yasuda produces the most amazing", "subject": "amazing", "target": " trumpet music"}
LIKELY = {"prompt": "Needle is in Seattle. {}", "subject": "Miles"}  # the sharp model's next token: P ~ 0.57


def random_stats(cfg, layers, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for l in layers:
        a = rng.normal(size=(cfg.d_ff, 4 * cfg.d_ff)) * 0.1
        out[l] = (a @ a.T / a.shape[1]).astype(np.float32)
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_solve_matches_float64_numpy(dtype):
    """The one solve of MEMIT and AlphaEdit against each paper's own formula in float64 numpy."""
    rng = np.random.default_rng(1)
    f, d, n, lam, l2 = 40, 24, 6, 15.0, 10.0
    a = rng.normal(size=(f, 200))
    C = a @ a.T / 200
    K, R = rng.normal(size=(f, n)), rng.normal(size=(d, n))
    f32 = lambda x: x.astype(np.float32)
    # MEMIT: R K^T (lambda C + K K^T)^-1, the torch-layout update [d, f]
    ref = R @ K.T @ np.linalg.inv(lam * C + K @ K.T)
    got, rel = ed.solve_update(f32(K), f32(R), ridge=lam, N=f32(C), dtype=dtype)
    assert got.shape == (f, d) and rel < 1e-4
    np.testing.assert_allclose(got, ref.T, rtol=1e-4 if dtype == "float32" else 1e-6,
                               atol=1e-5 * np.abs(ref).max())
    # AlphaEdit: solve(P (K K^T + C_p) + l2 I, P K R^T), P a projector of rank 25, C_p the keys of earlier edits
    U = np.linalg.qr(rng.normal(size=(f, f)))[0][:, :25]
    P = U @ U.T
    K0 = rng.normal(size=(f, 12))
    Cp = K0 @ K0.T
    ref = np.linalg.solve(P @ (K @ K.T + Cp) + l2 * np.eye(f), P @ K @ R.T)
    got, rel = ed.solve_update(f32(K), f32(R), ridge=l2, M=f32(P), Cp=f32(Cp), dtype=dtype)
    assert got.shape == (f, d) and rel < 1e-4
    np.testing.assert_allclose(got, ref, rtol=1e-4 if dtype == "float32" else 1e-6, atol=1e-5 * np.abs(ref).max())


def torch_spread(hf, tok, reqs, contexts, z, stats, layers, lam):
    """The reference schedule, written directly on the HF torch model in float64."""
    hf = hf.double()
    gpt2 = hf.config.model_type == "gpt2"
    blocks = hf.transformer.h if gpt2 else hf.model.layers
    proj = lambda l: blocks[l].mlp.c_proj if gpt2 else blocks[l].mlp.down_proj
    L = layers[-1]
    for i, l in enumerate(layers):
        K, Z = [], []
        for r in reqs:
            ks = []
            for c in contexts:
                full = c.replace("{}", r.template)
                key = len(tok(full[:full.index("{}")] + r.subject)["input_ids"]) - 1
                got = {}
                h1 = proj(l).register_forward_pre_hook(lambda m, a: got.__setitem__("k", a[0][0].numpy()))
                h2 = blocks[L].register_forward_hook(lambda m, a, o: got.__setitem__(
                    "h", (o[0] if isinstance(o, tuple) else o)[0].numpy()))
                with torch.no_grad():
                    hf(torch.tensor([tok(full.replace("{}", r.subject))["input_ids"]]))
                h1.remove(), h2.remove()
                ks.append(got["k"][key])
                if c == "{}":
                    Z.append(got["h"][key])
            K.append(0.5 * ks[0] + 0.5 * np.mean(ks[1:], 0))
        K, Z = np.array(K).T, np.array(Z).T  # [f, n], [d, n]
        R = (z.T - Z) / (len(layers) - i)
        upd = R @ K.T @ np.linalg.inv(lam * stats[l].astype(np.float64) + K @ K.T)  # [d, f]
        with torch.no_grad():
            w = proj(l).weight
            w += torch.tensor(upd.T if gpt2 else upd)
    return [proj(l).weight.detach().numpy().copy() if gpt2 else proj(l).weight.detach().numpy().T.copy()
            for l in layers]


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-untied"])
def test_spreading_matches_torch_loop(tiny_dirs, tokenizer, name):
    import copy

    model, tok = jaxedit.load(tiny_dirs[name][0])
    cfg = model.config
    layers = (0, 1, 2)
    hp = ed.hparams_for(cfg, layers=layers, mom2_update_weight=2.0, solve_dtype="float64", max_update_ratio=1e6)
    reqs = ed.parse_requests([REQ, REQ2], tok, "edit")
    contexts = ["{}", "Miles Davis. {}", "Beats Music is owned by Apple. {}"]
    stats = random_stats(cfg, layers)
    params = jaxedit.params_of(model)
    rng = np.random.default_rng(3)
    z = rng.normal(size=(2, cfg.d_model)).astype(np.float32)
    new, report = ed.spread(cfg, params, tok, reqs, contexts, z, stats, layers, hp)
    ref = torch_spread(copy.deepcopy(tiny_dirs[name][1]), tok, reqs, contexts, z, stats, layers, 2.0)
    for l, w in zip(layers, ref):
        got = np.asarray(new["blocks"]["w_out"][l])
        orig = np.asarray(params["blocks"]["w_out"][l])
        assert np.abs(w - orig).max() > 1e-3  # the update is not negligible
        np.testing.assert_allclose(got, w, atol=2e-5 * np.abs(w - orig).max() + 1e-6)
    assert [r["layer"] for r in report] == list(layers)


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory, tokenizer):
    """A tiny LLaMA with larger weights (init std 0.3): its logits can express a confident prediction."""
    from tiny_models import build_hf_model

    hf = build_hf_model("llama-mha-tied", init_std=0.3)
    d = tmp_path_factory.mktemp("sharp")
    hf.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return str(d), hf


@pytest.mark.parametrize("mode", ["edit", "logp", "unlikelihood"])
def test_objective_and_effect(sharp_llama, tokenizer, monkeypatch, mode):
    """The z optimization against :func:`torch_z_reference` at every step (the whole objective: NLL or deletion term
    + KL at a nonzero weight + weight decay; the final delta after the Adam steps, the clamp active), and the edit's
    effect."""
    import copy

    model, tok = jaxedit.load(sharp_llama[0])
    hf = copy.deepcopy(sharp_llama[1]).double()
    cfg = model.config
    before = np.asarray(jaxedit.params_of(model)["blocks"]["w_out"]).copy()
    real, recorded = ed.optimize_deltas, []

    def record(*args, **kwargs):
        out = real(*args, **kwargs)
        recorded.extend(np.asarray(a) for a in out)
        return out

    monkeypatch.setattr(ed, "optimize_deltas", record)
    # clamp factors at which the clamp acts in the last steps (unlikelihood settles earlier, with a shorter delta)
    kw = dict(layers=[0, 1], tokenizer=tok, stats=random_stats(cfg, (0, 1)), mom2_update_weight=1.0, progress=False,
              clamp_norm_factor=0.25 if mode == "unlikelihood" else 1.0)
    if mode == "edit":
        reqs = [END1, END2]
        edited, rep = jaxedit.memit(model, reqs, **kw)  # the preset's KL weight, 0.0625
    else:
        if mode == "logp":
            suppress = [[" Paris", " is"], " music"]
            prompts = (END1, END2)
        else:  # -log(1 - P) is ~P for improbable tokens: suppress what the model predicts, in the first request a
            # likely token (P > 0.5 on the bare prompt: where a tighter clamp of log P would change the loss)
            suppress, prompts = [], (LIKELY, END2)
            for r in prompts:
                with torch.no_grad():
                    logits = hf(torch.tensor([tok(r["prompt"].format(r["subject"]))["input_ids"]])).logits
                suppress.append(tok.decode([int(logits[0, -1].argmax())]))
        reqs = [{"prompt": r["prompt"], "subject": r["subject"], "suppress": s} for r, s in zip(prompts, suppress)]
        edited, rep = jaxedit.delete(model, reqs, kl_weight=0.1, delete_objective=mode, **kw)
    hp = ed.EditHparams(**dict(rep["hparams"], layers=tuple(rep["hparams"]["layers"])))
    delta, losses, mains, n_run = recorded
    clamped = 0
    for j, req in enumerate(ed.parse_requests(reqs, tok, "edit" if mode == "edit" else "delete")):
        ref_losses, ref_mains, ref_delta, h_norm = torch_z_reference(hf, tok, req, rep["contexts"], hp, mode)
        n = len(ref_losses)
        assert n_run[j] == n == rep["requests"][j]["steps"]
        np.testing.assert_allclose(losses[j, :n], ref_losses, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(mains[j, :n], ref_mains, rtol=1e-4, atol=1e-5)
        assert np.abs(ref_losses - ref_mains)[1:].max() > 1e-3  # the KL and weight decay terms weigh in
        np.testing.assert_allclose(delta[j], ref_delta, atol=1e-3 * np.abs(ref_delta).max())
        clamped += abs(np.linalg.norm(ref_delta) / (hp.clamp_norm_factor * h_norm) - 1) < 1e-6
        r = rep["requests"][j]
        np.testing.assert_allclose([r["objective_first"], r["loss_last"]], [ref_mains[0], ref_losses[-1]],
                                   rtol=1e-4, atol=1e-5)
    assert clamped  # the clamp decided the final delta of a request
    if mode == "unlikelihood":
        assert rep["requests"][0]["p_before"][0] > 0.5
    # the input model is untouched; the edited one moved the tracked tokens the right way
    np.testing.assert_array_equal(np.asarray(jaxedit.params_of(model)["blocks"]["w_out"]), before)
    for r in rep["requests"]:
        pb, pa = np.mean(r["p_before"]), np.mean(r["p_after"])
        # the bounded -log(1 - P) pushes little once P is small (and the clamp is tight here): a smaller drop
        assert (pa > 20 * pb) if mode == "edit" else (pa < pb / (4 if mode == "unlikelihood" else 20)), r
    assert len(rep["layers_report"]) == 2 and all(x["update_norm"] > 0 for x in rep["layers_report"])
    w = np.asarray(jaxedit.params_of(edited)["blocks"]["w_out"])
    np.testing.assert_array_equal(w[2], before[2])  # layer 2 not edited


def test_request_errors_and_refusals(tiny_dirs, tokenizer):
    model, tok = jaxedit.load(tiny_dirs["gpt2"][0])
    stats = random_stats(model.config, (1, 2))
    kw = dict(tokenizer=tok, stats=stats, progress=False)
    bad = [({"prompt": "Miles Davis plays", "subject": "John", "target": " x"}, "does not occur"),
           ({"prompt": "Miles Davis plays", "target": " x"}, "subject"),
           ({"prompt": "Miles Davis plays", "subject": "Miles", "suppress": " x"}, "target"),
           ({"prompt": "", "subject": "Miles", "target": " x"}, "prompt"),
           ({"prompt": "Miles Davis plays", "span": [3, 99], "target": " x"}, "outside")]
    for req, msg in bad:
        with pytest.raises(JaxeditError, match=msg):
            jaxedit.memit(model, [req], layers=[1, 2], **kw)
    with pytest.raises(JaxeditError, match="outside"):
        jaxedit.memit(model, [REQ], layers=[1, 5], **kw)
    with pytest.raises(JaxeditError, match="statistics"):
        jaxedit.memit(model, [REQ], layers=[0, 1], **kw)
    with pytest.raises(JaxeditError, match="refused"):  # an absurd update is refused
        jaxedit.memit(model, [REQ], layers=[1, 2], mom2_update_weight=1e-3, max_update_ratio=1e-3, **kw)
    with pytest.raises(JaxeditError, match="unknown hyperparameter"):
        jaxedit.memit(model, [REQ], layers=[1, 2], no_such_option=1, **kw)
    # a span names the same key as the subject
    ids = tok(REQ["prompt"])["input_ids"]
    n = len(tok("The Eiffel Tower")["input_ids"])
    a = ed.parse_requests([{"prompt": REQ["prompt"], "span": [0, n], "target": " x"}], tok, "edit")[0]
    b = ed.parse_requests([REQ], tok, "edit")[0]
    assert (a.template, a.subject) == (b.template, b.subject) and len(ids) > n


def test_default_layers_and_presets():
    from jaxedit.config import ModelConfig

    xl = ModelConfig("gpt2", 48, 1600, 25, 25, 64, 6400, 50257, 1024, 1e-5, True)
    assert ed.hparams_for(xl).layers == (13, 14, 15, 16, 17) and ed.hparams_for(xl).mom2_update_weight == 20000
    l7 = ModelConfig("llama", 32, 4096, 32, 32, 128, 11008, 32000, 4096, 1e-5, False, "silu")
    assert ed.hparams_for(l7).layers == (4, 5, 6, 7, 8) and ed.hparams_for(l7).clamp_norm_factor == 4.0
    small = ModelConfig("gpt2", 12, 768, 12, 12, 64, 3072, 50257, 1024, 1e-5, True)
    assert ed.default_layers(small) == (3, 4)
    smol = ModelConfig("llama", 30, 576, 9, 3, 64, 1536, 49152, 8192, 1e-5, True, "silu")
    assert ed.default_layers(smol) == (4, 5, 6, 7, 8)


def torch_z_reference(hf, tok, req, contexts, hp, mode):
    """The z optimization of one request, written here after MEMIT's compute_v in float64 torch on the HF model:
    delta added to the output of the last edited layer at the subject's last token of every row (the prompt under
    each context, then hp.kl_prompt), objective = the NLL of the target (edit; mean over its tokens, then over the
    rows) or the mean log P / -log(1 - P) of the suppressed tokens (delete), + kl_factor x KL (torch's kl_div:
    KL(P_now || P_orig) for edits, KL(P_orig || P_now) for deletion, at the KL prompt's key token) + weight_decay x
    ||delta|| / ||h||^2; torch Adam; after each step delta is scaled back to clamp_norm_factor x ||h||; stop at the
    last step or (edit) when the loss falls below early_stop_loss, without applying that step.
    Returns (losses, objective terms, delta, ||h||)."""
    F = torch.nn.functional
    blocks = hf.transformer.h if hf.config.model_type == "gpt2" else hf.model.layers
    L = hp.layers[-1]

    def encode(full):
        cut = full.index("{}")
        prefix = tok(full[:cut] + req.subject)["input_ids"]
        ids = tok(full.replace("{}", req.subject))["input_ids"]
        assert ids[:len(prefix)] == prefix
        return ids, len(prefix) - 1

    rows, keys, where = [], [], []  # where: (positions, tokens) of each prompt row's objective
    for c in contexts:
        ids, key = encode(c.replace("{}", req.template))
        n = len(ids)
        extra = req.targets[:-1] if mode == "edit" else []
        rows.append(ids + extra)
        keys.append(key)
        where.append(([n - 1 + j for j in range(len(req.targets))] if mode == "edit" else [n - 1] * len(req.targets),
                      req.targets))
    ids, key = encode(hp.kl_prompt)
    rows.append(ids)
    keys.append(key)
    # one batch, right-padded (causal attention: the padding cannot reach the real tokens)
    T = max(map(len, rows))
    batch = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    at_key = torch.zeros(len(rows), T, 1, dtype=torch.float64)
    at_key[torch.arange(len(rows)), torch.tensor(keys)] = 1.0

    def run(delta):
        """log-softmax logits [rows, T, V] and the output of layer L [rows, T, d], delta added at the keys."""
        seen = {}

        def hook(m, a, o):
            h = (o[0] if isinstance(o, tuple) else o) + at_key * delta
            seen["h"] = h
            return (h,) + tuple(o[1:]) if isinstance(o, tuple) else h

        handle = blocks[L].register_forward_hook(hook)
        try:
            logits = hf(batch).logits
        finally:
            handle.remove()
        return torch.log_softmax(logits, -1), seen["h"]

    with torch.no_grad():
        lp, h = run(torch.zeros(hf.config.hidden_size, dtype=torch.float64))
        h_norm = h[0, keys[0]].norm()  # the bare prompt (context "{}"), its key token
        lp0 = lp[-1, keys[-1]]

    def objective(delta):
        lp = run(delta)[0]
        per_row = []
        for i, (pos, toks) in enumerate(where):
            v = lp[i, pos, toks]
            per_row.append((-torch.log1p(-torch.exp(v)) if mode == "unlikelihood" else v).mean())
        main = torch.stack(per_row).mean() * (-1 if mode == "edit" else 1)
        lp_kl = lp[-1, keys[-1]]
        kl = (F.kl_div(lp0[None], lp_kl[None], log_target=True, reduction="batchmean") if mode == "edit"
              else F.kl_div(lp_kl[None], lp0[None], log_target=True, reduction="batchmean"))
        return main + hp.kl_factor * kl + hp.v_weight_decay * delta.norm() / h_norm ** 2, main

    delta = torch.zeros(hf.config.hidden_size, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    losses, mains = [], []
    for it in range(hp.v_num_grad_steps):
        opt.zero_grad()
        loss, main = objective(delta)
        losses.append(loss.item())
        mains.append(main.item())
        if it == hp.v_num_grad_steps - 1 or (mode == "edit" and loss.item() < hp.early_stop_loss):
            break
        loss.backward()
        opt.step()
        with torch.no_grad():
            max_norm = hp.clamp_norm_factor * h_norm
            if delta.norm() > max_norm:
                delta[...] = delta * max_norm / delta.norm()
    return np.array(losses), np.array(mains), delta.detach().numpy(), float(h_norm)


@pytest.mark.parametrize("mode", ["edit", "logp", "unlikelihood"])
def test_z_objective_terms_against_numpy(mode):
    """:func:`z_objective` on hand-built log-probabilities against the objective written out in float64 numpy: the
    main term (NLL of the targets, or mean log P / -log(1 - P) of the suppressed tokens, each row's mean over its
    tokens, then the mean over rows), the KL at the KL row's key token, and the weight decay
    weight x ||delta|| / ||h||^2 alone at a large weight and a ||h|| far from 1. Suppressed tokens at P = 0.8 and
    0.6 (where a clamp of log P tighter than -1e-7 would change -log(1 - P))."""
    rng = np.random.default_rng(3)
    R, K, V, d = 3, 2, 7, 5  # two prompt rows (the second with one token and one padding slot), then the KL row
    logits = rng.normal(size=(R, K, V))
    tok_ids = np.array([[2, 4], [1, 0], [0, 0]])
    tok_w = np.array([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])

    def set_p(r, k, t, p):  # logits of (r, k) such that softmax puts p on token t
        others = np.exp(logits[r, k]).sum() - np.exp(logits[r, k, t])
        logits[r, k, t] = np.log(p / (1 - p) * others)

    set_p(0, 0, 2, 0.8)
    set_p(1, 0, 1, 0.6)
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    lp0 = rng.normal(size=V)
    lp0 -= np.log(np.exp(lp0).sum())
    h = rng.normal(size=d) * 3.0
    norm_h = np.sqrt((h ** 2).sum())
    assert abs(np.exp(lp[0, 0, 2]) - 0.8) < 1e-12 and norm_h > 2
    for delta, wd, klf in ((rng.normal(size=d) * 0.7, 25.0, 0.0), (np.zeros(d), 25.0, 0.0),
                           (rng.normal(size=d) * 0.02, 0.0, 0.0), (rng.normal(size=d), 0.5, 0.3)):
        # the reference, term by term
        rows = []
        for r in range(R - 1):
            vals = []
            for k in range(K):
                if tok_w[r, k]:
                    v = lp[r, k, tok_ids[r, k]]
                    vals.append(-np.log(1 - np.exp(v)) if mode == "unlikelihood" else v)
            rows.append(sum(vals) / len(vals))
        main = -np.mean(rows) if mode == "edit" else np.mean(rows)
        p_now, p0 = np.exp(lp[-1, 0]), np.exp(lp0)
        kl = (p_now * np.log(p_now / p0)).sum() if mode == "edit" else (p0 * np.log(p0 / p_now)).sum()
        want = main + klf * kl + wd * np.sqrt((delta ** 2).sum()) / norm_h ** 2
        total, got_main = ed.z_objective(jnp.asarray(lp, jnp.float32), jnp.asarray(lp0, jnp.float32),
                                         jnp.asarray(tok_ids), jnp.asarray(tok_w, jnp.float32),
                                         jnp.asarray(delta, jnp.float32), jnp.float32(norm_h), mode=mode,
                                         weight_decay=wd, kl_factor=klf)
        assert float(got_main) == pytest.approx(main, rel=1e-5, abs=1e-6)
        assert float(total) == pytest.approx(want, rel=1e-5, abs=1e-6), (delta, wd, klf)
        if wd:  # the weight-decay term alone: the total less the main term at KL weight 0 (0 at delta = 0)
            got_wd = float(ed.z_objective(jnp.asarray(lp, jnp.float32), jnp.asarray(lp0, jnp.float32),
                                          jnp.asarray(tok_ids), jnp.asarray(tok_w, jnp.float32),
                                          jnp.asarray(delta, jnp.float32), jnp.float32(norm_h), mode=mode,
                                          weight_decay=wd, kl_factor=0.0)[0]) - float(got_main)
            assert got_wd == pytest.approx(wd * np.sqrt((delta ** 2).sum()) / norm_h ** 2, rel=1e-4, abs=1e-5)
