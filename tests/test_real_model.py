"""The embedded SmolLM2-135M-Instruct GGUF: jaxedit equals transformers loading the same file."""
import os

import numpy as np
import pytest

import jaxedit

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "The capital of Japan is",
    "Miles Davis plays the",
    "Water is made of hydrogen and",
    "The first president of the United States was",
]


@pytest.mark.slow
def test_config(smollm2):
    model, _ = smollm2
    c = model.config
    assert (c.family, c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.vocab_size, c.tie_embeddings) == \
        ("llama", 30, 576, 9, 3, 49152, True)


@pytest.mark.slow
def test_logits_match_transformers_gguf(smollm2, hf_gguf):
    import torch

    model, tok = smollm2
    worst = 0.0
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        ours = np.asarray(jaxedit.forward(model, [ids]).logits[0])
        with torch.no_grad():
            ref = hf_gguf(torch.tensor([ids])).logits[0].numpy()
        worst = max(worst, float(np.abs(ours - ref).max()))
        np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    assert worst <= 1e-3, worst


@pytest.mark.slow
def test_padded_batch_of_real_prompts(smollm2):
    model, tok = smollm2
    enc = [tok(p)["input_ids"] for p in PROMPTS]
    T = max(map(len, enc))
    ids = np.full((len(enc), T), tok.pad_token_id or 0)
    mask = np.zeros_like(ids)
    for b, e in enumerate(enc):
        ids[b, T - len(e):], mask[b, T - len(e):] = e, 1
    batch = np.asarray(jaxedit.forward(model, ids, mask).logits[:, -1])
    for b, e in enumerate(enc):
        single = np.asarray(jaxedit.forward(model, [e]).logits[0, -1])
        assert np.abs(batch[b] - single).max() < 1e-3


@pytest.mark.slow
def test_eiffel_tower_is_in_paris(smollm2):
    model, tok = smollm2
    ids = tok("The Eiffel Tower is located in the city of")["input_ids"]
    logits = np.asarray(jaxedit.forward(model, [ids]).logits[0, -1])
    p = np.exp(logits - logits.max())
    p /= p.sum()
    assert tok.decode([int(p.argmax())]) == " Paris"
    assert 0.6 < p.max() < 0.8


@pytest.mark.slow
def test_gguf_tokenizer_without_torch_equals_transformers():
    """The tokenizer built from GGUF metadata (the path taken where torch is not installed) encodes like
    transformers' own GGUF tokenizer."""
    from transformers import AutoTokenizer

    from jaxedit.loading import embedded_gguf_path
    from jaxedit.loading.gguf_file import gguf_tokenizer_without_torch

    path = embedded_gguf_path("smollm2")
    ours = gguf_tokenizer_without_torch(path)
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    texts = PROMPTS + ["  Hello,\tworld!\n\nÜber 123 4567 café 🙂", "<|im_start|>user\nhi<|im_end|>", "it's WE'LL"]
    for t in texts:
        assert ours(t)["input_ids"] == ref(t)["input_ids"], t
        assert ours.decode(ours(t)["input_ids"]) == ref.decode(ref(t)["input_ids"])
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (ref.bos_token, ref.eos_token, ref.pad_token)
