"""NAS (norm-anchored scaling) parity: jaxedit's NAS against NAS's own published code on a tiny random GPT-2.

NAS (SasyaTitech/NAS) changes the target of AlphaEdit/MEMIT: v* = delta + v0 (v0: the MLP output of the last edited
layer at the subject's last token, delta: the optimized change of that layer's output); a v* longer than twice the
mean |v*| of clean edits on the unedited model (a seed-0 sample of requests, the top 5 % of norms dropped) is not
written (v* = v0), every other v* is rescaled to that mean; the target is h - v0 + v*.

Both sides get the same model, the same requests, the same context templates and the same hyperparameters:
- the model: tests/tiny_models.py's tiny GPT-2 (3 layers, d 32), seed 0, initializer range ``--init-std`` 0.5
  (at the tests' 0.02, |h| ~ 0.17 and the weight decay term 0.5 |delta| / |h|^2 outweighs the NLL gradient 2000:1,
  delta bounces on the clamp and float rounding differences grow to tens of percent within 20 steps: 41 % in |v*|
  in NAS's code alone between a request by itself and the same request twice in a batch; at 0.5, |h| ~ 40-55, the
  NLL leads and the optimization is stable), exported once with
  save_pretrained; one outlier planted (see :func:`build_model`) so that one request's v0, hence |v*|, is above
  twice the mean ("not written");
- the requests: the CounterFact demo records of jaxedit/data/counterfact_demo.json (targets with a leading space)
  as the pool NAS samples from (written as its multi_counterfact.json; jaxedit's nas_mean gets them as its
  requests, in the same order); the first ``--edits`` of them plus the outlier are edited;
- the context templates: sampled once by jaxedit (context_templates), given to both;
- the hyperparameters: read from the reference's hparams/NAS/gpt2-xl.json and hparams/MEMIT/gpt2-xl.json (the
  statistics use MEMIT's; they agree): steps 20, lr 0.5, weight decay 0.5, clamp 0.75, KL factor 0.0625, the
  subject's last token; adapted to 3 layers: edited layers 0 and 1 (z at 1), loss at the last layer 2;
  ``--samples`` (nas_restart) requests make the mean.

Compared: (a) the sampled requests, the clean |v*| of each and the trimmed mean, NAS's vstar_stats
(get_or_compute_mean_vstar_norm: batched by 16 as published, and by 1) against jaxedit's nas_mean /
vstar_mean_norm; the trimmed-mean rule on the other side's norms; (b) per edit request NAS's compute_z (the final
target) against jaxedit.memit(nas=True)'s target (captured at spreading), and the rule alone: jaxedit's nas_targets
on NAS's own h, delta, v0 and mean, and NAS's compute_z fed jaxedit's delta (no optimizer step) and mean; (c) the
early stop of the statistics (per batch in NAS's batched code, per request in jaxedit and in NAS's compute_z) on a
batch with one request that stops at once.

The reference is imported at run time from ``--reference DIR`` (an extracted copy of the NAS repository, never part
of this one: ``mkdir -p /tmp/nas_ref && git --git-dir=<mirror> archive HEAD NAS util hparams baselines/rome
baselines/memit dsets prompt_templates.py globals.yml | tar -x -C /tmp/nas_ref``) with run-time shims only: CPU for
its hard-coded "cuda", its nethook edit/retain hooks given the (tensor,) tuple that GPT-2 blocks returned before
transformers 5 (they now return the tensor), its data/hparams/stats folders pointed at a temporary folder.

    python benchmarks/nas_reference.py --reference /tmp/nas_ref [--samples 20] [--edits 4]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import shutil
import sys
import tempfile
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

LAYERS = (0, 1)  # edited layers of the 3-layer model (GPT-2-XL: 13..17 of 48); z at the last, loss at layer 2
OUTLIER = {"prompt": "{} is a native speaker of", "subject": "Quo Vadis Xq", "target": " Swedish"}


def pool_records():
    with open(os.path.join(HERE, "..", "jaxedit", "data", "counterfact_demo.json")) as f:
        demo = json.load(f)
    recs = []
    for i, d in enumerate(demo):
        rw = dict(d["requested_rewrite"])
        rw["target_new"] = dict(rw["target_new"], str=" " + rw["target_new"]["str"].strip())
        recs.append({"case_id": i, "requested_rewrite": rw})
    return recs


def as_jaxedit(rw):
    return {"prompt": rw["prompt"], "subject": rw["subject"], "target": rw["target_new"]["str"]}


def as_nas(r, case_id):
    return {"case_id": case_id, "prompt": r["prompt"], "subject": r["subject"], "target_new": {"str": r["target"]}}


def build_model(folder, seed, scale, init_std, neuron_gain):
    """The tiny GPT-2 (seed ``seed``, initializer range ``init_std``) with the outlier planted, saved to folder:
    the embedding row of OUTLIER's key token x ``scale`` (the token occurs nowhere in the pool), and neuron 0 of
    the last edited layer's MLP rewired to fire at that token only (input weights: the unit direction of the MLP's
    input there, i.e. its ln_2 output u on OUTLIER's bare prompt; bias -|u| / 2, so the pre-activation is |u| / 2
    there and |x| (cos(x, u) - 1/2) < 0 wherever the input x (|x| = |u|, a layer norm output) points 60 degrees or
    more away; output weights: a seeded random unit vector x ``neuron_gain``). Its v0, hence |v*|, is then large."""
    import torch
    from tiny_models import build_hf_model, make_tokenizer

    tok = make_tokenizer()
    hf = build_hf_model("gpt2", seed=seed, init_std=init_std)
    ids = tok(OUTLIER["subject"], add_special_tokens=False)["input_ids"]
    others = set()
    for rec in pool_records():
        rw = rec["requested_rewrite"]
        others |= set(tok(rw["prompt"].replace("{}", rw["subject"]) + rw["target_new"]["str"])["input_ids"])
    assert ids[-1] not in others, "the outlier's key token must not occur in the pool"
    mlp = hf.transformer.h[LAYERS[-1]].mlp
    with torch.no_grad():
        hf.transformer.wte.weight[ids[-1]] *= scale
        got = {}
        hook = hf.transformer.h[LAYERS[-1]].ln_2.register_forward_hook(lambda m, i, o: got.update(u=o))
        hf(torch.tensor([tok(OUTLIER["prompt"].replace("{}", OUTLIER["subject"]))["input_ids"]]))
        hook.remove()
        u = got["u"][0, len(ids) - 1]  # the subject opens the prompt: its last token is at len(ids) - 1
        mlp.c_fc.weight[:, 0] = u / u.norm()  # Conv1D weights: [in, out]
        mlp.c_fc.bias[0] = -0.5 * u.norm()
        w = torch.randn(hf.config.n_embd, generator=torch.Generator().manual_seed(seed))
        mlp.c_proj.weight[0] = neuron_gain * w / w.norm()
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return tok.convert_ids_to_tokens(ids[-1])


def rel(a, b):
    """max over rows of |a - b| / |b| (vector norms over the last axis)."""
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    return float(np.max(np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-30)))


def rel_each(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


# ---- the reference (NAS's code) ----

class Reference:
    def __init__(self, ref_dir, work, folder, n_samples):
        for sub in ("data", "stats", "results", "kvs"):
            os.makedirs(os.path.join(work, sub), exist_ok=True)
        os.environ.update(NAS_DATA_DIR=os.path.join(work, "data"), NAS_STATS_DIR=os.path.join(work, "stats"),
                          NAS_RESULTS_DIR=os.path.join(work, "results"), NAS_KV_DIR=os.path.join(work, "kvs"),
                          NAS_HPARAMS_DIR=os.path.join(work, "hparams"))
        # hyperparameters: their GPT-2 (XL) files, the layers adapted to the tiny model
        self.hp_json = {}
        for algo in ("NAS", "MEMIT"):
            with open(os.path.join(ref_dir, "hparams", algo, "gpt2-xl.json")) as f:
                h = json.load(f)
            h.update(model_name="tiny-gpt2", layers=list(LAYERS), v_loss_layer=2)
            if algo == "NAS":
                h["nas_restart"] = n_samples
            os.makedirs(os.path.join(work, "hparams", algo), exist_ok=True)
            with open(os.path.join(work, "hparams", algo, "tiny-gpt2.json"), "w") as f:
                json.dump(h, f)
            self.hp_json[algo] = h
        with open(os.path.join(work, "data", "multi_counterfact.json"), "w") as f:
            json.dump(pool_records(), f)

        sys.path.insert(0, ref_dir)
        import torch
        import transformers
        from transformers import AutoTokenizer, GPT2LMHeadModel

        # CPU for their hard-coded "cuda"
        to = transformers.BatchEncoding.to
        transformers.BatchEncoding.to = lambda self, device, *a, **k: to(
            self, "cpu" if str(device).startswith("cuda") else device, *a, **k)
        import NAS.compute_z as cz
        import util.nethook as nethook
        import util.vstar_stats as vs
        from NAS import NASHyperParams

        torch.set_num_threads(1)  # a tiny model: threads only contend (with JAX's) here
        self.torch, self.cz, self.vs = torch, cz, vs
        self.rec = {}
        rec = self.rec

        class CpuTorch(types.ModuleType):  # torch with device="cuda" -> cpu; records Adam's parameter (delta)
            def __getattr__(self, name):
                return getattr(torch, name)

            @staticmethod
            def tensor(*a, **k):
                k["device"] = "cpu"
                return torch.tensor(*a, **k)

            @staticmethod
            def zeros(*a, **k):
                k["device"] = "cpu"
                if rec.get("inject") is not None:  # their delta starts at the given vector
                    return torch.tensor(rec["inject"], dtype=torch.float32, requires_grad=True)
                return torch.zeros(*a, **k)

        class RecAdam(torch.optim.Adam):
            def __init__(self, params, *a, **k):
                params = list(params)
                rec["delta"], rec["updates"] = params[0], 0
                super().__init__(params, *a, **k)

            def step(self, *a, **k):
                rec["updates"] += 1
                return super().step(*a, **k)

        proxy = CpuTorch("torch")
        proxy.optim = types.SimpleNamespace(Adam=RecAdam)

        class TupleTraceDict(nethook.TraceDict):  # block outputs as the (tensor,) tuple their code indexes
            def __init__(self, module, layers=None, edit_output=None, **kw):
                def edit(output, layer):
                    if not isinstance(output, torch.Tensor):
                        return edit_output(output, layer)
                    if layer == rec.get("rewrite_layer") and rec.get("h_out") is None:
                        rec["h_out"] = output.detach().clone()  # the layer output before delta (target_init)
                    return edit_output((output,), layer)[0]

                super().__init__(module, layers, edit_output=edit if edit_output else None, **kw)

            def __exit__(self, *exc):
                out = super().__exit__(*exc)
                for t in self.values():
                    if isinstance(getattr(t, "output", None), torch.Tensor):
                        t.output = (t.output,)
                return out

        nh = types.ModuleType("nethook")
        nh.__dict__.update(nethook.__dict__)
        nh.TraceDict = TupleTraceDict
        cz.torch, cz.nethook = proxy, nh
        self.real_mean = cz.get_or_compute_mean_vstar_norm

        # the per-request clean |v*| of their statistics (their function, recorded)
        self.stat_norms, self.stat_requests = [], []
        batched = vs._compute_vstar_norms_batched

        def recorded(**kw):
            out = batched(**kw)
            self.stat_norms.extend(out)
            self.stat_requests.extend((r["prompt"], r["subject"], r["target_new"]["str"]) for r in kw["requests"])
            return out

        vs._compute_vstar_norms_batched = recorded
        vs._NAS_PROGRESS = False

        self.model = GPT2LMHeadModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(folder)
        self.hp = NASHyperParams.from_json(os.path.join(work, "hparams", "NAS", "tiny-gpt2.json"))

    def quiet(self, fn, *a, **k):
        with contextlib.redirect_stdout(io.StringIO()):
            return fn(*a, **k)

    def mean_norm(self, batch_size=16):
        """get_or_compute_mean_vstar_norm (their batch of 16), or the same statistics by 1 (uncached)."""
        self.stat_norms.clear()
        self.stat_requests.clear()
        if batch_size == 16:
            m = self.quiet(self.real_mean, model=self.model, tok=self.tok, target_layer=LAYERS[-1],
                           algo_hparams=self.hp)
        else:
            from baselines.memit import MEMITHyperParams

            mh = MEMITHyperParams.from_json(os.path.join(os.environ["NAS_HPARAMS_DIR"], "MEMIT", "tiny-gpt2.json"))
            m, _ = self.quiet(self.vs._compute_mean_vstar_norm_from_multicounterfact, model=self.model, tok=self.tok,
                              target_layer=LAYERS[-1], memit_hparams=mh, nas_restart=self.hp.nas_restart, seed=0,
                              batch_size=batch_size, outlier_mode="drop", outlier_upper_quantile=0.95)
        return m, list(self.stat_norms), list(self.stat_requests)

    def compute_z(self, request, contexts, *, delta=None, mean=None):
        """Their compute_z: (target, h, delta, v0, debug). With ``delta`` (and ``mean``): their delta starts there
        and no optimizer step runs (one step, which breaks before stepping): their rule on the given v*."""
        hp = self.hp if delta is None else copy.copy(self.hp)
        if delta is not None:
            hp.v_num_grad_steps = 1
        self.rec.update(inject=delta, h_out=None, rewrite_layer=hp.layer_module_tmp.format(LAYERS[-1]))
        v0s = []
        real_io = self.cz.get_module_input_output_at_words
        self.cz.get_module_input_output_at_words = lambda *a, **k: v0s.append(real_io(*a, **k)) or v0s[-1]
        if mean is not None:
            self.cz.get_or_compute_mean_vstar_norm = lambda **k: float(mean)
        try:
            target, dbg = self.quiet(self.cz.compute_z, self.model, self.tok, request, hp, LAYERS[-1],
                                     [["{}"], list(contexts[1:])], return_debug=True)
        finally:
            self.cz.get_module_input_output_at_words = real_io
            self.cz.get_or_compute_mean_vstar_norm = self.real_mean
            self.rec["inject"] = None
        tok_ids = self.tok(request["target_new"]["str"])["input_ids"]
        prompt0 = request["prompt"] + self.tok.decode(tok_ids[:-1])
        idx = self.cz.find_fact_lookup_idx(prompt0, request["subject"], self.tok, self.hp.fact_token, verbose=False)
        h = self.rec["h_out"][0, idx].numpy()
        dbg["updates"] = self.rec["updates"]
        return (target.detach().numpy(), h, self.rec["delta"].detach().numpy().copy(), v0s[0][1][0].numpy(), dbg)


# ---- jaxedit ----

def run_jaxedit(folder, pool, edits, hp_json, n_samples):
    import jaxedit
    from jaxedit.edit import memit as ed

    model, tok = jaxedit.load(folder)
    over = dict(v_lr=hp_json["v_lr"], v_num_grad_steps=hp_json["v_num_grad_steps"],
                v_weight_decay=hp_json["v_weight_decay"], clamp_norm_factor=hp_json["clamp_norm_factor"],
                kl_factor=hp_json["kl_factor"], mom2_update_weight=hp_json["mom2_update_weight"],
                nas=True, nas_samples=n_samples, nas_quantile=0.95)
    hp, layers = ed.prepare(model, LAYERS, over)
    contexts = ed.context_templates(model, tok, hp)
    out = {"contexts": contexts, "hp": hp, "model": model, "tok": tok}

    # (a) the mean |v*| of clean edits: jaxedit's nas_mean on the pool (as NAS's pool, in the same order)
    seen, sample = [], []
    real_opt, real_sample = ed.optimize_targets, ed.nas_sample
    ed.optimize_targets = lambda *a, **k: seen.append(real_opt(*a, **k)) or seen[-1]
    ed.nas_sample = lambda reqs, n: sample.extend(real_sample(reqs, n)) or sample
    try:
        mean = ed.nas_mean(model, tok, ed.parse_requests(pool, tok, "edit"), hp, layers)
    finally:
        ed.optimize_targets, ed.nas_sample = real_opt, real_sample
    norms = np.concatenate([np.linalg.norm(o[2].astype(np.float64) + o[6], axis=1) for o in seen])[:len(sample)]
    out.update(mean=mean, norms=norms, sample=[r.raw for r in sample])

    # (b) the edit: jaxedit.memit(nas=True) with its own mean from (a); the contexts fixed, z captured at spreading
    cap = {}
    real_ctx, real_spread = ed.context_templates, ed.spread
    ed.context_templates = lambda *a, **k: list(contexts)
    ed.optimize_targets = lambda *a, **k: cap.setdefault("opt", real_opt(*a, **k))
    ed.spread = lambda *a, **k: cap.setdefault("z", np.asarray(a[5], np.float64)) is None or real_spread(*a, **k)
    stats = {l: np.eye(model.config.d_ff, dtype=np.float32) for l in layers}
    try:
        _, report = jaxedit.memit(model, edits, tokenizer=tok, layers=list(layers), stats=stats, progress=False,
                                  nas_mean_norm=mean, **{k: v for k, v in over.items() if not k.startswith("nas_")})
    finally:
        ed.context_templates, ed.spread, ed.optimize_targets = real_ctx, real_spread, real_opt
    _, h, delta, _, _, n_run, v0 = cap["opt"]
    out.update(z=cap["z"], h=h, delta=delta, v0=v0, steps=n_run, written=report["nas"]["written"],
               vstar_norm=report["nas"]["vstar_norm"], nas_targets=ed.nas_targets, trimmed_mean=ed.trimmed_mean)
    return out


def early_stop_check(ref, jx, n_alone_sample):
    """The early stop of the clean-edit statistics: NAS's batched code stops a batch when the batch's mean loss is
    below 0.05, jaxedit (and NAS's compute_z) each request when its own loss is. A batch of 16 clean edits: the first
    15 sampled requests and one whose target is the model's near-certain next token (loss ~ 0 at delta = 0, so it
    stops at once alone). Their _compute_vstar_norms_batched is called directly (their pool loader would prepend a
    space to the target, another token)."""
    from baselines.memit import MEMITHyperParams
    from jaxedit.edit import memit as ed

    easy = {"prompt": "The capital of {} is", "subject": "Japan", "target": "q"}
    batch = jx["sample"][:15] + [easy]
    mh = MEMITHyperParams.from_json(os.path.join(os.environ["NAS_HPARAMS_DIR"], "MEMIT", "tiny-gpt2.json"))
    nas = [{"prompt": r["prompt"], "subject": r["subject"], "target_new": {"str": r["target"]}} for r in batch]
    f = lambda reqs: ref.quiet(ref.vs._compute_vstar_norms_batched, model=ref.model, tok=ref.tok, requests=reqs,
                               hparams=mh, layer=LAYERS[-1])
    n_batch = np.array(f(nas))
    n_alone = np.array(list(n_alone_sample[:15]) + f(nas[-1:]))  # NAS by 1: (a)'s for the 15
    seen = []
    real = ed.optimize_targets
    ed.optimize_targets = lambda *a, **k: seen.append(real(*a, **k)) or seen[-1]
    try:
        ed.vstar_mean_norm(jx["model"], jx["tok"], ed.parse_requests(batch, jx["tok"], "edit"), jx["hp"], LAYERS)
    finally:
        ed.optimize_targets = real
    n_jax = np.linalg.norm(seen[0][2].astype(np.float64) + seen[0][6], axis=1)
    tm = lambda v: ref.vs._upper_trimmed_mean(v, upper_quantile=0.95)[0]
    return (f"early stop: 16 clean edits, the 16th targeting the model's near-certain next token ({easy}): its "
            f"|v*| NAS batch 16 {n_batch[-1]:.5f}, NAS alone {n_alone[-1]:.5f}, jaxedit {n_jax[-1]:.5f} "
            f"(jaxedit loss evaluations {int(seen[0][5][-1])}); the other 15: max rel. diff. NAS batch vs jaxedit "
            f"{rel_each(n_jax[:15], n_batch[:15]):.2e}, NAS alone vs jaxedit {rel_each(n_jax[:15], n_alone[:15]):.2e}; "
            f"trimmed mean of the 16: NAS batch {tm(n_batch):.5f}, NAS alone {tm(n_alone):.5f}, jaxedit {tm(n_jax):.5f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="an extracted copy of NAS's repository (SasyaTitech/NAS)")
    ap.add_argument("--samples", type=int, default=20, help="requests whose clean |v*| make the mean (nas_restart)")
    ap.add_argument("--edits", type=int, default=4, help="pool requests edited besides the outlier")
    ap.add_argument("--scale", type=float, default=30.0, help="x the embedding row of the outlier's key token")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--neuron-gain", type=float, default=60.0, help="the planted neuron's output norm (see above)")
    ap.add_argument("--init-std", type=float, default=0.5, help="the tiny model's initializer range (see above)")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="nas-ref-")
    folder = os.path.join(work, "model")
    key_token = build_model(folder, args.seed, args.scale, args.init_std, args.neuron_gain)
    pool = [as_jaxedit(r["requested_rewrite"]) for r in pool_records()]
    if args.samples > len(pool):
        sys.exit(f"--samples must be <= {len(pool)} (their loop needs that many distinct requests)")
    edits = pool[:args.edits] + [OUTLIER]

    ref = Reference(args.reference, work, folder, args.samples)
    zfields = ("v_num_grad_steps", "v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor", "fact_token")
    same = all(ref.hp_json["NAS"][k] == ref.hp_json["MEMIT"][k] for k in zfields)
    jx = run_jaxedit(folder, pool, edits, ref.hp_json["NAS"], args.samples)

    # (a) the mean
    m16, n16, s16 = ref.mean_norm(16)
    m1, n1, _ = ref.mean_norm(1)
    jm, jn = jx["mean"], jx["norms"]
    theirs_trim = ref.vs._upper_trimmed_mean
    rows = [
        ("(a) sampled requests identical (NAS's rng.sample vs nas_sample)", "yes" if s16 == [(r["prompt"], r["subject"], r["target"]) for r in jx["sample"]] else "NO"),
        ("(a) clean \\|v*\\| per sampled request, NAS (batch 16) vs jaxedit", rel_each(jn, n16)),
        ("(a) clean \\|v*\\| per sampled request, NAS (batch 1) vs jaxedit", rel_each(jn, n1)),
        ("(a) clean \\|v*\\|, NAS batch 16 vs NAS batch 1", rel_each(n16, n1)),
        ("(a) mean \\|v*\\| (top 5 % dropped), NAS (batch 16) vs jaxedit", rel_each(jm, m16)),
        ("(a) mean \\|v*\\|, NAS (batch 1) vs jaxedit", rel_each(jm, m1)),
        ("(a) rule: jaxedit trimmed_mean(NAS's norms) vs NAS's mean", rel_each(jx["trimmed_mean"](n16, 0.95), m16)),
        ("(a) rule: NAS _upper_trimmed_mean(jaxedit's norms) vs jaxedit's mean",
         rel_each(theirs_trim(jn, upper_quantile=0.95)[0], jm)),
    ]

    # (b) the targets, per edit request
    theirs = [ref.compute_z(as_nas(r, i), jx["contexts"]) for i, r in enumerate(edits)]
    T, H, D, V0 = (np.array([t[i] for t in theirs]) for i in range(4))
    dbg = [t[4] for t in theirs]
    m = m16
    # the rule alone: jaxedit's nas_targets on NAS's own h, delta, v0, mean ...
    zj_on_theirs, wj_on_theirs, _ = jx["nas_targets"](H, D, V0, m)
    # ... and NAS's compute_z fed jaxedit's delta and mean (their h and v0, recomputed by their code)
    fed = [ref.compute_z(as_nas(r, i), jx["contexts"], delta=jx["delta"][i], mean=jm) for i, r in enumerate(edits)]
    Tf, Hf, V0f = (np.array([f[i] for f in fed]) for i in (0, 1, 3))
    w_fed = [f[4]["v_star_norm_orig"] <= 2 * jm for f in fed]
    zj_same_in, _, _ = jx["nas_targets"](Hf, jx["delta"], V0f, jm)
    kept = np.array(jx["written"])
    rows += [
        ("(b) h (layer-1 output at the key token), NAS vs jaxedit", rel(jx["h"], H)),
        ("(b) v0 (layer-1 MLP output at the key token), NAS vs jaxedit", rel(jx["v0"], V0)),
        ("(b) delta after the z optimization, NAS vs jaxedit", rel(jx["delta"], D)),
        ("(b) \\|v*\\| before the rule, NAS vs jaxedit",
         rel_each(jx["vstar_norm"], [d["v_star_norm_orig"] for d in dbg])),
        ("(b) final NAS target (end to end), NAS compute_z vs jaxedit.memit(nas=True)", rel(jx["z"], T)),
        ("(b) final target, the rescaled requests", rel(jx["z"][kept], T[kept]) if kept.any() else "-"),
        ("(b) final target, the not-written requests (= h)", rel(jx["z"][~kept], T[~kept]) if (~kept).any() else "-"),
        ("(b) rule on NAS's v*: jaxedit nas_targets(NAS's h, delta, v0, mean) vs NAS's target", rel(zj_on_theirs, T)),
        ("(b) rule on jaxedit's v*: NAS compute_z fed jaxedit's delta and mean vs jaxedit's target", rel(Tf, jx["z"])),
        ("(b) the same, both rules on the same inputs: NAS compute_z fed jaxedit's delta and mean vs jaxedit "
         "nas_targets(NAS's h and v0 of that run, jaxedit's delta, jaxedit's mean)", rel(zj_same_in, Tf)),
    ]
    early = early_stop_check(ref, jx, n1)

    print(f"model: tiny GPT-2 (tests/tiny_models.py, seed {args.seed}), token {key_token!r} (the outlier's key) "
          f"embedding x {args.scale:g}; layers {list(LAYERS)}, z at {LAYERS[-1]}, loss at 2; contexts "
          f"{jx['contexts']}")
    print(f"hyperparameters (their gpt2-xl files): " + ", ".join(f"{k}={ref.hp_json['NAS'][k]}" for k in zfields)
          + f"; NAS and MEMIT (statistics) files agree on them: {same}")
    print(f"mean |v*|: NAS {m16:.8f} (batch 16), {m1:.8f} (batch 1); jaxedit {jm:.8f}; "
          f"{args.samples} samples, {int(np.floor(0.05 * args.samples))} dropped; 2 x mean = {2 * m16:.6f}")
    print(f"clean |v*| (NAS batch 16): min {min(n16):.5f} max {max(n16):.5f}\n")
    print("| quantity | max relative difference |\n|---|---|")
    for q, v in rows:
        print(f"| {q} | {v if isinstance(v, str) else f'{v:.2e}'} |")
    print("\n(c) " + early)
    print("\n| request | \\|v*\\| NAS | \\|v*\\| jaxedit | 2 x mean | NAS branch | jaxedit branch | "
          "jaxedit rule on NAS's v* | NAS rule on jaxedit's v* | Adam updates NAS / jaxedit |\n"
          "|---|---|---|---|---|---|---|---|---|")
    br = lambda w: "rescaled" if w else "not written (v0)"
    for i, r in enumerate(edits):
        wn = dbg[i]["v_star_norm_orig"] <= 2 * m16
        print(f"| {r['subject']} -> {r['target'].strip()} | {dbg[i]['v_star_norm_orig']:.5f} | "
              f"{jx['vstar_norm'][i]:.5f} | {2 * m16:.5f} | {br(wn)} | {br(jx['written'][i])} | "
              f"{br(wj_on_theirs[i])} | {br(w_fed[i])} | {dbg[i]['updates']} / {int(jx['steps'][i]) - 1} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
