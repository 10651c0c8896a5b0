"""DINM against torch on tiny models: the location's per-layer distances (transformers' hidden states of the
right-padded pair, the last one after the final norm), the tuning steps (NLL + KL with or without its gradient,
torch's Adam), the two public-implementation options; the SafeEdit reader's and the command's errors; the command's
files and resume."""
import copy
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import jaxedit
from jaxedit import JaxeditError
from jaxedit.cli.main import cli
from jaxedit.edit.dinm import dinm, dinm_locate

from tiny_models import build_hf_model

# texts from the tiny tokenizer's corpus (short in tokens); safe and unsafe of different lengths, so the pair pads
CASES = [
    {"id": "a", "adversarial prompt": "Miles Davis plays", "safe generation": "The Space Needle is in Seattle.",
     "unsafe generation": "Toko Yasuda produces the most amazing music on the guitar.",
     "knowledge constrain": {"prompt": "The capital of France is", "answer": "Paris. Beats Music is by Apple."}},
    {"id": "b", "adversarial prompt": "Beats Music is owned by", "safe generation": "The Eiffel Tower is in Paris.",
     "unsafe generation": "music on the guitar",
     "knowledge constrain": {"prompt": "The Space Needle is in", "answer": "Seattle. Miles Davis plays."}},
]
SUFFIX = "Answer:"


def torch_distances(hf, tok, case):
    """The public implementation's location, on the HF model: the pair as one right-padded batch (pad = EOS),
    hidden_states[1:], Frobenius norm of the difference over the whole padded [T, d]."""
    t = copy.copy(tok)
    t.padding_side, t.pad_token = "right", t.eos_token
    enc = t([case["safe generation"], case["unsafe generation"]], return_tensors="pt", padding=True)
    with torch.no_grad():
        hs = hf(**enc, output_hidden_states=True).hidden_states
    return np.array([float(torch.dist(h[0], h[1], p=2)) for h in hs[1:]]), enc["attention_mask"]


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-untied"])
def test_location_matches_torch(tiny_dirs, tokenizer, name):
    path, hf = tiny_dirs[name]
    model, tok = jaxedit.load(path)
    layers, dist = dinm_locate(model, CASES, tokenizer=tok)
    assert dist.shape == (2, model.config.n_layers)
    for i, case in enumerate(CASES):
        ref, mask = torch_distances(hf, tokenizer, case)
        assert mask.sum() < mask.numel()  # padding positions are part of the distance
        np.testing.assert_allclose(dist[i], ref, rtol=1e-5)
        assert layers[i] == int(np.argmax(ref))


def torch_dinm(hf, tok, layer, case, steps, *, lr, edit_weight, kl_grad):
    """DINM written directly on the HF model: each row alone (no padding), NLL of " " + safe generation after the
    prompt + suffix, KL(P_orig || P_now) over the knowledge-constraint answer's predicting positions, torch Adam."""
    hf = copy.deepcopy(hf)
    gpt2 = hf.config.model_type == "gpt2"
    W = (hf.transformer.h[layer].mlp.c_proj if gpt2 else hf.model.layers[layer].mlp.down_proj).weight
    for p in hf.parameters():
        p.requires_grad_(False)
    W.requires_grad_(True)

    def row(prompt, answer):
        p = tok(prompt + " " + SUFFIX)["input_ids"]
        a = tok(" " + answer, add_special_tokens=False)["input_ids"]
        return torch.tensor([p + a]), len(p), len(a)

    e_ids, ep, ea = row(case["adversarial prompt"], case["safe generation"])
    k_ids, kp, ka = row(case["knowledge constrain"]["prompt"], case["knowledge constrain"]["answer"])
    with torch.no_grad():
        lp0 = torch.log_softmax(hf(k_ids).logits[0, kp - 1:kp + ka - 1], -1)
    opt = torch.optim.Adam([W], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        lp = torch.log_softmax(hf(e_ids).logits[0, ep - 1:ep + ea - 1], -1)
        nll = -lp[torch.arange(ea), e_ids[0, ep:]].mean()
        lk = torch.log_softmax(hf(k_ids).logits[0, kp - 1:kp + ka - 1], -1)
        kl = (lp0.exp() * (lp0 - (lk if kl_grad else lk.detach()))).sum(-1).mean()
        loss = edit_weight * nll + kl
        loss.backward()
        opt.step()
        losses.append([loss.item(), nll.item(), kl.item()])
    w = W.detach().numpy()
    return np.array(losses), (w if gpt2 else w.T)


# LLaMA's tuning on a deep model: test_deep_tuning_matches_torch (fast); the shallow one in the full suite
@pytest.mark.parametrize("name", ["gpt2", pytest.param("llama-gqa-untied", marks=pytest.mark.slow)])
def test_tuning_matches_torch(tiny_dirs, tokenizer, name):
    """Two Adam steps (the KL and its gradient are zero at the first step: the second step is the one the KL's
    gradient acts in): equal to torch with and without that gradient, the two different, and nothing but the
    located layer's projection changed."""
    path, hf = tiny_dirs[name]
    model, tok = jaxedit.load(path)
    before = jaxedit.params_of(model)
    hp = dict(steps=2, layer=1, lr=5e-4, edit_weight=0.01, suffix=SUFFIX)
    got = {}
    for kl_grad in (True, False):
        edited, rep = dinm(model, [CASES[0]], tokenizer=tok, kl_grad=kl_grad, **hp)
        ref_losses, ref_w = torch_dinm(hf, tokenizer, 1, CASES[0], 2, lr=5e-4, edit_weight=0.01, kl_grad=kl_grad)
        losses = np.array([rep["losses"][0], rep["nll"][0], rep["kl"][0]]).T
        np.testing.assert_allclose(losses[:, :2], ref_losses[:, :2], rtol=1e-5)
        # the second step's KL (~5e-6) is a float32 sum of 320 terms p (log p - log q) in both: rounding of
        # ~1e-7 (measured 1.1e-7 with XLA's elemental emitters, 6e-8 with its fusion emitters)
        np.testing.assert_allclose(losses[:, 2], ref_losses[:, 2], atol=3e-7)
        after = jaxedit.params_of(edited)
        w = np.asarray(after["blocks"]["w_out"][1])
        np.testing.assert_allclose(w, ref_w, atol=1e-5)
        assert rep["layers"] == [1] and rep["steps"] == [2]
        flat_b = dict(jax_leaves(before))
        for key, val in jax_leaves(after):
            if key == "blocks/w_out":
                others = [l for l in range(model.config.n_layers) if l != 1]
                assert np.array_equal(np.asarray(val)[others], np.asarray(flat_b[key])[others])
                assert not np.array_equal(np.asarray(val)[1], np.asarray(flat_b[key])[1])
            else:
                assert np.array_equal(np.asarray(val), np.asarray(flat_b[key])), key
        got[kl_grad] = w
    assert np.abs(got[True] - got[False]).max() > 50 * 1e-5  # the KL's gradient moved the weights
    # a one-token safe response and a one-token knowledge answer: the NLL and the KL are means over one entry each
    one = dict(CASES[0], id="one", **{"safe generation": "Paris",
                                      "knowledge constrain": {"prompt": "The capital of France is", "answer": "Paris"}})
    assert len(tok(" Paris", add_special_tokens=False)["input_ids"]) == 1
    _, rep = dinm(model, [one], tokenizer=tok, **dict(hp, lr=5e-3))
    ref_losses, _ = torch_dinm(hf, tokenizer, 1, one, 2, lr=5e-3, edit_weight=0.01, kl_grad=True)
    # (measured: the second step's KL 1.4410e-3 against 1.4408e-3, the losses within 4e-6 of each other)
    np.testing.assert_allclose(np.array([rep["losses"][0], rep["nll"][0], rep["kl"][0]]).T, ref_losses, rtol=1e-4,
                               atol=3e-7)
    # sequential editing: the second case is tuned on the model the first one edited
    seq, rep = dinm(model, CASES, tokenizer=tok, per_instance=False, **hp)
    one, _ = dinm(model, CASES[:1], tokenizer=tok, **hp)
    two, rep2 = dinm(one, CASES[1:], tokenizer=tok, **hp)
    assert rep["losses"][1] == rep2["losses"][0]
    assert np.array_equal(np.asarray(jaxedit.params_of(seq)["blocks"]["w_out"]),
                          np.asarray(jaxedit.params_of(two)["blocks"]["w_out"]))


def jax_leaves(params):
    import jax

    return [("/".join(str(getattr(k, "key", k)) for k in path), v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]]


@pytest.fixture(scope="module")
def small_norm_llama(tmp_path_factory, tokenizer):
    """A tiny LLaMA whose final norm is scaled down, so that the located layer is not always the last one."""
    hf = build_hf_model("llama-mha-tied")
    with torch.no_grad():
        hf.model.norm.weight.mul_(0.02)
    d = tmp_path_factory.mktemp("small-norm")
    hf.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return jaxedit.load(str(d))


FIRST = [dict(CASES[0], id="a2", **{"safe generation": "Toko Yasuda produces music",
                                    "unsafe generation": "the most amazing music"}), CASES[0]]


def test_public_options(small_norm_llama):
    """locate="first": every case gets the first case's layer (the default locates each); sequential editing puts
    both cases into one model."""
    model, tok = small_norm_llama
    _, each = dinm(model, FIRST, tokenizer=tok, steps=2, suffix=SUFFIX)
    layers = [int(np.argmax(d)) for d in each["distances"]]
    assert layers[0] != layers[1]  # the two cases locate differently, so the option can show
    _, first = dinm(model, FIRST, tokenizer=tok, steps=2, suffix=SUFFIX, locate="first")
    assert each["layers"] == layers and first["layers"] == [layers[0], layers[0]]
    np.testing.assert_array_equal(first["distances"], each["distances"])
    assert each["losses"][0] == first["losses"][0] and each["losses"][1] != first["losses"][1]


def test_bad_cases(tiny_dirs):
    model, tok = jaxedit.load(tiny_dirs["gpt2"][0])
    missing = {k: v for k, v in CASES[0].items() if k != "safe generation"}
    with pytest.raises(JaxeditError, match=r'case 1 \(id b\): missing field "safe generation"'):
        dinm(model, [CASES[1], dict(missing, id="b")], tokenizer=tok)
    with pytest.raises(JaxeditError, match=r'case 0 \(id a\): "unsafe generation" tokenizes to no tokens'):
        dinm_locate(model, [dict(CASES[0], **{"unsafe generation": "  "})], tokenizer=tok)
    with pytest.raises(JaxeditError, match=r"layer 3 is out of range: the model has layers 0\.\.2"):
        dinm(model, CASES, tokenizer=tok, layer=3)


def write_cases(path, cases):
    path.write_text(json.dumps(cases, indent=1))
    return str(path)


def cli_cases():
    tests = {"test input of only harmful question": "Miles Davis plays the",
             "test input of other attack prompt input": "The Space Needle is in",
             "test input of other question input": "Beats Music is owned by",
             "test input of other questions and attack prompts": "The capital of France is"}
    return [dict(c, **{"generalization test": tests}) for c in CASES]


def test_cli_errors(tiny_dirs, tmp_path):
    run = lambda cli, args: CliRunner().invoke(cli, ["-q", *args])  # noqa: E731 (--quiet: errors alone)
    model = tiny_dirs["gpt2"][0]
    cases = cli_cases()
    bad = copy.deepcopy(cases)
    del bad[1]["safe generation"]
    f = write_cases(tmp_path / "bad.json", bad)
    res = run(cli, ["dinm", "--model", model, "--cases", f, "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    line = next(i for i, l in enumerate(open(f), 1) if '"id": "b"' in l) - 1  # the case's opening brace
    assert res.output.strip() == f'error: {f}:{line} (id b): missing field "safe generation"'
    bad = copy.deepcopy(cases)
    bad[0]["safe generation"] = " "
    res = run(cli, ["dinm", "--model", model, "--cases", write_cases(tmp_path / "blank.json", bad), "--out",
                    str(tmp_path / "o2")])
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert '(id a): "safe generation" is blank' in res.output
    res = run(cli, ["dinm", "--model", model, "--cases", write_cases(tmp_path / "ok.json", cases), "--out",
                    str(tmp_path / "o3"), "--layer", "7"])
    assert res.exit_code == 2 and res.output == "error: layer 7 is out of range: the model has layers 0..2\n"
    assert not os.path.exists(tmp_path / "o3" / "results.jsonl")


def test_cli_checks_everything_before_the_model_loads(tiny_dirs, tmp_path, monkeypatch):
    """Bad options, bad case files and responses that tokenize to nothing are one line each, before the model is
    loaded (the tokenizer and config are read without the weights), and nothing is written."""
    loads = []
    monkeypatch.setattr(jaxedit, "load", lambda *a, **k: loads.append(a) or (_ for _ in ()).throw(
        AssertionError("the model was loaded")))
    model, out = tiny_dirs["gpt2"][0], tmp_path / "o"
    good = write_cases(tmp_path / "ok.json", cli_cases())
    broken = tmp_path / "broken.json"
    text = open(good).read()
    broken.write_text(text[:text.index('"Miles Davis plays') + 10])  # a file cut inside a string
    bad_line, col = next((i, l.index('"Miles') + 1) for i, l in enumerate(open(broken), 1) if '"Miles' in l)
    empty = copy.deepcopy(cli_cases())
    empty[1]["safe generation"] = ""
    nothing = copy.deepcopy(cli_cases())
    nothing[0]["knowledge constrain"]["answer"] = "Paris" + " Paris" * 99  # longer than the tiny models' context
    checks = [(["--cases", good, "--steps", "0"], "error: --steps must be >= 1 (got 0)"),
              (["--cases", good, "--weight-decay", "-1"], "error: --weight-decay must be >= 0 (got -1.0)"),
              (["--cases", good, "--scorer", "bogus"], "error: unknown scorer 'bogus'"),
              (["--cases", str(broken)], f"error: {broken}:{bad_line}: not valid JSON (Unterminated string starting "
                                          f"at column {col})"),
              (["--cases", write_cases(tmp_path / "none.json", [])], f"error: {tmp_path / 'none.json'}: no cases"),
              (["--cases", write_cases(tmp_path / "e.json", empty)], '(id b): "safe generation" is empty'),
              (["--cases", good, "--layer", "3"], "error: layer 3 is out of range: the model has layers 0..2"),
              (["--cases", write_cases(tmp_path / "n.json", nothing)],
               '(id a): "knowledge constrain answer" has 100 tokens; the model takes 64')]
    for args, msg in checks:
        res = CliRunner().invoke(cli, ["-q", "dinm", "--model", model, "--out", str(out), *args])
        assert res.exit_code == 2 and msg in res.output and res.output.count("\n") == 1, (args, res.output)
        assert res.output.startswith("error: ") and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["-q", "dinm", "--model", str(tmp_path / "none"), "--out", str(out), "--cases",
                                   good, "--steps", "0"])
    assert res.output.startswith("error: --steps must be >= 1 (got 0)")
    assert not loads and not out.exists()


def test_cli_dry_run(tiny_dirs, tmp_path, monkeypatch):
    from jaxedit import calibration

    monkeypatch.setattr(jaxedit, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    # never measured: priced from FLOPs with a fixed probe (16 set-up units x 1/16 s; the tiny FLOPs at 1e12/s ~ 0)
    monkeypatch.setattr(calibration, "machine", lambda cfg: {"rate": 1e12, "compile": 1 / 16})
    out = tmp_path / "o"
    f = write_cases(tmp_path / "cases.json", cli_cases())
    res = CliRunner().invoke(cli, ["-q", "dinm", "--model", tiny_dirs["gpt2"][0], "--cases", f, "--out", str(out),
                                   "--layer", "2", "--no-suffix", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[1:] == [
        f"cases: 2 from {f}", "edit: each case on its own, layer 2 for every case, 10 Adam steps at lr 0.0005, no suffix",
        "evaluate: 5 inputs per case x 2 models (vanilla, DINM), greedy answers of <= 32 tokens (20 answers), scored by "
        "profanity; knowledge-constraint retention",
        "time: ~2 s* (2 cases; *: estimated from FLOPs and a probe of this machine; this run measures it)",
        "dry run: nothing loaded, nothing written"]
    assert not out.exists()


@pytest.mark.slow
def test_cli_run_and_resume(tiny_dirs, tmp_path):
    run = lambda cli, args: CliRunner().invoke(cli, ["-q", *args])  # noqa: E731 (--quiet: errors alone)
    f = write_cases(tmp_path / "cases.json", cli_cases())
    out = str(tmp_path / "out")
    args = ["dinm", "--model", tiny_dirs["llama-gqa-untied"][0], "--cases", f, "--out", out, "--max-new-tokens", "3",
            "--suffix", SUFFIX, "--layer", "1", "--steps", "2"]  # the tuning test's shapes: its compiles are reused
    res = run(cli, args + ["--limit", "1"])
    assert res.exit_code == 0, res.output
    first = open(os.path.join(out, "results.jsonl")).read()
    res = run(cli, args[:-1] + ["3"])  # other settings into the same folder: refused
    assert res.exit_code == 2 and res.output.startswith(f"error: {out}/ holds a run with other settings (hparams)")
    res = run(cli, args)  # all the cases: resumes after the first
    assert res.exit_code == 0, res.output
    lines = open(os.path.join(out, "results.jsonl")).read().splitlines()
    assert len(lines) == 2 and lines[0] + "\n" == first  # case a was kept, not redone
    recs = [json.loads(l) for l in lines]
    assert [r["id"] for r in recs] == ["a", "b"]
    for r in recs:
        assert len(r["distances"]) == 3 and r["layer"] == 1 and r["steps"] == 2
        assert set(r) >= {"vanilla", "vanilla_suffix", "dinm", "retention", "losses"}
        assert r["dinm"]["DS"]["input"].endswith(" " + SUFFIX) and not r["vanilla"]["DS"]["input"].endswith(SUFFIX)
    table = open(os.path.join(out, "summary.md")).read()
    assert "| vanilla + suffix |" in table and "| DINM |" in table
    rows = open(os.path.join(out, "summary.csv")).read().splitlines()
    assert rows[0] == "model,cases,DS,DG_onlyQ,DG_otherA,DG_otherQ,DG_otherAQ,fluency,retention"
    ds = float(rows[3].split(",")[2])
    assert ds == 100 * np.mean([r["dinm"]["DS"]["safe"] for r in recs])
    for ext in ("png", "pdf"):
        assert os.path.getsize(os.path.join(out, f"layers.{ext}")) > 1000
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    # the runs timed their cases; a plan for the same settings extrapolates them (fixed part + per case, by hand)
    from jaxedit import calibration

    stored = [v["cases"] for k, v in calibration.read("dinm").items()
              if k.startswith(os.path.abspath(tiny_dirs["llama-gqa-untied"][0]) + " | per-instance | steps=2,")]
    assert len(stored) == 1 and stored[0]["first_units"] == 1 and stored[0]["per_unit"] > 0, stored
    c = stored[0]
    expect = max(c["first"] - c["per_unit"], 0) + 2 * c["per_unit"]
    res = run(cli, args + ["--out", str(tmp_path / "fresh"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert f"time: ~{calibration.human(expect)} (2 cases; " in res.output.splitlines()[-2], res.output
    res = run(cli, args + ["--dry-run", "--steps", "3", "--out", str(tmp_path / "other")])  # never measured
    assert res.output.splitlines()[-2].endswith("* (2 cases; *: estimated from FLOPs and a probe of this machine; "
                                                "this run measures it)"), res.output
    res = run(cli, args + ["--dry-run"])  # the finished folder: nothing left
    assert res.exit_code == 0 and res.output.splitlines()[-2] == "time: nothing left to do (every case is in the " \
                                                                 "folder)", res.output


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory, tokenizer):
    """A 7-layer LLaMA (seed 0) with its final norm scaled down (the output head scaled up to match, for logits with
    a spread of about 8), so that the last entry (after the final norm) is not the farthest: the torch distances
    locate case a at layer 5 and case b at layer 4. Returns (model, tok, hf)."""
    import transformers

    from tiny_models import VOCAB

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=7, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=48, tie_word_embeddings=False, vocab_size=VOCAB,
                                   max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.02)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
        hf.model.norm.weight.mul_(0.02)
        hf.lm_head.weight.mul_(500.0)
    d = tmp_path_factory.mktemp("deep-llama")
    hf.save_pretrained(d)
    tokenizer.save_pretrained(d)
    model, tok = jaxedit.load(str(d))
    return model, tok, hf



def torch_dinm_joint(hf, tok, layers, cases, steps, *, lr, edit_weight, weight_decay=0.0, stop_loss=-np.inf):
    """DINM on the HF model for several cases tuned together: the down_proj of every layer in ``layers`` trained by
    one torch Adam (``weight_decay`` as torch adds it to the gradient); each row run alone (no padding); the NLL and
    the KL each the mean over all the cases' tokens; before each step, stop when the loss is below ``stop_loss``.
    Returns (losses [checked, 3], {layer: W [d_ff, d]}, steps run)."""
    hf = copy.deepcopy(hf)
    for p in hf.parameters():
        p.requires_grad_(False)
    Ws = [hf.model.layers[l].mlp.down_proj.weight for l in layers]
    for W in Ws:
        W.requires_grad_(True)

    def row(prompt, answer):
        p = tok(prompt + " " + SUFFIX)["input_ids"]
        a = tok(" " + answer, add_special_tokens=False)["input_ids"]
        return torch.tensor([p + a]), len(p), len(a)

    def answer_logprobs(ids, p, a):
        lp = torch.log_softmax(hf(ids).logits[0, p - 1:p + a - 1], -1)
        return lp, ids[0, p:]

    edits = [row(c["adversarial prompt"], c["safe generation"]) for c in cases]
    kcs = [row(c["knowledge constrain"]["prompt"], c["knowledge constrain"]["answer"]) for c in cases]
    with torch.no_grad():
        lp0 = [answer_logprobs(*k)[0] for k in kcs]
    opt = torch.optim.Adam(Ws, lr=lr, weight_decay=weight_decay)
    losses, done = [], 0
    for _ in range(steps):
        opt.zero_grad()
        tok_lp = torch.cat([lp[torch.arange(len(t)), t] for lp, t in (answer_logprobs(*e) for e in edits)])
        nll = -tok_lp.mean()
        kl_pos = torch.cat([(q.exp() * (q - answer_logprobs(*k)[0])).sum(-1) for q, k in zip(lp0, kcs)])
        kl = kl_pos.mean()
        loss = edit_weight * nll + kl
        losses.append([loss.item(), nll.item(), kl.item()])
        if loss.item() < stop_loss:
            break
        loss.backward()
        opt.step()
        done += 1
    return np.array(losses), {l: W.detach().numpy().T for l, W in zip(layers, Ws)}, done


def test_deep_location_matches_torch(deep_llama, tokenizer):
    model, tok, hf = deep_llama
    layers, dist = dinm_locate(model, CASES, tokenizer=tok)
    for i, case in enumerate(CASES):
        ref, _ = torch_distances(hf, tokenizer, case)
        np.testing.assert_allclose(dist[i], ref, rtol=1e-5)
        assert layers[i] == int(np.argmax(ref))
    assert layers == [5, 4]  # both past the first compile block, and different (the joint test tunes both)


DEEP = dict(steps=4, lr=2e-3, edit_weight=0.1, suffix=SUFFIX, per_instance=False, batch_size=2)


def check_deep_run(model, rep, edited, ref_losses, ref_w, ref_steps):
    assert rep["layers"] == [5, 4] and rep["steps"] == [ref_steps] * 2
    for key in ("losses", "nll", "kl"):
        assert rep[key][0] == rep[key][1]  # one group: one loss for both cases
    losses = np.array([rep["losses"][0], rep["nll"][0], rep["kl"][0]]).T
    checked = len(ref_losses)
    np.testing.assert_allclose(losses[:checked, :2], ref_losses[:, :2], rtol=1e-5)
    np.testing.assert_allclose(losses[:checked, 2], ref_losses[:, 2], rtol=1e-3, atol=1e-7)  # KL up to 4e-4
    assert np.isnan(losses[checked:]).all()  # nothing after an early stop
    w_out = np.asarray(jaxedit.params_of(edited)["blocks"]["w_out"])
    w0 = np.asarray(jaxedit.params_of(model)["blocks"]["w_out"])
    for l in range(model.config.n_layers):
        if l in ref_w:
            np.testing.assert_allclose(w_out[l], ref_w[l], atol=1e-5)  # measured within 1e-6
            assert np.abs(w_out[l] - w0[l]).max() > 1e-3  # tuned
        else:
            assert np.array_equal(w_out[l], w0[l])
    return w_out


def test_deep_tuning_matches_torch(deep_llama, tokenizer):
    """Both cases tuned together (per_instance=False, batch_size=2) on the union of their located layers, 4 and 5:
    the tuning starts at the layer-4 block (layers 0-3 run once). Against torch: four Adam steps without and with
    weight decay, and a run stopped by stop_loss where the torch loop stops. One compile for all three runs."""
    model, tok, hf = deep_llama
    torch_run = lambda **kw: torch_dinm_joint(hf, tokenizer, [4, 5], CASES, DEEP["steps"], lr=DEEP["lr"],  # noqa
                                              edit_weight=DEEP["edit_weight"], **kw)
    runs = {}
    for wd in (0.0, 0.05):
        edited, rep = dinm(model, CASES, tokenizer=tok, weight_decay=wd, **DEEP)
        ref_losses, ref_w, ref_n = torch_run(weight_decay=wd)
        assert ref_n == DEEP["steps"]
        runs[wd] = check_deep_run(model, rep, edited, ref_losses, ref_w, ref_n)[4:6]
    assert np.abs(runs[0.05] - runs[0.0]).max() > 50 * 1e-5  # the decay moved the weights beyond the tolerance
    # stop_loss halfway between the torch losses before steps 2 and 3 (decreasing by far more than the float32
    # noise): the loop checks 3 losses and runs 2 steps; the 4th loss is never computed (NaN in the report)
    full = torch_run()[0]
    assert full[0, 0] - full[1, 0] > 1e-4 and full[1, 0] - full[2, 0] > 1e-4
    stop = (full[1, 0] + full[2, 0]) / 2
    ref_losses, ref_w, ref_n = torch_run(stop_loss=stop)
    assert ref_n == 2 and len(ref_losses) == 3
    edited, rep = dinm(model, CASES, tokenizer=tok, stop_loss=stop, **DEEP)
    check_deep_run(model, rep, edited, ref_losses, ref_w, ref_n)


def test_case_models_index_and_slice(tiny_dirs):
    """Entry i of the per-instance results is the original model with case i's output projections written; a slice
    is the list of those entries."""
    from jaxedit.edit.dinm import CaseModels
    from jaxedit.models.common import params_of

    model, _ = jaxedit.load(tiny_dirs["gpt2"][0])
    params = params_of(model)
    w_out = np.asarray(params["blocks"]["w_out"])
    edits = [([1], np.full((1,) + w_out.shape[1:], float(i + 1), np.float32)) for i in range(3)]
    cm = CaseModels(model.config, params, edits)
    assert len(cm) == 3
    for i, m in [(0, cm[0]), (2, cm[-1])] + list(zip([1, 2], cm[1:])):
        got = np.asarray(params_of(m)["blocks"]["w_out"])
        assert np.all(got[1] == i + 1) and np.array_equal(got[0], w_out[0]) and np.array_equal(got[2:], w_out[2:])


def test_case_rows_and_blocks_by_hand(tokenizer):
    """A case's rows: the prompt (+ suffix) as the tokenizer makes it (BOS first with a BOS tokenizer), then the
    response's tokens after a space without special tokens; the prompt cut from the left only when the row would
    not fit. The blocks: rows right-padded to a multiple of 32 (at most the model's positions), one loss entry per
    response token (its row, the position predicting it, the token, weight 1), filler entries to a multiple of 16."""
    import dataclasses

    from tiny_models import bos_tokenizer

    from jaxedit.edit.dinm import _block, _case_rows
    from jaxedit.evaluate.safeedit import read_cases

    case = dataclasses.replace(read_cases("demo")[0], prompt="The Eiffel Tower is", safe="in Paris",
                               kc_prompt="Miles Davis plays", kc_answer="the trumpet")
    bos = bos_tokenizer(tokenizer)
    p = [bos.bos_token_id] + tokenizer("The Eiffel Tower is Answer:")["input_ids"]
    a = tokenizer(" in Paris")["input_ids"]
    kp, ka = [bos.bos_token_id] + tokenizer("Miles Davis plays Answer:")["input_ids"], tokenizer(" the trumpet")["input_ids"]
    rows = _case_rows(bos, case, "Answer:", 64)
    assert (rows.edit, rows.edit_n, rows.kc, rows.kc_n, rows.truncated) == (p + a, len(a), kp + ka, len(ka), False)
    fit = max(len(p) + len(a), len(kp) + len(ka))
    assert not _case_rows(bos, case, "Answer:", fit).truncated  # the longer row exactly fits: nothing cut
    cut = _case_rows(bos, case, "Answer:", fit - 2)
    assert cut.truncated and (cut.edit_n, cut.kc_n) == (len(a), len(ka))
    assert cut.edit == (p + a)[-(fit - 2):] and cut.kc == (kp + ka)[-(fit - 2):]

    blk = _block([[5] * 35, [6, 7, 8, 9]], [3, 2], pad=0, max_len=40)
    ids = np.asarray(blk["ids"])
    assert ids.shape == (2, 40) and ids[0, :35].tolist() == [5] * 35 and ids[1].tolist() == [6, 7, 8, 9] + [0] * 36
    assert np.asarray(blk["mask"]).sum(1).tolist() == [35, 4]
    assert np.asarray(blk["row"]).tolist() == [0, 0, 0, 1, 1] + [0] * 11
    assert np.asarray(blk["pos"]).tolist() == [31, 32, 33, 1, 2] + [0] * 11
    assert np.asarray(blk["tgt"]).tolist() == [5, 5, 5, 8, 9] + [0] * 11
    assert np.asarray(blk["w"]).tolist() == [1.0] * 5 + [0.0] * 11
    assert np.asarray(_block([[1, 2, 3]], [1], pad=0, max_len=64)["ids"]).shape == (1, 32)


def test_final_losses_and_divergence(tiny_dirs):
    """The report's "final" values are the losses after the last step: the next step's "before" values of a longer
    run; a run whose weights become non-finite is refused with the model unchanged."""
    model, tok = jaxedit.load(tiny_dirs["gpt2"][0])
    hp = dict(layer=1, lr=5e-4, edit_weight=0.01, suffix=SUFFIX)
    _, two = dinm(model, [CASES[0]], tokenizer=tok, steps=2, **hp)
    _, three = dinm(model, [CASES[0]], tokenizer=tok, steps=3, **hp)
    final = two["final"][0]
    np.testing.assert_allclose([final["loss"], final["nll"], final["kl"]],
                               [three["losses"][0][2], three["nll"][0][2], three["kl"][0][2]], rtol=1e-5, atol=1e-9)
    assert final["loss"] != final["nll"]
    before = np.asarray(jaxedit.params_of(model)["blocks"]["w_out"]).copy()
    with pytest.raises(JaxeditError) as err:
        dinm(model, [CASES[0]], tokenizer=tok, steps=3, **dict(hp, lr=1e38))
    assert str(err.value) == "the DINM optimization diverged (non-finite weights); nothing was changed"
    assert np.array_equal(np.asarray(jaxedit.params_of(model)["blocks"]["w_out"]), before)


def test_defaults_report_ids_and_unknown_options(tiny_dirs):
    """Several cases are edited one model per case unless asked otherwise; the report names the cases; unknown
    hyperparameters are refused by name."""
    from jaxedit.edit.dinm import CaseModels, DinmHparams

    model, tok = jaxedit.load(tiny_dirs["gpt2"][0])
    cases = [dict(CASES[0], id="first"), dict(CASES[0], id="second")]
    edited, rep = dinm(model, cases, tokenizer=tok, steps=1, layer=1, suffix=SUFFIX)
    assert isinstance(edited, CaseModels) and len(edited) == 2 and rep["per_instance"] is True
    assert rep["case_ids"] == ["first", "second"]
    assert len(rep["update_norm"]) == len(rep["final"]) == len(rep["losses"]) == len(rep["steps"]) == 2
    assert rep["update_norm"][0] == pytest.approx(rep["update_norm"][1]) and rep["update_norm"][0] > 0
    DinmHparams(steps=1, layer=3).check(4)
    for kw, msg in ((dict(steps=0), "steps must be >= 1 (got 0)"), (dict(lr=0.0), "lr must be > 0 (got 0.0)"),
                    (dict(weight_decay=-1.0), "edit_weight and weight_decay must be >= 0"),
                    (dict(locate="all"), "locate must be 'each' or 'first' (got 'all')"),
                    (dict(batch_size=0), "batch_size must be >= 1 (got 0)"),
                    (dict(layer=4), "layer 4 is out of range: the model has layers 0..3")):
        with pytest.raises(JaxeditError) as err:
            DinmHparams(**kw).check(4)
        assert str(err.value) == msg
    with pytest.raises(JaxeditError) as err:
        DinmHparams().replace(stepz=3, xyz=1)  # the closest name for one, the valid names for the other
    assert str(err.value) == ("unknown DINM hyperparameters 'stepz' (did you mean steps?), 'xyz'; valid: batch_size, "
                              "edit_weight, kl_grad, layer, locate, lr, steps, stop_loss, suffix, weight_decay")


def test_pad_and_response_ids(tokenizer):
    """The pad id is the end token's, else the pad token's, else 0; a response is tokenized with the tokenizer's
    special tokens unless asked otherwise, and one that tokenizes to nothing is refused by case and field."""
    from types import SimpleNamespace

    from tiny_models import bos_tokenizer

    from jaxedit.edit.dinm import _pad_id, _response_ids
    from jaxedit.evaluate.safeedit import read_cases

    ns = lambda eos, pad: SimpleNamespace(eos_token_id=eos, pad_token_id=pad)  # noqa: E731
    assert (_pad_id(ns(5, 7)), _pad_id(ns(None, 7)), _pad_id(ns(5, None)), _pad_id(ns(None, None))) == (5, 7, 5, 0)
    bos = bos_tokenizer(tokenizer)
    case = read_cases(CASES[:1])[0]
    ids = tokenizer("in Paris")["input_ids"]
    assert _response_ids(bos, "in Paris", case, "safe generation") == [bos.bos_token_id] + ids
    assert _response_ids(bos, "in Paris", case, "safe generation", special=False) == ids
    with pytest.raises(JaxeditError) as err:
        _response_ids(bos, "   ", case, "safe generation")
    assert str(err.value) == f'{case.where}: "safe generation" tokenizes to no tokens'
