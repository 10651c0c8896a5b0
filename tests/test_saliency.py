"""Saliency profiles against the gradient of the tiny HF model in torch (float64), an independent reference."""
import numpy as np
import pytest
import torch

import jaxedit
from jaxedit import JaxeditError
from jaxedit.locate.saliency import saliency, saliency_batch

REQS = [{"prompt": "The Eiffel Tower is located in the city of", "target": " Paris"},
        {"prompt": "Miles Davis plays the", "target": " trumpet"},
        {"prompt": "Beats Music is owned by"}]
# the other model family's runs (tests/conftest.py: SLOW_CASES): the fast tier compares LLaMA's profiles and GPT-2's
# default target with their references
SLOW_CASES = {"test_profiles_equal_torch_float64[gpt2]", "test_default_target_is_the_argmax[llama-gqa-untied]"}


def torch_profiles(hf, ids, target):
    """(block, attention, mlp, mlp_out) [L] from torch float64 gradients: mean over each output unit's weights of
    |grad|, then mean over the layer's (module's) output units."""
    model = hf.double()
    model.zero_grad()
    x = torch.tensor([ids + target])
    logp = torch.log_softmax(model(x).logits[0, :-1], -1)
    n = len(ids)
    loss = -torch.stack([logp[n - 1 + i, t] for i, t in enumerate(target)]).mean()
    loss.backward()
    gpt2 = hf.config.model_type == "gpt2"
    layers = hf.transformer.h if gpt2 else hf.model.layers

    def cols(w):  # per-output-unit means of |grad|
        g = w.grad.abs()
        return g.mean(0) if gpt2 else g.mean(1)  # Conv1D is [in, out]; nn.Linear is [out, in]

    out = {k: [] for k in ("block", "attention", "mlp", "mlp_out")}
    for layer in layers:
        if gpt2:
            att = [layer.attn.c_attn.weight, layer.attn.c_proj.weight]
            mlp = [layer.mlp.c_fc.weight, layer.mlp.c_proj.weight]
        else:
            a = layer.self_attn
            att = [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight]
            mlp = [layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight]
        for name, ws in (("block", att + mlp), ("attention", att), ("mlp", mlp), ("mlp_out", mlp[-1:])):
            c = torch.cat([cols(w) for w in ws])
            out[name].append(float(c.mean()))
    hf.float()
    return {k: np.array(v) for k, v in out.items()}, loss.item()


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa-untied"])
def tiny(request, tiny_dirs):
    path, hf = tiny_dirs[request.param]
    model, tok = jaxedit.load(path)
    return hf, model, tok


def test_profiles_equal_torch_float64(tiny):
    hf, model, tok = tiny
    for req in REQS[:2]:
        ids = tok(req["prompt"])["input_ids"]
        tgt = tok(req["target"], add_special_tokens=False)["input_ids"]
        ref, ref_loss = torch_profiles(hf, ids, tgt)
        r = saliency(model, req["prompt"], target=req["target"], tokenizer=tok)
        assert r.loss == pytest.approx(ref_loss, rel=1e-5)
        np.testing.assert_allclose(r.layer, ref["block"], rtol=1e-5)
        for m in ("attention", "mlp", "mlp_out"):
            np.testing.assert_allclose(r.modules[m], ref[m], rtol=1e-5)


def test_default_target_is_the_argmax(tiny):
    hf, model, tok = tiny
    ids = tok(REQS[2]["prompt"])["input_ids"]
    with torch.no_grad():
        top = int(hf(torch.tensor([ids])).logits[0, -1].argmax())
    a = saliency(model, REQS[2]["prompt"], tokenizer=tok)
    b = saliency(model, input_ids=ids, target=top)
    np.testing.assert_allclose(a.layer, b.layer, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_batched_equals_one_by_one_for_any_chunk(tiny, chunk):
    _, model, tok = tiny
    per, mean = saliency_batch(model, REQS, tokenizer=tok, chunk=chunk)
    singles = [saliency(model, r["prompt"], target=r.get("target"), tokenizer=tok) for r in REQS]
    for p, s in zip(per, singles):
        np.testing.assert_allclose(p.layer, s.layer, rtol=1e-5)
        np.testing.assert_allclose(p.modules["mlp_out"], s.modules["mlp_out"], rtol=1e-5)
    np.testing.assert_allclose(mean.layer, np.mean([s.layer for s in singles], 0), rtol=1e-5)
    assert mean.n_examples == 3
    assert mean.top_layers(2) == list(np.argsort(-mean.layer)[:2])


def test_bad_examples(tiny):
    _, model, tok = tiny
    with pytest.raises(JaxeditError, match="empty prompt"):
        saliency(model, "  ", tokenizer=tok)
    with pytest.raises(JaxeditError, match="no examples"):
        saliency_batch(model, [], tokenizer=tok)


def test_cli_saliency(tiny_dirs, tmp_path):
    import json

    from click.testing import CliRunner

    from jaxedit.cli.main import cli

    src = tmp_path / "ex.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in REQS))
    res = CliRunner().invoke(cli, ["saliency", "--model", tiny_dirs["gpt2"][0], "--batch", str(src),
                                   "--out", str(tmp_path / "o"), "--top", "2"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "o" / "saliency.json").read_text())
    assert len(data["examples"]) == 3 and len(data["mean"]["block"]) == 3
    np.testing.assert_allclose(data["mean"]["mlp_out"],
                               np.mean([e["mlp_out"] for e in data["examples"]], 0), rtol=1e-6)
    assert (tmp_path / "o" / "saliency.png").is_file() and (tmp_path / "o" / "saliency.csv").is_file()
    bad = CliRunner().invoke(cli, ["saliency", "--model", tiny_dirs["gpt2"][0]])
    assert bad.exit_code == 2 and bad.output.startswith("error: give either --prompt")
