"""benchmarks/flops_table.py: its per-step FLOP counts for tiny configs equal a naive count made here from the
parameter tree's matrix sizes (jaxedit.model.abstract_params: 2 x matrix entries x tokens for each matmul, plus
4 x keys x heads x head_dim per query for the attention scores and weighted sum), within 1e-9 relative (both are
float64 sums of integers, so they should agree exactly)."""
import importlib.util
import math
import os

import numpy as np
import pytest

from jaxedit.config import ModelConfig
from jaxedit.model import abstract_params

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("flops_table", os.path.join(os.path.dirname(HERE), "benchmarks",
                                                                          "flops_table.py"))
ft = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ft)

TINY = {
    "gpt2": dict(model_type="gpt2", n_layer=4, n_embd=40, n_head=5, n_positions=64, vocab_size=320),
    "llama-gqa-untied": dict(model_type="llama", num_hidden_layers=4, hidden_size=32, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, intermediate_size=64, vocab_size=320,
                             max_position_embeddings=128, tie_word_embeddings=False),
}
REL = 1e-9


class Naive:
    """Matmul sizes read off the parameter tree, not off block_flops / row_flops."""

    def __init__(self, cfg):
        p = abstract_params(cfg)
        self.cfg = cfg
        self.mat = {k: math.prod(a.shape[1:]) for k, a in p["blocks"].items() if len(a.shape) == 3}
        self.head = math.prod((p.get("lm_head") or p.get("wte") or p["embed"]).shape)
        self.f = p["blocks"]["w_out"].shape[1]

    def attn(self, keys):  # scores q.k and the weighted sum of values, per query
        return 4 * keys * self.cfg.n_heads * self.cfg.head_dim

    def per_token(self, keys, names=None):
        names = self.mat if names is None else names
        return 2 * sum(self.mat[n] for n in names) + self.attn(keys)


@pytest.fixture(params=list(TINY))
def cfg(request):
    return ModelConfig.from_hf(TINY[request.param])


def test_statistics_match_naive(cfg):
    nv, layers, texts, T = Naive(cfg), (1, 2), 7, 12
    c = ft.stats_flops(cfg, layers, texts, T)
    tokens = texts * T
    model = tokens * (layers[-1] + 1) * nv.per_token(T)  # blocks 0..last statistics layer, no LM head
    outer = len(layers) * tokens * 2 * nv.f * nv.f  # k k^T per token and statistics layer
    assert c["model"] == pytest.approx(model, rel=REL)
    assert c["highest"] == pytest.approx(outer, rel=REL)
    assert c["f32"] == c["linalg"] == 0


def test_saliency_matches_naive(cfg):
    nv, T = Naive(cfg), 16
    fwd = T * cfg.n_layers * nv.per_token(T) + T * 2 * nv.head  # logits at every position
    assert ft.step_counts(cfg)["saliency"]["model"] == pytest.approx(3 * fwd, rel=REL)  # + weight gradients


@pytest.mark.parametrize("window", [3, 10])
def test_trace_matches_naive(cfg, window):
    """The packed grid, enumerated restoration by restoration (one restore layer per step)."""
    nv, L, T, S = Naive(cfg), cfg.n_layers, 6, 3
    kinds = ("hidden", "mlp", "attn")
    P = T * (T + 1) // 2  # every token row t packs positions t..T-1; one row group at this size
    qkv = ("wq", "wk", "wv")
    mlp = [n for n in nv.mat if n not in qkv + ("wo",)]
    total = (1 + S) * (T * L * nv.per_token(T) + 2 * nv.head)  # clean + corrupted runs, logits at the last token
    for kind in kinds:
        if kind == "hidden":
            firsts = [l + 1 for l in range(L)]
        else:
            wins = {(max(0, l - window // 2), min(L, l + math.ceil(window / 2))) for l in range(L)}
            firsts = [a + 1 for a, _ in wins]
        for first in firsts:
            for _ in range(S):
                for j in range(first, L - 1):  # full blocks on all packed positions
                    total += P * nv.per_token(T + P)
                total += P * 2 * sum(nv.mat[n] for n in qkv)  # last block: keys/values everywhere,
                total += T * (nv.per_token(T + P, ["wo"] + mlp))  # the rest at each row's last token
                total += T * 2 * nv.head
                if kind == "attn":
                    total += T * 2 * sum(nv.mat[n] for n in mlp)
    got = ft.trace_flops(cfg, T, S, kinds, window, layers_per_step=1)
    assert got == pytest.approx(total, rel=REL)
    # the accelerator's batching of restore layers only adds work (a step runs from its group's first start)
    assert ft.trace_flops(cfg, T, S, kinds, window, layers_per_step=2) >= got


def test_table_runs(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["flops_table.py", "--models", "gpt2-xl"])
    ft.main()
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and "gpt2-xl" in ln]
    assert len(rows) == len(ft.STEPS)
    assert np.all(["estimate" in out, "989" in out, "495" in out, "67" in out])
