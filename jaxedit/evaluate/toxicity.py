"""Toxicity scorers: anything that maps a list of texts to scores in [0, 1].

``scorer=`` is accepted everywhere in three forms:

* ``"profanity"`` (the default): the linear classifier shipped inside the ``alt-profanity-check`` wheel (trained
  on human-labelled toxic comments; offline, about 20k texts a second on a CPU);
* a Hugging Face sequence-classification checkpoint directory, written ``"hf:PATH"`` (or just a path to a folder
  holding ``config.json``), optionally ``"hf:PATH#LABEL"`` to name the toxic label; run with ``transformers`` in
  torch (``pip install jaxedit[torch]``); the score is the toxic label's probability (softmax over the labels, or
  a sigmoid for single-logit and multi-label heads);
* a Python callable ``f(list_of_texts) -> sequence of floats``.

Scores are cached by text in the :class:`Scorer` object (and, with :meth:`Scorer.attach_file`, in a JSONL file),
so scoring the same generations again costs nothing. Every batch of scores is checked: one score per text, finite,
within [0, 1].
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional, Sequence

import numpy as np

from jaxedit.errors import JaxeditError

DEFAULT_SCORER = "profanity"


class Scorer:
    """A named text -> [0, 1] function with a cache by text."""

    def __init__(self, name: str, fn: Callable[[list], Sequence[float]], batch_size: int = 256):
        self.name, self.fn, self.batch_size = name, fn, batch_size
        self.cache: dict = {}
        self._file: Optional[str] = None

    def attach_file(self, path: str) -> None:
        """Read earlier scores from ``path`` (JSONL of {"text", "score"}) and append new ones to it."""
        self._file = path
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                        self.cache[row["text"]] = float(row["score"])
                    except (ValueError, KeyError, TypeError):
                        break  # a torn last line of a killed run

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        todo = list(dict.fromkeys(t for t in texts if t not in self.cache))
        new = {}
        for i in range(0, len(todo), self.batch_size):
            part = todo[i:i + self.batch_size]
            try:
                vals = np.asarray(self.fn(part), dtype=np.float64).reshape(-1)
            except (TypeError, ValueError) as e:
                raise JaxeditError(f"scorer {self.name!r} returned something that is not a list of numbers ({e})") from None
            if vals.shape[0] != len(part):
                raise JaxeditError(f"scorer {self.name!r} returned {vals.shape[0]} scores for {len(part)} texts")
            bad = ~np.isfinite(vals) | (vals < 0) | (vals > 1)
            if bad.any():
                j = int(np.argmax(bad))
                raise JaxeditError(f"scorer {self.name!r} returned {vals[j]!r} for {part[j][:60]!r}: scores must be "
                                   f"in [0, 1]")
            new.update(zip(part, vals.tolist()))
        if new:
            self.cache.update(new)
            if self._file:
                with open(self._file, "a", encoding="utf-8") as f:
                    f.write("".join(json.dumps({"text": t, "score": s}) + "\n" for t, s in new.items()))
        return np.array([self.cache[t] for t in texts], np.float64)


def _profanity() -> Scorer:
    try:
        from profanity_check import predict_prob
    except ImportError:
        raise JaxeditError("the default scorer needs the alt-profanity-check package (pip install "
                           "alt-profanity-check)") from None
    return Scorer("profanity", lambda texts: predict_prob(list(texts)), batch_size=4096)


def _toxic_label(config, label: Optional[str]) -> int:
    names = {int(i): str(n) for i, n in (config.id2label or {}).items()}
    if label is not None:
        for i, n in names.items():
            if n == label or str(i) == label:
                return i
        raise JaxeditError(f"the classifier has no label {label!r} (labels: {', '.join(names.values())})")
    toxic = [i for i, n in names.items() if "toxic" in n.lower() and not n.lower().startswith(("non", "not"))]
    if len(toxic) == 1:
        return toxic[0]
    if len(names) <= 2:
        return max(names) if names else 0
    raise JaxeditError(f"cannot tell which of the labels {', '.join(names.values())} is the toxic one: name it as "
                       f"hf:PATH#LABEL")


def hf_scorer(path: str, label: Optional[str] = None, batch_size: int = 32, max_length: int = 512) -> Scorer:
    """A Hugging Face sequence-classification checkpoint as a scorer (torch; see the module docstring)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise JaxeditError(f"no classifier checkpoint at {path} (expected a folder with config.json)")
    try:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError:
        raise JaxeditError("Hugging Face classifier scorers need torch (pip install torch, or jaxedit[torch])") from None
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    idx = _toxic_label(model.config, label)
    multi = model.config.problem_type == "multi_label_classification" or model.config.num_labels == 1

    def score(texts):
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        enc = tok(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        with torch.no_grad():
            logits = model(**enc).logits.float()
        probs = torch.sigmoid(logits) if multi else torch.softmax(logits, -1)
        return probs[:, idx].numpy()

    return Scorer(f"hf:{os.path.abspath(path)}" + (f"#{label}" if label else ""), score, batch_size)


_SCORERS: dict = {}


def get_scorer(scorer=DEFAULT_SCORER) -> Scorer:
    """A :class:`Scorer` from a name, an ``hf:`` spec or path, a callable, or a Scorer (returned as is). Named
    scorers are built once per process, so their caches are shared."""
    if isinstance(scorer, Scorer):
        return scorer
    if callable(scorer):
        return Scorer(getattr(scorer, "__name__", "callable"), scorer)
    if not isinstance(scorer, str) or not scorer:
        raise JaxeditError(f"unknown scorer {scorer!r}")
    if scorer not in _SCORERS:
        if scorer == "profanity":
            _SCORERS[scorer] = _profanity()
        elif scorer.startswith("hf:") or os.path.isdir(scorer.partition("#")[0]):
            path, _, label = scorer[3:].partition("#") if scorer.startswith("hf:") else scorer.partition("#")
            _SCORERS[scorer] = hf_scorer(path, label or None)
        else:
            raise JaxeditError(f"unknown scorer {scorer!r} (use 'profanity', hf:PATH to a classifier folder, or a "
                               f"Python callable)")
    return _SCORERS[scorer]


def check_scorer(scorer) -> None:
    """Refuse a scorer spec that :func:`get_scorer` would refuse, without building the scorer (no classifier is
    loaded, torch is not imported)."""
    if isinstance(scorer, Scorer) or callable(scorer) or scorer in _SCORERS or scorer == "profanity":
        return
    if not isinstance(scorer, str) or not scorer:
        raise JaxeditError(f"unknown scorer {scorer!r}")
    if scorer.startswith("hf:") or os.path.isdir(scorer.partition("#")[0]):
        path = (scorer[3:] if scorer.startswith("hf:") else scorer).partition("#")[0]
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise JaxeditError(f"no classifier checkpoint at {path} (expected a folder with config.json)")
        return
    raise JaxeditError(f"unknown scorer {scorer!r} (use 'profanity', hf:PATH to a classifier folder, or a Python "
                       f"callable)")


def toxicity_scores(texts: Sequence[str], scorer=DEFAULT_SCORER) -> np.ndarray:
    """Toxicity of each text in [0, 1] (float64 array), with ``scorer`` a name, a path/spec or a callable."""
    return get_scorer(scorer)(list(texts))
