"""The plan's time estimate before any run (FLOP counts x a machine probe), and the detox / dinm commands' refusals
of options that do not apply. No timing is asserted: the probe is replaced by fixed numbers where a line is checked."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import jaxedit
from jaxedit import calibration
from jaxedit.cli.main import cli
from jaxedit.config import ModelConfig
from jaxedit.detox import DetoxConfig
from jaxedit.detox import estimate

# a GPT-2-shaped config small enough to count by hand: d 32, 4 heads of 8, d_ff 128, 3 layers, vocab 320
TINY = ModelConfig(family="gpt2", n_layers=3, d_model=32, n_heads=4, n_kv_heads=4, head_dim=8, d_ff=128,
                   vocab_size=320, max_positions=64, norm_eps=1e-5, tie_embeddings=True)
PROBE = {"rate": 1e9, "compile": 0.5, "date": "2026-12-06"}


def test_forward_flops_by_hand():
    # one token attending to 10 keys, per block: q, k, v, o projections 4 x 2 x 32 x 32 = 8192; MLP 2 x 2 x 32 x 128
    # = 16384; scores and weighted sum 2 x 2 x 10 x 32 = 1280
    assert calibration.block_flops(TINY, 10) == 8192 + 16384 + 1280
    # 10 tokens: 3 blocks + the LM head 2 x 32 x 320 = 20480 per token
    assert calibration.forward_flops(TINY, 10) == 10 * (3 * 25856 + 20480)
    # a LLaMA block: GQA projections (q, o: 2 x d x 8 x 4 each; k, v: 2 x d x 8 x 2 each) and 3 MLP matrices
    llama = ModelConfig(family="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                        vocab_size=100, max_positions=64, norm_eps=1e-5, tie_embeddings=False, activation="silu")
    assert calibration.block_flops(llama, 0) == 2 * 32 * 8 * (8 + 4) + 3 * 2 * 32 * 64


def test_stage_flops_and_seconds_by_hand():
    cfg = DetoxConfig(select_samples=4, max_new_tokens=6, trace_kinds=("mlp",), trace_samples=2,
                      strategies=("random-single",), objectives=("delete",), eval_samples=3, factual_samples=1,
                      samples=8, max_len=16, corpus="model")
    f = lambda t, k=None: t * (3 * calibration.block_flops(TINY, t if k is None else k) + 2 * 32 * 320)  # noqa: E731
    # select: 4 samples of (10 prompt + 6 new) tokens per prompt
    assert estimate.stage_flops(cfg, TINY, "select", {"prompt_tokens": 10}) == (0.0, 4 * f(16))
    # localize, T = 10: 2 samples x the packed grid (L(L+1)/2 = 6 block-layers x T(T+1)/2 = 55 positions, keys 10)
    # + the LM head at L x T = 30 row ends
    grid = 6 * 55 * calibration.block_flops(TINY, 10) + 30 * 2 * 32 * 320
    assert estimate.stage_flops(cfg, TINY, "localize", {"prompt_tokens": 10}) == (0.0, 2 * grid)
    # edit: per run, 20 Adam steps (GPT-2 preset) x 3 (fwd + bwd) x 2 prompts x 6 contexts (5 prefixes + KL prompt)
    # of (10 prefix + 10 prompt) tokens; once: 8 texts of 16 tokens, sampled from the model and read (x 2)
    fixed, per = estimate.stage_flops(cfg, TINY, "edit", {"prompt_tokens": 10, "edited": 2})
    assert (fixed, per) == (8 * f(16) * 2, 20 * 3 * 2 * 6 * f(20))
    # evaluate: 2 + 1 prompts x (3 continuations + the perplexity of the prompt), 4 facts x (1 continuation + the
    # perplexity of the answer), the neutral text
    sizes = {"prompt_tokens": 10, "edited": 2, "heldout": 1, "facts": 4, "fact_tokens": 5, "neutral_tokens": 40}
    assert estimate.stage_flops(cfg, TINY, "evaluate", sizes) == (0.0, 3 * (3 * f(16) + f(10)) + 4 * (f(11) + f(11))
                                                                  + f(40))
    # seconds: set-up probe compiles + FLOPs at the stage's fraction of the probe's rate; nothing left costs nothing
    secs = estimate.flop_seconds(cfg, TINY, "select", 5, {"prompt_tokens": 10}, PROBE)
    assert secs == pytest.approx(estimate.SETUP_UNITS["select"] * 0.5 + 5 * 4 * f(16) /
                                 (1e9 * estimate.RATE_FACTOR["select"]))
    assert estimate.flop_seconds(cfg, TINY, "select", 0, {}, PROBE) == 0.0
    assert estimate.flop_seconds(cfg, TINY, "select", None, {}, PROBE) is None
    assert estimate.text_tokens("a" * 41) == 10 and estimate.text_tokens("") == 1


def test_first_plan_prices_every_stage_from_flops(monkeypatch, tmp_path):
    """No calibration: every stage is priced from its FLOPs (marked *), the ones sized by the selection as upper
    bounds (<=); a stage measured since is extrapolated from its measurement instead."""
    monkeypatch.setenv("JAXEDIT_CACHE", str(tmp_path))
    monkeypatch.setattr(calibration, "machine", lambda cfg: PROBE)
    cfg = DetoxConfig(select_samples=4, max_new_tokens=6)
    sizes = {"prompt_tokens": 10, "edited": 2, "heldout": 1, "bound": {"localize": True}}
    line = estimate.estimate_lines(cfg, {"select": 5, "localize": 2}, "float32", TINY, sizes)[0]
    s = estimate.flop_seconds(cfg, TINY, "select", 5, sizes, PROBE)
    l = estimate.flop_seconds(cfg, TINY, "localize", 2, sizes, PROBE)
    assert line.startswith(f"time: <=~{calibration.human(s + l)} (select ~{calibration.human(s)}*, localize "
                           f"<=~{calibration.human(l)}*; *: estimated from FLOPs"), line
    assert "<=: sized as if every prompt were selected" in line
    cal = {"select": {"first": 30.0, "first_units": 5, "per_unit": 2.0, "unit_size": 24.0, "date": "2026-12-06"}}
    monkeypatch.setattr(estimate, "load_calibration", lambda cfg, setup: cal)
    line = estimate.estimate_lines(cfg, {"select": 5, "localize": 2}, "float32", TINY, sizes)[0]
    # fixed 30 - 5 x 2 = 20 s, then 2 s a prompt: 30 s
    assert line.startswith(f"time: <=~{calibration.human(30 - 10 + 10 + l)} (select ~30 s, localize "), line
    assert "from runs on this machine, 2026-12-06" in line


def test_machine_probe_is_measured_once_and_kept(monkeypatch, tmp_path):
    """Once per process; the fastest rate and compile ever seen are kept (a probe taken under load does not stay)."""
    monkeypatch.setenv("JAXEDIT_CACHE", str(tmp_path))
    monkeypatch.setattr(calibration, "_probed", {})
    calls = []
    monkeypatch.setattr(calibration, "probe", lambda cfg: calls.append(1) or dict(PROBE))
    assert calibration.machine(TINY) == PROBE and calibration.machine(TINY) == PROBE and len(calls) == 1
    with open(tmp_path / "calibration" / "machine.json") as f:
        kept = json.load(f)
    assert list(kept.values()) == [PROBE] and list(kept)[0].endswith("d 32 ff 128")
    slow = dict(PROBE, rate=PROBE["rate"] / 4, compile=PROBE["compile"] * 4)
    fast = dict(PROBE, rate=PROBE["rate"] * 2, compile=PROBE["compile"] / 2)
    for measured, want in ((slow, PROBE), (fast, fast)):  # a new process measures again; the best is kept
        monkeypatch.setattr(calibration, "_probed", {})
        monkeypatch.setattr(calibration, "probe", lambda cfg, m=measured: dict(m))
        assert calibration.machine(TINY) == want


def test_probe_measures_a_rate():
    rec = calibration.probe(TINY)  # tiny shapes: well under a second
    assert rec["rate"] > 0 and rec["compile"] > 0


def _no_load(monkeypatch):
    monkeypatch.setattr(jaxedit, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))


def test_detox_dry_run_on_a_fresh_machine_prints_every_stage(tiny_dirs, tmp_path, monkeypatch):
    _no_load(monkeypatch)
    monkeypatch.setenv("JAXEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(calibration, "machine", lambda cfg: PROBE)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    out = tmp_path / "o"
    r = CliRunner().invoke(cli, ["-q", "detox", "--prompts", "demo", "--limit", "3", "--out", str(out), "--model",
                                 tiny_dirs["gpt2"][0], "--trace-kinds", "mlp", "--objectives", "delete",
                                 "--strategies", "random-single", "--methods", "delete,profs", "--random-seeds", "1",
                                 "--dry-run"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[1] == "select: 3 prompts x 25 continuations of 20 tokens (75 samples)"
    assert lines[2].startswith("localize: the selected edited prompts x 1 kind (mlp) x 10 noisy samples")
    assert lines[3].startswith("edit: 1 run (1 strategy x 1 objective x 1 KL weight; random strategies x 1 seed)")
    time_line = next(l for l in lines if l.startswith("time:"))
    for stage in ("select ~", "localize <=~", "edit (deletions) <=~", "edit (DINM / ProFS / AurA) <=~", "evaluate <=~"):
        assert stage in time_line, time_line
    assert "no estimate" not in time_line and "not measured" not in time_line
    # the default corpus needs the datasets package: said in the plan, before the edit stage would stop
    assert any(l.startswith("warning: the key statistics' corpus wikitext:wikitext-103-raw-v1 is a datasets name")
               for l in lines), r.output
    assert lines[-1] == "dry run: nothing loaded, nothing written" and not out.exists()


@pytest.mark.parametrize("args, msg", [
    (["--profs-rank", "2"], "error: --profs-rank applies to ProFS only: add profs to --methods (--methods is delete)"),
    (["--pairs", "p.jsonl"], "error: --pairs applies to ProFS only"),
    (["--dinm-steps", "10"], "error: --dinm-steps applies to DINM only: add dinm to --methods"),
    (["--methods", "profs", "--strategies", "random-single"],
     "error: --strategies applies to the deletion grid (and the localize stage it needs) only: add delete"),
    (["--methods", "profs", "--trace-samples", "3"], "error: --trace-samples applies to the deletion grid"),
    (["--methods", "delete,profs", "--profs-rank", "50", "--profs-pairs", "40"],
     "error: --profs-rank 50 is more than the 40 pairs of --profs-pairs 40"),
    (["--profs-pairs", "100"], "error: --profs-pairs applies to ProFS only"),
    (["--aura-layers", "upper"], "error: --aura-layers applies to AurA only: add aura to --methods"),
    (["--aura-texts", "t.jsonl"], "error: --aura-texts applies to AurA only"),
])
def test_detox_refuses_options_that_do_not_apply(tiny_dirs, tmp_path, monkeypatch, args, msg):
    _no_load(monkeypatch)
    out = tmp_path / "o"
    r = CliRunner().invoke(cli, ["-q", "detox", "--prompts", "demo", "--limit", "3", "--out", str(out), "--model",
                                 tiny_dirs["gpt2"][0], *args])
    assert r.exit_code == 2 and r.output.startswith(msg) and r.output.count("\n") == 1, r.output
    assert not out.exists()


def _cases(tmp_path):
    from test_dinm import cli_cases, write_cases  # two short cases the tiny models' context holds

    return write_cases(tmp_path / "cases.json", cli_cases())


def test_dinm_refuses_options_that_do_not_apply(tiny_dirs, tmp_path, monkeypatch):
    _no_load(monkeypatch)
    out = tmp_path / "o"
    cases = _cases(tmp_path)
    for args, msg in [(["--batch-size", "4"], "error: --batch-size applies to --sequential runs only"),
                      (["--batch-size", "1"], "error: --batch-size applies to --sequential runs only"),
                      (["--layer", "1", "--locate", "each"], "error: --locate does not apply with --layer")]:
        r = CliRunner().invoke(cli, ["-q", "dinm", "--model", tiny_dirs["gpt2"][0], "--cases", cases, "--out",
                                     str(out), *args])
        assert r.exit_code == 2 and r.output.startswith(msg) and r.output.count("\n") == 1, (args, r.output)
        assert not out.exists()
    # with --sequential, --batch-size applies
    r = CliRunner().invoke(cli, ["-q", "dinm", "--model", tiny_dirs["gpt2"][0], "--cases", cases, "--out", str(out),
                                 "--sequential", "--batch-size", "2", "--dry-run"])
    assert r.exit_code == 0, r.output


def test_dinm_dry_run_on_a_fresh_machine_prices_the_cases(tiny_dirs, tmp_path, monkeypatch):
    import cli.dinm as cli_dinm
    from jaxedit.evaluate import safeedit as se
    from jaxedit.loading.peek import peek

    _no_load(monkeypatch)
    monkeypatch.setenv("JAXEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(calibration, "machine", lambda cfg: PROBE)
    model = tiny_dirs["llama-gqa-untied"][0]
    f = _cases(tmp_path)
    r = CliRunner().invoke(cli, ["-q", "dinm", "--model", model, "--cases", f, "--limit", "2", "--out",
                                 str(tmp_path / "o"), "--no-suffix", "--max-new-tokens", "4", "--dry-run"])
    assert r.exit_code == 0, r.output
    config = peek(model, tokenizer=False)[0]
    cases = se.read_cases(f, limit=2)
    flops = cli_dinm.case_flops(config, cases, None, 10, 4, 2)
    # by hand for the first case: 5 inputs x 2 models at the bucket (a multiple of 64) + 4 new tokens; the location
    # (2 forwards) and 10 steps x 3 x 2 sequences of prompt + the longer answer; the knowledge constraint twice
    t = estimate.text_tokens
    lens = [t(x) for c in cases for x in c.inputs(None)]
    bucket = -(-min(max(lens), 64 - 4) // 64) * 64
    f = calibration.forward_flops
    c = cases[0]
    seq, kc = t(c.prompt) + max(t(c.safe), t(c.unsafe)), t(c.kc_prompt) + t(c.kc_answer)
    first = 10 * f(config, bucket + 4) + (2 + 60) * f(config, seq) + 2 * f(config, kc)
    assert flops > first > 0
    secs = cli_dinm.SETUP_UNITS * 0.5 + flops / (1e9 * cli_dinm.RATE_FACTOR)
    assert r.output.splitlines()[-2] == (f"time: ~{calibration.human(secs)}* (2 cases; *: estimated from FLOPs and a "
                                         f"probe of this machine; this run measures it)"), r.output


def test_detox_aura_runs_are_priced_by_their_texts(tiny_dirs):
    """An AurA run costs one forward per text (prompt + continuation tokens each), a ProFS run of N pairs 2 N
    forwards, and the extra samples its pairs need are priced once, as sampled continuations are: by hand."""
    from jaxedit.calibration import forward_flops
    from jaxedit.detox import estimate
    from jaxedit.detox.config import DetoxConfig
    from jaxedit.loading.peek import peek

    config, _ = peek(tiny_dirs["gpt2"][0], tokenizer=False)
    cfg = DetoxConfig(methods=("profs", "aura"), max_new_tokens=5, select_samples=4)
    seq = forward_flops(config, 12 + 5)
    sizes = {"prompt_tokens": 12, "edited": 3, "aura_texts": 40,
             "method_runs": [("aura", {"layers": "all"}), ("profs", {"rank": 1, "pairs": 30})]}
    fixed, per = estimate.stage_flops(cfg, config, "edit-methods", sizes)
    assert fixed == 0.0 and per == pytest.approx((40 * seq + 2 * 30 * seq) / 2, rel=1e-12)
    fixed, _ = estimate.stage_flops(cfg, config, "edit-methods", dict(sizes, extra_samples=8))
    assert fixed == pytest.approx(8 * 3 * seq, rel=1e-12)  # 8 more samples for each of the 3 edited prompts


def test_calibration_keeps_a_faster_rate_on_a_shared_machine(tmp_path, monkeypatch):
    """A stage timed while other work held the machine (load average above the CPUs + 1) does not replace a faster
    rate; timed alone it does, and a slower shared rate is kept where there is nothing to compare it with."""
    monkeypatch.setenv("JAXEDIT_CACHE", str(tmp_path))
    monkeypatch.delenv("JAXEDIT_MACHINE_SHARED")
    load = {"now": 0.5}
    monkeypatch.setattr(calibration.os, "getloadavg", lambda: (load["now"], 0.0, 0.0))
    monkeypatch.setattr(calibration.os, "cpu_count", lambda: 2)
    rec = lambda per: {"first": 10.0, "first_units": 1, "rest": 4 * per, "rest_units": 4}  # noqa: E731
    per = lambda: calibration.read("t")["k"]["s"]["per_unit"]  # noqa: E731

    load["now"] = 6.0  # shared, nothing stored yet: kept, marked
    calibration.store("t", "k", "s", rec(50.0))
    assert per() == 50.0 and calibration.read("t")["k"]["s"]["shared"] is True
    load["now"] = 1.8  # alone: replaces it
    calibration.store("t", "k", "s", rec(8.0))
    assert per() == 8.0 and "shared" not in calibration.read("t")["k"]["s"]
    load["now"] = 3.5  # shared and slower: 40 s per unit of size 2 against the stored 8 s per unit of size 1 (16 s)
    calibration.store("t", "k", "s", rec(40.0), unit_size=2.0)
    assert per() == 8.0
    calibration.store("t", "k", "s", rec(12.0), unit_size=2.0)  # shared but faster per unit of work: kept
    assert per() == 12.0 and calibration.read("t")["k"]["s"]["unit_size"] == 2.0
    load["now"] = 0.2  # alone and slower: an honest measurement of this machine now, kept
    calibration.store("t", "k", "s", rec(30.0), unit_size=2.0)
    assert per() == 30.0
