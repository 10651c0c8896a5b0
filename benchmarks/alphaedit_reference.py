"""AlphaEdit side by side with AlphaEdit's published code (jianghoucheng/AlphaEdit) on a random GPT-2-small-shaped
model: (a) parity of one edit (z, the per-layer updates, and a float64 restatement of the update from the same K,
R, P, C_p) and (b) the speed of a sequence (10 edits in 2 batches of 5), both codes in this process.

The model: ``transformers.GPT2Config()`` (12 layers, d 768, d_ff 3072, vocab 50257), random weights (``--seed``),
saved as a Hugging Face folder in a temporary directory with SmolLM2's byte-level BPE tokenizer (no GPT-2
tokenizer is needed offline; its ids are below 50257). jaxedit loads the folder (``jaxedit.load``), torch loads it
with ``GPT2LMHeadModel.from_pretrained``. One set of inputs serves both: the key statistics C of layers 3-5 (c_proj's
inputs over 64 short texts: rank-deficient), the context templates (jaxedit's, injected into their cache), the
requests (CounterFact demo records), AlphaEdit's GPT-2 hyperparameters (their ``hparams/AlphaEdit/gpt2-xl.json``
with layers 3-5 and the loss at the last layer).

Their code runs from a temporary copy of ``--reference DIR`` (an extracted checkout, never part of this
repository) with run-time shims: "cuda" -> "cpu" in the copy, a stand-in ``datasets`` module (only their statistics
pass, unused here, imports it), their ``get_cov`` replaced by the shared C, and their ``get_project`` (in
experiments/evaluate.py, whose other imports are not needed) executed on its own.

    git --git-dir=/work/.mirror/jianghoucheng+AlphaEdit/repo archive HEAD | tar -x -C /tmp/alphaedit_ref
    nice -n 10 python benchmarks/alphaedit_reference.py --reference /tmp/alphaedit_ref [--part parity|speed|both]

jaxedit's sequence runs in child processes (this tree's jaxedit, and with ``--before DIR`` another copy, e.g.
``git archive HEAD jaxedit | tar -x -C DIR``), each called twice: cold (compiles) and warm; their code runs once, in
this process, with jaxedit's context templates. The ratios are the numbers to read on a shared machine.
"""
from __future__ import annotations

import argparse
import ast
import atexit
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
LAYERS = (3, 4, 5)


# ---------------------------------------------------------------------------------------------- shared inputs

def texts64() -> list:
    """64 short texts: the demo CounterFact prompts and the sentences of jaxedit's neutral paragraphs."""
    import jaxedit

    demo = jaxedit.load_counterfact("demo")
    out = []
    for d in demo:
        rr = d["requested_rewrite"]
        out.append(rr["prompt"].replace("{}", rr["subject"]) + " " + rr["target_true"]["str"] + ".")
        out.extend(d.get("paraphrase_prompts", [])[:1])
    with open(os.path.join(HERE, "..", "jaxedit", "data", "neutral.txt")) as f:
        for line in f:
            out.extend(s.strip() + "." for s in line.split(". ") if s.strip())
    if len(out) < 64:
        raise SystemExit(f"only {len(out)} texts")
    return out[:64]


def edit_requests(n: int) -> list:
    import jaxedit

    demo = jaxedit.load_counterfact("demo")
    out = []
    for i in range(n):
        rr = demo[i % len(demo)]["requested_rewrite"]
        subject = rr["subject"] if i < len(demo) else f"{rr['subject']} {i}"
        out.append({"prompt": rr["prompt"], "subject": subject, "target": " " + rr["target_new"]["str"].strip(),
                    "case_id": i})
    return out


def build_model(folder: str, seed: int) -> None:
    """A random GPT-2-small-shaped checkpoint (GPT2Config defaults) + SmolLM2's tokenizer, as a HF folder."""
    import torch
    import transformers
    from jaxedit.loading import embedded_gguf_path

    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    hf.save_pretrained(folder)
    path = embedded_gguf_path("smollm2")
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    tok.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------- their code

# their Trace hook expects a block's output to be a tuple (transformers < 5): wrap a bare tensor in one for their
# code and unwrap it for the model
NETHOOK_SHIM = [
    ("        def retain_hook(m, inputs, output):\n",
     "        def retain_hook(m, inputs, output):\n"
     "            bare = torch.is_tensor(output) and type(m).__name__ == 'GPT2Block'\n"
     "            output = (output,) if bare else output\n"),
    ("            if stop:\n                raise StopForward()\n            return output\n",
     "            if stop:\n                raise StopForward()\n            return output[0] if bare else output\n"),
]


def load_reference(ref_dir: str) -> types.SimpleNamespace:
    """Their AlphaEdit modules, imported from a patched temporary copy of ``ref_dir``."""
    work = tempfile.mkdtemp(prefix="alphaedit-ref-")
    atexit.register(shutil.rmtree, work, True)
    for sub in ("AlphaEdit", "rome", "util"):
        shutil.copytree(os.path.join(ref_dir, sub), os.path.join(work, sub),
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ref_dir, "globals.yml"), work)
    for root, _, files in os.walk(work):
        for fn in files:
            if fn.endswith(".py"):
                p = os.path.join(root, fn)
                with open(p) as f:
                    src = f.read()
                src = src.replace('"cuda"', '"cpu"').replace(".cuda()", ".cpu()")
                if fn == "nethook.py":  # transformers >= 5: a decoder block returns a tensor, not a tuple
                    for a, b in NETHOOK_SHIM:
                        if a not in src:
                            raise SystemExit(f"{ref_dir}/util/nethook.py: the shim's anchor {a!r} is not there")
                        src = src.replace(a, b, 1)
                with open(p, "w") as f:
                    f.write(src)
    if "datasets" not in sys.modules:
        try:
            import datasets  # noqa: F401
        except ImportError:  # only their statistics pass (rome/layer_stats.py) uses it, and it is not run here
            stub = types.ModuleType("datasets")
            stub.load_dataset = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("datasets stand-in"))
            sys.modules["datasets"] = stub
    sys.path.insert(0, work)
    cwd = os.getcwd()
    os.chdir(work)  # util/globals.py reads globals.yml from the working directory
    try:
        import AlphaEdit.AlphaEdit_main as main
        import AlphaEdit.compute_z as cz
        from AlphaEdit.AlphaEdit_hparams import AlphaEditHyperParams
    finally:
        os.chdir(cwd)
    # their get_project (experiments/evaluate.py), executed alone with the shared statistics behind get_cov
    with open(os.path.join(ref_dir, "experiments", "evaluate.py")) as f:
        tree = ast.parse(f.read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_project")
    ns = {"torch": __import__("torch")}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "evaluate.py:get_project", "exec"), ns)
    return types.SimpleNamespace(main=main, cz=cz, Hparams=AlphaEditHyperParams, get_project_ns=ns, dir=work)


def their_hparams(ref, ref_dir: str, layers, n_layers: int):
    with open(os.path.join(ref_dir, "hparams", "AlphaEdit", "gpt2-xl.json")) as f:
        d = json.load(f)
    d.update(layers=list(layers), v_loss_layer=n_layers - 1)
    return ref.Hparams(**d)


def their_projectors(ref, hf, tok, hp, C: dict):
    """P [len(layers), f, f] from their get_project, with their get_cov returning the shared C."""
    import torch

    ref.get_project_ns["get_cov"] = lambda model, tok, name, *a, **k: torch.tensor(
        np.asarray(C[int(name.split(".")[2])], np.float32))
    with contextlib.redirect_stdout(io.StringIO()):
        return torch.stack([ref.get_project_ns["get_project"](hf, tok, l, hp) for l in hp.layers])


def their_requests(reqs):
    return [{"prompt": r["prompt"], "subject": r["subject"], "target_new": {"str": r["target"]},
             "case_id": r["case_id"]} for r in reqs]


def c_proj_weights(hf, layers):
    return {l: hf.transformer.h[l].mlp.c_proj.weight.detach().clone() for l in layers}


def restore(hf, saved):
    import torch

    with torch.no_grad():
        for l, w in saved.items():
            hf.transformer.h[l].mlp.c_proj.weight[...] = w


def run_theirs(ref, hf, tok, reqs, hp, P, cache_c, record=None):
    """One call of their apply_AlphaEdit_to_model; with ``record`` (a dict), z, the keys and current z per layer."""
    main = ref.main
    if record is not None:
        orig_z, orig_ks, orig_io = main.compute_z, main.compute_ks, main.get_module_input_output_at_words
        record.update(z=[], ks=[], cur=[])

        def compute_z(*a, **k):
            out = orig_z(*a, **k)
            record["z"].append(out.detach().numpy().copy())
            return out

        def compute_ks(*a, **k):
            out = orig_ks(*a, **k)
            record["ks"].append(out.detach().numpy().copy())
            return out

        def io_at(*a, **k):
            out = orig_io(*a, **k)
            record["cur"].append(out[1].detach().numpy().copy())
            return out

        main.compute_z, main.compute_ks, main.get_module_input_output_at_words = compute_z, compute_ks, io_at
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            _, cache_c = main.apply_AlphaEdit_to_model(hf, tok, their_requests(reqs), hp, cache_template=None,
                                                       cache_c=cache_c, P=P)
    finally:
        if record is not None:
            main.compute_z, main.compute_ks, main.get_module_input_output_at_words = orig_z, orig_ks, orig_io
    return cache_c


# ---------------------------------------------------------------------------------------------- float64

def f64_update(K, R, P, Cp, l2):
    """AlphaEdit's update in float64: solve(P (K K^T + C_p) + l2 I, P K R^T); K [f, n], R [d, n]."""
    K, R, P, Cp = (np.asarray(a, np.float64) for a in (K, R, P, Cp))
    A = P @ (K @ K.T + Cp) + l2 * np.eye(K.shape[0])
    return np.linalg.solve(A, P @ K @ R.T)


def f64_projector(C, threshold=2e-2):
    w, U = np.linalg.eigh(np.asarray(C, np.float64))
    keep = w < threshold
    return (U[:, keep] @ U[:, keep].T), w


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def maxabs_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ---------------------------------------------------------------------------------------------- jaxedit

def jax_one_batch(model, tok, reqs, hp, layers, state, l2, record=None):
    """jaxedit's AlphaEdit batch (alphaedit.run_batch's edit) with the solver's K and R recorded."""
    from jaxedit.edit import alphaedit as ae
    from jaxedit.edit import memit as me

    parsed = me.parse_requests(reqs, tok, "edit")
    base = ae.alphaedit_solver(state, l2, hp.solve_dtype)

    def solver(l, K, R, sharding):
        if record is not None:
            record.setdefault("K", {})[l] = np.asarray(K, np.float32).copy()
            record.setdefault("R", {})[l] = np.asarray(R, np.float32).copy()
        return base(l, K, R, sharding)

    if record is not None:
        z = me.optimize_targets(model, tok, parsed, "edit", hp, layers, state["contexts"])[0]
        record["z"] = np.asarray(z)
    edited, rep = me.edit_batch(model, tok, parsed, "edit", hp, layers, state["contexts"], None, solver=solver,
                                evaluate=False)
    return edited, rep


def layer_weight(model, l):
    from jaxedit.model import params_of

    return np.asarray(params_of(model)["blocks"]["w_out"][l], np.float32)


# ---------------------------------------------------------------------------------------------- part (a)

def parity(ref, ref_dir, model, tok, hf, htok, C, contexts, l2):
    import torch
    from jaxedit.edit import alphaedit as ae
    from jaxedit.edit import memit as me

    layers = LAYERS
    hp, _ = me.prepare(model, layers, {})
    thp = their_hparams(ref, ref_dir, layers, model.config.n_layers)
    ref.main.CONTEXT_TEMPLATES_CACHE = [["{}"], list(contexts[1:])]
    req = edit_requests(1)
    saved = c_proj_weights(hf, layers)
    f = model.config.d_ff

    print("their projectors ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    P_theirs = their_projectors(ref, hf, htok, thp, C)
    t_their_P = time.perf_counter() - t
    t = time.perf_counter()
    state = ae.new_state(model, tok, layers, hp, stats=C, contexts=contexts, progress=False)
    t_jax_P = time.perf_counter() - t
    print(f"P: theirs {t_their_P:.1f} s, jaxedit {t_jax_P:.1f} s; float64 ...", file=sys.stderr, flush=True)
    P64, eig = {}, {}
    for l in layers:
        P64[l], eig[l] = f64_projector(C[l])
    print(f"\n## (a) parity: one request ({req[0]['prompt'].format(req[0]['subject'])!r} -> {req[0]['target']!r}),"
          f" layers {list(layers)}, l2 = {l2}\n")
    print("Projectors (threshold 2e-2 on the eigenvalues of the shared C; f = 3072):\n")
    print("| layer | rank C (eig > 1e-6 max) | null rank f64 | jaxedit | theirs | eigenvalues in [1e-2, 4e-2] | "
          "|P_jax - P64|_F | |P_theirs - P64|_F | |P_jax - P64| max | |P_theirs - P64| max |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, l in enumerate(layers):
        w = eig[l]
        Pj, Pt = state["P"][l], P_theirs[i].numpy()
        print(f"| {l} | {(w > 1e-6 * w.max()).sum()} | {(w < 2e-2).sum()} | {state['null_space'][l]['rank']} | "
              f"{int(round(float(np.trace(Pt))))} | {((w > 1e-2) & (w < 4e-2)).sum()} | "
              f"{np.linalg.norm(Pj - P64[l]):.2e} | {np.linalg.norm(Pt - P64[l]):.2e} | "
              f"{np.abs(Pj - P64[l]).max():.2e} | {np.abs(Pt - P64[l]).max():.2e} |")
    print(f"\n(P: jaxedit {t_jax_P:.1f} s with the context templates, theirs {t_their_P:.1f} s)")

    variants = [("own P (each code's from C)", state["P"], P_theirs),
                ("shared P (float64 eigh, cast to float32)", {l: P64[l].astype(np.float32) for l in layers},
                 torch.stack([torch.tensor(P64[l], dtype=torch.float32) for l in layers]))]
    results = {}
    for name, Pj, Pt in variants:
        st = dict(state, P={l: np.asarray(Pj[l], np.float32) for l in layers})
        rec_j = {}
        edited, rep = jax_one_batch(model, tok, req, hp, layers, st, l2, record=rec_j)
        dW_j = {l: layer_weight(edited, l) - layer_weight(model, l) for l in layers}
        restore(hf, saved)
        rec_t = {}
        cache_c = torch.zeros(len(layers), f, f)
        run_theirs(ref, hf, htok, req, thp, Pt, cache_c, record=rec_t)
        dW_t = {l: (hf.transformer.h[l].mlp.c_proj.weight.detach() - saved[l]).numpy() for l in layers}
        restore(hf, saved)
        z_t = rec_t["z"][0].reshape(1, -1)
        z_j = rec_j["z"]
        print(f"\n### {name}\n")
        print(f"z: |z_jax - z_theirs| / |z_theirs| = {rel(z_j, z_t):.2e} (max abs {np.abs(z_j - z_t).max():.2e}; "
              f"|z| = {np.linalg.norm(z_t):.2f})\n")
        print("| layer | |dW_j - dW_t|/|dW_t| | max-abs (rel. to max|dW_t|) | row of max | K rel | R rel | "
              "jax vs f64(own K,R; P64) | theirs vs f64(own K,R; P64) | max-abs: jax vs f64 | max-abs: theirs vs f64 | "
              "jax vs f64(own K,R,P) | theirs vs f64(own K,R,P) | f64(jax K,R) vs f64(their K,R), P64 |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        rows = []
        for i, l in enumerate(layers):
            Kj, Rj = rec_j["K"][l], rec_j["R"][l]
            Kt = rec_t["ks"][i].T  # [f, n]
            Rt = (rec_t["z"][0].reshape(-1, 1) - rec_t["cur"][i].T) / (len(layers) - i)
            zero = np.zeros((f, f))
            exact_j = f64_update(Kj, Rj, P64[l], zero, l2)
            exact_t = f64_update(Kt, Rt, P64[l], zero, l2)
            own_j = f64_update(Kj, Rj, Pj[l], zero, l2)
            own_t = f64_update(Kt, Rt, Pt[i].numpy(), zero, l2)
            d = np.abs(dW_j[l] - dW_t[l])
            row = {"layer": l, "rel": rel(dW_j[l], dW_t[l]), "maxabs": maxabs_rel(dW_j[l], dW_t[l]),
                   "argmax_row": int(np.unravel_index(d.argmax(), d.shape)[0]), "K": rel(Kj, Kt), "R": rel(Rj, Rt),
                   "jax_f64": rel(dW_j[l], exact_j), "theirs_f64": rel(dW_t[l], exact_t),
                   "jax_f64_maxabs": maxabs_rel(dW_j[l], exact_j), "theirs_f64_maxabs": maxabs_rel(dW_t[l], exact_t),
                   "jax_ownP": rel(dW_j[l], own_j), "theirs_ownP": rel(dW_t[l], own_t),
                   "inputs": rel(exact_j, exact_t)}
            rows.append(row)
            print(f"| {l} | {row['rel']:.2e} | {row['maxabs']:.2e} | {row['argmax_row']} | {row['K']:.1e} | "
                  f"{row['R']:.1e} | {row['jax_f64']:.2e} | {row['theirs_f64']:.2e} | {row['jax_f64_maxabs']:.2e} | "
                  f"{row['theirs_f64_maxabs']:.2e} | {row['jax_ownP']:.2e} | "
                  f"{row['theirs_ownP']:.2e} | {row['inputs']:.2e} |")
        results[name] = {"z_rel": rel(z_j, z_t), "layers": rows}
    return results


# ---------------------------------------------------------------------------------------------- part (b)

class Timers:
    """Wall time of module functions, by monkeypatching them for the duration of a ``with`` block."""

    def __init__(self, targets):
        self.targets = targets  # [(module, attribute name, label)]
        self.t = {}

    def __enter__(self):
        self.saved = []
        for mod, name, label in self.targets:
            fn = getattr(mod, name)
            self.saved.append((mod, name, fn))

            def wrapped(*a, _fn=fn, _label=label, **k):
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    self.t[_label] = self.t.get(_label, 0.0) + time.perf_counter() - t0

            setattr(mod, name, wrapped)
        return self

    def __exit__(self, *exc):
        for mod, name, fn in self.saved:
            setattr(mod, name, fn)


def jax_timers():
    from jaxedit.edit import alphaedit as ae
    from jaxedit.edit import memit as me

    return Timers([(ae, "null_space_projector", "P (3 layers)"), (me, "context_templates", "context templates"),
                   (me, "batch_shape", "batch shape (tokenizing)"), (me, "optimize_targets", "z optimization"),
                   (me, "spread", "spread: keys, current z, solve, add"), (me, "solve_update", "  of which solve"),
                   (ae, "accumulate", "C_p update (keys on the edited model)")])


def their_timers(ref):
    import torch

    return Timers([(ref.main, "compute_z", "z optimization"), (ref.main, "compute_ks", "keys (spread and C_p)"),
                   (ref.main, "get_module_input_output_at_words", "current z"),
                   (torch.linalg, "solve", "torch.linalg.solve (without the P products)")])


def jax_child(args) -> None:
    """(child process) jaxedit's sequence, cold then warm, with the jaxedit on PYTHONPATH; writes JSON + weights."""
    import jaxedit

    jaxedit.set_progress(False)
    model, tok = jaxedit.load(args.model)
    with np.load(args.stats) as z:
        C = {int(k): z[k] for k in z.files}
    layers = sorted(C)
    reqs = edit_requests(args.edits)

    def run():
        with jax_timers() as tm:
            t = time.perf_counter()
            edited, rep = jaxedit.edit_sequential(model, [dict(r) for r in reqs], tokenizer=tok, method="alphaedit",
                                                  batch_size=args.batch_size, layers=layers, stats=C, l2=args.l2,
                                                  progress=False)
            secs = time.perf_counter() - t
        return secs, [b["seconds"] for b in rep["batches"]], tm.t, edited, rep["contexts"]

    cold, b_cold, T_cold, _, _ = run()
    warm, b_warm, T_warm, edited, contexts = run()
    np.savez(args.child_out + ".npz", **{str(l): layer_weight(edited, l) for l in layers})
    with open(args.child_out + ".json", "w") as f:
        json.dump({"jaxedit": os.path.dirname(os.path.dirname(os.path.abspath(jaxedit.__file__))), "cold": cold,
                   "warm": warm, "batches_cold": b_cold, "batches_warm": b_warm, "pieces_cold": T_cold,
                   "pieces_warm": T_warm, "contexts": contexts}, f)


def run_child(tree, folder, stats_path, out, edits, batch_size, l2):
    import subprocess

    env = dict(os.environ, PYTHONPATH=tree, JAXEDIT_COMPILE_CACHE="0")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", folder, "--stats", stats_path,
           "--child-out", out, "--edits", str(edits), "--batch-size", str(batch_size), "--l2", str(l2),
           "--reference", "-"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"jaxedit child ({tree}) failed:\n{proc.stderr[-3000:]}")
    with open(out + ".json") as f:
        res = json.load(f)
    with np.load(out + ".npz") as z:
        res["weights"] = {int(k): z[k] for k in z.files}
    return res


def speed(ref, ref_dir, folder, work, hf, htok, C, l2, n_edits, batch_size, before=None):
    """Their code here; jaxedit (this tree, and ``before`` when given) in child processes on the same folder and C."""
    import torch

    layers = LAYERS
    thp = their_hparams(ref, ref_dir, layers, hf.config.n_layer)
    reqs = edit_requests(n_edits)
    f = hf.config.n_inner or 4 * hf.config.n_embd
    saved = c_proj_weights(hf, layers)
    stats_path = os.path.join(work, "C.npz")
    np.savez(stats_path, **{str(l): C[l] for l in layers})

    def their_run(contexts):
        restore(hf, saved)
        ref.main.CONTEXT_TEMPLATES_CACHE = [["{}"], list(contexts[1:])]  # jaxedit's (its sampling is timed)
        with their_timers(ref) as tm:
            t = time.perf_counter()
            P = their_projectors(ref, hf, htok, thp, C)
            tP = time.perf_counter() - t
            cache_c = torch.zeros(len(layers), f, f)
            times = []
            for b in range(0, len(reqs), batch_size):
                tb = time.perf_counter()
                cache_c = run_theirs(ref, hf, htok, reqs[b:b + batch_size], thp, P, cache_c)
                times.append(time.perf_counter() - tb)
            secs = time.perf_counter() - t
        w = {l: hf.transformer.h[l].mlp.c_proj.weight.detach().numpy().copy() for l in layers}
        restore(hf, saved)
        return secs, tP, times, tm.t, w

    trees = ([("jaxedit before", before)] if before else []) + [("jaxedit", os.path.dirname(HERE))]
    loads = [os.getloadavg()[0]]
    jax_res = []
    for name, tree in trees:
        print(f"speed: {name} ({tree}) ... (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
        jax_res.append((name, run_child(tree, folder, stats_path, os.path.join(work, name.replace(" ", "_")),
                                        n_edits, batch_size, l2)))
        loads.append(os.getloadavg()[0])
    print(f"speed: their code ... (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    theirs, t_P, t_batches, T_theirs, w_theirs = their_run(jax_res[-1][1]["contexts"])
    loads.append(os.getloadavg()[0])
    n = len(reqs)
    w0 = {l: saved[l].numpy() for l in layers}
    print(f"\n## (b) speed: {n} edits in batches of {batch_size}, layers {list(layers)}, sequential AlphaEdit "
          f"(C_p growing), statistics given (shared), CPU ({os.cpu_count()} cores, torch "
          f"{torch.get_num_threads()} threads); 1-min load average before/between/after: "
          f"{', '.join(f'{x:.1f}' for x in loads)}\n")
    print("| code | seconds | edits / min | their seconds / this |")
    print("|---|---:|---:|---:|")
    print(f"| AlphaEdit's code (P: {t_P:.1f} s; batches: {', '.join(f'{x:.1f}' for x in t_batches)} s) | "
          f"{theirs:.1f} | {60 * n / theirs:.1f} | 1.00 |")
    for name, r in jax_res:
        for kind in ("cold", "warm"):
            what = "first call, compiles" if kind == "cold" else "second call"
            print(f"| {name} edit_sequential, {kind} ({what}; batches "
                  f"{', '.join(f'{x:.1f}' for x in r['batches_' + kind])} s) | {r[kind]:.1f} | "
                  f"{60 * n / r[kind]:.1f} | {theirs / r[kind]:.2f} |")
    for name, r in jax_res:
        agree = [rel(r["weights"][l] - w0[l], w_theirs[l] - w0[l]) for l in layers]
        print(f"\n{name}: the sequence's total update vs their code's, |dW_jax - dW_theirs| / |dW_theirs| per layer "
              f"(own P, the same context templates): " + ", ".join(f"{a:.1e}" for a in agree))
    for name, r in jax_res:
        print(f"\n{name}: time by piece (the functions edit_sequential calls, timed in place; "
              f"compile = cold - warm):\n")
        print("| piece | cold (s) | warm (s) | compile (s) |")
        print("|---|---:|---:|---:|")
        Tc, Tw = r["pieces_cold"], r["pieces_warm"]
        for k in [label for _, _, label in jax_timers().targets if label in Tw]:
            print(f"| {k} | {Tc.get(k, 0):.2f} | {Tw[k]:.2f} | {Tc.get(k, 0) - Tw[k]:.2f} |")
        top = [k for k in Tw if not k.startswith(" ")]
        print(f"| other (edit_sequential's own work) | {r['cold'] - sum(Tc.get(k, 0) for k in top):.2f} | "
              f"{r['warm'] - sum(Tw[k] for k in top):.2f} | |")
    print("\nAlphaEdit's code by piece:\n")
    print("| piece | seconds |")
    print("|---|---:|")
    print(f"| P (get_project: SVD, 3 layers) | {t_P:.2f} |")
    for k, v in T_theirs.items():
        print(f"| {k} | {v:.2f} |")
    print(f"| other (P products, updates) | {theirs - t_P - sum(T_theirs.values()):.2f} |")
    return {"theirs": theirs, "their_P": t_P, "their_batches": t_batches, "their_pieces": T_theirs,
            "jaxedit": [(name, {k: v for k, v in r.items() if k != "weights"}) for name, r in jax_res],
            "loads": loads}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True, help="an extracted checkout of AlphaEdit's code (never committed)")
    ap.add_argument("--before", default=None,
                    help="(speed) a folder holding another jaxedit package (e.g. `git archive HEAD jaxedit`, "
                         "extracted) to time beside this tree's")
    ap.add_argument("--part", choices=("parity", "speed", "both"), default="both")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--edits", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=5)
    ap.add_argument("--l2", type=float, default=None, help="default: their hparams' L2 (10)")
    ap.add_argument("--json", default=None, help="write the numbers here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--stats", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return jax_child(args)

    import torch
    import transformers
    import jaxedit

    jaxedit.set_progress(False)
    work = tempfile.mkdtemp(prefix="alphaedit-bench-")
    atexit.register(shutil.rmtree, work, True)
    folder = os.path.join(work, "gpt2-small-random")
    t = time.perf_counter()
    build_model(folder, args.seed)
    model, tok = jaxedit.load(folder)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    htok = transformers.AutoTokenizer.from_pretrained(folder)
    htok.padding_side = "right"
    if htok.pad_token is None:
        htok.pad_token = htok.eos_token
    corpus = os.path.join(work, "texts.txt")
    with open(corpus, "w") as fh:
        fh.write("\n".join(texts64()) + "\n")
    C = jaxedit.layer_stats(model, list(LAYERS), tokenizer=tok, corpus=corpus, stats_samples=64,
                            cache_dir=os.path.join(work, "stats"), progress=False)
    C = {l: np.asarray(C[l], np.float32) for l in LAYERS}
    print(f"model, tokenizer and statistics ready in {time.perf_counter() - t:.1f} s (uptime load "
          f"{os.getloadavg()})", file=sys.stderr)
    ref = load_reference(args.reference)
    with open(os.path.join(args.reference, "hparams", "AlphaEdit", "gpt2-xl.json")) as fh:
        l2 = float(json.load(fh)["L2"]) if args.l2 is None else args.l2
    out = {}
    if args.part in ("parity", "both"):
        from jaxedit.edit import memit as me

        hp, _ = me.prepare(model, LAYERS, {})
        contexts = me.context_templates(model, tok, hp)
        out["parity"] = parity(ref, args.reference, model, tok, hf, htok, C, contexts, l2)
    if args.part in ("speed", "both"):
        out["speed"] = speed(ref, args.reference, folder, work, hf, htok, C, l2, args.edits, args.batch_size,
                             args.before)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
