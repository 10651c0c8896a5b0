"""Chunks of a prompt and the most toxic one (the key of a toxic memory).

A chunker maps a text to character spans ``[(start, end), ...]``. Built in:

* ``"phrases"`` (the default; offline, no model): words are split into short phrases at punctuation and before
  closed-class words (articles, possessives, prepositions, conjunctions), e.g. "He looked at me and said, shut up
  you" -> "He looked" / "at me" / "and said" / "shut up you". A rough, dependency-free stand-in for a syntactic
  chunker;
* ``"words"``: every word alone;
* ``"spacy"`` or ``"spacy:MODEL"``: spaCy's noun chunks (``pip install spacy`` and a pipeline with a parser, by
  default ``en_core_web_sm``);
* a callable ``f(text)`` returning substrings of the text or ``(start, end)`` character pairs.

:func:`toxic_span` scores every chunk with a toxicity scorer, takes the highest (the first on ties) and maps its
characters to the tokens that overlap it, using the tokenizer's offset mapping.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

from jaxedit.errors import JaxeditError
from jaxedit.evaluate.toxicity import toxicity_scores

CLOSED_CLASS = frozenset("""
a an the this that these those my your his her its our their
at in on of for with from by about to into onto over under after before behind like than as through without
and or but so because if when while which who whom whose then nor yet
""".split())
_WORD = re.compile(r"[A-Za-z0-9]+(?:['\u2019][A-Za-z]+)*|[^\sA-Za-z0-9]")


def phrase_chunks(text: str) -> list:
    """The default chunker (see the module docstring)."""
    spans, cur = [], None
    for m in _WORD.finditer(text):
        word = m.group()
        if not word[0].isalnum():  # punctuation closes the chunk
            if cur:
                spans.append(cur)
            cur = None
            continue
        if cur is not None and word.lower() in CLOSED_CLASS:
            spans.append(cur)
            cur = None
        cur = (cur[0], m.end()) if cur else (m.start(), m.end())
    if cur:
        spans.append(cur)
    return spans


def word_chunks(text: str) -> list:
    return [m.span() for m in _WORD.finditer(text) if m.group()[0].isalnum()]


_SPACY: dict = {}


def spacy_chunks(model: str = "en_core_web_sm") -> Callable:
    if model not in _SPACY:
        try:
            import spacy
        except ImportError:
            raise JaxeditError("chunker 'spacy' needs spaCy (pip install spacy) and a pipeline with a parser") from None
        try:
            _SPACY[model] = spacy.load(model)
        except OSError:
            raise JaxeditError(f"chunker 'spacy': the spaCy pipeline {model!r} is not installed (python -m spacy "
                               f"download {model}, where the network allows); the offline default is 'phrases'") from None
    nlp = _SPACY[model]
    return lambda text: [(c.start_char, c.end_char) for c in nlp(text).noun_chunks]


CHUNKERS = {"phrases": phrase_chunks, "words": word_chunks}


def check_chunker(chunker) -> None:
    """Refuse a chunker name that :func:`get_chunker` would refuse, without loading spaCy."""
    if callable(chunker) or (isinstance(chunker, str) and (chunker in CHUNKERS or chunker == "spacy"
                                                           or chunker.startswith("spacy:"))):
        return
    raise JaxeditError(f"unknown chunker {chunker!r} (use phrases, words, spacy[:MODEL], or a Python callable)")


def get_chunker(chunker="phrases") -> Callable:
    """A function text -> [(start, end)] from a name (phrases, words, spacy[:MODEL]) or a callable."""
    if callable(chunker):
        def call(text):
            spans = []
            for c in chunker(text):
                if isinstance(c, str):
                    at = text.find(c)
                    if not c.strip() or at < 0:
                        raise JaxeditError(f"the chunker returned {c!r}, which is not a substring of {text!r}")
                    spans.append((at, at + len(c)))
                else:
                    a, b = (int(v) for v in c)
                    if not 0 <= a < b <= len(text):
                        raise JaxeditError(f"the chunker returned the span ({a}, {b}) outside {text!r}")
                    spans.append((a, b))
            return spans
        return call
    if isinstance(chunker, str):
        if chunker in CHUNKERS:
            return CHUNKERS[chunker]
        if chunker == "spacy" or chunker.startswith("spacy:"):
            return spacy_chunks(chunker.partition(":")[2] or "en_core_web_sm")
    raise JaxeditError(f"unknown chunker {chunker!r} (use phrases, words, spacy[:MODEL], or a Python callable)")


def char_to_token_range(tokenizer, text: str, start: int, end: int) -> tuple:
    """Half-open range of the tokens of ``tokenizer(text)["input_ids"]`` whose characters overlap [start, end)."""
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
    except NotImplementedError:
        raise JaxeditError("locating chunks needs a fast tokenizer (one with offset mappings)") from None
    hit = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start]
    if not hit:
        raise JaxeditError(f"the chunk {text[start:end]!r} cannot be located in the tokens of {text!r}")
    return hit[0], hit[-1] + 1


def scored_chunks(prompt: str, scorer="profanity", chunker="phrases") -> list:
    """[(score, (start, end), text)] for every chunk of ``prompt``, in order."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise JaxeditError("cannot chunk an empty prompt")
    spans = [s for s in get_chunker(chunker)(prompt) if prompt[s[0]:s[1]].strip()]
    if not spans:
        raise JaxeditError(f"the chunker found no chunk in {prompt!r}")
    texts = [prompt[a:b] for a, b in spans]
    return list(zip(toxicity_scores(texts, scorer).tolist(), spans, texts))


def toxic_span(prompt: str, *, tokenizer=None, scorer="profanity", chunker="phrases") -> tuple:
    """The most toxic chunk of ``prompt``: ``(start, end, chunk)`` with [start, end) a half-open range of
    ``tokenizer(prompt)["input_ids"]`` (the tokens overlapping the chunk's characters) and its text."""
    if tokenizer is None:
        raise JaxeditError("toxic_span needs a tokenizer")
    chunks = scored_chunks(prompt, scorer, chunker)
    best = max(range(len(chunks)), key=lambda i: (chunks[i][0], -i))
    _, (a, b), text = chunks[best]
    start, end = char_to_token_range(tokenizer, prompt, a, b)
    return start, end, text


def first_token_of_word(tokenizer, new_ids: Sequence[int], char_start: int) -> int:
    """Index into ``new_ids`` of the token whose decoded text covers character ``char_start`` of their decoding."""
    for k in range(1, len(new_ids) + 1):
        if len(tokenizer.decode(list(new_ids[:k]), skip_special_tokens=True)) > char_start:
            return k - 1
    raise JaxeditError("the word is beyond the decoded tokens")
