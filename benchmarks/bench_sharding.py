"""Memory per device on a mesh: parameter bytes and the peak live bytes of each heavy computation, for one device and
for meshes of several data x model shapes.

Everything is measured from shapes alone: the parameters are abstract arrays (``jax.ShapeDtypeStruct``) carrying
the placement ``jaxedit.load(..., mesh=)`` gives them, each computation is lowered and compiled for that placement,
and XLA's memory analysis of the compiled (per-device) program gives its arguments, outputs and temporaries. Peak
live bytes = arguments + outputs + temporaries - donated (aliased) bytes: what one device must hold at once. No
weights are allocated, so the shapes of large models can be measured on a small machine (compilation takes the
time).

On this CPU machine (8 devices simulated by XLA on the host):

    python benchmarks/bench_sharding.py --cpu-devices 8

On a machine with 8 GPUs (no --cpu-devices: the real devices), e.g. for LLaMA-7B's shape:

    python benchmarks/bench_sharding.py --shape llama-7b \
        --meshes one,data=8,data=4,model=2,data=2,model=4,data=1,model=8

Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

SHAPES = {
    # a LLaMA scaled down (4 layers, d 512, d_ff 1536, vocab 8000) with GQA (16 heads, 8 key/value heads)
    "llama-small": dict(n_layers=4, d_model=512, n_heads=16, n_kv_heads=8, head_dim=32, d_ff=1536, vocab_size=8000),
    "llama-7b": dict(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, head_dim=128, d_ff=11008,
                     vocab_size=32000),
    "llama-3-8b": dict(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, head_dim=128, d_ff=14336,
                       vocab_size=128256),
}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-small", choices=list(SHAPES))
    ap.add_argument("--meshes", default="one,data=8,data=4,model=2,data=2,model=4,data=1,model=8",
                    help="meshes to measure, comma-separated ('one': a single device; a model= item joins the "
                         "data= item before it)")
    ap.add_argument("--cpu-devices", type=int, default=None, help="simulate this many CPU devices (CPU only)")
    ap.add_argument("--batch", type=int, default=8, help="prompts / texts / examples / requests per step")
    ap.add_argument("--len", dest="T", type=int, default=128, help="tokens per text (forward, statistics)")
    ap.add_argument("--trace-len", type=int, default=16, help="tokens per traced prompt")
    ap.add_argument("--samples", type=int, default=4, help="noisy samples per traced prompt")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    return ap.parse_args()


def split_meshes(text):
    """'one,data=8,data=4,model=2' -> ['one', 'data=8', 'data=4,model=2']: a 'model=' item joins the one before."""
    out = []
    for part in text.replace("/", ",").split(","):
        part = part.strip()
        if part.startswith("model=") and out and out[-1].startswith("data=") and "model=" not in out[-1]:
            out[-1] += "," + part
        elif part:
            out.append(part)
    return out


def main():
    args = parse_args()
    if args.cpu_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.cpu_devices}")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jaxedit
    from jaxedit.config import ModelConfig
    from jaxedit.edit.memit import optimize_deltas
    from jaxedit.edit.stats import accumulate
    from jaxedit.forward import apply
    from jaxedit.generate import decode
    from jaxedit.locate.saliency import saliency_profiles
    from jaxedit.locate.tracing import auto_layers_per_step, row_groups, trace_grid
    from jaxedit.model import abstract_params
    from jaxedit.sharding import param_shardings

    cfg = ModelConfig(family="llama", max_positions=2048, norm_eps=1e-5, tie_embeddings=False, activation="silu",
                      **SHAPES[args.shape])
    B, T, S, Tt = args.batch, args.T, args.samples, args.trace_len
    d, f, L = cfg.d_model, cfg.d_ff, cfg.n_layers
    abstract = abstract_params(cfg, args.dtype)
    param_total = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(abstract))

    def sds(shape, dtype, sharding=None):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    def peak(jitted, *a, **kw):
        m = jitted.lower(*a, **kw).compile().memory_analysis()
        return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)

    rows = []
    for spec in split_meshes(args.meshes):
        t0 = time.time()
        mesh = None if spec == "one" else jaxedit.make_mesh(spec)
        if mesh is None:
            params = abstract
            per_device = param_total
            data = lambda shape, dtype, axis=0: sds(shape, dtype)
            D = 1
        else:
            shardings = param_shardings(cfg, mesh, abstract)
            params = jax.tree.map(lambda a, s: sds(a.shape, a.dtype, s), abstract, shardings)
            per_device = sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
                             for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))
            D = mesh.shape["data"]

            def data(shape, dtype, axis=0):
                spec_ = [None] * len(shape)
                spec_[axis] = "data"
                return sds(shape, dtype, NamedSharding(mesh, P(*spec_)))
        res = {"mesh": spec, "params": per_device}
        # the forward: logits of B texts of T tokens
        res["forward"] = peak(jax.jit(apply, static_argnames=("cfg",)), cfg, params, data((B, T), jnp.int32))
        # the tracing grid (hidden kind): B prompts of Tt tokens, S noisy samples each
        groups = tuple(tuple(g) for g in row_groups(Tt, S, cfg, 2 * 2**30, 1))
        res["trace grid"] = peak(trace_grid, cfg, params, data((B, Tt), jnp.int32), data((B,), jnp.int32),
                                 data((B, Tt), bool), data((B, S, Tt, d), jnp.float32), data((B,), jnp.int32),
                                 kinds=("hidden",), window=10, groups=groups,
                                 layers_per_step=auto_layers_per_step(cfg, S, Tt, groups, 2 * 2**30))
        # key statistics of 2 layers: B texts of T tokens (mesh: one partial sum per data shard)
        if mesh is None:
            acc = sds((2, f, f), jnp.float32)
            ids, mask = sds((B, T), jnp.int32), sds((B, T), jnp.int32)
        else:
            acc = sds((D, 2, f, f), jnp.float32, NamedSharding(mesh, P("data", None, "model")))
            ids, mask = data((D, B // D, T), jnp.int32), data((D, B // D, T), jnp.int32)
        res["statistics"] = peak(accumulate, cfg, params, ids, mask, acc, layers=(L // 2 - 1, L // 2))
        # saliency: B examples of 32 tokens, one example per device per step
        if mesh is None:
            x = [sds((B, 32), dt) for dt in (jnp.int32, jnp.int32, bool)]
        else:
            x = [data((B // D, D, 32), dt, axis=1) for dt in (jnp.int32, jnp.int32, bool)]
        res["saliency"] = peak(saliency_profiles, cfg, params, *x, chunk=1)
        # the z optimization of MEMIT: B requests, 6 rows of 24 tokens each, 3 target tokens, 20 steps
        n, R, Tz, K = B, 6, 24, 3
        res["z optimization"] = peak(
            optimize_deltas, cfg, params, data((n, R, Tz, d), jnp.float32), data((n, R, Tz), jnp.int32),
            data((n, R), jnp.int32), data((n, R, K), jnp.int32), data((n, R, K), jnp.int32),
            data((n, R, K), jnp.float32), data((n, d), jnp.float32), layer=L // 2, mode="edit", steps=20, lr=0.5,
            weight_decay=0.5, clamp_factor=0.75, kl_factor=0.0625, stop_loss=0.05, window=8)
        # sampling: B prompts, 64 positions
        res["sampling"] = peak(decode, cfg, params, data((B, 64), jnp.int32), data((B,), jnp.int32),
                               jax.random.PRNGKey(0), top_k=5)
        res["seconds"] = time.time() - t0
        rows.append(res)
        print(f"{spec}: compiled in {res['seconds']:.0f} s", file=sys.stderr, flush=True)

    cols = ["forward", "trace grid", "statistics", "saliency", "z optimization", "sampling"]
    mib = lambda b: f"{b / 2**20:,.1f}"
    print(f"shape {args.shape}: {L} layers, d={d}, {cfg.n_heads} heads ({cfg.n_kv_heads} kv), d_ff={f}, "
          f"vocab {cfg.vocab_size}, {args.dtype}; {param_total / 2**20:,.1f} MiB of parameters; "
          f"devices: {jax.devices()[0].platform} x {len(jax.devices())}\n")
    print("| mesh | parameters / device (MiB) | " + " | ".join(f"{c} peak / device (MiB)" for c in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {'one device' if r['mesh'] == 'one' else r['mesh']} | {mib(r['params'])} | " +
              " | ".join(mib(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
