"""llama.cpp GGUF files (LLaMA architecture): metadata -> config, tensors dequantized with the ``gguf`` package."""
from __future__ import annotations


import numpy as np

from jaxedit.config import ModelConfig
from jaxedit.errors import JaxeditError
from jaxedit.loading.convert import convert, convert_sharded


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise JaxeditError(f"GGUF file lacks the metadata key {key!r}")
        return default
    return f.contents()


def read_gguf(path: str):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:
        raise JaxeditError(f"{path}: not a readable GGUF file ({e})") from None


def gguf_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise JaxeditError(f"GGUF architecture {arch!r} is not supported (supported: llama)")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise JaxeditError("GGUF files with a rope_freqs tensor (llama3 rope scaling) are not supported yet")
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    n_heads = int(_field(reader, "llama.attention.head_count"))
    d = int(_field(reader, "llama.embedding_length"))
    return ModelConfig(
        family="llama", n_layers=int(_field(reader, "llama.block_count")), d_model=d, n_heads=n_heads,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", d // n_heads)),
        d_ff=int(_field(reader, "llama.feed_forward_length")), vocab_size=int(embd.shape[-1]),
        max_positions=int(_field(reader, "llama.context_length", 2048)),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names, activation="silu",
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
    )


def load_gguf(path: str, dtype="float32", mesh=None, reader=None):
    """The model a GGUF file holds, its tensors dequantized; ``reader``: the file's GGUFReader when it was parsed
    already (parsing builds ~200,000 Python objects for a tokenizer's arrays, ~6 s for SmolLM2)."""
    import gguf

    reader = reader or read_gguf(path)
    cfg = gguf_config(reader)
    tensors = {t.name: t for t in reader.tensors}

    def get(name):
        t = tensors[name]
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(arr, np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))

    if mesh is not None:  # quantized blocks: each tensor is dequantized whole on the host, then split
        import types

        return convert_sharded(list(tensors), types.SimpleNamespace(get=get), cfg, "gguf", dtype, mesh)
    return convert(list(tensors), get, cfg, "gguf", dtype)


# llama.cpp metadata keys -> the names transformers' GGUF tokenizer builder expects
_TOKENIZER_KEYS = {"model": "tokenizer_type", "pre": "pre_tokenizer_type", "tokens": "tokens", "scores": "scores",
                   "token_type": "token_type", "merges": "merges", "bos_token_id": "bos_token_id",
                   "eos_token_id": "eos_token_id", "unknown_token_id": "unk_token_id",
                   "padding_token_id": "pad_token_id", "add_space_prefix": "add_prefix_space"}


def gguf_tokenizer(path: str, reader=None):
    """The tokenizer a GGUF file describes, built from its metadata by transformers' GGUF tokenizer builder (the
    one ``AutoTokenizer.from_pretrained(..., gguf_file=...)`` uses), from ``reader`` when the file was parsed
    already. transformers' own GGUF path would parse the file again, with torch; this one needs no torch and
    encodes alike (tests/test_real_model.py compares the two on SmolLM2)."""
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:
        raise JaxeditError("reading a GGUF tokenizer needs transformers >= 5 (its GGUF tokenizer builder)") from None
    reader = reader or read_gguf(path)
    meta = {}
    for key, name in _TOKENIZER_KEYS.items():
        f = reader.fields.get(f"tokenizer.ggml.{key}")
        if f is not None:
            meta[name] = f.contents()
    if "tokens" not in meta:
        raise JaxeditError(f"{path}: the GGUF file has no tokenizer")
    backend, _ = convert_gguf_tokenizer(_field(reader, "general.architecture"), meta)
    special = {name: meta["tokens"][meta[key]] for name, key in
               (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unk_token_id"),
                ("pad_token", "pad_token_id")) if key in meta}
    add_bos = reader.fields.get("tokenizer.ggml.add_bos_token")
    add_bos = bool(add_bos.contents()) if add_bos is not None else meta.get("tokenizer_type") == "llama"
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    if add_bos and tok.bos_token_id is not None:
        from tokenizers import processors

        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tok.bos_token}:0 $A:0", pair=f"{tok.bos_token}:0 $A:0 {tok.bos_token}:1 $B:1",
            special_tokens=[(tok.bos_token, tok.bos_token_id)])
    return tok
