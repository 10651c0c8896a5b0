"""llama.cpp GGUF files (LLaMA architecture): metadata -> config, tensors dequantized with the ``gguf`` package."""
from __future__ import annotations

import importlib.util

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


def load_gguf(path: str, dtype="float32", mesh=None):
    """The model a GGUF file holds, its tensors dequantized."""
    import gguf

    reader = read_gguf(path)
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


def gguf_tokenizer(path: str):
    """The tokenizer a GGUF file describes, as transformers builds it for ``AutoTokenizer.from_pretrained(folder,
    gguf_file=name)`` (vocabulary, merges, special tokens, chat template, BOS/EOS flags), from transformers' GGUF
    tokenizer builder directly: without the configuration loading that call also does (SmolLM2: ~1 s instead of
    ~10 s). transformers' metadata reader imports torch; where torch is not installed, the metadata is read with the
    ``gguf`` package under transformers' own key table (tests/test_real_model.py compares both paths with
    AutoTokenizer on SmolLM2, tests/test_gguf.py the torch-free one with the tokenizer a tiny GGUF was written from)."""
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:
        raise JaxeditError("reading a GGUF tokenizer needs transformers >= 5 (its GGUF tokenizer builder)") from None
    if importlib.util.find_spec("torch") is not None:
        from transformers.integrations.gguf import get_gguf_tokenizer

        try:
            architecture, tokenizer, config = get_gguf_tokenizer(path)
        except Exception as e:
            raise JaxeditError(f"{path}: could not read the GGUF tokenizer "
                               f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    else:
        architecture, tokenizer, config = gguf_tokenizer_fields(path)
    if "tokens" not in tokenizer:
        raise JaxeditError(f"{path}: the GGUF file has no tokenizer")
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{**config, **extra})


def gguf_tokenizer_fields(path: str):
    """(architecture, tokenizer fields, tokenizer configuration) of a GGUF file as transformers' GGUF tokenizer
    reader returns them, read with the ``gguf`` package (no torch): transformers' table of tokenizer keys, BOS on by
    default for a sentencepiece ("llama") vocabulary, the special tokens by their ids."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    reader = read_gguf(path)
    groups = {}
    for group, renames in GGUF_TOKENIZER_MAPPING.items():
        groups[group] = {}
        for key, name in renames.items():
            f = reader.fields.get(f"tokenizer.{key}")
            if f is not None:
                groups[group][name] = f.contents()
    tokenizer, config = groups["tokenizer"], groups["tokenizer_config"]
    if tokenizer.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unk_token_id"),
                      ("pad_token", "pad_token_id")):
        config[name] = tokenizer["tokens"][tokenizer[key]] if key in tokenizer and "tokens" in tokenizer else None
    return _field(reader, "general.architecture"), tokenizer, config
