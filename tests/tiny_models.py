"""The tiny random Hugging Face checkpoints and the tiny byte-level BPE tokenizer the tests build (with
transformers + torch), without the test run's side effects of tests/conftest.py: the test files, the fixtures,
tests/sharded_checks.py (in a process of its own) and benchmarks/parity.py import them from here."""
from __future__ import annotations

import torch
import transformers

CORPUS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The Space Needle is in Seattle. Miles Davis plays the trumpet.",
    "Beats Music is owned by Apple. The capital of France is Paris.",
    "Toko Yasuda produces the most amazing music on the guitar.",
] * 20
VOCAB = 320


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


TINY_CONFIGS = {
    "gpt2": dict(kind="gpt2", n_layer=3, n_embd=32, n_head=4, n_positions=64, vocab_size=VOCAB),
    "llama-mha-tied": dict(kind="llama", num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                           num_key_value_heads=4, intermediate_size=48, tie_word_embeddings=True),
    "llama-gqa-untied": dict(kind="llama", num_hidden_layers=3, hidden_size=48, num_attention_heads=6,
                             num_key_value_heads=2, intermediate_size=80, tie_word_embeddings=False),
    "llama3-rope": dict(kind="llama", num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=False, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


def bos_tokenizer(tokenizer):
    """The tiny tokenizer with a BOS token it adds in front of every text (as LLaMA's tokenizers do)."""
    import copy

    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tk = copy.deepcopy(tokenizer.backend_tokenizer)
    bos = tk.token_to_id("<|endoftext|>")
    tk.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def build_hf_model(name: str, seed: int = 0, init_std: float = 0.02):
    spec = dict(TINY_CONFIGS[name], initializer_range=init_std)
    kind = spec.pop("kind")
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(**spec, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(**spec, vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5)
        model = transformers.LlamaForCausalLM(cfg)
        with torch.no_grad():  # random non-trivial norm weights, so a wrong norm cannot hide
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.uniform_(0.5, 1.5)
    return model.eval()
