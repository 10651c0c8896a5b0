"""NAS (norm-anchored scaling) for MEMIT and AlphaEdit: the v* rule and the trimmed mean by hand in float64 numpy,
and the targets an edit writes on a tiny GPT-2 against v0 and h read from the torch model by hooks."""
import numpy as np
import pytest
import torch

import jaxedit
from jaxedit import JaxeditError
from jaxedit.edit import memit as ed
from test_editing import random_stats

REQS = [{"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower", "target": " Seattle"},
        {"prompt": "{} plays the", "subject": "Miles Davis", "target": " guitar"},
        {"prompt": "The Space Needle is in {}", "subject": "Seattle", "target": " Paris"}]


def test_vstar_rule_by_hand():
    """v* = delta + v0; |v*| > 2 mean: v* = v0 (nothing written); else v* scaled to the mean; z = h - v0 + v*."""
    h = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    v0 = np.array([[0.5, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    delta = np.array([[0.5, 0.0, 0.0], [0.0, 9.0, 0.0], [3.0, 4.0, 0.0]])  # |v*| = 1, 10, 5
    z, written, norm = ed.nas_targets(h, delta, v0, mean_norm=2.5)
    np.testing.assert_allclose(norm, [1.0, 10.0, 5.0])
    assert written.tolist() == [True, False, True]  # 10 > 2 x 2.5; 5 is not above 5
    expected = np.array([[1.0 - 0.5 + 2.5, 0, 0],  # v* = (1, 0, 0) scaled to 2.5
                         [0, 2.0, 0],  # v* = v0: z = h
                         [1.5, 2.0, 1.0]])  # v* = (3, 4, 0) / 5 x 2.5
    np.testing.assert_allclose(z, expected, atol=1e-6)


def test_trimmed_mean_drops_the_top_share():
    vals = np.arange(1.0, 41.0)  # 40 values: floor(0.05 x 40) = 2 dropped (39, 40)
    assert ed.trimmed_mean(vals[::-1], 0.95) == pytest.approx(np.arange(1.0, 39.0).mean())
    assert ed.trimmed_mean(vals[:19], 0.95) == pytest.approx(vals[:19].mean())  # floor(0.95) = 0 dropped
    assert ed.nas_sample(list(range(10)), 20) == list(range(10))
    s = ed.nas_sample(list(range(100)), 5)
    assert len(set(s)) == 5 and s == ed.nas_sample(list(range(100)), 5)  # seed 0: the same sample every time


def test_nas_targets_against_torch(tiny_dirs, monkeypatch):
    """The z an edit with nas=True writes equals the rule applied to delta (the plain run's z - h) and to v0 and h
    read by hooks from the torch model (the MLP output and the block output of the last edited layer at the
    subject's last token of prompt + the target's tokens but the last)."""
    model, tok = jaxedit.load(tiny_dirs["gpt2"][0])
    hf = tiny_dirs["gpt2"][1].double().eval()
    layers = [0, 1]
    stats = random_stats(model.config, layers)
    seen = []
    real = ed.spread
    monkeypatch.setattr(ed, "spread", lambda *a, **k: seen.append(np.asarray(a[5], np.float64)) or real(*a, **k))
    kw = dict(tokenizer=tok, layers=layers, stats=stats, context_prefixes=(), v_num_grad_steps=4, progress=False)
    jaxedit.memit(model, REQS, **kw)
    _, report = jaxedit.memit(model, REQS, nas=True, nas_mean_norm=3.0, **kw)
    z_plain, z_nas = seen
    h, v0 = [], []
    for r in REQS:
        tmpl = r["prompt"] if "{}" in r["prompt"] else r["prompt"].replace(r["subject"], "{}", 1)
        target = tok(r["target"], add_special_tokens=False)["input_ids"]
        ids, key = ed._encode_with_key(tok, "{}", tmpl, r["subject"], target[:-1])
        got = {}
        hook = hf.transformer.h[layers[-1]].mlp.register_forward_hook(lambda m, i, o: got.update(mlp=o))
        with torch.no_grad():
            out = hf(torch.tensor([ids]), output_hidden_states=True)
        hook.remove()
        h.append(out.hidden_states[layers[-1] + 1][0, key].numpy())
        v0.append(got["mlp"][0, key].numpy())
    h, v0 = np.array(h), np.array(v0)
    delta = z_plain - h
    vstar = delta + v0
    norm = np.linalg.norm(vstar, axis=1)
    keep = norm <= 6.0
    want = h - v0 + np.where(keep[:, None], vstar * (3.0 / norm)[:, None], v0)
    np.testing.assert_allclose(z_nas, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert report["nas"]["written"] == keep.tolist() and report["nas"]["mean_norm"] == 3.0
    np.testing.assert_allclose(report["nas"]["vstar_norm"], norm, rtol=1e-4)
    # a mean below half of every |v*|: nothing is written, the weights stay (to float32 rounding)
    small = float(norm.min()) / 4
    edited, report = jaxedit.memit(model, REQS, nas=True, nas_mean_norm=small, **kw)
    assert report["nas"]["written"] == [False] * 3
    w0, w1 = (np.asarray(jaxedit.params_of(m)["blocks"]["w_out"]) for m in (model, edited))
    assert np.abs(w1 - w0).max() < 1e-5 * np.abs(w0).max()


@pytest.mark.slow
def test_nas_mean_from_the_requests_and_refusals(tiny_dirs):
    """Without nas_mean_norm the mean is NAS's trimmed mean of the clean |v*| of the requests (computed on the
    unedited model, bare prompts), the value the edit's report records; AlphaEdit keeps it in its state."""
    model, tok = jaxedit.load(tiny_dirs["gpt2"][0])
    layers = [1]
    stats = random_stats(model.config, layers)
    kw = dict(tokenizer=tok, layers=layers, stats=stats, context_prefixes=(), v_num_grad_steps=3, progress=False)
    hp = ed.hparams_for(model.config, layers=tuple(layers), context_prefixes=(), v_num_grad_steps=3, nas=True)
    reqs = ed.parse_requests(REQS, tok, "edit")
    clean = ed.vstar_mean_norm(model, tok, reqs, hp, tuple(layers))
    out = ed.optimize_targets(model, tok, reqs, "edit", hp, tuple(layers), ["{}"])
    norms = np.linalg.norm(out[2].astype(np.float64) + out[6], axis=1)
    assert clean["mean_norm"] == pytest.approx(norms.mean(), rel=1e-5) and clean["samples"] == 3
    _, report = jaxedit.memit(model, REQS, nas=True, **kw)
    assert report["nas"]["mean_norm"] == pytest.approx(clean["mean_norm"], rel=1e-5)
    _, report = jaxedit.alphaedit(model, REQS[:2], nas=True, null_space_threshold="energy:0.5", **kw)
    assert report["state"]["nas_mean_norm"] == pytest.approx(
        ed.vstar_mean_norm(model, tok, reqs[:2], hp, tuple(layers))["mean_norm"], rel=1e-5)
    for call, msg in [(lambda: jaxedit.memit(model, REQS, nas_mean_norm=2.0, **kw), "nas_mean_norm is NAS's"),
                      (lambda: jaxedit.memit(model, REQS, nas=True, nas_mean_norm=-1.0, **kw),
                       "nas_mean_norm must be a number > 0"),
                      (lambda: jaxedit.delete(model, [dict(REQS[0], suppress=" Paris", target=None)], nas=True,
                                              **kw), "deletion has none")]:
        with pytest.raises(JaxeditError, match=msg):
            call()


@pytest.mark.slow
def test_nas_in_a_sequence_is_measured_once_and_kept(tiny_dirs, tmp_path):
    """edit_sequential(nas=True): the mean is measured once on the unedited model, recorded with the checkpoints,
    and a resumed run keeps it (it is not measured again on the edited model); --nas on the command line."""
    import json

    from click.testing import CliRunner

    from jaxedit.cli.main import cli

    model, tok = jaxedit.load(tiny_dirs["gpt2"][0])
    layers = [1]
    stats = random_stats(model.config, layers)
    kw = dict(tokenizer=tok, layers=layers, stats=stats, context_prefixes=(), v_num_grad_steps=3, progress=False,
              method="memit", batch_size=1, nas=True)
    out = str(tmp_path / "seq")
    first, rep = jaxedit.edit_sequential(model, REQS[:2], out=out, **kw)
    hp = ed.hparams_for(model.config, layers=tuple(layers), context_prefixes=(), v_num_grad_steps=3, nas=True)
    want = ed.vstar_mean_norm(model, tok, ed.parse_requests(REQS[:2], tok, "edit"), hp, tuple(layers))
    assert rep["nas_mean_norm"] == pytest.approx(want["mean_norm"], rel=1e-5)
    assert json.load(open(tmp_path / "seq" / "sequence.json"))["nas_mean_norm"] == rep["nas_mean_norm"]
    for b in rep["batches"]:  # each batch says which of its targets NAS wrote, against v*'s norm and the mean
        nas = b["parts"][0]["nas"]
        assert nas["mean_norm"] == rep["nas_mean_norm"] and len(nas["written"]) == len(nas["vstar_norm"]) == 1
        assert nas["written"][0] == (nas["vstar_norm"][0] <= 2 * nas["mean_norm"])
    again, rep2 = jaxedit.edit_sequential(model, REQS[:2], out=out, **kw)  # everything done: kept, not remeasured
    assert rep2["nas_mean_norm"] == rep["nas_mean_norm"]
    res = CliRunner().invoke(cli, ["edit", "--model", tiny_dirs["gpt2"][0], "--requests", "demo", "--method",
                                   "ultraedit", "--batch-size", "2", "--nas", "--dry-run"])
    assert res.exit_code == 2 and "UltraEdit has none" in res.output, res.output
    res = CliRunner().invoke(cli, ["edit", "--model", tiny_dirs["gpt2"][0], "--requests", "demo", "--method",
                                   "alphaedit", "--batch-size", "2", "--nas", "--corpus", "model", "--dry-run"])
    assert res.exit_code == 0, res.output


def test_z_optimization_in_chunks_equals_one_call(tiny_dirs, monkeypatch):
    """Requests beyond the memory budget are optimized in equal chunks (one compiled program); each request's
    optimization is its own, so the chunks give the deltas one call gives."""
    model, tok = jaxedit.load(tiny_dirs["gpt2"][0])
    layers = (1,)
    hp = ed.hparams_for(model.config, layers=layers, context_prefixes=(), v_num_grad_steps=3)
    reqs = ed.parse_requests(REQS, tok, "edit")
    whole = ed.optimize_targets(model, tok, reqs, "edit", hp, layers, ["{}"])
    per = ed.z_request_bytes(model.config, 2, 16, 16, 4, 1)
    assert ed.z_chunk(model.config, 2, 16, 16, 4, 1, 3, budget=1.5 * per) == 1
    assert ed.z_chunk(model.config, 2, 16, 16, 4, 1, 3, budget=2.5 * per) == 2  # 3 requests: 2 calls of 2
    calls = []
    real = ed.optimize_deltas
    monkeypatch.setattr(ed, "optimize_deltas", lambda *a, **k: calls.append(a[2].shape[0]) or real(*a, **k))
    monkeypatch.setattr(ed.runtime, "default_memory_budget", lambda: 1.0)  # one request per call
    chunked = ed.optimize_targets(model, tok, reqs, "edit", hp, layers, ["{}"])
    assert calls == [1] * len(REQS)
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
