"""jaxedit.plan (memory plans from compiled programs) and benchmarks/make_shapes.py (checkpoints at real shapes).

The plan's bytes are checked against the memory analysis of the programs the library itself compiles when it runs
(tracing and saliency on a tiny checkpoint, through runtime.compiled's cache) and the statistics pass lowered with
the real arrays; the shape script's folders against transformers (its config classes and its models loading the
written weights, with logits compared to jaxedit's)."""
from __future__ import annotations
import os
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import jaxedit
from jaxedit import runtime
from jaxedit.cli.main import cli
from jaxedit.config import ModelConfig
from jaxedit.errors import JaxeditError

from jaxedit import planning as planner
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import make_shapes  # noqa: E402

# tiny copies of the two shapes the benchmark writes: GPT-2 (fused c_attn, biases, learned positions) and a
# Llama-3.2-like model (GQA, explicit head_dim, tied embeddings, llama3 rope scaling)
TINY_SHAPES = {
    "gpt2": dict(model_type="gpt2", n_layer=2, n_embd=40, n_head=5, n_positions=64, vocab_size=320,
                 activation_function="gelu_new", layer_norm_epsilon=1e-5),
    "llama": dict(model_type="llama", num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, intermediate_size=64, vocab_size=320,
                  max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                  rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


@pytest.mark.parametrize("name", list(planner.SHAPES))
def test_named_shapes_survive_transformers_config_classes(name):
    """Each named shape, written through transformers' config class (as make_shapes does) and read back, is the
    same jaxedit config; the sizes are the published ones."""
    hf = planner.SHAPES[name]
    direct = ModelConfig.from_hf(hf)
    via = ModelConfig.from_hf(make_shapes.hf_config(hf).to_dict())
    assert via == direct
    published = {"gpt2-xl": (48, 1600, 25, 25, 6400, 50257), "llama-3.2-1b": (16, 2048, 32, 8, 8192, 128256),
                 "llama-2-7b": (32, 4096, 32, 32, 11008, 32000), "llama-3-8b": (32, 4096, 32, 8, 14336, 128256),
                 "llama-2-13b": (40, 5120, 40, 40, 13824, 32000), "llama-3-70b": (80, 8192, 64, 8, 28672, 128256)}
    c = direct
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_ff, c.vocab_size) == published[name]
    if name == "llama-3.2-1b":
        assert c.tie_embeddings and c.head_dim == 64 and dict(c.rope_scaling)["factor"] == 32.0


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_shape_folder_loads_in_transformers_and_jaxedit(tmp_path, tokenizer, kind):
    import torch
    import transformers

    hf = TINY_SHAPES[kind]
    out = make_shapes.write_shape(str(tmp_path / kind), hf, tokenizer=tokenizer, seed=3, std=0.2)
    ref, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert ref.config.to_dict()["vocab_size"] == hf["vocab_size"]
    model, tok = jaxedit.load(out)
    assert model.config == ModelConfig.from_hf(hf)
    ids = tok("The Eiffel Tower is located in")["input_ids"]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits.numpy()
    got = np.asarray(jaxedit.forward(model, [ids]).logits)
    assert np.abs(want).max() > 1e-2  # the random weights are not trivial
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _analysis(exe):
    return planner._peak(exe.memory_analysis())


def test_plan_bytes_equal_the_library_programs(tiny_dirs, tokenizer):
    """Tracing and saliency as the library compiles them for a run, the statistics pass lowered with the real
    arrays: the plan's abstract programs have the same argument, output, temporary and aliased bytes."""
    import jax.numpy as jnp

    from jaxedit.edit.stats import accumulate
    from jaxedit.locate.saliency import saliency_profiles
    from jaxedit.locate.tracing import trace_grid

    model, _ = jaxedit.load(tiny_dirs["llama-gqa-untied"][0])
    cfg = model.config
    ids = [int(i) for i in tokenizer("The Eiffel Tower is located in the city")["input_ids"]]
    T, S = len(ids), 3
    runtime.clear_compiled()
    jaxedit.trace(model, input_ids=ids, span=(0, 2), samples=S, kinds=("hidden",))
    jaxedit.saliency(model, input_ids=ids, target=[5], tokenizer=tokenizer)
    ran = {key[0]: exe for key, exe in runtime._compiled.items()}
    settings = planner.settings_of(cfg, dict(trace_tokens=T, samples=S, kinds=("hidden",),
                                             saliency_tokens=T + 1, stats_len=12, stats_layers=2))
    got = planner.program_bytes(cfg, {"data": 1, "model": 1}, settings, ("trace", "saliency", "statistics"),
                                rows=(1,))
    assert got["trace"][1] == _analysis(ran[id(trace_grid)])
    assert got["saliency"][1] == _analysis(ran[id(saliency_profiles)])
    f = cfg.d_ff
    layers = settings["layers"]
    real = accumulate.lower(cfg, jaxedit.params_of(model), jnp.ones((1, 12), jnp.int32),
                            jnp.ones((1, 12), jnp.int32), jnp.zeros((len(layers), f, f)), layers=layers).compile()
    assert got["statistics"][1] == _analysis(real)
    assert got["statistics"][1]["alias"] == 4 * len(layers) * f * f  # the donated sums
    params = sum(int(x.nbytes) for x in __import__("jax").tree.leaves(jaxedit.params_of(model)))
    assert planner.param_bytes(cfg, "float32", {"data": 1, "model": 1}) == (params, params)
    assert got["trace"][1]["argument"] >= params  # the weights are arguments of the programs that run the model


def test_projected_solve_and_host_eigendecomposition(tiny_dirs):
    """AlphaEdit's projected solve: the plan's abstract program has the bytes of the solve AlphaEdit runs with P and
    C_p; the projector's float64 eigendecomposition runs on the host, where the plan's PROJECTOR_F2_BYTES d_ff^2
    bytes (17: C's float64 copy, the eigenvectors, the solver's workspace) bound the peak the kernel measures
    beside C (VmHWM reset before the call) and are within 25 % of it."""
    import jax

    from jaxedit.edit.alphaedit import PROJECTOR_F2_BYTES
    from jaxedit.edit.memit import _solve_f32

    model, _ = jaxedit.load(tiny_dirs["gpt2"][0])
    cfg = model.config
    f, d = cfg.d_ff, cfg.d_model
    settings = planner.settings_of(cfg, {})
    got = planner.program_bytes(cfg, {"data": 1, "model": 1}, settings, ("projected solve",), rows=(1,))
    n = int(settings["requests"])
    real = jax.jit(_solve_f32).lower(np.ones((f, n), np.float32), np.ones((d, n), np.float32), np.float32(10.0),
                                     None, np.eye(f, dtype=np.float32), np.zeros((f, f), np.float32)).compile()
    assert got["projected solve"][1] == _analysis(real)
    assert PROJECTOR_F2_BYTES == 17 and got["host_eigh_bytes"] == PROJECTOR_F2_BYTES * f * f

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("no /proc/self/clear_refs to reset the peak resident memory")
    # in a fresh process, large buffers always mapped anew (no reuse of freed heap pages) and one BLAS thread, so
    # the peak counts the eigendecomposition's own buffers
    code = """
import numpy as np
from jaxedit.edit.alphaedit import null_space_projector
F = 1536
C = np.random.default_rng(0).standard_normal((F, 400)).astype(np.float32)
C = C @ C.T / 400
null_space_projector(C, 0.02)  # warm: BLAS and LAPACK set up
def hwm():
    with open("/proc/self/status") as st:
        return int(st.read().split("VmHWM:")[1].split()[0]) * 1024
with open("/proc/self/clear_refs", "w") as cr:
    cr.write("5")
base = hwm()
null_space_projector(C, 0.02)
print(hwm() - base)
"""
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    used, F = int(res.stdout.strip().splitlines()[-1]), 1536
    assert 0.75 * 17 * F * F <= used <= 17 * F * F, used / F / F


def test_plan_refusals_without_compiling():
    """Weights over the usable memory: refused before anything is compiled, naming the smallest model axis whose
    weights fit; unknown options are refused with the closest names."""
    cfg = ModelConfig.from_hf(dict(TINY_SHAPES["llama"], tie_word_embeddings=False))
    total, per = planner.param_bytes(cfg, "float32", {"data": 1, "model": 1})
    assert total == per and planner.param_bytes(cfg, "float32", {"data": 2, "model": 2})[1] < total / 1.9
    with pytest.raises(JaxeditError, match=r"below .* weights per device.*model=2 \(2 devices"):
        planner.plan(cfg, device_memory=int(0.7 * total / 0.9), search=False, progress=False)
    with pytest.raises(JaxeditError, match=r"unknown plan option 'sampels' \(did you mean samples"):
        planner.plan(cfg, sampels=3)
    assert planner.parse_bytes("80GB") == 80 * 10**9 and planner.parse_bytes("24GiB") == 24 * 2**30
    assert planner.model_axes(ModelConfig.from_hf(planner.SHAPES["gpt2-xl"])) == [1, 5, 25]


def test_rows_that_fit_follow_a_kinked_peak():
    """A peak whose cost per row grows past a count (as the statistics' does when its peak moves from the MLP to
    the k k^T product): the line through 1 and 2 rows overshoots; refine_rows compiles its guesses until the rows
    that fit are a compiled count within 2 % of the true limit, in a few compiles."""
    usable = 10_000.0
    for a, b, kink, c in [(100, 1.0, 4, 10.0), (100, 1.0, 1, 7.0), (100, 0.5, 50, 3.0), (100, 2.0, 10**6, 0.0),
                          (100, 1.0, 5000, 1000.0), (100, 1.0, 30, 50.0)]:  # the last two: a far, steep kink
        peak = lambda r, a=a, b=b, kink=kink, c=c: a + b * r + c * max(0, r - kink)  # noqa: E731
        true = max(r for r in range(1, planner.MAX_ROWS + 1) if peak(r) <= usable) if peak(1) <= usable else 0
        calls = []
        points = planner.refine_rows(lambda r: calls.append(r) or peak(r), {1: peak(1), 2: peak(2)}, usable)
        fit, per_row = planner.rows_that_fit(points, usable)
        assert fit in points and peak(fit) <= usable and 0.98 * true <= fit <= true, (a, b, kink, c, fit, true)
        assert len(calls) <= planner.REFINE_COMPILES and per_row >= 0
    # a peak that does not grow: MAX_ROWS, nothing compiled; one that does not fit at one row: 0
    calls = []
    points = planner.refine_rows(lambda r: calls.append(r) or 100.0, {1: 100.0, 2: 100.0}, usable)
    assert planner.rows_that_fit(points, usable) == (planner.MAX_ROWS, 0) and not calls
    # the line through 1 and 2 rows alone (nothing refined) is the extrapolated count
    assert planner.rows_that_fit({1: 100.0, 2: 110.0}, 1000.0, refined=False) == (91, 10)
    assert planner.rows_that_fit({1: 100.0, 2: 110.0}, 1000.0) == (2, 10)
    assert planner.rows_that_fit({1: 2000.0, 2: 2010.0}, 1000.0)[0] == 0


@pytest.mark.slow
def test_plan_report_rows():
    """The batch sizes are compiled counts: the rows that fit are the most whose compiled peak stays within the
    usable memory (each guess compiled, the line redrawn through the counts nearest the limit)."""
    cfg = ModelConfig.from_hf(dict(TINY_SHAPES["llama"], tie_word_embeddings=False))
    r = planner.plan(cfg, device_memory="64MiB", progress=False, trace_tokens=8, samples=2, stats_len=8,
                     z_tokens=8)
    usable = 0.9 * 64 * 2**20
    for name, p in r["programs"].items():
        assert p["peak"] > 0 and p["fits"] == (p["peak"] <= usable)
        if p.get("unit"):
            fit, compiled = p["rows_per_device"], p["compiled"]
            assert fit in compiled and compiled[fit] <= usable
            above = [r for r in compiled if r > fit]
            # the limit is bracketed within 2 % by a compiled count that does not fit, or (none above) the line
            # through the last two counts puts it within 2 % of fit
            assert (above and min(above) - fit <= max(1, fit // 50)) or fit == planner.MAX_ROWS or \
                (not above and compiled[fit] + (max(1, fit // 50) + 1) * p["per_row"] > usable), (name, compiled)
    assert r["fits"] and r["parameters_per_device"] == r["parameters"]
    table = planner.format_plan(r)
    assert "| z step |" in table and "plan: fits" in table


@pytest.mark.parametrize("args,needle", [
    (["--model", "gpt-9"], "unknown model shape 'gpt-9'"),
    (["--model", "gpt2-xl", "--mesh", "model=4"], "a model axis of 4 does not divide"),
    (["--model", "llama-3-70b", "--device-memory", "24GiB"], "below llama-3-70b's float32 weights"),
    (["--model", "llama-2-7b", "--device", "h100-800g"], "unknown device kind 'h100-800g'"),
    (["--model", "llama-2-7b", "--device-memory", "lots"], "bad device memory 'lots'"),
])
def test_plan_command_bad_input(args, needle):
    res = CliRunner().invoke(cli, ["-q", "plan"] + args)
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], res.output


def test_plan_command_dry_run():
    res = CliRunner().invoke(cli, ["-q", "plan", "--model", "llama-3-70b", "--device", "h100-80g", "--mesh",
                                   "model=8", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "llama-3-70b" in res.output and "data=1,model=8 (8 devices)" in res.output


@pytest.mark.slow
def test_plan_on_a_mesh_compiles_in_a_child_with_simulated_devices():
    """model=2 on a one-device process: the programs are compiled in a child with 2 CPU devices; the weights per
    device halve (up to the replicated norms) and so does the statistics' sum."""
    cfg = ModelConfig.from_hf(dict(TINY_SHAPES["llama"], tie_word_embeddings=False))
    kw = dict(device_memory="1GiB", progress=False, trace_tokens=8, samples=2, stats_len=8, z_tokens=8)
    one = planner.plan(cfg, **kw)
    two = planner.plan(cfg, mesh="model=2", **kw)
    assert two["devices"] == 2 and two["analysis"] == "XLA:CPU (standing in for the accelerator)"  # 1GiB: no cpu-*
    norms = 4 * (2 * cfg.n_layers + 1) * cfg.d_model
    assert two["parameters_per_device"] == (one["parameters"] - norms) // 2 + norms
    assert two["programs"]["statistics"]["alias"] * 2 == one["programs"]["statistics"]["alias"]
