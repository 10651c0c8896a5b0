"""GGUF loading without the embedded model or the cache: a tiny LLaMA written as a GGUF file here, the way llama.cpp's
HF converter writes one, read by jaxedit and by transformers' own GGUF loader; and the conversion cache's key."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

import jaxedit
from jaxedit import loading
from conftest import jaxedit_imports
from tiny_models import build_hf_model

TEXT = "The Eiffel Tower is located in the city of Paris. Miles Davis plays the trumpet."


def rotary_interleave(w, heads):
    """llama.cpp's converter reorders the rows of q_proj / k_proj (HF layout [heads * head_dim, d]): within each
    head, the first half of the rows and the second half are interleaved (row 2i <- i, row 2i + 1 <- half + i)."""
    per_head = w.shape[0] // heads
    half = per_head // 2
    within = np.stack([np.arange(half), half + np.arange(half)], axis=1).reshape(-1)
    rows = (np.arange(heads)[:, None] * per_head + within[None]).reshape(-1)
    return w[rows]


# HF LLaMA tensor name (inside layer i) -> GGUF tensor name (inside blk.i), as llama.cpp's tensor map names them
LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def write_gguf(hf, tok, path):
    """Write ``hf`` (LlamaForCausalLM) and its byte-level BPE tokenizer as an all-F32 GGUF file."""
    import gguf

    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))) and len(tokens) == c.vocab_size
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == tok.eos_token else 1 for t in tokens])  # 3: control, 1: normal
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(tok.eos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    for name, t in hf.state_dict().items():
        a = t.detach().numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue  # a tied model has no output tensor in GGUF
            out = "output.weight"
        else:
            _, _, i, *rest = name.split(".")  # model.layers.{i}.<module>.weight
            module = ".".join(rest[:-1])
            if module == "self_attn.q_proj":
                a = rotary_interleave(a, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                a = rotary_interleave(a, c.num_key_value_heads)
            out = f"blk.{i}.{LAYER_NAMES[module]}.weight"
        w.add_tensor(out, np.ascontiguousarray(a))  # numpy [out, in]; the writer stores GGUF dims reversed
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tokenizer):
    """name -> (path of the GGUF file, the HF torch model it was written from). Init std 0.3: attention scores
    large enough that a wrong rotary row order shows in the logits."""
    out = {}
    for name in ("llama-gqa-untied", "llama-mha-tied"):
        hf = build_hf_model(name, seed=1, init_std=0.3)
        path = tmp_path_factory.mktemp("gguf-" + name) / "tiny.gguf"
        write_gguf(hf, tokenizer, path)
        out[name] = (str(path), hf)
    return out


@pytest.mark.parametrize("name", ["llama-gqa-untied", "llama-mha-tied"])
def test_tiny_gguf_logits_equal_transformers_gguf_loader(tiny_gguf, tokenizer, name):
    from transformers import AutoModelForCausalLM

    path, source = tiny_gguf[name]
    model, tok = jaxedit.load(path, cache=False)
    c = model.config
    assert (c.n_layers, c.n_heads, c.n_kv_heads, c.tie_embeddings) == (
        source.config.num_hidden_layers, source.config.num_attention_heads, source.config.num_key_value_heads,
        source.config.tie_word_embeddings)
    ids = tokenizer(TEXT)["input_ids"]
    assert tok(TEXT)["input_ids"] == ids  # the tokenizer read back from the file's metadata
    ref_model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].numpy()
        src = source(torch.tensor([ids])).logits[0].numpy()
    ours = np.asarray(jaxedit.forward(model, [ids]).logits[0])
    assert np.abs(ref - src).max() < 1e-4  # the file holds the source model (transformers undoes the reordering)
    assert np.ptp(ref) > 5  # logits with signal: a wrong row order moves them by whole units
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_cache_key_changes_with_the_conversion(tiny_gguf, tmp_path, monkeypatch):
    """A converted copy is served only to the conversion that wrote it: other converting code or other dependency
    versions give another key, so a stale (here: corrupted) copy is not read."""
    from safetensors.numpy import load_file, save_file

    cache = tmp_path / "cache"
    monkeypatch.setenv("JAXEDIT_CACHE", str(cache))
    path, source = tiny_gguf["llama-gqa-untied"]
    ids = [[5, 17, 42, 8, 99]]
    with torch.no_grad():
        ref = source(torch.tensor(ids)).logits.numpy()
    model, _ = jaxedit.load(path)
    np.testing.assert_allclose(np.asarray(jaxedit.forward(model, ids).logits), ref, atol=1e-4, rtol=0)
    (first,) = os.listdir(cache)
    # make the cached copy wrong, as an older conversion with a bug would have left it
    f = cache / first / "params.safetensors"
    params = load_file(str(f))
    params["blocks.wq"] = params["blocks.wq"][..., ::-1].copy()
    save_file(params, str(f))
    stale, _ = jaxedit.load(path)
    assert np.abs(np.asarray(jaxedit.forward(stale, ids).logits) - ref).max() > 1e-2  # same code: the copy is read

    def fingerprint_with(**versions):
        from importlib import metadata

        real = metadata.version
        monkeypatch.setattr(metadata, "version", lambda d: versions.get(d) or real(d))
        loading.conversion_fingerprint.cache_clear()
        try:
            return loading.conversion_fingerprint()
        finally:
            monkeypatch.setattr(metadata, "version", real)
            loading.conversion_fingerprint.cache_clear()

    base = loading.conversion_fingerprint()
    assert fingerprint_with(gguf="0.0.1") != base and fingerprint_with(transformers="0.0.1") != base
    assert fingerprint_with() == base

    # new converting code: one of the modules' source changed
    spec = importlib.util.find_spec("jaxedit.loading.mappings")
    changed = tmp_path / "mappings.py"
    changed.write_text(open(spec.origin).read() + "\n# changed\n")
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *a):
        s = real_find_spec(name, *a)
        if name == "jaxedit.loading.mappings":
            s = importlib.util.spec_from_file_location(name, str(changed))
        return s

    loading.conversion_fingerprint.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    try:
        assert loading.conversion_fingerprint() != base
        fresh, _ = jaxedit.load(path)
    finally:
        monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
        loading.conversion_fingerprint.cache_clear()
    np.testing.assert_allclose(np.asarray(jaxedit.forward(fresh, ids).logits), ref, atol=1e-4, rtol=0)
    assert len(os.listdir(cache)) == 2  # converted again, beside the old copy


# jaxedit modules the converting modules import that do not take part in what a conversion writes
NOT_CONVERTING = {
    "jaxedit.errors": "error messages only",
    "jaxedit.forward": "runs a model; imported by jaxedit.model for its forward(), makes no parameter",
    "jaxedit.models.gpt2": "GGUF files are LLaMA only (gguf_config refuses other architectures)",
    "jaxedit.runtime": "status lines, progress bars and the compile cache: no values",
    "jaxedit.calls": "checks how jaxedit.save and export_hf are called (no values)",
    "jaxedit.sharding": "places arrays on devices (a mesh); the converted values do not depend on it",
}


def test_conversion_modules_cover_what_they_import():
    """Every jaxedit module imported by a module of the cache key is in the key or named above with a reason."""
    listed = set(loading.CONVERSION_MODULES)
    for name in listed:
        for mod in jaxedit_imports(name):
            assert mod in listed or mod in NOT_CONVERTING, f"{name} imports {mod}: in the cache key or not?"


TORCH_FREE = r"""
import json, sys
sys.modules["torch"] = None  # any "import torch" now raises ImportError
import jaxedit
from jaxedit.loading.gguf_file import gguf_tokenizer

path, texts = sys.argv[1], json.loads(sys.argv[2])
_, loaded = jaxedit.load(path)  # converted into $JAXEDIT_CACHE: the tokenizer saved there and read back
direct = gguf_tokenizer(path)
assert sys.modules["torch"] is None and not any(m.startswith("torch.") for m in sys.modules)
print(json.dumps({name: {"ids": [t(x)["input_ids"] for x in texts], "eos": t.eos_token_id,
                         "decoded": [t.decode(t(x)["input_ids"]) for x in texts]}
                  for name, t in (("loaded", loaded), ("direct", direct))}))
"""


def test_gguf_tokenizer_without_torch(tiny_gguf, tokenizer, tmp_path):
    """In a process where torch cannot be imported, the tokenizer jaxedit builds from the GGUF metadata (directly,
    and as jaxedit.load converts it into the cache) encodes like the tokenizer the file was written from: texts
    from its corpus, unseen words, non-ASCII text, spaces and newlines, its special token."""
    import subprocess
    import sys

    path = tiny_gguf["llama-mha-tied"][0]
    texts = [TEXT, "Seattle's guitar: 12 trumpets!", "Ünïcödé ☃ text\n\twith  two  spaces",
             "a<|endoftext|>b", " leading space"]
    env = dict(os.environ, JAXEDIT_CACHE=str(tmp_path / "cache"), JAXEDIT_COMPILE_CACHE="0")
    res = subprocess.run([sys.executable, "-c", TORCH_FREE, path, json.dumps(texts)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    want = [tokenizer(x)["input_ids"] for x in texts]
    assert any(len(w) > len(x.split()) for w, x in zip(want, texts))  # merges and byte fallback at work
    assert tokenizer.eos_token_id in want[3]  # the special token is one token
    for name in ("loaded", "direct"):
        assert got[name]["ids"] == want
        assert got[name]["eos"] == tokenizer.eos_token_id
        assert got[name]["decoded"] == [tokenizer.decode(w) for w in want]
