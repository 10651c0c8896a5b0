"""Prompts for the toxic-memory study and the texts shipped with jaxedit.

:func:`read_prompts` reads

* a JSONL file: RealToxicityPrompts' own lines (``{"prompt": {"text": ..., "toxicity": ...}, ...}``) or plain
  ``{"prompt": "..."}`` lines (an optional ``"toxicity"`` beside it is kept as the dataset's score);
* ``"demo"``: the demo openings written for jaxedit (``jaxedit/data/demo_prompts.jsonl``: innocuous-looking
  sentence openings of the kind that draw rude continuations from small models; mild, no slurs);
* a ``datasets`` name such as ``allenai/real-toxicity-prompts`` (train split; needs ``pip install datasets`` and
  the network or a local datasets cache).

Every prompt keeps its 1-based line number (its row number for a dataset), which names it in every later file.
"""
from __future__ import annotations

import os
from typing import Optional

from jaxedit.errors import JaxeditError
from jaxedit.locate.trace_files import read_jsonl
from jaxedit.request_files import RequestFile

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
DEMO_PROMPTS = os.path.join(DATA_DIR, "demo_prompts.jsonl")
NEUTRAL_TEXT = os.path.join(DATA_DIR, "neutral.txt")
FACTS = os.path.join(DATA_DIR, "facts.jsonl")


def prompt_of(obj: dict) -> tuple:
    """(prompt text, the dataset's toxicity or None) of one JSONL object or dataset row."""
    p = obj.get("prompt")
    tox = obj.get("toxicity")
    if isinstance(p, dict):  # RealToxicityPrompts
        tox = p.get("toxicity", tox)
        p = p.get("text")
    if not isinstance(p, str) or not p.strip():
        raise JaxeditError("expected \"prompt\" as a non-empty string or as {\"text\": ...}")
    if tox is not None and not isinstance(tox, (int, float)):
        tox = None
    return p, tox


def read_prompts(source: str, limit: Optional[int] = None, skip_bad: bool = False) -> list:
    """[{"line", "prompt", "dataset_toxicity"}] from a JSONL file, "demo", or a datasets name. A bad line is an
    error naming FILE:LINE, or with ``skip_bad`` left out."""
    if limit is not None and limit < 1:
        raise JaxeditError(f"limit must be >= 1 (got {limit})")
    if source == "demo":
        source = DEMO_PROMPTS
    out = []
    if os.path.exists(source) or source.endswith((".jsonl", ".json")):
        rf = RequestFile(source, "prompts", skip_bad=skip_bad)
        for no, (p, tox) in rf.check(prompt_of):
            out.append({"line": no, "prompt": p, "dataset_toxicity": tox})
        return out[:limit] if limit else out
    try:
        import datasets
    except ImportError:
        raise JaxeditError(f"{source!r} is neither a file nor 'demo'; as a datasets name it needs the datasets "
                           f"package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(source, split="train", streaming=True)
        for i, row in enumerate(ds, 1):
            try:
                p, tox = prompt_of(row)
            except JaxeditError as e:
                if skip_bad:
                    continue
                raise JaxeditError(f"{source} row {i}: {e}") from None
            out.append({"line": i, "prompt": p, "dataset_toxicity": tox})
            if limit and len(out) >= limit:
                break
    except JaxeditError:
        raise
    except Exception as e:  # offline, unknown name, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise JaxeditError(f"cannot read the dataset {source!r} ({msg}); give a local JSONL file, or 'demo'") from None
    if not out:
        raise JaxeditError(f"{source}: no prompts")
    return out


def read_texts(source: str) -> list:
    """Neutral texts for perplexity: a .txt file (one text per paragraph/non-empty line) or "neutral"."""
    if source == "neutral":
        source = NEUTRAL_TEXT
    try:
        with open(source, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise JaxeditError(f"cannot read {source}: {e.strerror}") from None
    if not texts:
        raise JaxeditError(f"{source}: no text")
    return texts


def read_facts(source: str) -> list:
    """Factual prompts (JSONL with "prompt"), "facts" for the shipped set, or "" for none."""
    if not source:
        return []
    if source == "facts":
        source = FACTS
    out = []
    for no, obj in read_jsonl(source, "prompts"):
        if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise JaxeditError(f"{source}:{no}: expected a \"prompt\" string")
        out.append(obj["prompt"])
    return out
