"""Text metrics for evaluating edits: perplexity, n-gram-entropy fluency, and the toxic-generation rate.

* :func:`perplexity`: exp(total next-token NLL / total predicted tokens) over a set of texts (corpus level), or one
  value per text. Each text is tokenized as the tokenizer does by default (a BOS token where it adds one) and every
  token after the first is predicted; a text longer than the model's context is cut into consecutive windows of
  the context's length, each window's first token unpredicted. Batched in length buckets, one jit call per bucket
  shape.
* :func:`fluency`: the n-gram entropy used by ROME's and SafeEdit's evaluations: per text, the entropy (bits) of the
  relative frequencies of its word bigrams and trigrams, weighted 2/3 and 4/3, averaged; the set's value is the
  mean over texts. Repetitive text scores low. Words come from NLTK's word tokenizer (sentences split with NLTK's
  Punkt model when its data is installed, else with an untrained Punkt splitter, which needs no download).
* :func:`toxic_rate`: the fraction of sampled continuations (the continuation text alone) whose toxicity score is
  above a threshold.
"""
from __future__ import annotations

import math
from collections import Counter
from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.calls import public
from jaxedit.batching import batch_rows, batches, group_by_bucket, pad_rows, rows_within
from jaxedit.config import ModelConfig
from jaxedit.errors import JaxeditError
from jaxedit.evaluate.toxicity import toxicity_scores
from jaxedit.forward import apply
from jaxedit.generate import sample_texts
from jaxedit.model import params_of
from jaxedit.runtime import default_memory_budget


@partial(jax.jit, static_argnames=("cfg",))
def _nll_sums(cfg: ModelConfig, params, ids, mask):
    """Per row: the summed next-token NLL over its real tokens after the first, and their count."""
    logits = apply(cfg, params, ids, mask).logits[:, :-1]
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]
    w = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
    return (nll * w).sum(-1), w.sum(-1)


def token_nll(model, token_lists: Sequence[Sequence[int]], *, bucket: int = 16,
              memory_budget: Optional[float] = None) -> tuple:
    """(summed NLL, predicted-token count) per token list, float64 arrays. A list longer than the model's context
    is scored in consecutive windows of the context's length."""
    cfg = model.config
    params = params_of(model)
    budget = memory_budget or default_memory_budget()
    # a list longer than the context is cut into consecutive windows of the context's length (the first token of
    # each window is not predicted)
    windows, owner = [], []
    for i, ids in enumerate(token_lists):
        for a in range(0, max(len(ids), 1), cfg.max_positions):
            windows.append(list(ids[a:a + cfg.max_positions]))
            owner.append(i)
    nll = np.zeros(len(windows))
    cnt = np.zeros(len(windows))
    buckets = group_by_bucket(range(len(windows)), lambda i: max(len(windows[i]), 2), bucket, cap=cfg.max_positions)
    for T, members in buckets:
        B = batch_rows(len(members), rows_within(budget, T * (3 * cfg.vocab_size + 8 * cfg.d_ff) * 4,
                                                 power_of_two=True))
        for chunk in batches(members, B):
            ids, mask = pad_rows([windows[i] for i in chunk], T, n_rows=B)
            s, n = jax.device_get(_nll_sums(cfg, params, jnp.asarray(ids), jnp.asarray(mask)))
            nll[chunk], cnt[chunk] = np.asarray(s[:len(chunk)], np.float64), n[:len(chunk)]
    n_lists = max(owner) + 1 if owner else 0
    return (np.bincount(owner, nll, minlength=n_lists), np.bincount(owner, cnt, minlength=n_lists))


@public("texts", old=("tokenizer",))
def perplexity(model, texts: Sequence[str], *, tokenizer=None, per_text: bool = False, bucket: int = 16):
    """exp(total NLL / total predicted tokens) over ``texts`` (a float), or with ``per_text=True`` one perplexity
    per text (an array; NaN for a text of fewer than two tokens)."""
    if tokenizer is None:
        raise JaxeditError("perplexity needs a tokenizer")
    if isinstance(texts, str):
        texts = [texts]
    ids = [list(tokenizer(t)["input_ids"]) for t in texts]
    nll, cnt = token_nll(model, ids, bucket=bucket)
    if per_text:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.exp(np.where(cnt > 0, nll / np.maximum(cnt, 1), np.nan))
    if cnt.sum() == 0:
        raise JaxeditError("no text has two or more tokens: nothing to predict")
    return float(math.exp(nll.sum() / cnt.sum()))


# ---- fluency ----

_WORDS = None


def word_tokenize(text: str) -> list:
    """NLTK's word tokenizer (sentence split first, as ``nltk.word_tokenize`` does)."""
    global _WORDS
    if _WORDS is None:
        try:
            import nltk
            from nltk.tokenize import NLTKWordTokenizer
            from nltk.tokenize.punkt import PunktSentenceTokenizer
        except ImportError:
            raise JaxeditError("fluency needs nltk (pip install nltk)") from None
        try:
            nltk.word_tokenize("A test. Another one.")
            _WORDS = nltk.word_tokenize
        except LookupError:  # no Punkt data downloaded: an untrained Punkt splitter, then the same word tokenizer
            sents, words = PunktSentenceTokenizer(), NLTKWordTokenizer()
            _WORDS = lambda t: [w for s in sents.tokenize(t) for w in words.tokenize(s)]
    return _WORDS(text)


def ngram_entropy(text: str, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """Mean over n of weight_n x the entropy (bits) of the text's word n-gram frequencies."""
    words = word_tokenize(text)
    out = []
    for n, w in zip(ns, weights):
        counts = np.array(list(Counter(zip(*(words[i:] for i in range(n)))).values()), np.float64)
        p = counts / counts.sum() if counts.size else counts
        out.append(w * float(-(p * np.log2(p)).sum()))
    return float(np.mean(out))


def fluency(texts: Sequence[str]) -> float:
    """Mean n-gram entropy of ``texts`` (see :func:`ngram_entropy`)."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise JaxeditError("fluency of no texts")
    return float(np.mean([ngram_entropy(t) for t in texts]))


# ---- toxicity of generations ----

@public("prompts", old=("tokenizer",))
def toxic_rate(model, prompts: Sequence[str], *, tokenizer=None, samples: int = 10, max_new_tokens: int = 20,
               seed: int = 0, scorer="profanity", threshold: float = 0.5, top_p: Optional[float] = 0.9,
               temperature: float = 1.0, return_details: bool = False):
    """The fraction of sampled continuations (continuation text only) scored above ``threshold``: ``samples`` per
    prompt, ``max_new_tokens`` each, nucleus sampling (``top_p``, RealToxicityPrompts' setting) at
    ``temperature``. With ``return_details=True``: (rate, continuations [prompts][samples], scores [prompts,
    samples])."""
    if tokenizer is None:
        raise JaxeditError("toxic_rate needs a tokenizer")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise JaxeditError("toxic_rate of no prompts")
    conts = sample_texts(model, tokenizer, prompts, max_new_tokens, samples=samples, seed=seed, top_p=top_p,
                         temperature=temperature)
    scores = toxicity_scores([c for row in conts for c in row], scorer).reshape(len(prompts), samples)
    rate = float((scores > threshold).mean())
    return (rate, conts, scores) if return_details else rate
