"""Attribution patching against torch autograd on the HF model (gradients of the corrupted run's mean p(answer)
with respect to each block / MLP / attention output, dotted with clean - corrupted)."""
import numpy as np
import pytest
import torch

import jaxedit
from jaxedit.locate.attribution import attribution_patching
from jaxedit.locate.tracing import draw_noise, find_token_range, trace
from tiny_models import build_hf_model

PROMPT = "The Eiffel Tower is located in the city of"
# the other model family's run (tests/conftest.py: SLOW_CASES): the fast tier compares LLaMA's with torch
SLOW_CASES = {"test_attribution_equals_torch_autograd[gpt2]"}


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa-untied"])
def tiny(request, tmp_path_factory, tokenizer):
    hf = build_hf_model(request.param, seed=5, init_std=0.15)
    d = tmp_path_factory.mktemp("attr-" + request.param)
    hf.save_pretrained(d)
    tokenizer.save_pretrained(d)
    model, tok = jaxedit.load(str(d))
    return hf, model, tok


def torch_attribution(hf, ids, span, noise, answer, window):
    gpt2 = hf.config.model_type == "gpt2"
    base = hf.transformer if gpt2 else hf.model
    layers, emb = (base.h, base.wte) if gpt2 else (base.layers, base.embed_tokens)
    mods = {"hidden": list(layers), "mlp": [l.mlp for l in layers],
            "attn": [l.attn if gpt2 else l.self_attn for l in layers]}
    S, (s, e) = noise.shape[0], span

    def run(noisy):
        kept = {k: [] for k in mods}
        hooks = []
        for k, ms in mods.items():
            for m in ms:
                def keep(mod, i, o, k=k):
                    h = o[0] if isinstance(o, tuple) else o
                    if h.requires_grad:
                        h.retain_grad()
                    kept[k].append(h)
                hooks.append(m.register_forward_hook(keep))
        if noisy:
            hooks.append(emb.register_forward_hook(
                lambda m, i, o: o + torch.nn.functional.pad(torch.from_numpy(noise), (0, 0, s, o.shape[1] - e))))
        x = torch.tensor([ids] * (S if noisy else 1))
        p = torch.softmax(hf(x).logits[:, -1], -1)[:, answer]
        for h in hooks:
            h.remove()
        return p, kept

    _, clean = run(False)
    p, corr = run(True)
    p.sum().backward()
    L, T = len(layers), len(ids)
    out = {}
    for k in mods:
        term = np.zeros((L, T))
        for l in range(L):
            diff = (clean[k][l][0][None] - corr[k][l]).detach()
            term[l] = (diff * corr[k][l].grad).sum(-1).mean(0).numpy()
        if k != "hidden":
            term = np.stack([term[max(0, l - window // 2):min(L, l - (-window // 2))].sum(0) for l in range(L)])
        out[k] = (p.mean().item() + term).T
    hf.zero_grad()
    return out, p.mean().item()


def test_attribution_equals_torch_autograd(tiny):
    hf, model, tok = tiny
    ids = tok(PROMPT)["input_ids"]
    span = find_token_range(tok, ids, "Eiffel Tower")
    noise = draw_noise(3, span[1] - span[0], model.config.d_model, 0.5)
    res = attribution_patching(model, input_ids=ids, span=span, samples=3, noise=noise, window=3)
    ref, low = torch_attribution(hf, ids, span, noise, res["hidden"].answer_id, 3)
    for kind in ("hidden", "mlp", "attn"):
        assert res[kind].low_score == pytest.approx(low, abs=1e-6)
        assert np.abs(res[kind].scores - ref[kind]).max() < 1e-5, kind
        assert np.ptp(ref[kind]) > 1e-4


@pytest.mark.slow
def test_attribution_tracks_the_exact_grid_for_small_effects(tiny):
    """With weak noise every restoration is a small change, where the first-order estimate is close (window 1: a
    wider window's joint restoration also clamps later MLPs of the window, which the summed estimate ignores)."""
    _, model, tok = tiny
    kw = dict(span="Eiffel Tower", tokenizer=tok, samples=3, noise=0.0005, kinds=("hidden", "mlp", "attn"), window=1)
    exact = trace(model, PROMPT, **kw)
    approx = attribution_patching(model, PROMPT, **kw)
    for k in ("hidden", "mlp", "attn"):
        ie, est = exact[k].ie, approx[k].ie
        assert np.abs(ie).max() > 1e-6
        assert np.abs(est - ie).max() < 0.1 * np.abs(ie).max()
