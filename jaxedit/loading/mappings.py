"""Checkpoint name-mapping tables: one per (format, family).

Each table maps a checkpoint tensor name (``{i}`` = layer index) to the internal parameter(s) it fills and a
small transform hook. Internal names are paths in the model's parameter dict; ``blocks.*`` are stacked over
layers. Names listed in an ``IGNORED`` tuple are consumed without use; any other unknown tensor is an error.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from jaxedit.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Rule:
    source: str  # checkpoint name; "{i}" stands for the layer index
    targets: tuple  # internal parameter names
    transform: Callable = None  # (array, config) -> tuple of arrays, one per target; None = as is

    def regex(self):
        return re.compile("^" + re.escape(self.source).replace(r"\{i\}", r"(\d+)") + "$")


# ---- transform hooks ----

# A hook may carry two more functions for loading straight into a sharded placement (jaxedit.load with mesh=):
# ``out_shapes(shape, cfg)`` -> the shapes of its outputs (checked before anything is read), and
# ``read_slice(read, shape, k, index, cfg)`` -> the block ``index`` (a tuple of slices) of output k, reading only
# the source block it needs through ``read(source_index)``. Hooks without them read the whole tensor.

def transpose(w, cfg):
    """nn.Linear stores [out, in]; jaxedit uses x @ W with W [in, out]."""
    return (np.ascontiguousarray(w.T),)


transpose.out_shapes = lambda shape, cfg: (tuple(shape[::-1]),)
transpose.read_slice = lambda read, shape, k, index, cfg: np.ascontiguousarray(read(tuple(index[::-1])).T)


def split3(w, cfg):
    """GPT-2's fused c_attn (Conv1D, already [in, 3*d]) -> q, k, v."""
    return tuple(np.split(w, 3, axis=-1))


def _split3_read(read, shape, k, index, cfg):
    n = shape[-1] // 3
    last = index[-1]
    return read(tuple(index[:-1]) + (slice(k * n + last.start, k * n + last.stop),))


split3.out_shapes = lambda shape, cfg: (tuple(shape[:-1]) + (shape[-1] // 3,),) * 3
split3.read_slice = _split3_read


def _unpermute_rope(w, heads):
    """llama.cpp stores Q/K rows interleaved for its rotary layout; undo it (to the HF half-split order), then
    transpose to [in, out]."""
    out = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return (np.ascontiguousarray(out.T),)


# Plain module-level hooks rather than closures made while the tables below are built: code that runs only at import
# time is out of reach of a mutation tool that switches implementations per call (see docs/testing.md).
def unpermute_rope_q(w, cfg):
    """GGUF attn_q -> wq (``cfg.n_heads`` heads)."""
    return _unpermute_rope(w, cfg.n_heads)


def unpermute_rope_k(w, cfg):
    """GGUF attn_k -> wk (``cfg.n_kv_heads`` heads)."""
    return _unpermute_rope(w, cfg.n_kv_heads)


unpermute_rope_q.out_shapes = unpermute_rope_k.out_shapes = lambda shape, cfg: (tuple(shape[::-1]),)


def _layer_rules(prefix, items):  # pragma: no mutate block (runs only at import, while the tables are built)
    return [Rule(prefix + src, (tgt,) if isinstance(tgt, str) else tgt, fn) for src, tgt, fn in items]


# ---- Hugging Face GPT-2 (GPT2LMHeadModel; the "transformer." prefix is optional) ----
HF_GPT2 = [
    Rule("wte.weight", ("wte",)),
    Rule("wpe.weight", ("wpe",)),
    Rule("ln_f.weight", ("ln_f_scale",)),
    Rule("ln_f.bias", ("ln_f_bias",)),
] + _layer_rules("h.{i}.", [
    ("ln_1.weight", "blocks.ln1_scale", None),
    ("ln_1.bias", "blocks.ln1_bias", None),
    ("attn.c_attn.weight", ("blocks.wq", "blocks.wk", "blocks.wv"), split3),
    ("attn.c_attn.bias", ("blocks.bq", "blocks.bk", "blocks.bv"), split3),
    ("attn.c_proj.weight", "blocks.wo", None),
    ("attn.c_proj.bias", "blocks.bo", None),
    ("ln_2.weight", "blocks.ln2_scale", None),
    ("ln_2.bias", "blocks.ln2_bias", None),
    ("mlp.c_fc.weight", "blocks.w_in", None),
    ("mlp.c_fc.bias", "blocks.b_in", None),
    ("mlp.c_proj.weight", "blocks.w_out", None),
    ("mlp.c_proj.bias", "blocks.b_out", None),
])
HF_GPT2_PREFIX = "transformer."
# attention-mask buffers of old checkpoints; the LM head is tied to wte
HF_GPT2_IGNORED = ("h.{i}.attn.bias", "h.{i}.attn.masked_bias", "lm_head.weight")

# ---- Hugging Face LLaMA (LlamaForCausalLM) ----
HF_LLAMA = [
    Rule("model.embed_tokens.weight", ("embed",)),
    Rule("model.norm.weight", ("norm_f",)),
    Rule("lm_head.weight", ("lm_head",), transpose),
] + _layer_rules("model.layers.{i}.", [
    ("input_layernorm.weight", "blocks.attn_norm", None),
    ("self_attn.q_proj.weight", "blocks.wq", transpose),
    ("self_attn.k_proj.weight", "blocks.wk", transpose),
    ("self_attn.v_proj.weight", "blocks.wv", transpose),
    ("self_attn.o_proj.weight", "blocks.wo", transpose),
    ("post_attention_layernorm.weight", "blocks.mlp_norm", None),
    ("mlp.gate_proj.weight", "blocks.w_gate", transpose),
    ("mlp.up_proj.weight", "blocks.w_up", transpose),
    ("mlp.down_proj.weight", "blocks.w_out", transpose),
])
HF_LLAMA_IGNORED = ("model.layers.{i}.self_attn.rotary_emb.inv_freq",)

# ---- llama.cpp GGUF LLaMA (tensors already dequantized to numpy [out, in]) ----
GGUF_LLAMA = [
    Rule("token_embd.weight", ("embed",)),
    Rule("output_norm.weight", ("norm_f",)),
    Rule("output.weight", ("lm_head",), transpose),
] + _layer_rules("blk.{i}.", [
    ("attn_norm.weight", "blocks.attn_norm", None),
    ("attn_q.weight", "blocks.wq", unpermute_rope_q),
    ("attn_k.weight", "blocks.wk", unpermute_rope_k),
    ("attn_v.weight", "blocks.wv", transpose),
    ("attn_output.weight", "blocks.wo", transpose),
    ("ffn_norm.weight", "blocks.mlp_norm", None),
    ("ffn_gate.weight", "blocks.w_gate", transpose),
    ("ffn_up.weight", "blocks.w_up", transpose),
    ("ffn_down.weight", "blocks.w_out", transpose),
])
GGUF_LLAMA_IGNORED = ()

TABLES = {
    ("hf", "gpt2"): (HF_GPT2, HF_GPT2_IGNORED, HF_GPT2_PREFIX),
    ("hf", "llama"): (HF_LLAMA, HF_LLAMA_IGNORED, ""),
    ("gguf", "llama"): (GGUF_LLAMA, GGUF_LLAMA_IGNORED, ""),
}
