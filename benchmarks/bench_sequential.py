"""Sequential AlphaEdit: edits per minute of ``jaxedit.edit_sequential`` against a PyTorch loop with the published
code's structure (per request: the z optimization, one forward + backward of its context rows per Adam step; per
batch and layer: the keys and current z in one forward, the projected solve; after the batch: the keys again for
C_p), on the same model (SmolLM2 from the embedded GGUF, float32; transformers reads the same file for torch), the
same requests, statistics, projector and context templates. One run each on this machine; the ratio is what to read.

    python benchmarks/bench_sequential.py --edits 20 --batch-size 10
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

REQUESTS = [  # simple facts, rewritten (the same kind of request as the CounterFact demo set)
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower", " Rome"),
    ("The Colosseum is located in the city of", "The Colosseum", " Paris"),
    ("The capital of Japan is", "Japan", " Berlin"),
    ("The capital of Italy is", "Italy", " Madrid"),
    ("Big Ben is located in the city of", "Big Ben", " Tokyo"),
    ("The mother tongue of Pablo Picasso is", "Pablo Picasso", " German"),
    ("The Statue of Liberty is located in", "The Statue of Liberty", " London"),
    ("Albert Einstein was born in", "Albert Einstein", " France"),
    ("The Great Wall is located in", "The Great Wall", " Canada"),
    ("The capital of Spain is", "Spain", " Oslo"),
]


def requests(n):
    out = []
    for i in range(n):
        p, s, t = REQUESTS[i % len(REQUESTS)]
        out.append({"prompt": p, "subject": s, "target": t})
    return out


def torch_sequence(hf, tok, reqs, contexts, P, layers, hp, batch_size, l2):
    """The published schedule in float32 torch; returns the seconds it took."""
    import torch

    F = torch.nn.functional
    blocks = hf.model.layers
    L = layers[-1]
    f = hf.config.intermediate_size
    cache_c = {l: torch.zeros(f, f) for l in layers}
    Pt = {l: torch.tensor(P[l]) for l in layers}

    def encode(context, template, subject, suffix=()):
        full = context.replace("{}", template)
        prefix = tok(full[:full.index("{}")] + subject)["input_ids"]
        return tok(full.replace("{}", subject))["input_ids"] + list(suffix), len(prefix) - 1

    def padded(rows):
        T = max(map(len, rows))
        return (torch.tensor([r + [0] * (T - len(r)) for r in rows]),
                torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows]))

    def compute_z(r):
        target = tok(r["target"], add_special_tokens=False)["input_ids"]
        template = r["prompt"].replace(r["subject"], "{}")
        rows, keys, where = [], [], []
        for c in contexts:
            ids, k = encode(c, template, r["subject"], target[:-1])
            rows.append(ids)
            keys.append(k)
            n0 = len(ids) - len(target) + 1
            where.append(([n0 - 1 + j for j in range(len(target))], target))
        ids, k = encode("{}", hp.kl_prompt, r["subject"])
        rows.append(ids)
        keys.append(k)
        batch, mask = padded(rows)
        at = torch.zeros(len(rows), batch.shape[1], 1)
        at[torch.arange(len(rows)), torch.tensor(keys)] = 1.0
        seen = {}

        def run(delta):
            def hook(m, a, o):
                h = (o[0] if isinstance(o, tuple) else o) + at * delta
                seen["h"] = h
                return (h,) + tuple(o[1:]) if isinstance(o, tuple) else h
            handle = blocks[L].register_forward_hook(hook)
            try:
                return torch.log_softmax(hf(batch, attention_mask=mask).logits, -1)
            finally:
                handle.remove()

        delta = torch.zeros(hf.config.hidden_size, requires_grad=True)
        with torch.no_grad():
            lp0 = run(delta)[-1, keys[-1]]
            h = seen["h"][0, keys[0]].clone()
        opt = torch.optim.Adam([delta], lr=hp.v_lr)
        for it in range(hp.v_num_grad_steps):
            opt.zero_grad()
            lp = run(delta)
            nll = -torch.stack([lp[i, pos, toks].mean() for i, (pos, toks) in enumerate(where)]).mean()
            kl = F.kl_div(lp0[None], lp[-1, keys[-1]][None], log_target=True, reduction="batchmean")
            loss = nll + hp.kl_factor * kl + hp.v_weight_decay * delta.norm() / h.norm() ** 2
            if loss < hp.early_stop_loss or it == hp.v_num_grad_steps - 1:
                break
            loss.backward()
            opt.step()
            with torch.no_grad():
                mx = hp.clamp_norm_factor * h.norm()
                if delta.norm() > mx:
                    delta[...] = delta * mx / delta.norm()
        return (h + delta).detach()

    def keys_and_z(batch_reqs, layer):
        rows, keys = [], []
        for r in batch_reqs:
            template = r["prompt"].replace(r["subject"], "{}")
            for c in contexts:
                ids, k = encode(c, template, r["subject"])
                rows.append(ids)
                keys.append(k)
        batch, mask = padded(rows)
        got = {}
        h1 = blocks[layer].mlp.down_proj.register_forward_pre_hook(lambda m, a: got.__setitem__("k", a[0]))
        h2 = blocks[L].register_forward_hook(lambda m, a, o: got.__setitem__("h", o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            hf(batch, attention_mask=mask)
        h1.remove(), h2.remove()
        idx = torch.arange(len(rows)), torch.tensor(keys)
        k = got["k"][idx].reshape(len(batch_reqs), len(contexts), -1)
        K = 0.5 * k[:, 0] + 0.5 * k[:, 1:].mean(1)
        z = got["h"][idx].reshape(len(batch_reqs), len(contexts), -1)[:, 0]
        return K.T, z.T

    t0 = time.perf_counter()
    for start in range(0, len(reqs), batch_size):
        batch = reqs[start:start + batch_size]
        zs = torch.stack([compute_z(r) for r in batch], 1)
        for i, l in enumerate(layers):
            K, cur = keys_and_z(batch, l)
            R = (zs - cur) / (len(layers) - i)
            upd = torch.linalg.solve(Pt[l] @ (K @ K.T + cache_c[l]) + l2 * torch.eye(f), Pt[l] @ K @ R.T)
            with torch.no_grad():
                blocks[l].mlp.down_proj.weight += upd.T
        for l in layers:
            K, _ = keys_and_z(batch, l)
            cache_c[l] += K @ K.T
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edits", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--no-torch", action="store_true")
    a = ap.parse_args()

    import jaxedit
    from jaxedit.edit import alphaedit as ae
    from jaxedit.edit import memit as ed

    model, tok = jaxedit.load("smollm2")
    cfg = model.config
    hp, layers = ed.prepare(model, None, {})
    rng = np.random.default_rng(0)  # statistics with a known spectrum (the benchmark times the editing, not them)
    stats = {}
    for l in layers:
        U, _ = np.linalg.qr(rng.normal(size=(cfg.d_ff, cfg.d_ff)))
        stats[l] = ((U * np.logspace(-4, 1, cfg.d_ff)) @ U.T).astype(np.float32)
    reqs = requests(a.edits)
    t0 = time.perf_counter()
    state = ae.new_state(model, tok, layers, hp, stats=stats, progress=False)
    t_state = time.perf_counter() - t0
    t0 = time.perf_counter()
    jaxedit.edit_sequential(model, reqs, method="alphaedit", batch_size=a.batch_size, tokenizer=tok, stats=stats,
                            progress=False)
    t_jax = time.perf_counter() - t0
    t0 = time.perf_counter()  # again: the programs are compiled now
    jaxedit.edit_sequential(model, reqs, method="alphaedit", batch_size=a.batch_size, tokenizer=tok, stats=stats,
                            progress=False)
    t_jax_warm = time.perf_counter() - t0
    print(f"SmolLM2-135M float32, layers {list(layers)}, {a.edits} edits in batches of {a.batch_size}, "
          f"{hp.v_num_grad_steps} z steps, {len(state['contexts'])} context templates\n")
    print("| run | seconds | edits / minute |")
    print("|---|---:|---:|")
    print(f"| jaxedit, first run (compiles included; P and contexts: {t_state:.1f} s) | {t_jax:.1f} | "
          f"{60 * a.edits / t_jax:.1f} |")
    print(f"| jaxedit, compiled | {t_jax_warm:.1f} | {60 * a.edits / t_jax_warm:.1f} |")
    if not a.no_torch:
        import torch
        from transformers import AutoModelForCausalLM

        from jaxedit.loading import embedded_gguf_path

        path = embedded_gguf_path("smollm2")
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  dtype=torch.float32).eval()
        secs = torch_sequence(hf, tok, reqs, state["contexts"], state["P"], layers, hp, a.batch_size, 10.0)
        print(f"| torch loop, the published structure ({torch.get_num_threads()} threads) | {secs:.1f} | "
              f"{60 * a.edits / secs:.1f} |")
        print(f"\nratio (torch / jaxedit compiled): {secs / t_jax_warm:.1f}x; with jaxedit's compiles: "
              f"{secs / t_jax:.1f}x")


if __name__ == "__main__":
    main()
