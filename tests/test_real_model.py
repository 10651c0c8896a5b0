"""The embedded SmolLM2-135M-Instruct GGUF: jaxedit equals transformers loading the same file. Padded batches, the
GGUF Q/K row order and the tokenizer without torch are pinned on tiny checkpoints (test_parity.py, test_gguf.py);
here only what the real file can show."""

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
TOKENIZER_TEXTS = ["  Hello,\tworld!\n\nÜber 123 4567 café 🙂", "<|im_start|>user\nhi<|im_end|>", "it's WE'LL"]


def test_smollm2_smoke(smollm2, hf_gguf):
    """The fast tier's one real-model check: the configuration, two prompts' logits against transformers' own GGUF
    loader, and jaxedit's tokenizer (built from the GGUF metadata at conversion, saved with the converted copy and
    read back) against the one transformers builds from the same file."""
    import torch
    from transformers import AutoTokenizer
    from transformers.integrations.gguf import get_gguf_tokenizer

    from jaxedit.loading import embedded_gguf_path
    from jaxedit.loading.gguf_file import gguf_tokenizer_fields

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
    path = embedded_gguf_path("smollm2")
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    for t in PROMPTS + TOKENIZER_TEXTS:
        assert tok(t)["input_ids"] == ref(t)["input_ids"], t
        assert tok.decode(tok(t)["input_ids"]) == ref.decode(ref(t)["input_ids"])
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (ref.bos_token, ref.eos_token, ref.pad_token)
    # the instruct model's chat template comes with it (rendered alike), and the BOS / EOS flags
    assert ref.chat_template and tok.chat_template == ref.chat_template
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == \
        ref.apply_chat_template(chat, add_generation_prompt=True)
    assert [getattr(t, "add_bos_token", None) for t in (tok, ref)] == [getattr(ref, "add_bos_token", None)] * 2
    assert [getattr(t, "add_eos_token", None) for t in (tok, ref)] == [getattr(ref, "add_eos_token", None)] * 2
    # the metadata read without torch (the gguf package's reader, transformers' key table) gives the same tokenizer
    fields = gguf_tokenizer_fields(path)
    assert fields[0] == "llama" and fields[2]["chat_template"] and fields == get_gguf_tokenizer(path)


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
