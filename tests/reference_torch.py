"""Causal tracing with the reference's structure, in PyTorch over a transformers model, written here from
docs/methods.md section 1 as an independent check (tests) and a baseline (benchmarks): for every (token, layer) cell and
kind, one forward of 1 clean + S noisy rows, noise added to the span's token embeddings and the clean row's state
copied into the noisy rows by forward hooks, logits at every position."""
from __future__ import annotations

import numpy as np
import torch


def _parts(hf):
    gpt2 = hf.config.model_type == "gpt2"
    base = hf.transformer if gpt2 else hf.model
    return gpt2, (base.h if gpt2 else base.layers), (base.wte if gpt2 else base.embed_tokens)


def torch_scores(hf, ids, span, noise, answer, kind="hidden", window=1, cells=()):
    """The corrupted run and the restorations of ``cells`` [(token, layer)] alone. Returns ({cell: score},
    low_score, high_score); answer: the token whose probability is read."""
    gpt2, layers, emb = _parts(hf)
    L, S = len(layers), noise.shape[0]
    s, e = span
    x = torch.tensor([list(map(int, ids))] * (S + 1))
    tnoise = torch.from_numpy(np.asarray(noise, np.float32)).to(emb.weight.dtype)

    def sub(l):
        if kind == "hidden":
            return layers[l]
        return layers[l].mlp if kind == "mlp" else (layers[l].attn if gpt2 else layers[l].self_attn)

    def run(patch):  # patch: list of (module, token)
        hooks = [emb.register_forward_hook(lambda m, i, o: o.__setitem__(
            (slice(1, None), slice(s, e)), o[1:, s:e] + tnoise))]
        for module, t in patch:
            def restore(m, i, o, t=t):
                h = o[0] if isinstance(o, tuple) else o
                h[1:, t] = h[0, t]
            hooks.append(module.register_forward_hook(restore))
        try:
            with torch.no_grad():
                logits = hf(x).logits
        finally:
            for h in hooks:
                h.remove()
        probs = torch.softmax(logits[:, -1].double(), -1)
        return float(probs[0, answer]), float(probs[1:, answer].mean())

    high, low = run([])
    scores = {}
    for t, l in cells:
        lays = [l] if kind == "hidden" else range(max(0, l - window // 2), min(L, l - (-window // 2)))
        scores[(t, l)] = run([(sub(j), t) for j in lays])[1]
    return scores, low, high


def torch_trace(hf, ids, span, noise, answer, kind, window):
    """Returns (scores [T, L], low_score, high_score) for one kind; answer: the token whose probability is read."""
    L, T = len(_parts(hf)[1]), len(ids)
    cells = [(t, l) for t in range(T) for l in range(L)]
    got, low, high = torch_scores(hf, ids, span, noise, answer, kind, window, cells)
    scores = np.zeros((T, L))
    for (t, l), v in got.items():
        scores[t, l] = v
    return scores, low, high
