"""UltraEdit on tiny models: two turns (the second continuing the lifelong normalizer) against a float64 reference
written after the published algorithm (keys and output gradients of the edited projections from the Hugging Face
model in float64 torch, by hooks, at the labelled positions; the normalizer, the shift and the solve in float64
numpy); the normalizer's running update against a two-pass computation; a sequence interrupted and resumed
against one uninterrupted; bad input refused in one line."""
import json

import numpy as np
import pytest
import torch

import jaxedit
from jaxedit import JaxeditError
from jaxedit.edit import ultraedit as ue

TURN1 = [{"prompt": "The Eiffel Tower is located in the city of", "target": " Rome"},
         {"prompt": "{} plays the", "subject": "Miles Davis", "target": " guitar on the"},
         {"prompt": "The Space Needle is in", "target": " Paris Texas"},
         {"prompt": "Beats Music is owned by", "target": " Apple"},
         {"prompt": "The capital of France is", "target": " Seattle music"}]
TURN2 = [{"prompt": "Toko Yasuda produces music on the", "target": " trumpet"},
         {"prompt": "The city of Seattle is", "target": " Paris"},
         {"prompt": "Miles Davis is", "target": " the owner of Apple"}]
EPS = float(np.finfo(np.float32).eps)


def _torch_rows(hf, tok, reqs, modules, micro):
    """Per micro-batch (the reference's order: longest first), per module: (k, g) rows in float64."""
    gpt2 = hf.config.model_type == "gpt2"
    blocks = hf.transformer.h if gpt2 else hf.model.layers
    recs = []
    for r in reqs:
        p = tok(r["prompt"].replace("{}", r.get("subject", "")))["input_ids"]
        a = tok(r["target"], add_special_tokens=False)["input_ids"]
        recs.append((p + a[:-1], [-100] * (len(p) - 1) + a))
    order = sorted(range(len(recs)), key=lambda i: -len(recs[i][0]))
    out = []
    for s in range(0, len(order), micro):
        idx = order[s:s + micro]
        T = max(len(recs[i][0]) for i in idx)
        ids = torch.zeros(len(idx), T, dtype=torch.long)
        mask = torch.zeros(len(idx), T, dtype=torch.long)
        labels = torch.full((len(idx), T), -100)
        for b, i in enumerate(idx):
            n = len(recs[i][0])
            ids[b, :n], mask[b, :n], labels[b, :n] = torch.tensor(recs[i][0]), 1, torch.tensor(recs[i][1])
        sel = labels != -100
        store, hooks = {}, []
        for name, l in modules:
            mlp = blocks[l].mlp
            lin = mlp.c_fc if gpt2 else (mlp.gate_proj if name == "w_gate" else mlp.up_proj)

            def fwd(m, inp, outp, key=(name, l)):
                outp.retain_grad()
                store[key] = (inp[0], outp)
            hooks.append(lin.register_forward_hook(fwd))
        logits = hf(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits[sel], labels[sel])
        loss.backward()
        for h in hooks:
            h.remove()
        out.append({k: (x[sel].detach().numpy(), y.grad[sel].numpy()) for k, (x, y) in store.items()})
    return out


def _reference_turn(rows, modules, norms, lr, shapes):
    """dW per module and the updated normalizers, float64 numpy."""
    for mb in rows:
        for key in modules:
            x = np.concatenate(mb[key], -1)
            sk = shapes[key]
            n, mean, var = norms.get(sk, (0.0, 0.0, 0.0))
            m = x.shape[0]
            delta = x.mean(0) - mean
            within = x.var(0, ddof=1) if m > 1 else 0.0  # one row: jaxedit adds no within term (torch: NaN)
            var = var + m * within + n * m * delta ** 2 / (n + m)
            mean = mean + m * delta / (n + m)
            norms[sk] = (n + m, mean, var)
    dW = {}
    for key in modules:
        K = np.concatenate([mb[key][0] for mb in rows])
        G = np.concatenate([mb[key][1] for mb in rows])
        n, mean, var = norms[shapes[key]]
        std = np.sqrt(var / (n - 1 + EPS))
        Z = (np.concatenate([K, G], -1) - mean) / (std + EPS)
        kh, gh = Z[:, :K.shape[1]], Z[:, K.shape[1]:]
        V = -lr * (kh ** 2).sum(-1, keepdims=True) * gh
        dW[key] = np.linalg.solve(K.T @ K + np.eye(K.shape[1]), K.T @ V)
    return dW


@pytest.mark.parametrize("name,layers", [("llama-mha-tied", {"gate": [0, 1], "up_proj": [1, 2]}),
                                         pytest.param("gpt2", [1, 2], marks=pytest.mark.slow)])
def test_two_turns_against_float64(tiny_dirs, tokenizer, name, layers):
    d, hf = tiny_dirs[name]
    hf = hf.double()
    model, tok = jaxedit.load(str(d))
    lr = 1e-2  # large enough that the second turn's gradients depend on the first turn's update
    modules = ue.resolve_modules(model.config, layers)
    state = ue.new_state(model, modules)
    gpt2 = name == "gpt2"
    shapes = {m: "s" for m in modules}
    norms = {}
    for reqs in (TURN1, TURN2):
        rows = _torch_rows(hf, tokenizer, reqs, modules, micro=2)
        ref = _reference_turn(rows, modules, norms, lr, shapes)
        before = jaxedit.params_of(model)["blocks"]
        model, rep, state = ue.run_turn(model, ue.parse_records(reqs, tok), modules, state, lr, micro_batch=2,
                                        keep_updates=True, progress=False)
        after = jaxedit.params_of(model)["blocks"]
        for key in modules:
            got = rep["updates"][key]
            assert np.linalg.norm(got - ref[key]) / np.linalg.norm(ref[key]) < 1e-4, key
            np.testing.assert_allclose(np.asarray(after[key[0]][key[1]]) - np.asarray(before[key[0]][key[1]]),
                                       got, atol=2e-5)
        with torch.no_grad():  # the reference model takes the same update (torch's [out, in] layout)
            for (n_, l), w in ref.items():
                mlp = (hf.transformer.h if gpt2 else hf.model.layers)[l].mlp
                lin = mlp.c_fc if gpt2 else (mlp.gate_proj if n_ == "w_gate" else mlp.up_proj)
                lin.weight += torch.tensor(w if gpt2 else w.T)
    st = next(iter(state["normalizers"].values()))  # LLaMA's gate and up share one normalizer (same shape)
    assert len(state["normalizers"]) == 1 and state["turns"] == 2 and state["edits"] == 8
    n, mean, var = norms["s"]
    assert st["n"] == n
    np.testing.assert_allclose(st["mean"], mean, rtol=1e-4, atol=1e-6 * np.abs(mean).max())
    np.testing.assert_allclose(st["var"], var, rtol=1e-4, atol=1e-6 * np.abs(var).max())


def test_normalizer_against_two_pass():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(3.0, 2.0, size=(m, 7)) * rng.uniform(0.5, 2, 7) for m in (5, 1, 12, 2, 30)]
    st = ue.normalizer_new(7)
    for c in chunks:
        st = ue.normalizer_update(st, c)
    x = np.concatenate(chunks)
    mean = x.mean(0)
    m2 = ((x - mean) ** 2).sum(0)  # two-pass sum of squares
    # the per-chunk unbiased variances add m_i / (m_i - 1) of each chunk's own sum of squares (a one-row chunk: 0)
    extra = sum(((c - c.mean(0)) ** 2).sum(0) / (len(c) - 1) for c in chunks if len(c) > 1)
    assert st["n"] == len(x)
    np.testing.assert_allclose(st["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(st["var"], m2 + extra, rtol=1e-12)
    np.testing.assert_allclose(ue.normalizer_std(st), np.sqrt((m2 + extra) / (len(x) - 1 + EPS)), rtol=1e-12)
    z = ue.normalize(st, x)
    np.testing.assert_allclose(z, (x - mean) / (np.sqrt((m2 + extra) / (len(x) - 1 + EPS)) + EPS), rtol=1e-10)


def test_defaults_and_public_call(tiny_dirs):
    d, _ = tiny_dirs["llama-gqa-untied"]
    model, tok = jaxedit.load(str(d))

    class Cfg:
        family, n_layers = "llama", 30
    assert ue.default_modules(Cfg) == {"w_gate": [10, 11, 12, 13, 14], "w_up": [17, 18, 19, 20, 21, 22, 23]}
    Cfg.n_layers = 32
    assert ue.default_modules(Cfg) == {"w_gate": [11, 12, 13, 14, 15], "w_up": list(range(18, 25))}
    edited, rep = jaxedit.ultraedit(model, TURN1[:2], tokenizer=tok, lr=1e-3, progress=False)
    assert rep["modules"] == [["w_gate", 1], ["w_up", 2]] and rep["state"]["edits"] == 2
    edited2, rep2 = jaxedit.ultraedit(edited, TURN2[:1], tokenizer=tok, lr=1e-3, state=rep["state"],
                                      progress=False)
    assert rep2["state"]["turns"] == 2
    assert rep2["state"]["normalizers"]["48x80"]["n"] > rep["state"]["normalizers"]["48x80"]["n"]


def test_bad_input(tiny_dirs):
    d, _ = tiny_dirs["llama-gqa-untied"]
    model, tok = jaxedit.load(str(d))
    ok = TURN1[:1]
    cases = [
        (dict(requests=[TURN1[0], {"prompt": "x is"}]), r"^requests\[1\]: needs a non-empty \"target\"$"),
        (dict(requests=[{"prompt": "{} is", "target": " a"}]), r"requests\[0\]: .*no \"subject\""),
        (dict(layers={"down": [1]}), r"layers: unknown module 'down'.*w_gate, w_up"),
        (dict(layers=[5]), r"layers: w_gate layer 5 is outside the model's 3 layers"),
        (dict(layers={"w_in": [1]}), r"unknown module 'w_in'"),
        (dict(lr=0), r"lr must be a number > 0"),
        (dict(lr=-1e-6), r"lr must be a number > 0"),
        (dict(l2=1.0), r"unknown option 'l2'"),
        (dict(state={"method": "alphaedit", "P": {}}), r"state must be .*ultraedit.*alphaedit"),
    ]
    for kw, pattern in cases:
        reqs = kw.pop("requests", ok)
        with pytest.raises(JaxeditError, match=pattern) as e:
            jaxedit.ultraedit(model, reqs, tokenizer=tok, progress=False, **kw)
        assert "\n" not in str(e.value)
    g, gtok = jaxedit.load(str(tiny_dirs["gpt2"][0]))
    _, rep = jaxedit.ultraedit(g, ok, tokenizer=gtok, progress=False)
    with pytest.raises(JaxeditError, match="state is from another model"):
        jaxedit.ultraedit(model, ok, tokenizer=tok, state=rep["state"], progress=False)


def test_sequence_resumed_equals_uninterrupted(tiny_dirs, tmp_path):
    d, _ = tiny_dirs["gpt2"]
    model, tok = jaxedit.load(str(d))
    reqs = TURN1 + TURN2
    kw = dict(tokenizer=tok, method="ultraedit", batch_size=3, layers=[1, 2], lr=1e-2, micro_batch=2,
              progress=False)
    full, rep_full = jaxedit.edit_sequential(model, reqs, **kw)

    class Killed(Exception):
        pass

    def kill(done, m):
        if done == 2:
            raise Killed

    out = str(tmp_path / "seq")
    with pytest.raises(Killed):
        jaxedit.edit_sequential(model, reqs, out=out, on_batch=kill, **kw)
    seq = json.load(open(f"{out}/sequence.json"))
    assert seq["done"] == 2 and seq["options"]["method"] == "ultraedit"
    with pytest.raises(JaxeditError, match=r"other options \(lr 0.01 -> 0.02\)"):
        jaxedit.edit_sequential(model, reqs, out=out, **dict(kw, lr=2e-2))
    with pytest.raises(JaxeditError, match="null_space_threshold is AlphaEdit's option"):
        jaxedit.edit_sequential(model, reqs, out=out, null_space_threshold=0.1, **kw)
    resumed, rep = jaxedit.edit_sequential(model, reqs, out=out, **kw)
    assert rep["resumed_at"] == 2 and len(rep["batches"]) == 3
    a, b = jaxedit.params_of(full)["blocks"]["w_in"], jaxedit.params_of(resumed)["blocks"]["w_in"]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    sa, sb = rep_full["state"]["normalizers"], rep["state"]["normalizers"]
    for key in sa:
        assert sa[key]["n"] == sb[key]["n"]
        np.testing.assert_array_equal(sa[key]["mean"], sb[key]["mean"])
        np.testing.assert_array_equal(sa[key]["var"], sb[key]["var"])
    assert not np.array_equal(np.asarray(a), np.asarray(jaxedit.params_of(model)["blocks"]["w_in"]))


def test_cli(tiny_dirs, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from jaxedit.cli.main import cli

    monkeypatch.setenv("JAXEDIT_CACHE", str(tmp_path / "cache"))
    d, _ = tiny_dirs["gpt2"]
    req = tmp_path / "r.jsonl"
    req.write_text("".join(json.dumps(r) + "\n" for r in TURN1))
    out = tmp_path / "o"
    base = ["edit", "--model", str(d), "--requests", str(req), "--method", "ultraedit", "--out", str(out)]
    for extra, msg in [(["--lr", "0"], "--lr must be > 0"), (["--l2", "1"], "AlphaEdit's options"),
                       (["--corpus", "model"], "--corpus is a MEMIT / AlphaEdit option"),
                       (["--layers", "7"], "outside")]:
        res = CliRunner().invoke(cli, base + extra)
        assert res.exit_code == 2 and msg in res.output and res.output.count("\n") == 1, (extra, res.output)
    res = CliRunner().invoke(cli, base[:-4] + ["--lr", "1e-6", "--out", str(out)])
    assert res.exit_code == 2 and "--lr is UltraEdit's option" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(TURN1[0]) + "\n" + json.dumps({"prompt": "x is"}) + "\n")
    res = CliRunner().invoke(cli, base[:4] + [str(bad)] + base[5:])
    assert res.exit_code == 2 and f"{bad}:2" in res.output and "target" in res.output, res.output
    assert not out.exists()


@pytest.mark.slow
def test_cli_sequence(tiny_dirs, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from jaxedit.cli.main import cli

    monkeypatch.setenv("JAXEDIT_CACHE", str(tmp_path / "cache"))
    d, _ = tiny_dirs["gpt2"]
    req = tmp_path / "r.jsonl"
    req.write_text("".join(json.dumps(r) + "\n" for r in TURN1))
    out = tmp_path / "o"
    base = ["edit", "--model", str(d), "--requests", str(req), "--method", "ultraedit", "--out", str(out)]
    res = CliRunner().invoke(cli, base + ["--batch-size", "2", "--lr", "1e-3", "--layers", "1-2"])
    assert res.exit_code == 0, res.output
    assert "ultraedit: 5 edits in 3 batches of 2" in res.output
    seq = json.load(open(out / "sequence" / "sequence.json"))
    assert seq["done"] == 3 and seq["options"]["modules"] == [["w_in", 1], ["w_in", 2]]
    edited, _ = jaxedit.load(str(out / "model"))
    assert not np.array_equal(np.asarray(jaxedit.params_of(edited)["blocks"]["w_in"][1]),
                              np.asarray(jaxedit.params_of(jaxedit.load(str(d))[0])["blocks"]["w_in"][1]))
