"""Subject spans against the tokenizer's own character offsets (not jaxedit's span finding on both sides), for a
GPT-2-style byte-level BPE tokenizer (the tiny test tokenizer; SmolLM2's is one too) and a LLaMA-style
sentencepiece tokenizer (BOS added, "▁" word prefixes, a decoder that drops the first token's leading space)."""
import pytest

from jaxedit.locate.tracing import find_token_range
from conftest import offset_span
from tiny_models import CORPUS

CASES = [  # (prompt, subject): multi-token subjects, at the start, at the end, with a leading space, repeated
    ("The Eiffel Tower is located in the city of Paris", "Eiffel Tower"),
    ("The Eiffel Tower is located in the city of Paris", "The Eiffel Tower"),
    ("The Eiffel Tower is located in the city of Paris", "The"),
    ("The Eiffel Tower is located in the city of Paris", " Eiffel Tower"),
    ("The Eiffel Tower is located in the city of Paris", "Paris"),
    ("The Eiffel Tower is located in the city of Paris", "city of Paris"),
    ("The Eiffel Tower is located in the city of Paris", " Paris"),
    ("Miles Davis plays the trumpet", "Miles Davis"),
    ("Miles Davis plays the trumpet", "trumpet"),
    ("Toko Yasuda produces the most amazing music on the guitar", "Toko Yasuda"),
    ("Toko Yasuda produces the most amazing music on the guitar", "amazing music"),
    ("Beats Music is owned by Apple. Beats Music", "Beats Music"),
    ("The Space Needle is in Seattle.", "Seattle"),
]


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    """A LLaMA-2-shaped tokenizer trained here: BPE over "▁"-prefixed words with byte fallback, a BOS token added
    to every encoding, and LLaMA's decoder (▁ -> space, bytes fused, one leading space stripped)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]  # what byte fallback spells unknown characters with
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600,
                                                       special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    ids = tok("The Eiffel Tower")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:2]) == "The"
    assert tok.convert_ids_to_tokens(ids[2:3])[0].startswith("\u2581") and tok.decode(ids[2:3])[0] != " "
    return tok


def check(tok, cases=CASES):
    for prompt, subject in cases:
        ids = tok(prompt)["input_ids"]
        assert find_token_range(tok, ids, subject) == offset_span(tok, prompt, subject), (prompt, subject)


def test_spans_byte_level_bpe(tokenizer):
    ids = tokenizer("The Eiffel Tower")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[1].startswith("\u0120")  # a byte-level space ("Ġ")
    check(tokenizer)


def test_spans_sentencepiece(sentencepiece_tokenizer):
    check(sentencepiece_tokenizer)


def test_spans_non_ascii(tokenizer, sentencepiece_tokenizer):
    """Characters the tiny vocabularies lack: byte tokens (several per character in byte-level BPE)."""
    cases = [("Über den Café Zürich in Köln", "Café Zürich"), ("Das Café Zürich", "Zürich")]
    check(tokenizer, cases)
    check(sentencepiece_tokenizer, cases)


def test_spans_smollm2_tokenizer(smollm2):  # the tokenizer only: SmolLM2 is loaded for the fast tier's smoke test
    _, tok = smollm2
    check(tok, CASES + [("Das Café Zürich liegt in der Schweiz", "Café Zürich")])
