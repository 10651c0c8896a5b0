"""Running on a device mesh: every sharded computation equals the single-device one.

The checks need 8 devices, and JAX fixes the device count when it starts, so they run in one process of their own
(tests/sharded_checks.py, 8 CPU devices through XLA_FLAGS); the rest of the suite keeps its single device. That
process is started in the background as soon as these tests are collected (tests/conftest.py), and
these tests read its JSON report. Tiny GPT-2 and GQA LLaMA checkpoints are loaded with ``mesh=`` on the meshes 4x2
and 1x8 (data x model; the fast tier) and 8x1 and 2x4 (the full suite), and the parameter bytes each device holds
and their placement are checked on every one; the logits, tracing grids, key statistics, saliency profiles, MEMIT
updates, ProFS edits and sequential AlphaEdit edits are compared with the same calls on the model loaded without
a mesh for the pairs in FAST_RUNS / SLOW_RUNS (GPT-2, whose split differs by its biases and tied vocabulary, on 4x2
and 1x8; LLaMA on all four; in the fast tier each computation on one model), and sampled tokens for those in
SAMPLES. Also: the all-gathers of every compiled
program (XLA's dump); in the full suite an orbax save and an export of a sharded model, the memory of a wider
model's forward, and a two-process ``jaxedit trace`` run.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import sharded_job
from click.testing import CliRunner

HERE = os.path.dirname(os.path.abspath(__file__))
FAST_MESHES = ["data=4,model=2", "data=1,model=8"]
SLOW_MESHES = ["data=8", "data=2,model=4"]
MESHES = [*FAST_MESHES, *(pytest.param(m, marks=pytest.mark.slow) for m in SLOW_MESHES)]
# the (model, mesh, computations) whose results are compared with one device (the names of tests/sharded_checks.py's
# QUANTITIES): in the fast tier each model on one of the two meshes (GPT-2 on 1x8, the one mesh that splits its tied
# vocabulary table over d_model), each computation on one of the two models, as the fast tier's other references
# alternate the family; in the full suite the rest, so that GPT-2 (whose split differs by its biases and tied
# vocabulary) is compared on both meshes and LLaMA on all four, every computation (GPT-2 on the other two meshes is
# loaded and its placement checked, as every model on every mesh; "all": every computation)
FAST_RUNS = [("gpt2", "data=1,model=8", "logits,trace,stats,memit,profs"),
             ("llama", "data=4,model=2", "logits,trace,stats,saliency,alphaedit")]
SLOW_RUNS = [("gpt2", "data=1,model=8", "saliency,alphaedit"), ("llama", "data=4,model=2", "memit,profs"),
             ("gpt2", "data=4,model=2", "all"), ("llama", "data=1,model=8", "all"), ("llama", "data=8", "all"),
             ("llama", "data=2,model=4", "all")]
RUNS = [*FAST_RUNS, *(pytest.param(*r, marks=pytest.mark.slow) for r in SLOW_RUNS)]


def test_both_tiers_compare_every_computation_on_both_models(report):
    """The full suite's pairs compare every computation the checks know on both models (the fast tier's split
    leaves none out)."""
    known = set(report["quantities"])
    for model in ("gpt2", "llama"):
        named = set()
        for m, _, quantities in FAST_RUNS + SLOW_RUNS:
            if m == model:
                named |= known if quantities == "all" else set(quantities.split(","))
        assert named == known, (model, known - named)
# sampled tokens compared with one device's: LLaMA's (4x2) in the fast tier, GPT-2's (1x8, its vocabulary split over
# d_model) too in the full suite
SAMPLES = [("llama", "data=4,model=2"), pytest.param("gpt2", "data=1,model=8", marks=pytest.mark.slow)]
TOL = 1e-5


@pytest.fixture(scope="module")
def report(request):
    if os.environ.get("PYTEST_XDIST_WORKER") is None:  # started at collection; here when a test asks for it alone
        sharded_job.start(request.session.items)
    got = sharded_job.wait_for_report(sharded_job.work_dir())
    if isinstance(got, str):
        pytest.fail(got)
    return got


# ---- meshes and their errors (in this process: one device) ----

@pytest.mark.parametrize("args, message", [
    (["--mesh", "data=4;model=2"], "bad mesh"),
    (["--mesh", "rows=1"], "unknown axis 'rows'"),
    (["--mesh", "data=3"], "needs a multiple of 3 devices, but 1 are visible"),
    (["--mesh", "data=2,model=2"], "= 4 devices, but 1 are visible"),
    (["--coordinator", "127.0.0.1:1234"], "needs the number of processes"),
    (["--process-id", "1"], "need --coordinator"),
])
def test_cli_mesh_errors_are_one_line(args, message):
    from jaxedit.cli.main import cli

    res = CliRunner().invoke(cli, ["info", "no-such-model", *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and res.output.count("\n") == 1 and "Traceback" not in res.output


def test_every_command_takes_mesh():
    from jaxedit.cli.main import cli

    for name, command in cli.commands.items():
        options = {o for p in command.params for o in p.opts}
        if name == "plan":  # its --mesh is the planned machine's (nothing runs here): no multi-host options
            assert "--mesh" in options and "--coordinator" not in options
            continue
        assert {"--mesh", "--coordinator", "--num-processes", "--process-id"} <= options, name


def test_make_mesh_errors(report):
    errors = report["errors"]
    assert "needs a multiple of 3 devices, but 8 are visible" in errors["data=3"]
    assert "16 devices, but 8 are visible" in errors["data=4,model=4"]
    assert "bad mesh" in errors["data=2,model=x"] and "unknown axis" in errors["rows=8"]
    assert "given twice" in errors["model=2,model=4"] and "multiple of 3" in errors["model=3"]


def test_one_device_default_is_unchanged(tiny_dirs):
    """No mesh: parameters on one device, no NamedSharding (today's path)."""
    import jaxedit
    from jaxedit.sharding import mesh_of

    model, _ = jaxedit.load(tiny_dirs["gpt2"][0])
    assert mesh_of(model) is None


# ---- placement ----

@pytest.mark.parametrize("model", ["gpt2", "llama"])
@pytest.mark.parametrize("mesh", MESHES)
def test_parameters_are_split_over_the_model_axis(report, model, mesh):
    entry = report["models"][model]["meshes"][mesh]
    m = int(mesh.split("model=")[1]) if "model=" in mesh else 1
    b = entry["bytes"]
    # the norms and output biases stay replicated: a little over 1/m
    assert b["max_per_device"] == b["min_per_device"]
    assert b["total"] / m <= b["max_per_device"] <= b["total"] / m * 1.05 + 2048, (b, m)
    specs = entry["specs"]
    if m == 1:
        assert set(specs.values()) == {"P()"}
        return
    col, row = "P(None, None, 'model')", "P(None, 'model', None)"
    assert specs["blocks.wq"] == specs["blocks.wk"] == specs["blocks.wv"] == col
    assert specs["blocks.wo"] == specs["blocks.w_out"] == row
    if model == "gpt2":
        assert specs["blocks.w_in"] == col and specs["blocks.bq"] == "P(None, 'model')"
        # vocabulary 324: split over it up to 4 devices, over d_model on 8
        assert specs["wte"] == ("P(None, 'model')" if m == 8 else "P('model', None)")
    else:
        assert specs["blocks.w_gate"] == specs["blocks.w_up"] == col
        assert specs["embed"] == "P('model', None)" and specs["lm_head"] == "P(None, 'model')"


def test_model_axis_must_divide_heads_and_d_ff(report):
    """6 heads (2 key/value heads) and d_ff 80: a model axis of 2 splits them; 4 and 8 are refused in one line."""
    meshes = report["models"]["llama-odd"]["meshes"]
    assert "error" not in meshes["data=4,model=2"]
    for mesh in ("data=2,model=4", "data=1,model=8"):
        err = meshes[mesh]["error"]
        assert "does not divide this model's attention heads (6, key/value heads 2) and d_ff (80)" in err
        assert "\n" not in err


# ---- results ----

@pytest.mark.parametrize("model, mesh, quantities", RUNS)
def test_results_equal_single_device(report, model, mesh, quantities):
    entry = report["models"][model]["meshes"][mesh]
    names = list(report["quantities"]) if quantities == "all" else quantities.split(",")
    want = {key for name in names for key in report["quantities"][name]}
    assert set(entry["rel"]) >= want
    bad = {k: v for k, v in entry["rel"].items() if k in want and not v <= TOL}
    assert not bad, bad
    flat = {k: v for k, v in entry["signal"].items() if k in want and not v > 1e-2}
    assert not flat, flat


@pytest.mark.parametrize("model, mesh", SAMPLES)
def test_sampling_equals_single_device(report, model, mesh):
    assert report["models"][model]["meshes"][mesh]["sample_equal"] is True


def test_no_program_gathers_a_weight(report):
    """No compiled program (forward, tracing grid, statistics, saliency, z optimization, sampling, ...) all-gathers
    an array shaped like a weight matrix, whole or one layer of it; the programs do all-gather activations. (The
    programs of the computations compared: in the fast tier GPT-2's saliency and AlphaEdit programs and LLaMA's
    MEMIT and ProFS ones are not compiled on a mesh.)"""
    shapes = {tuple(s) for entry in report["models"].values() for s in entry["weight_shapes"]}
    gathers = report["all_gathers"]
    assert gathers, "no all-gather found: the HLO dump is missing"
    assert not [g for g in gathers if tuple(g[1]) in shapes]


@pytest.mark.slow  # with the persistence checks (the sharded checks' --persistence)
def test_model_axis_divides_live_memory(report):
    """The compiled forward of a wider model (weights much larger than activations): with the model axis over 8
    devices each holds about 1/8 of the weights, and its temporaries shrink too (no full weight materialized)."""
    w = report["wide_forward"]
    one, eight = w["one device"], w["data=1,model=8"]
    assert one["arguments"] >= w["param_bytes"]
    assert eight["arguments"] <= w["param_bytes"] / 8 * 1.05 + 4096
    assert eight["temp"] < one["temp"] / 4 and eight["temp"] < w["param_bytes"] / 8


@pytest.mark.slow  # a sharded model's save and export (one device's: tests/test_persist.py)
def test_orbax_save_and_export_of_a_sharded_model(report):
    assert report["orbax"] == {"equal": True, "same_shardings": True}
    assert report["export"] == {"same_names": True, "equal": True}


# ---- several processes ----

def _rows(out_dir):
    with open(os.path.join(out_dir, "results.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_processes_write_the_results_of_one(report):
    """`jaxedit trace --batch` as two processes (jax.distributed on 127.0.0.1, two CPU devices each, mesh data=4,
    each process drawing the noise of its own prompts) writes the results.jsonl and grids of one process."""
    mh = report["multihost"]
    assert mh["returncodes"] == [0, 0, 0], mh["logs"]
    assert "wrote" not in mh["logs"][1]  # process 1 computes but writes nothing
    two, one = _rows(mh["two"]), _rows(mh["one"])
    assert [r["line"] for r in two] == [r["line"] for r in one] and len(one) == 4
    for a, b in zip(two, one):
        scale = max(b["high_score"], b["low_score"])
        for key in b:
            if isinstance(b[key], float):
                assert abs(a[key] - b[key]) <= TOL * abs(b[key]), (key, a[key], b[key])
            elif key == "hidden":
                assert abs(a[key]["max_ie"] - b[key]["max_ie"]) <= TOL * scale
                assert (a[key]["token"], a[key]["layer"]) == (b[key]["token"], b[key]["layer"])
            else:
                assert a[key] == b[key], key
        za = np.load(os.path.join(mh["two"], a["files"]["hidden"]))
        zb = np.load(os.path.join(mh["one"], b["files"]["hidden"]))
        np.testing.assert_allclose(za["scores"], zb["scores"], rtol=TOL, atol=0)
    assert sorted(os.listdir(mh["two"])) == sorted(os.listdir(mh["one"]))
