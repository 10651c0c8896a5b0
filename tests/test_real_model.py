"""The embedded SmolLM2-135M-Instruct GGUF: jaxedit equals transformers loading the same file. Padded batches, the
GGUF Q/K row order and the torch-free tokenizer path are pinned on tiny checkpoints (test_parity.py, test_gguf.py);
here only what the real file can show."""

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
TOKENIZER_TEXTS = ["  Hello,\tworld!\n\nÜber 123 4567 café 🙂", "<|im_start|>user\nhi<|im_end|>", "it's WE'LL"]


def test_smollm2_smoke(smollm2, hf_gguf):
    """The fast tier's one real-model check: the configuration, two prompts' logits against transformers' own GGUF
    loader, and the tokenizer built without torch against the one transformers builds from the same file."""
    import torch

    from jaxedit.loading import embedded_gguf_path
    from jaxedit.loading.gguf_file import gguf_tokenizer_without_torch

    model, tok = smollm2
    c = model.config
    assert (c.family, c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.vocab_size, c.tie_embeddings) == \
        ("llama", 30, 576, 9, 3, 49152, True)
    for prompt in PROMPTS[:2]:
        ids = tok(prompt)["input_ids"]
        ours = np.asarray(jaxedit.forward(model, [ids]).logits[0])
        with torch.no_grad():
            ref = hf_gguf(torch.tensor([ids])).logits[0].numpy()
        assert np.ptp(ref) > 10  # logits with signal
        np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)
        if prompt == PROMPTS[0]:  # the fact the tracing and editing examples rely on, from transformers' numbers
            p = np.exp(ref[-1] - ref[-1].max())
            assert tok.decode([int(p.argmax())]) == " Paris" and 0.6 < p.max() / p.sum() < 0.8
    no_torch = gguf_tokenizer_without_torch(embedded_gguf_path("smollm2"))
    for t in PROMPTS + TOKENIZER_TEXTS:
        assert no_torch(t)["input_ids"] == tok(t)["input_ids"], t
        assert no_torch.decode(no_torch(t)["input_ids"]) == tok.decode(tok(t)["input_ids"])
    assert (no_torch.bos_token, no_torch.eos_token, no_torch.pad_token) == (tok.bos_token, tok.eos_token,
                                                                           tok.pad_token)


@pytest.mark.slow
def test_logits_match_transformers_gguf(smollm2, hf_gguf):
    import torch

    model, tok = smollm2
    worst = 0.0
    for prompt in PROMPTS[2:]:
        ids = tok(prompt)["input_ids"]
        ours = np.asarray(jaxedit.forward(model, [ids]).logits[0])
        with torch.no_grad():
            ref = hf_gguf(torch.tensor([ids])).logits[0].numpy()
        worst = max(worst, float(np.abs(ours - ref).max()))
        np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    assert worst <= 1e-3, worst
