"""The sharded computations against the single-device ones, in a process of its own with 8 CPU devices (the device
count is fixed when JAX starts, so the rest of the suite keeps its one device). tests/test_sharding.py runs it once
and checks the JSON report it prints on its last line.

    JAXEDIT_CHECKS_DUMP=DIR python tests/sharded_checks.py WORK_DIR REPORT.json [--mesh SPEC ...]
        [--run MODEL@SPEC[:QUANTITY,...] ...] [--sample MODEL@SPEC ...] [--persistence] [--multihost]

``--mesh`` (repeated) names the meshes to load the models on (default: all four); ``--run`` the (model, mesh) pairs
whose computations are compared, and which of them (``MODEL@MESH:trace,memit``; default: all of QUANTITIES, on every
model and every selected mesh); ``--sample`` the pairs that also compare sampled tokens (added to --run; with neither
option: GPT-2 on data=1,model=8 and LLaMA on data=4,model=2, where those meshes are selected; with --run alone,
none); ``--persistence`` adds the orbax save / export of a sharded model and the wide forward's memory,
``--multihost`` the two-process run (both off unless given).
tests/test_sharding.py asks for what its selected tests read: two meshes, a pair on each (each computation on one
of the two models) and LLaMA's sampling in the fast tier; all four meshes, six pairs with every computation, both
models' sampling, the persistence checks and the two-process run in the full suite.

Each model is loaded with ``mesh=`` on each selected mesh (each device reading its shards from the safetensors
file), and for the selected (model, mesh) pairs the selected public computations are compared with the same calls on
the model loaded without a mesh: logits, tracing grids, key statistics, saliency profiles, MEMIT weight updates, ProFS edits
and sequential AlphaEdit edits (whose edited weights must keep the input's placement) and, on one mesh per model,
sampled tokens. The report also holds the parameter bytes per device, the all-gathers of the compiled programs (from
XLA's dump), the compiled forward's memory per device on a wider model, an orbax save / export of a sharded model,
and a two-process ``jaxedit trace`` run (jax.distributed on 127.0.0.1) beside a one-process one.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys
import time

DUMP = os.environ.get("JAXEDIT_CHECKS_DUMP")
# tiny programs: compile time is what costs, so XLA's CPU backend optimizes little (every run here, the
# single-device references and the two-process run included, uses the same flags)
FAST_XLA = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
            "--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = " ".join(filter(None, [
    os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8", FAST_XLA,
    f"--xla_dump_to={DUMP} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*" if DUMP else ""]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxedit  # noqa: E402
from jaxedit import JaxeditError  # noqa: E402
from jaxedit.edit import memit as memit_module  # noqa: E402
from jaxedit.model import params_of  # noqa: E402
from jaxedit.sharding import bytes_per_device  # noqa: E402

PROMPTS = ["The Eiffel Tower is located in the city of", "Miles Davis plays the",
           "The Space Needle is in Seattle. Beats Music is owned by"]
SUBJECTS = ["The Eiffel Tower", "Miles Davis", "Beats Music"]
EDITS = [{"prompt": "The Space Needle is in {}", "subject": "Seattle", "target": " Paris"},
         {"prompt": "Toko Yasuda produces the most amazing", "subject": "amazing", "target": " trumpet"}]
PROFS_PAIRS = [("The Eiffel Tower is located in the city of Paris.", "Miles Davis plays the trumpet."),
               ("The Space Needle is in Seattle.", "Toko Yasuda produces the most amazing music on the guitar."),
               ("Beats Music is owned by Apple.", "The capital of France is Paris. Miles Davis plays.")]
CORPUS = ["The Eiffel Tower is located in the city of Paris.", "Miles Davis plays the trumpet.",
          "Beats Music is owned by Apple.", "The capital of France is Paris.", "The Space Needle is in Seattle.",
          "Toko Yasuda produces music on the guitar.", "Paris is the capital of France."]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def random_stats(cfg, layers, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for l in layers:
        a = rng.normal(size=(cfg.d_ff, 4 * cfg.d_ff)) * 0.1
        out[l] = (a @ a.T / a.shape[1]).astype(np.float32)
    return out


# the computations compared, by the name --run takes -> the results' keys in the report
QUANTITIES = {"logits": ("logits",), "trace": ("trace",), "stats": ("stats",), "saliency": ("saliency",),
              "memit": ("memit_update", "memit_weights", "memit_report"),
              "profs": ("profs_weights", "profs_projectors"), "alphaedit": ("alphaedit_update", "alphaedit_cp")}


def run_all(model, tok, work, tag, sample, quantities=tuple(QUANTITIES)):
    """The computations named in ``quantities`` (and sampling with ``sample``) on ``model``; returns
    {result key: numpy result}."""
    from jaxedit.edit.stats import layer_stats
    from jaxedit.generate import generate_ids, sample as sample_rows

    cfg = model.config
    out = {}
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    T = max(map(len, ids))
    batch = np.zeros((len(ids), T), np.int32)
    mask = np.zeros((len(ids), T), np.int32)
    for i, x in enumerate(ids):
        batch[i, :len(x)], mask[i, :len(x)] = x, 1
    if "logits" in quantities:
        out["logits"] = np.asarray(jax.device_get(jaxedit.forward(model, batch, mask).logits)) * mask[..., None]
    kinds = ("attn",) if cfg.family == "gpt2" else ("hidden", "mlp")  # every kind, over the two models
    if "trace" in quantities:
        res = jaxedit.trace_batch(model, [{"prompt": p, "subject": s} for p, s in zip(PROMPTS[:2], SUBJECTS)],
                                  tokenizer=tok, kinds=kinds, samples=2, window=2, batch_size=2, bucket=16)
        out["trace"] = np.concatenate([r[k].scores.ravel() for r in res for k in kinds] +
                                      [[r[kinds[0]].low_score, r[kinds[0]].high_score] for r in res])
    if "stats" in quantities:
        layers = (0, cfg.n_layers - 1)
        st = layer_stats(model, layers, tokenizer=tok, corpus=os.path.join(work, "corpus.txt"), stats_samples=len(CORPUS),
                         max_len=16, batch_size=4, cache_dir=os.path.join(work, "stats-" + tag), progress=False)
        out["stats"] = np.stack([st[l] for l in layers])
    if sample:
        short = np.array([x[-6:] for x in generate_ids(model, ids, 6, top_k=5, seed=3)])
        batched = np.array([s for row in sample_rows(model, ids, 5, samples=3, top_p=0.9, seed=2) for s in row])
        out["sample"] = np.concatenate([short.ravel(), batched.ravel()])
    if "saliency" in quantities:
        per, mean = jaxedit.saliency_batch(model, [{"prompt": p, "target": " Paris"} for p in PROMPTS],
                                           tokenizer=tok)
        out["saliency"] = np.stack([np.concatenate([r.layer] + list(r.modules.values())) for r in per])
    layer = (cfg.n_layers - 1,)
    if "memit" in quantities:
        out.update(_memit(model, tok, layer))
    if "profs" in quantities:
        out.update(_profs(model, tok))
    if "alphaedit" in quantities:
        out.update(_alphaedit(model, tok, layer))
    return out


def _placed_like_input(method, edited, model):
    """The edited model's w_out, which must keep the input's placement (an edit on a mesh stays sharded alike)."""
    w_out, before = params_of(edited)["blocks"]["w_out"], params_of(model)["blocks"]["w_out"]
    if w_out.sharding != before.sharding:
        raise AssertionError(f"{method}: the edited w_out is placed as {w_out.sharding}, the input's as "
                             f"{before.sharding}")
    return w_out


def _memit(model, tok, layer):
    out = {}
    cfg = model.config
    updates = []
    solve = memit_module.solve_update

    # the update dW itself (the stored weights W + dW round it to W's float32 ulp); 10 steps let delta grow: the
    # residual z - z_now is a difference of two nearly equal vectors while delta is small next to h
    def capture(*args, **kwargs):
        dW, rel_residual = solve(*args, **kwargs)
        updates.append(np.asarray(jax.device_get(dW)))
        return dW, rel_residual

    memit_module.solve_update = capture
    try:
        edited, report = jaxedit.memit(model, EDITS, layers=layer, tokenizer=tok, stats=random_stats(cfg, layer),
                                       context_prefixes=(), v_num_grad_steps=10, progress=False)
    finally:
        memit_module.solve_update = solve
    out["memit_update"] = np.stack(updates)
    out["memit_weights"] = np.asarray(jax.device_get(params_of(edited)["blocks"]["w_out"]))
    out["memit_report"] = np.array([r["update_norm"] for r in report["layers_report"]] +
                                   [r["delta_norm"] for r in report["requests"]] +
                                   [p for r in report["requests"] for p in r["p_after"]])
    return out


def _profs(model, tok):
    out = {}
    cfg = model.config
    # ProFS: the padded mean (its own forward); the subspaces as projectors (free of the SVD's sign)
    edited, report = jaxedit.profs(model, PROFS_PAIRS, tokenizer=tok, layers=range(cfg.n_layers), mean_over="padded",
                                   progress=False)
    w_out = _placed_like_input("profs", edited, model)
    out["profs_weights"] = np.asarray(jax.device_get(w_out))
    out["profs_projectors"] = np.stack([v.T @ v for v in report["subspace"].values()])
    return out


def _alphaedit(model, tok, layer):
    out = {}
    cfg = model.config
    # AlphaEdit, sequentially: one request a batch (padded to the data axis on a mesh), the state carried over
    edited, report = jaxedit.edit_sequential(model, EDITS, method="alphaedit", batch_size=1, layers=layer,
                                             tokenizer=tok, stats=random_stats(cfg, layer), context_prefixes=(),
                                             v_num_grad_steps=10, null_space_threshold="energy:0.5",
                                             progress=False)
    w_out = _placed_like_input("alphaedit", edited, model)
    # the update itself (relative to the whole weights it would hide in their rounding)
    out["alphaedit_update"] = (np.asarray(jax.device_get(w_out[layer[0]]), np.float64)
                               - np.asarray(jax.device_get(params_of(model)["blocks"]["w_out"][layer[0]]), np.float64))
    out["alphaedit_cp"] = report["state"]["C_p"][layer[0]]
    return out


def hlo_all_gathers(dump):
    """[(module, shape)] of every all-gather in the optimized programs XLA compiled."""
    found = []
    for fn in glob.glob(os.path.join(dump, "*after_optimizations.txt")):
        with open(fn) as f:
            for line in f:
                m = re.search(r"= (\w+)\[([\d,]*)\][^ ]* all-gather(-start)?\(", line)
                if m:
                    found.append((os.path.basename(fn), [int(x) for x in m.group(2).split(",") if x]))
    return found


def weight_shapes(cfg, params):
    """Shapes that would betray a gathered weight matrix: every matrix, whole (stacked) or one layer of it."""
    shapes = set()
    for leaf in jax.tree.leaves(params):
        if leaf.ndim >= 2:
            shapes.add(tuple(leaf.shape))
            if leaf.shape[0] == cfg.n_layers and leaf.ndim == 3:
                shapes.add(tuple(leaf.shape[1:]))
    return sorted(shapes)


def wide_forward_memory():
    """The compiled forward of a model whose weights dwarf its activations: bytes per device of its arguments and
    temporaries on one device and with the weights over 8 devices."""
    from jaxedit.config import ModelConfig
    from jaxedit.forward import apply

    cfg = ModelConfig(family="llama", n_layers=2, d_model=256, n_heads=8, n_kv_heads=8, head_dim=32, d_ff=1024,
                      vocab_size=512, max_positions=64, norm_eps=1e-5, tie_embeddings=False, activation="silu")
    model = jaxedit.create_model(cfg)
    ids = np.zeros((8, 8), np.int32)
    out = {"param_bytes": int(sum(x.nbytes for x in jax.tree.leaves(params_of(model))))}
    for spec in (None, "data=1,model=8"):
        m = model if spec is None else jaxedit.shard_model(model, jaxedit.make_mesh(spec))
        f = jax.jit(apply, static_argnames=("cfg",))
        ma = f.lower(cfg, params_of(m), ids).compile().memory_analysis()
        out[spec or "one device"] = {"arguments": int(ma.argument_size_in_bytes), "temp": int(ma.temp_size_in_bytes),
                                     "output": int(ma.output_size_in_bytes)}
    return out


# Tiny checkpoints whose heads and d_ff divide every model axis up to 8 (GPT-2's vocabulary, 324, is split over
# the vocabulary up to 4 devices and over d_model on 8), and one whose heads and d_ff do not. Their dimensions
# differ from the activations' (sequence lengths 16 and 32), so a gathered weight shows by its shape.
MODELS = {
    "gpt2": dict(kind="gpt2", n_layer=2, n_embd=48, n_head=8, n_inner=96, n_positions=64, vocab_size=324),
    "llama": dict(kind="llama", num_hidden_layers=2, hidden_size=48, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=4, intermediate_size=96, tie_word_embeddings=False),
    "llama-odd": dict(kind="llama", num_hidden_layers=2, hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                      intermediate_size=80, tie_word_embeddings=False),
}
MESHES = ["data=8", "data=4,model=2", "data=2,model=4", "data=1,model=8"]
# Every model is loaded on every selected mesh (placement, bytes per device); the computations run for the selected
# (model, mesh) pairs (``--run``; tests/test_sharding.py's FAST_RUNS / SLOW_RUNS), sampling for those of ``--sample``;
# the odd LLaMA is only loaded (the errors of the meshes that do not divide it)
SAMPLES = [("gpt2", "data=1,model=8"), ("llama", "data=4,model=2")]
PLAN = {"gpt2": {"meshes": MESHES},
        "llama": {"meshes": MESHES},
        "llama-odd": {"meshes": ["data=4,model=2", "data=2,model=4", "data=1,model=8"], "run": False}}


def build_models(work):
    """Save the tiny checkpoints (random torch models, as the tests build them: tests/tiny_models.py) under ``work``."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tiny_models

    tok = tiny_models.make_tokenizer()
    paths = {}
    for name, cfg in MODELS.items():
        tiny_models.TINY_CONFIGS["sharded-" + name] = cfg
        path = paths[name] = os.path.join(work, name)
        tiny_models.build_hf_model("sharded-" + name, seed=1, init_std=0.2).save_pretrained(path)
        tok.save_pretrained(path)
    return paths


def mesh_checks(paths, work, report, meshes, runs, samples):
    t0 = time.time()
    for name, plan in PLAN.items():
        path = paths[name]
        ref_model, tok = jaxedit.load(path)
        wanted = set().union(*[q for (m, _), q in runs.items() if m == name])
        ref = (run_all(ref_model, tok, work, f"{name}-ref", sample=any(m == name for m, _ in samples),
                       quantities=wanted) if any(m == name for m, _ in runs) else None)
        report["seconds"][f"{name}-ref"] = time.time() - t0
        entry = report["models"][name] = {"weight_shapes": weight_shapes(ref_model.config, params_of(ref_model)),
                                          "meshes": {}}
        for mesh_spec in [m for m in plan["meshes"] if m in meshes or not plan.get("run", True)]:
            run = (name, mesh_spec) in runs
            t1 = time.time()
            try:
                model, _ = jaxedit.load(path, mesh=jaxedit.make_mesh(mesh_spec))
            except JaxeditError as e:
                entry["meshes"][mesh_spec] = {"error": str(e)}
                continue
            params = params_of(model)
            per = bytes_per_device(params)
            result = entry["meshes"][mesh_spec] = {
                "bytes": {"max_per_device": max(per.values()), "min_per_device": min(per.values()),
                          "total": int(sum(x.nbytes for x in jax.tree.leaves(params)))},
                "specs": {".".join(str(getattr(p, "key", p)) for p in path): str(leaf.sharding.spec)
                          for path, leaf in jax.tree_util.tree_leaves_with_path(params)},
            }
            if run:
                got = run_all(model, tok, work, f"{name}-{mesh_spec}", sample=(name, mesh_spec) in samples,
                              quantities=runs[(name, mesh_spec)])
                result["rel"] = {k: rel(got[k], ref[k]) for k in got if k != "sample"}
                # how much the reference varies: a comparison with a flat result would prove little
                result["signal"] = {k: float(np.ptp(ref[k]) / max(np.abs(ref[k]).max(), 1e-30))
                                    for k in got if k != "sample"}
                result["sample_equal"] = bool(np.array_equal(got["sample"], ref["sample"])) if "sample" in got else None
            report["seconds"][f"{name}-{mesh_spec}"] = time.time() - t1
            t0 = time.time()


def persistence_checks(paths, work, report):
    """An orbax save of a sharded (edited) model loads back with its shardings and values; export_hf of a sharded
    model writes the same tensors as of the model on one device."""
    from safetensors.numpy import load_file

    path = paths["llama"]
    one, tok = jaxedit.load(path)
    mesh = jaxedit.make_mesh("data=4,model=2")
    model, _ = jaxedit.load(path, mesh=mesh)
    jaxedit.save(model, os.path.join(work, "saved"), tokenizer=tok)
    back, _ = jaxedit.load(os.path.join(work, "saved"), mesh=mesh)
    pairs = list(zip(jax.tree.leaves(params_of(model)), jax.tree.leaves(params_of(back))))
    report["orbax"] = {"equal": all(bool(np.array_equal(jax.device_get(a), jax.device_get(b))) for a, b in pairs),
                       "same_shardings": all(a.sharding == b.sharding for a, b in pairs)}
    jaxedit.export_hf(model, os.path.join(work, "hf-sharded"), tokenizer=tok)
    jaxedit.export_hf(one, os.path.join(work, "hf-one"), tokenizer=tok)
    a = load_file(os.path.join(work, "hf-sharded", "model.safetensors"))
    b = load_file(os.path.join(work, "hf-one", "model.safetensors"))
    report["export"] = {"same_names": sorted(a) == sorted(b),
                        "equal": sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)}


TRACE_ARGS = ["trace", "--batch", "{prompts}", "--samples", "2", "--kinds", "hidden", "--window", "2",
              "--no-plots", "--batch-size", "4"]
PROMPT_LINES = [{"prompt": p, "subject": s} for p, s in zip(PROMPTS, SUBJECTS)] + [
    {"prompt": "Toko Yasuda produces the most amazing music", "subject": "Toko Yasuda"}]


def multihost_run(paths, work, report):
    """`jaxedit trace --batch` as two processes (two CPU devices each, jax.distributed on 127.0.0.1, mesh data=4)
    and as one process on one device."""
    import socket
    import subprocess

    prompts = os.path.join(work, "prompts.jsonl")
    with open(prompts, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in PROMPT_LINES))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [a.replace("{prompts}", prompts) for a in TRACE_ARGS] + ["--model", paths["gpt2"]]

    def launch(i):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_XLA}")
        with open(os.path.join(work, f"process{i}.log"), "w") as log:
            return subprocess.Popen([sys.executable, "-m", "jaxedit.cli.main", *args,
                                     "--out", os.path.join(work, "trace-2proc"), "--mesh", "data=4",
                                     "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                     "--process-id", str(i)], env=env, stdout=log, stderr=subprocess.STDOUT)

    t0 = time.time()
    two = [launch(i) for i in range(2)]
    for p in two:
        p.wait(timeout=900)
    logs = []
    for i in range(2):
        with open(os.path.join(work, f"process{i}.log")) as f:
            logs.append(f.read())
    # the one-process run: here, on one device (no mesh), through the same command
    from click.testing import CliRunner

    from jaxedit.cli.main import cli

    one = CliRunner().invoke(cli, args + ["--out", os.path.join(work, "trace-1proc")])
    logs.append(one.output + ("" if one.exception is None or one.exit_code == 0 else repr(one.exception)))
    report["multihost"] = {"returncodes": [p.returncode for p in two] + [one.exit_code],
                           "logs": [l[-2000:] for l in logs],
                           "two": os.path.join(work, "trace-2proc"), "one": os.path.join(work, "trace-1proc"),
                           "seconds": time.time() - t0}


def main(work, out_file, meshes=tuple(MESHES), runs=None, samples=tuple(SAMPLES), persistence=False, multihost=False):
    # (model, mesh) -> the names of QUANTITIES compared there
    if runs is None:
        runs = {(m, spec): set(QUANTITIES) for m, p in PLAN.items() if p.get("run", True)
                for spec in p["meshes"] if spec in meshes}
    else:
        merged = {}
        for m, spec, quantities in runs:
            merged.setdefault((m, spec), set()).update(quantities)
        runs = merged
    samples = set(samples)
    for pair in samples:
        runs.setdefault(pair, set())
    report = {"devices": len(jax.devices()), "models": {}, "errors": {}, "seconds": {},
              "quantities": {name: list(keys) for name, keys in QUANTITIES.items()}}
    t0 = time.time()
    paths = build_models(work)
    with open(os.path.join(work, "corpus.txt"), "w") as f:
        f.write("\n".join(CORPUS) + "\n")
    report["seconds"]["build"] = time.time() - t0
    mesh_checks(paths, work, report, meshes, runs, samples)
    for spec_text in ("data=3", "data=4,model=4", "data=2,model=x", "rows=8", "model=2,model=4", "model=3"):
        try:
            jaxedit.make_mesh(spec_text)
            report["errors"][spec_text] = None
        except JaxeditError as e:
            report["errors"][spec_text] = str(e)
    if persistence:
        t1 = time.time()
        persistence_checks(paths, work, report)
        report["wide_forward"] = wide_forward_memory()
        report["seconds"]["persistence+wide"] = time.time() - t1
    if DUMP:
        report["all_gathers"] = hlo_all_gathers(DUMP)
    if multihost:
        multihost_run(paths, work, report)
    report["seconds"]["total"] = time.time() - t0
    import resource

    report["cpu_seconds"] = sum(getattr(resource.getrusage(who), f) for who in
                                (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))
    with open(out_file + ".tmp", "w") as f:
        json.dump(report, f)
    os.replace(out_file + ".tmp", out_file)


def run_pair(text):
    """``MODEL@MESH`` -> (model, mesh) for --sample."""
    import argparse

    model, _, spec = text.partition("@")
    if model not in PLAN or not PLAN[model].get("run", True) or spec not in MESHES:
        runnable = [m for m, p in PLAN.items() if p.get("run", True)]
        raise argparse.ArgumentTypeError(f"{text!r}: expected MODEL@MESH with MODEL in {runnable} and MESH in {MESHES}")
    return model, spec


def run_spec(text):
    """``MODEL@MESH[:QUANTITY,...]`` -> (model, mesh, quantities) for --run (all of QUANTITIES when none is named)."""
    import argparse

    pair, _, names = text.partition(":")
    quantities = set(names.split(",")) if names else set(QUANTITIES)
    unknown = quantities - set(QUANTITIES)
    if unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown quantities {sorted(unknown)} (known: "
                                         f"{', '.join(QUANTITIES)})")
    return (*run_pair(pair), quantities)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("work")
    parser.add_argument("report")
    parser.add_argument("--mesh", action="append", choices=MESHES)
    parser.add_argument("--run", action="append", metavar="MODEL@MESH[:QUANTITY,...]", type=run_spec,
                        help="compare these computations (default: all of " + ", ".join(QUANTITIES) + ") of this "
                             "model on this mesh (default: every model, every mesh; the mesh is added to --mesh)")
    parser.add_argument("--sample", action="append", metavar="MODEL@MESH", type=run_pair,
                        help="also compare sampled tokens for this model on this mesh (added to --run; with neither "
                             "option: " + ", ".join(f"{m}@{s}" for m, s in SAMPLES) + ")")
    parser.add_argument("--persistence", action="store_true",
                        help="the orbax save and export of a sharded model, the wide forward's memory")
    parser.add_argument("--multihost", action="store_true")
    a = parser.parse_args()
    if a.sample is not None:
        samples = a.sample
    else:  # the default pairs, on the meshes asked for (all of them without --mesh), when no --run chooses
        samples = [] if a.run is not None else [p for p in SAMPLES if not a.mesh or p[1] in a.mesh]
    meshes = set(a.mesh or MESHES) | {r[1] for r in [*(a.run or ()), *samples]}
    main(a.work, a.report, tuple(m for m in MESHES if m in meshes), a.run, samples, a.persistence, a.multihost)
