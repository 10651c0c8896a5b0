"""Hugging Face checkpoint folders with real models' shapes and random weights, made without the network.

    python benchmarks/make_shapes.py gpt2-xl --out shapes/gpt2-xl
    python benchmarks/make_shapes.py llama-3.2-1b --out shapes/llama-3.2-1b

writes ``config.json`` (through transformers' ``GPT2Config`` / ``LlamaConfig``, from the shape's published sizes in
``jaxedit.planning.SHAPES``), ``model.safetensors`` with random weights (normal, std 0.02; norms 1, biases 0), streamed
tensor by tensor and row block by row block, so the host never holds more than one block (64 MiB) of it, and a
tokenizer. Any of ``jaxedit.planning.SHAPES`` works (7B and up write 27 GiB and more).

The tokenizer: no model's own tokenizer can be fetched here, so the folder gets SmolLM2's (49,152 tokens, from the
embedded default model, ``--tokenizer smollm2``) or the one in a folder you name. Its ids use only the first 49,152
rows of the embedding (50,257 for GPT-2-XL, 128,256 for Llama-3.2-1B): the shapes, and so the memory and the
arithmetic of every computation, are the real models'; the text is meaningless, as with any random weights.

The folder loads the usual way: ``jaxedit.load("shapes/gpt2-xl")``, ``--model shapes/gpt2-xl``, and with
transformers' ``AutoModelForCausalLM.from_pretrained`` (tests/test_plan.py checks both on tiny copies).
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys

import numpy as np

BLOCK_BYTES = 64 * 2**20


def tensor_specs(hf: dict) -> list:
    """[(name, shape, init)] of a GPT-2 or LLaMA checkpoint in Hugging Face's names and layouts (init: "normal",
    "ones", "zeros")."""
    out = []
    if hf["model_type"] == "gpt2":
        d, L, V = hf["n_embd"], hf["n_layer"], hf["vocab_size"]
        f = hf.get("n_inner") or 4 * d
        p = "transformer."
        out += [(p + "wte.weight", (V, d), "normal"), (p + "wpe.weight", (hf["n_positions"], d), "normal")]
        for i in range(L):
            h = f"{p}h.{i}."
            out += [(h + "ln_1.weight", (d,), "ones"), (h + "ln_1.bias", (d,), "zeros"),
                    (h + "attn.c_attn.weight", (d, 3 * d), "normal"), (h + "attn.c_attn.bias", (3 * d,), "zeros"),
                    (h + "attn.c_proj.weight", (d, d), "normal"), (h + "attn.c_proj.bias", (d,), "zeros"),
                    (h + "ln_2.weight", (d,), "ones"), (h + "ln_2.bias", (d,), "zeros"),
                    (h + "mlp.c_fc.weight", (d, f), "normal"), (h + "mlp.c_fc.bias", (f,), "zeros"),
                    (h + "mlp.c_proj.weight", (f, d), "normal"), (h + "mlp.c_proj.bias", (d,), "zeros")]
        out += [(p + "ln_f.weight", (d,), "ones"), (p + "ln_f.bias", (d,), "zeros")]
        return out
    if hf["model_type"] != "llama":
        raise SystemExit(f"unsupported model_type {hf['model_type']!r}")
    d, L, V, f = hf["hidden_size"], hf["num_hidden_layers"], hf["vocab_size"], hf["intermediate_size"]
    H = hf["num_attention_heads"]
    KV = hf.get("num_key_value_heads") or H
    hd = hf.get("head_dim") or d // H
    out.append(("model.embed_tokens.weight", (V, d), "normal"))
    for i in range(L):
        b = f"model.layers.{i}."
        out += [(b + "input_layernorm.weight", (d,), "ones"),
                (b + "self_attn.q_proj.weight", (H * hd, d), "normal"),
                (b + "self_attn.k_proj.weight", (KV * hd, d), "normal"),
                (b + "self_attn.v_proj.weight", (KV * hd, d), "normal"),
                (b + "self_attn.o_proj.weight", (d, H * hd), "normal"),
                (b + "post_attention_layernorm.weight", (d,), "ones"),
                (b + "mlp.gate_proj.weight", (f, d), "normal"), (b + "mlp.up_proj.weight", (f, d), "normal"),
                (b + "mlp.down_proj.weight", (d, f), "normal")]
    out.append(("model.norm.weight", (d,), "ones"))
    if not hf.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (V, d), "normal"))
    return out


def hf_config(hf: dict):
    """transformers' config object of the shape (GPT2Config / LlamaConfig)."""
    import transformers

    kw = {k: v for k, v in hf.items() if k != "model_type"}
    cls = transformers.GPT2Config if hf["model_type"] == "gpt2" else transformers.LlamaConfig
    return cls(**kw)


def write_safetensors(path: str, specs: list, seed: int = 0, std: float = 0.02) -> int:
    """Write ``specs`` as float32 tensors into ``path`` block by block; returns the bytes written."""
    header, offset = {}, 0
    for name, shape, _ in specs:
        n = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, init in specs:
            rows = shape[0]
            row_elems = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            step = max(1, BLOCK_BYTES // (4 * row_elems))
            for start in range(0, rows, step):
                n = min(step, rows - start) * row_elems
                if init == "normal":
                    block = rng.standard_normal(n, dtype=np.float32)
                    block *= np.float32(std)
                else:
                    block = np.full(n, 1.0 if init == "ones" else 0.0, np.float32)
                f.write(block.tobytes())
    os.replace(tmp, path)
    return 8 + len(raw) + offset


def write_shape(out: str, hf: dict, tokenizer=None, seed: int = 0, std: float = 0.02) -> str:
    """Write a checkpoint folder for the Hugging Face config dict ``hf`` (with ``tokenizer``, a transformers
    tokenizer, saved beside it when given). Returns ``out``."""
    os.makedirs(out, exist_ok=True)
    hf_config(hf).save_pretrained(out)
    write_safetensors(os.path.join(out, "model.safetensors"), tensor_specs(hf), seed=seed, std=std)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def load_tokenizer(spec: str):
    if spec == "smollm2":
        import jaxedit

        _, tok = jaxedit.load("smollm2")
        return tok
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec)


def main():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from jaxedit.planning import SHAPES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=list(SHAPES))
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", default="smollm2", help="'smollm2' or a folder with a tokenizer")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import time

    t0 = time.time()
    write_shape(args.out, SHAPES[args.shape], tokenizer=load_tokenizer(args.tokenizer), seed=args.seed)
    size = os.path.getsize(os.path.join(args.out, "model.safetensors"))
    print(f"wrote {args.out}/ ({args.shape}: {size / 2**30:.2f} GiB of float32 weights) in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
