"""The standard knowledge-editing evaluation: CounterFact's and zsRE's metrics, as ROME's and MEMIT's evaluation
code defines them.

**CounterFact** (:func:`counterfact_eval`). A record asks to rewrite a fact (``requested_rewrite``: a ``prompt``
with ``{}`` for the ``subject``, the ``target_true`` it has and the ``target_new`` it should get, each ``{"str",
"id"}``) and brings test prompts: ``paraphrase_prompts`` (the same fact said differently), ``neighborhood_prompts``
(other subjects that share the true attribute; an edit should leave them alone) and ``generation_prompts``.

For a prompt and a target t, the score is the mean over t's tokens of -log p(token | everything before it), with t
after the prompt and a space ("lower is more likely"). Then per prompt:

* efficacy (the rewrite prompt, ``prompt.format(subject)``) and generalization (each paraphrase): success when
  NLL(new) < NLL(true); magnitude exp(-NLL(new)) - exp(-NLL(true));
* specificity (each neighborhood prompt): success when NLL(true) < NLL(new); magnitude exp(-NLL(true)) -
  exp(-NLL(new)).

A record's value is the mean over its prompts of that kind; the summary's is the mean over records (a record with
no prompt of a kind is left out of that mean). Shares and magnitudes are fractions (success shares in [0, 1],
probability differences in [-1, 1]); :func:`format_summary` prints them x100, as the papers' tables do.

With ``generation=True``, each generation prompt is continued by top-k sampling (k = 5) to ``max_out_len`` tokens
in all (prompt included, 100 by default); the texts (prompt included) give **fluency**: the n-gram entropy
(:func:`jaxedit.evaluate.metrics.ngram_entropy`, bits) averaged over a record's texts, then over records. Without
``generation`` the summary's ``fluency`` is None. With ``snippets`` (reference texts about each target, MEMIT's
``attribute_snippets.json`` or a dict), **consistency** is the cosine between the TF-IDF vectors of a record's
generations (joined) and of the snippets of its ``target_new`` (its ``relation_id`` and ``target_new.id``,
joined); the IDF comes from ``idf`` (MEMIT's ``idf.npy`` with ``tfidf_vocab.json``) or, without it, is fitted on
the snippets themselves. Without snippets the summary has no ``consistency`` key.

**zsRE** (:func:`zsre_eval`), MEMIT's ``zsre_mend_eval.json`` records: ``src`` (a question), ``rephrase``,
``answers`` (the first is the target MEMIT edits in; ``target="alt"`` takes ``alt`` instead), ``loc`` and
``loc_ans`` (an unrelated question and its answer). Token accuracy, teacher-forced: with the target's tokens after
the question, the share of positions where the model's argmax is the next target token. Efficacy: on ``src``;
generalization: on ``rephrase``; specificity: on ``loc`` + "?" followed by ``loc_ans``. Mean over a record's
tokens, then over records; fractions in [0, 1].

**Tokens.** A prompt is tokenized as the tokenizer does by default (with its BOS token where it adds one); the
target's tokens are those that follow the prompt's in the tokenization of ``prompt + " " + target`` (for GPT-2's
tokenizer these are the tokens of ``" " + target``, as MEMIT takes them). Where the joint text does not begin with
the prompt's tokens, the target is tokenized alone (``" " + target``, no special tokens). MEMIT tokenizes
``" " + target`` with the tokenizer's defaults, which for a tokenizer that adds BOS puts a BOS token into the
target; jaxedit never does. zsRE's accuracy is teacher-forced on token ids (MEMIT re-tokenizes the prompt plus the
decoded target prefix, which is the same text for usual words).

Every (prompt, target) row of a call is scored by jaxedit's batched forward with rows packed several to a row as
prefix trees (rows that begin alike share those tokens; each token attends only to its own row's earlier tokens, at
its own positions) and logits only at the target positions.
"""
from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from collections import Counter
from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.calls import public
from jaxedit.batching import batch_rows, batches, round_up, rows_within
from jaxedit.config import ModelConfig
from jaxedit.edit.stats import model_fingerprint
from jaxedit.errors import JaxeditError
from jaxedit.evaluate.metrics import ngram_entropy
from jaxedit.forward import apply
from jaxedit.generate import prompt_token_ids, sample
from jaxedit.model import params_of
from jaxedit import runtime
from jaxedit.runtime import default_memory_budget

DEMO_COUNTERFACT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                                "counterfact_demo.json")
CF_KEYS = ("efficacy", "generalization", "specificity")


# ---- reading ----

def _read_items(source, kind: str) -> list:
    """(where, record) pairs from a JSON array file, a JSONL file, a hub dataset name, or a list of dicts."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if kind == "CounterFact" and path == "demo":
            path = DEMO_COUNTERFACT
        if os.path.isdir(path):
            raise JaxeditError(f"{path} is a directory, not a {kind} JSON file")
        if not os.path.exists(path):
            hub_name = (not path.endswith((".json", ".jsonl")) and not os.path.isabs(path)
                        and not path.startswith(".") and path.count("/") <= 1)
            if not hub_name:
                raise JaxeditError(f"{path}: no such file")
            return _hub_items(path, kind)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise JaxeditError(f"{path}: not UTF-8 text ({e.reason})") from None
        if not text.strip():
            raise JaxeditError(f"{path}: empty file")
        if text.lstrip()[0] == "[":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise JaxeditError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
            return [(f"{path}: record {i}", d) for i, d in enumerate(data)]
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise JaxeditError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        return items
    if isinstance(source, dict):
        return [("record 0", source)]
    try:
        return [(f"record {i}", d) for i, d in enumerate(source)]
    except TypeError:
        raise JaxeditError(f"{kind} records must be a file path or a list of dicts, not "
                           f"{type(source).__name__}") from None


def _hub_items(name: str, kind: str) -> list:
    """Records of a dataset on the Hugging Face hub (its "train" split), through the ``datasets`` package."""
    try:
        import datasets
    except ImportError:
        raise JaxeditError(f"{name}: no such file, and reading it as a hub dataset needs the datasets package "
                           f"(pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # offline, unknown name, no access: one line
        msg = " ".join(str(e).split())[:200]
        raise JaxeditError(f"{name}: no such file, and the hub dataset could not be read "
                           f"({type(e).__name__}: {msg})") from None
    return [(f"{name}: record {i}", dict(d)) for i, d in enumerate(ds)]


def _str(d: dict, key: str, where: str, allow_empty: bool = False) -> str:
    if not isinstance(d, dict) or key not in d:
        raise JaxeditError(f"{where}: missing field \"{key}\"")
    v = d[key]
    if not isinstance(v, str) or not (allow_empty or v.strip()):
        raise JaxeditError(f"{where}: field \"{key}\" must be a non-empty string")
    return v


def _str_list(d: dict, key: str, where: str, required: bool = True) -> list:
    if key not in d:
        if required:
            raise JaxeditError(f"{where}: missing field \"{key}\"")
        return []
    v = d[key]
    if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
        raise JaxeditError(f"{where}: field \"{key}\" must be a list of non-empty strings")
    return v


def check_counterfact(d, where: str) -> dict:
    """``d`` checked as a CounterFact record (errors name ``where`` and the field); returns ``d``."""
    if not isinstance(d, dict):
        raise JaxeditError(f"{where}: a record must be a JSON object, not {type(d).__name__}")
    rr = d.get("requested_rewrite")
    if rr is None:
        raise JaxeditError(f"{where}: missing field \"requested_rewrite\"")
    if isinstance(rr, list) and len(rr) == 1:  # multi-CounterFact style: a list with one rewrite
        rr = rr[0]
    if not isinstance(rr, dict):
        raise JaxeditError(f"{where}: field \"requested_rewrite\" must be an object")
    w = f"{where} requested_rewrite"
    prompt = _str(rr, "prompt", w)
    if "{}" not in prompt:
        raise JaxeditError(f"{w}: field \"prompt\" must contain {{}} where the subject goes")
    _str(rr, "subject", w)
    for t in ("target_new", "target_true"):
        if not isinstance(rr.get(t), dict):
            raise JaxeditError(f"{w}: field \"{t}\" must be an object with \"str\"")
        _str(rr[t], "str", f"{w} {t}")
    _str_list(d, "paraphrase_prompts", where)
    _str_list(d, "neighborhood_prompts", where)
    _str_list(d, "generation_prompts", where, required=False)
    return d


def check_zsre(d, where: str) -> dict:
    """``d`` checked as a zsRE record (MEMIT's ``zsre_mend_eval.json`` fields); returns ``d``."""
    if not isinstance(d, dict):
        raise JaxeditError(f"{where}: a record must be a JSON object, not {type(d).__name__}")
    for k in ("src", "rephrase", "loc", "loc_ans"):
        _str(d, k, where)
    if "answers" not in d and "alt" not in d:
        raise JaxeditError(f"{where}: missing field \"answers\" (or \"alt\")")
    if "answers" in d:
        a = d["answers"]
        if not (isinstance(a, list) and a and all(isinstance(x, str) and x.strip() for x in a)):
            raise JaxeditError(f"{where}: field \"answers\" must be a non-empty list of non-empty strings")
    if "alt" in d:
        _str(d, "alt", where)
    if not isinstance(d.get("loc_suffix", "?"), str):
        raise JaxeditError(f"{where}: field \"loc_suffix\" must be a string")
    return d


def as_zsre(d) -> dict:
    """A record of a zsRE-like benchmark in zsRE's fields (``src``, ``rephrase``, ``answers``, ``loc``,
    ``loc_ans``), the original fields kept beside them: WikiBigEdit's (``update``, ``rephrase``, ``ans``, ``loc``,
    ``loc_ans``, ``subject``), UltraEditBench's (``prompt``, ``rephrase_prompt``, ``ans``, ``loc``, ``loc_ans``) and
    UltraEdit's zsRE files (``ans`` for ``answers``). The two benchmarks' locality prompts are used as written, as
    their loaders do (``loc_suffix: ""``; zsRE's own get "?" appended). Other records pass unchanged."""
    if not isinstance(d, dict) or "src" in d and "answers" in d:
        return d
    out = dict(d)
    if "src" not in d and "update" in d:  # WikiBigEdit
        out["src"] = d["update"]
        out.setdefault("loc_suffix", "")
    elif "src" not in d and "rephrase_prompt" in d:  # UltraEditBench
        out["src"], out["rephrase"] = d.get("prompt"), d["rephrase_prompt"]
        out.setdefault("loc_suffix", "")
    if "answers" not in d and isinstance(d.get("ans"), str):
        out["answers"] = [d["ans"]]
    return out


def load_counterfact(path) -> list:
    """CounterFact records (checked dicts, as given) from a JSON array file (``counterfact.json``), a JSONL file,
    ``"demo"`` (jaxedit's demo set), or a hub dataset name (needs ``datasets`` and the network). A malformed
    record is a :class:`JaxeditError` naming the file and the record's index (``FILE:LINE`` for JSONL)."""
    items = _read_items(path, "CounterFact")
    if not items:
        raise JaxeditError(f"{os.fspath(path) if isinstance(path, (str, os.PathLike)) else 'records'}: no records")
    return [check_counterfact(d, where) for where, d in items]


def load_zsre(path) -> list:
    """zsRE records (MEMIT's ``zsre_mend_eval.json`` format; checked dicts, as given) from a JSON array or JSONL
    file, or a hub dataset name. WikiBigEdit's and UltraEditBench's records are read too, mapped by
    :func:`as_zsre`. Errors as :func:`load_counterfact`'s."""
    items = _read_items(path, "zsRE")
    if not items:
        raise JaxeditError(f"{os.fspath(path) if isinstance(path, (str, os.PathLike)) else 'records'}: no records")
    return [check_zsre(as_zsre(d), where) for where, d in items]


def _records(records, kind):
    if kind == "CounterFact":
        if isinstance(records, (str, os.PathLike)):
            return load_counterfact(records)
        return [check_counterfact(d, w) for w, d in _read_items(records, kind)]
    if isinstance(records, (str, os.PathLike)):
        return load_zsre(records)
    return [check_zsre(as_zsre(d), w) for w, d in _read_items(records, kind)]


# ---- scoring rows ----

def prompt_target_ids(tokenizer, prompt: str, target: str) -> tuple:
    """(prompt ids, target ids): the prompt as the tokenizer tokenizes it by default; the target's tokens are those
    after the prompt's in ``prompt + " " + target`` (or ``" " + target`` alone when the joint tokenization does not
    begin with the prompt's tokens)."""
    p = list(tokenizer(prompt)["input_ids"])
    joint = list(tokenizer(prompt + " " + target)["input_ids"])
    if joint[:len(p)] == p and len(joint) > len(p):
        t = joint[len(p):]
    else:
        t = list(tokenizer(" " + target, add_special_tokens=False)["input_ids"])
    if not p:
        raise JaxeditError(f"prompt {prompt!r} has no tokens (and the tokenizer adds no BOS token)")
    if not t:
        raise JaxeditError(f"target {target!r} has no tokens")
    return p, t


@partial(jax.jit, static_argnames=("cfg",))
def _position_scores(cfg: ModelConfig, params, ids, mask, positions, targets):
    """Per row and k: -log p(targets[k] | ids[:positions[k]+1]) and whether targets[k] is the argmax there,
    [B, K] each; the logits only at those positions (the unembedding and softmax are a large part of a short
    row's cost)."""
    logits = apply(cfg, params, ids, mask, logit_positions=positions).logits.astype(jnp.float32)
    lp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(lp, targets[..., None], -1)[..., 0]
    hit = jnp.argmax(logits, -1) == targets
    return nll, hit


PACK = 128  # tokens per packed row of score_rows
TARGETS_PER_PACK = 32  # target-token slots per packed row of score_rows (a row with a longer target gets more)
# tokens per compiled call of score_rows on CPU: SmolLM2's forward took 0.181 s per 128 tokens in calls of 512-1,024
# tokens, 0.201 s in calls of 4,096 and 0.211 s in calls of 8,192 (2 cores; benchmarks/bench_eval.py)
CPU_TOKENS_PER_CALL = 1024


def pack_prefix_trees(seqs: Sequence[Sequence[int]], size: int, weights: Optional[Sequence[int]] = None,
                      max_weight: Optional[int] = None) -> list:
    """Token sequences packed into rows of at most ``size`` tokens, each row a forest of prefix trees: sequences
    sorted, then taken in order into the current row while the tokens it does not share with the sequence before it
    still fit (and, given ``weights`` and ``max_weight``, while the row's summed weights stay within ``max_weight``:
    score_rows bounds a row's target tokens this way). Returns ``[(tokens, parents, paths), ...]``: the row's
    tokens, each token's parent index in the row (-1 for a first token) and, per packed sequence (its index in
    ``seqs``), the row indices of its tokens."""
    out, cur = [], None
    prev = ()
    load = 0
    for i in sorted(range(len(seqs)), key=lambda i: tuple(seqs[i])):
        f = list(seqs[i])
        w = weights[i] if weights is not None else 0
        shared = 0
        if cur is not None:
            while shared < min(len(f), len(prev)) and f[shared] == prev[shared]:
                shared += 1
            if len(cur[0]) + len(f) - shared > size or (max_weight is not None and load + w > max_weight):
                cur, shared = None, 0
        if cur is None:
            cur = ([], [], {})
            out.append(cur)
            prev_path = []
            load = 0
        load += w
        tokens, parents, paths = cur
        path = prev_path[:shared]
        for x in f[shared:]:
            parents.append(path[-1] if path else -1)
            path.append(len(tokens))
            tokens.append(x)
        paths[i] = path
        prev, prev_path = f, path
    return out


def tree_mask(parents: Sequence[int], size: int) -> np.ndarray:
    """[size, size] bool: row j marks token j and its ancestors (what token j attends to)."""
    m = np.zeros((size, size), bool)
    for j, p in enumerate(parents):
        if p >= 0:
            m[j] = m[p]
        m[j, j] = True
    return m


def score_rows(model, rows: Sequence[tuple], *, bucket: int = 16, memory_budget: Optional[float] = None,
               pack: int = PACK, targets_per_pack: int = TARGETS_PER_PACK) -> list:
    """For each (prompt ids, target ids): (per-token NLL of the target after the prompt, per-token argmax hits),
    float64 / bool arrays. Equal rows are scored once (a stream's neighborhood facts recur). Rows are packed
    several to a row of ``pack`` tokens (``bucket``-rounded up to the longest row) as prefix trees: rows that begin
    with the same tokens share them, and each token attends only to its own row's earlier tokens, at its own
    positions (:func:`pack_prefix_trees`); a target's last token is not fed (it is only a label); logits are
    computed only at the target positions, at most ``targets_per_pack`` of them per packed row (more where one row's
    target is longer). One compiled program per (rows, targets per pack) shape."""
    unique = list(dict.fromkeys((tuple(p), tuple(t)) for p, t in rows))
    if len(unique) < len(rows):
        scored = dict(zip(unique, score_rows(model, unique, bucket=bucket, memory_budget=memory_budget, pack=pack,
                                             targets_per_pack=targets_per_pack)))
        return [scored[(tuple(p), tuple(t))] for p, t in rows]
    cfg = model.config
    params = params_of(model)
    budget = memory_budget or default_memory_budget()
    full = [list(p) + list(t) for p, t in rows]
    for (p, t), f in zip(rows, full):
        if len(p) == 0 or len(t) == 0:
            raise JaxeditError("every row needs at least one prompt token and one target token")
        if len(f) > cfg.max_positions:
            raise JaxeditError(f"a prompt with its target has {len(f)} tokens, more than the model's "
                               f"{cfg.max_positions} positions")
    if not rows:
        return []
    # a target's last token is only read as a label, never fed: each row is packed as prompt + target[:-1]
    fed = [f[:-1] for f in full]
    T = min(max(pack, round_up(max(map(len, fed)), bucket)), cfg.max_positions)
    n_targets = [len(t) for _, t in rows]
    # target positions per pack: at most max(targets per pack, the longest row's target) rounded up to a power of
    # two, so that calls with other records (a growing set of edits) mostly reuse the compiled programs; the LM head
    # runs at every slot, so a pack closes when its targets would pass that bound (packs of 128 tokens hold ~17
    # targets on average on the synthetic stream, up to 55 unbounded)
    K = 1 << (max(max(n_targets), min(targets_per_pack, sum(n_targets))) - 1).bit_length()
    packs = pack_prefix_trees(fed, T, weights=n_targets, max_weight=K)
    most = [rows_within(budget, (T * 8 * cfg.d_ff + T * T + K * 3 * cfg.vocab_size) * 4, power_of_two=True)]
    if jax.default_backend() == "cpu":  # smaller calls stay in the CPU's caches
        most.append(rows_within(CPU_TOKENS_PER_CALL, T, power_of_two=True))
    B = batch_rows(len(packs), *most)
    out, pending = [None] * len(rows), []
    for chunk in batches(packs, B):
        B = batch_rows(len(chunk), B)  # the last call no larger than it needs (another power of two)
        ids = np.zeros((B, T), np.int32)
        allowed = np.zeros((B, T, T), bool)
        allowed[:, np.arange(T), np.arange(T)] = True  # padding sees itself only
        positions = np.zeros((B, K), np.int32)  # the token before each target token (0 past the last)
        targets = np.zeros((B, K), np.int32)
        where = []  # (row, pack, first target slot)
        for b, (tokens, parents, paths) in enumerate(chunk):
            ids[b, :len(tokens)] = tokens
            allowed[b, :len(tokens), :len(tokens)] = tree_mask(parents, len(tokens))
            k = 0
            for i, path in paths.items():
                a, t = len(rows[i][0]), rows[i][1]
                positions[b, k:k + len(t)] = path[a - 1:a - 1 + len(t)]
                targets[b, k:k + len(t)] = t
                where.append((i, b, k))
                k += len(t)
        # dispatched without waiting: the next call's inputs are built while this one runs
        pending.append((where, _position_scores(cfg, params, jnp.asarray(ids), jnp.asarray(allowed),
                                                jnp.asarray(positions), jnp.asarray(targets))))
    for where, scores in pending:
        nll, hit = jax.device_get(scores)
        for i, b, k in where:
            n = len(rows[i][1])
            out[i] = (np.asarray(nll[b, k:k + n], np.float64), np.asarray(hit[b, k:k + n]))
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _need_tokenizer(tokenizer, what):
    if tokenizer is None:
        raise JaxeditError(f"{what} needs a tokenizer (jaxedit.load returns it with the model)")


# ---- generation metrics ----

def generate_texts(model, tokenizer, prompts: Sequence[str], *, max_out_len: int = 100, top_k: int = 5,
                   seed: int = 0) -> list:
    """MEMIT's generation for fluency and consistency: each prompt continued by top-k sampling until it holds
    ``max_out_len`` tokens in all; the decoded texts, prompt included (special tokens dropped, NFKD-normalized,
    blank lines joined by a space)."""
    if not prompts:
        return []
    ids = prompt_token_ids(tokenizer, prompts)
    shortest = min(len(i) for i in ids)
    if shortest >= max_out_len:
        raise JaxeditError(f"max_out_len {max_out_len} leaves no room after prompts of {shortest} tokens")
    # one sampling call for all prompts: each row draws as many tokens as the shortest prompt needs and keeps its
    # own share (a causal sampler's first n tokens do not depend on how many follow)
    # all prompts in one length bucket (left-padded): one compiled sampler per call
    new = sample(model, ids, max_out_len - shortest, top_k=top_k, seed=seed,
                 bucket=round_up(max(len(i) for i in ids), 8))
    texts = []
    for p, row in zip(ids, new):
        keep = max(max_out_len - len(p), 0)
        t = tokenizer.decode(p + row[0][:keep], skip_special_tokens=True)
        texts.append(unicodedata.normalize("NFKD", t).replace("\n\n", " "))
    return texts


# ---- generative scores ----

def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def generative_match(continuation: str, target: str) -> bool:
    """Whether a greedy continuation begins with the target's words: both sides with leading and trailing
    whitespace dropped, runs of whitespace made one space and case folded (``str.casefold``); the continuation
    must equal the target or continue it with a character that is not a letter or digit (" Paris," and " Paris"
    match "Paris"; " Parisian" does not)."""
    c, t = _norm(continuation), _norm(target)
    if not t or not c.startswith(t):
        return False
    return len(c) == len(t) or not c[len(t)].isalnum()


def greedy_continuations(model, prompts: Sequence[str], *, tokenizer, targets: Optional[Sequence[str]] = None,
                         new_tokens: Optional[int] = None, bucket: int = 8) -> list:
    """The greedy continuation (decoded text, prompt not included, cut at the end-of-sequence token) of each
    prompt, batched with the key/value-cached sampler; equal prompts are decoded once. ``new_tokens``: how many
    tokens to decode (default: one more than the longest target's tokens, ``" " + target``, rounded up to a power
    of two, so a growing set of records reuses the compiled programs)."""
    if not prompts:
        return []
    if new_tokens is None:
        if not targets:
            raise JaxeditError("greedy_continuations needs new_tokens or the targets")
        longest = max(len(tokenizer(" " + t, add_special_tokens=False)["input_ids"]) for t in targets)
        new_tokens = 1 << max(longest, 1).bit_length()
    unique = list(dict.fromkeys(prompts))
    ids = prompt_token_ids(tokenizer, unique)
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None
    with runtime.bar(len(unique), "greedy decoding", unit="prompt") as bar:
        new = sample(model, ids, new_tokens, greedy=True, stop_ids=stop, bucket=bucket, progress=bar.update)
    text = {p: tokenizer.decode(row[0], skip_special_tokens=True) for p, row in zip(unique, new)}
    return [text[p] for p in prompts]


_WORD = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token pattern (lowercased text)


def _terms(text: str) -> list:
    return _WORD.findall(text.lower())


class Tfidf:
    """TF-IDF vectors as scikit-learn's ``TfidfVectorizer`` (default settings) makes them: lowercased words of two
    or more word characters, raw counts x IDF, L2-normalized. ``vocab``: term -> column; ``idf``: one weight per
    column."""

    def __init__(self, vocab: dict, idf):
        self.vocab, self.idf = dict(vocab), np.asarray(idf, np.float64)
        if len(self.idf) < len(self.vocab):
            raise JaxeditError(f"IDF has {len(self.idf)} weights for a vocabulary of {len(self.vocab)} terms")

    @classmethod
    def fit(cls, documents: Sequence[str]) -> "Tfidf":
        """Smoothed IDF over ``documents``: ln((1 + n) / (1 + df)) + 1 (the vocabulary sorted, as scikit-learn's)."""
        df = Counter(t for d in documents for t in set(_terms(d)))
        vocab = {t: i for i, t in enumerate(sorted(df))}
        n = len(documents)
        idf = np.array([math.log((1 + n) / (1 + df[t])) + 1 for t in sorted(df)])
        return cls(vocab, idf)

    @classmethod
    def from_files(cls, where) -> "Tfidf":
        """From MEMIT's ``idf.npy`` and ``tfidf_vocab.json`` (a directory holding both, or a pair of paths)."""
        idf_path, vocab_path = ((os.path.join(where, "idf.npy"), os.path.join(where, "tfidf_vocab.json"))
                                if isinstance(where, (str, os.PathLike)) else where)
        for p in (idf_path, vocab_path):
            if not os.path.exists(p):
                raise JaxeditError(f"{p}: no such file (consistency's IDF needs idf.npy and tfidf_vocab.json)")
        with open(vocab_path, encoding="utf-8") as f:
            return cls(json.load(f), np.load(idf_path))

    def vector(self, text: str) -> np.ndarray:
        v = np.zeros(len(self.idf))
        for t, c in Counter(_terms(text)).items():
            j = self.vocab.get(t)
            if j is not None:
                v[j] += c
        v *= self.idf
        n = np.linalg.norm(v)
        return v / n if n > 0 else v

    def cosine(self, a: str, b: str) -> float:
        """Cosine of the two texts' vectors (0 when either has no known term)."""
        return float(self.vector(a) @ self.vector(b))


def read_snippets(snippets) -> dict:
    """{relation_id: {target_id: [texts]}} from MEMIT's ``attribute_snippets.json`` (a path, or its list of
    {"relation_id", "target_id", "samples": [{"name", "text"}]}) or a dict already in that nested form (texts or
    {"text"} objects)."""
    if isinstance(snippets, (str, os.PathLike)):
        path = os.fspath(snippets)
        if not os.path.exists(path):
            raise JaxeditError(f"{path}: no such file")
        try:
            with open(path, encoding="utf-8") as f:
                snippets = json.load(f)
        except json.JSONDecodeError as e:
            raise JaxeditError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    out: dict = {}
    text = lambda s: s["text"] if isinstance(s, dict) else s
    if isinstance(snippets, list):
        for i, el in enumerate(snippets):
            if not isinstance(el, dict) or not {"relation_id", "target_id", "samples"} <= set(el):
                raise JaxeditError(f"snippets entry {i}: needs \"relation_id\", \"target_id\" and \"samples\"")
            out.setdefault(str(el["relation_id"]), {}).setdefault(str(el["target_id"]), []).extend(
                text(s) for s in el["samples"])
    elif isinstance(snippets, dict):
        for rid, by_target in snippets.items():
            for tid, samples in by_target.items():
                out.setdefault(str(rid), {}).setdefault(str(tid), []).extend(text(s) for s in samples)
    else:
        raise JaxeditError(f"snippets must be a path, a list or a dict, not {type(snippets).__name__}")
    return out


# ---- CounterFact ----

@public("records", old=("tokenizer",))
def counterfact_eval(model, records, *, tokenizer=None, generation: bool = False, snippets=None, idf=None,
                     max_out_len: int = 100, seed: int = 0, bucket: int = 8, generative: bool = False) -> dict:
    """CounterFact's metrics (see the module docstring) of ``model`` on ``records`` (a list of dicts, or a path /
    name for :func:`load_counterfact`). Returns {"summary": {...}, "rows": [one dict per record]}.

    Summary: ``efficacy``, ``generalization``, ``specificity`` (success shares, fractions in [0, 1]), their
    ``*_magnitude`` (mean probability differences), ``score`` (their harmonic mean, MEMIT's), ``fluency`` (None
    unless ``generation``), ``consistency`` (only with ``snippets``), ``records``. A row holds the record's
    ``case_id``, the same values for the record, and the per-prompt scores: ``rewrite``, ``paraphrase``,
    ``neighborhood``, each a list of {"target_new": NLL, "target_true": NLL}; with generation its
    ``generations`` too.

    ``snippets``: reference texts for consistency (needs ``generation=True``); ``idf``: MEMIT's IDF files (a
    directory with ``idf.npy`` and ``tfidf_vocab.json``, or a (idf path, vocab path) pair, or a :class:`Tfidf`);
    without it the IDF is fitted on all snippet texts. ``max_out_len``/``seed``: generation's total length and
    random seed.

    ``generative=True`` adds the generative scores (greedy decoding from the prompt alone; a prompt succeeds when
    its continuation begins with the target, :func:`generative_match`): ``gen_efficacy`` and
    ``gen_generalization`` with ``target_new``, ``gen_specificity`` with ``target_true`` on the neighborhood
    prompts; rows get the same keys and ``continuations`` ({kind: [text per prompt]})."""
    _need_tokenizer(tokenizer, "counterfact_eval")
    recs = _records(records, "CounterFact")
    if not recs:
        raise JaxeditError("no CounterFact records")
    if snippets is not None and not generation:
        raise JaxeditError("consistency compares generations with the snippets: pass generation=True with snippets")
    kinds = ("rewrite", "paraphrase", "neighborhood")
    rows, owner = [], []
    for r, d in enumerate(recs):
        rr = d["requested_rewrite"][0] if isinstance(d["requested_rewrite"], list) else d["requested_rewrite"]
        prompts = {"rewrite": [rr["prompt"].format(rr["subject"])], "paraphrase": d["paraphrase_prompts"],
                   "neighborhood": d["neighborhood_prompts"]}
        for kind in kinds:
            for k, prompt in enumerate(prompts[kind]):
                for which in ("target_new", "target_true"):
                    rows.append(prompt_target_ids(tokenizer, prompt, rr[which]["str"]))
                    owner.append((r, kind, k, which))
    scores = score_rows(model, rows, bucket=bucket)
    per = [{kind: {} for kind in kinds} for _ in recs]
    for (r, kind, k, which), (nll, _) in zip(owner, scores):
        per[r][kind].setdefault(k, {})[which] = float(nll.mean())
    out_rows = []
    for r, d in enumerate(recs):
        row = {"case_id": d.get("case_id", r)}
        for kind, key in zip(kinds, CF_KEYS):
            pairs = [per[r][kind][k] for k in sorted(per[r][kind])]
            row[kind] = pairs
            sign = -1 if kind == "neighborhood" else 1
            row[key] = _mean([float(sign * (p["target_true"] - p["target_new"]) > 0) for p in pairs])
            row[key + "_magnitude"] = _mean([sign * (math.exp(-p["target_new"]) - math.exp(-p["target_true"]))
                                             for p in pairs])
        out_rows.append(row)
    summary = {k: _mean([row[k] for row in out_rows]) for k in CF_KEYS}
    summary.update({k + "_magnitude": _mean([row[k + "_magnitude"] for row in out_rows]) for k in CF_KEYS})
    parts = [summary[k] for k in CF_KEYS]
    summary["score"] = (None if any(p is None for p in parts) else
                        0.0 if min(parts) <= 0 else len(parts) / sum(1 / p for p in parts))
    if generative:
        gen = []  # (record, kind, prompt, target)
        for r, d in enumerate(recs):
            rr = d["requested_rewrite"][0] if isinstance(d["requested_rewrite"], list) else d["requested_rewrite"]
            gen.append((r, "rewrite", rr["prompt"].format(rr["subject"]), rr["target_new"]["str"]))
            gen += [(r, "paraphrase", p, rr["target_new"]["str"]) for p in d["paraphrase_prompts"]]
            gen += [(r, "neighborhood", p, rr["target_true"]["str"]) for p in d["neighborhood_prompts"]]
        _generative(model, tokenizer, gen, out_rows, summary)
    summary["fluency"] = None
    if snippets is not None:  # every record's references, before the generation
        snips = read_snippets(snippets)
        refs = []
        for r, d in enumerate(recs):
            rr = d["requested_rewrite"][0] if isinstance(d["requested_rewrite"], list) else d["requested_rewrite"]
            rid, tid = rr.get("relation_id"), rr["target_new"].get("id")
            refs.append(snips.get(str(rid), {}).get(str(tid), []))
            if not refs[-1]:
                raise JaxeditError(f"record {r} (case_id {out_rows[r]['case_id']}): no snippets for relation "
                                   f"{rid!r} and target_new id {tid!r}")
    if generation:
        prompts = [(r, p) for r, d in enumerate(recs) for p in d.get("generation_prompts", [])]
        texts = generate_texts(model, tokenizer, [p for _, p in prompts], max_out_len=max_out_len, seed=seed)
        for row in out_rows:
            row["generations"] = []
        for (r, _), t in zip(prompts, texts):
            out_rows[r]["generations"].append(t)
        for row in out_rows:
            row["fluency"] = _mean([ngram_entropy(t) for t in row["generations"]])
        summary["fluency"] = _mean([row["fluency"] for row in out_rows])
        if snippets is not None:
            vec = (idf if isinstance(idf, Tfidf) else Tfidf.from_files(idf) if idf is not None else
                   Tfidf.fit([t for by_t in snips.values() for texts in by_t.values() for t in texts]))
            for row, ref in zip(out_rows, refs):
                row["consistency"] = (vec.cosine(" ".join(row["generations"]), " ".join(ref))
                                      if row["generations"] else None)
            summary["consistency"] = _mean([row["consistency"] for row in out_rows])
    summary["records"] = len(out_rows)
    return {"summary": summary, "rows": out_rows}


# ---- zsRE ----

@public("records", old=("tokenizer",))
def zsre_eval(model, records, *, tokenizer=None, target: str = "answers", bucket: int = 8,
              generative: bool = False) -> dict:
    """zsRE's metrics (see the module docstring) of ``model`` on ``records`` (a list of dicts, or a path / name for
    :func:`load_zsre`). Returns {"summary": {"efficacy", "generalization", "specificity", "records"}, "rows": [...]}
    with fractions in [0, 1]; a row holds the record's three accuracies and, per kind (``rewrite``,
    ``paraphrase``, ``neighborhood``), the 0/1 hit of each target token. ``target``: "answers" (the first answer,
    as MEMIT's evaluation edits) or "alt". The locality prompt is ``loc`` + "?" (MEMIT's), or ``loc`` +
    ``loc_suffix`` where a record has one. ``generative=True`` adds ``gen_efficacy``, ``gen_generalization``,
    ``gen_specificity`` (greedy continuation begins with the target; see :func:`counterfact_eval`)."""
    _need_tokenizer(tokenizer, "zsre_eval")
    if target not in ("answers", "alt"):
        raise JaxeditError(f"target must be \"answers\" or \"alt\" (got {target!r})")
    recs = _records(records, "zsRE")
    if not recs:
        raise JaxeditError("no zsRE records")
    rows = []
    for r, d in enumerate(recs):
        if target not in d:
            raise JaxeditError(f"record {r}: missing field \"{target}\" (the target)")
        new = d["answers"][0] if target == "answers" else d["alt"]
        rows += [prompt_target_ids(tokenizer, d["src"], new), prompt_target_ids(tokenizer, d["rephrase"], new),
                 prompt_target_ids(tokenizer, d["loc"] + d.get("loc_suffix", "?"), d["loc_ans"])]
    scores = score_rows(model, rows, bucket=bucket)
    out_rows = []
    for r, d in enumerate(recs):
        row = {"case_id": d.get("case_id", r)}
        for j, (kind, key) in enumerate(zip(("rewrite", "paraphrase", "neighborhood"), CF_KEYS)):
            hits = scores[3 * r + j][1]
            row[kind] = [int(h) for h in hits]
            row[key] = float(np.mean(hits))
        out_rows.append(row)
    summary = {k: _mean([row[k] for row in out_rows]) for k in CF_KEYS}
    if generative:
        gen = []
        for r, d in enumerate(recs):
            new = d["answers"][0] if target == "answers" else d["alt"]
            gen += [(r, "rewrite", d["src"], new), (r, "paraphrase", d["rephrase"], new),
                    (r, "neighborhood", d["loc"] + d.get("loc_suffix", "?"), d["loc_ans"])]
        _generative(model, tokenizer, gen, out_rows, summary)
    summary["records"] = len(out_rows)
    return {"summary": summary, "rows": out_rows}


GEN_KEYS = ("gen_efficacy", "gen_generalization", "gen_specificity")


def _generative(model, tokenizer, gen, out_rows, summary):
    """Greedy continuations of every (record, kind, prompt, target) of ``gen``; per record and kind the share of
    prompts whose continuation begins with the target (rows and summary, ``gen_*`` keys)."""
    runtime.stage(f"generative scores: greedy continuations of {len(set(g[2] for g in gen))} prompts")
    conts = greedy_continuations(model, [g[2] for g in gen], tokenizer=tokenizer, targets=[g[3] for g in gen])
    kinds = ("rewrite", "paraphrase", "neighborhood")
    for row in out_rows:
        row["continuations"] = {k: [] for k in kinds}
        hits = {k: [] for k in kinds}
        row["_hits"] = hits
    for (r, kind, _, t), c in zip(gen, conts):
        out_rows[r]["continuations"][kind].append(c)
        out_rows[r]["_hits"][kind].append(float(generative_match(c, t)))
    for row in out_rows:
        hits = row.pop("_hits")
        for kind, key in zip(kinds, GEN_KEYS):
            row[key] = _mean(hits[kind])
    summary.update({k: _mean([row[k] for row in out_rows]) for k in GEN_KEYS})


# ---- how a result was taken ----

METRIC_DEFINITIONS = {
    "counterfact": {
        "efficacy": "teacher-forced: share of rewrite prompts where NLL(target_new) < NLL(target_true) (mean "
                    "per-token NLL of the target after the prompt and a space)",
        "generalization": "teacher-forced: the same on each paraphrase prompt, mean per record",
        "specificity": "teacher-forced: share of neighborhood prompts where NLL(target_true) < NLL(target_new)",
    },
    "zsre": {
        "efficacy": "teacher-forced token accuracy of answers[0] after src (argmax = next target token, the "
                    "target's earlier tokens fed), mean per record",
        "generalization": "teacher-forced token accuracy of answers[0] after rephrase",
        "specificity": "teacher-forced token accuracy of loc_ans after loc + '?' (or loc + loc_suffix)",
    },
    "generative": {
        "gen_efficacy": "greedy decoding from the edit prompt alone; success when the continuation begins with "
                        "the new target (whitespace runs collapsed, case folded, a word boundary after it)",
        "gen_generalization": "the same on the paraphrase prompts (rephrase), mean per record",
        "gen_specificity": "the same on the neighborhood prompts with their true answers",
    },
}
EVALUATED = {"turn": "after each turn, on that turn's edits",
             "stream": "after the turns so far, on all edits so far (the first `evaluated_records` of the stream)"}


def stream_fingerprint(records) -> str:
    """A short hash of the records (their JSON, keys sorted): two results with the same fingerprint were taken on
    the same stream."""
    import hashlib

    return hashlib.sha256(json.dumps(list(records), sort_keys=True, default=str).encode()).hexdigest()[:16]


@public("records")
def protocol_record(model, records, *, kind: str, edits_per_turn: Optional[int] = None, evaluated: str = "stream",
                    evaluated_records: Optional[int] = None, edits_so_far: Optional[int] = None,
                    generative: bool = False, source: Optional[str] = None, model_name: Optional[str] = None,
                    method: Optional[str] = None) -> dict:
    """What a result was taken on and how: ``kind`` ("counterfact" / "zsre"; "requests" for plain edit requests),
    the edits per turn, when it was evaluated (``evaluated``: "turn", after each turn on that turn's edits,
    "stream", on all edits so far, or None: not evaluated), the
    metric definitions (teacher-forced, and generative with ``generative``), the evaluated model's fingerprint
    (``model``; None for none) and the stream's (``records``: the whole stream). JSON-ready."""
    if kind not in ("counterfact", "zsre", "requests"):
        raise JaxeditError(f"kind must be \"counterfact\", \"zsre\" or \"requests\" (got {kind!r})")
    if evaluated is not None and evaluated not in EVALUATED:
        raise JaxeditError(f"evaluated must be one of {sorted(EVALUATED)} or None (got {evaluated!r})")
    records = list(records or [])
    fp = None
    if model is not None:
        fp = model_fingerprint(model)
    metrics = dict(METRIC_DEFINITIONS.get(kind, {})) if evaluated is not None else {}
    if generative and evaluated is not None:
        metrics.update(METRIC_DEFINITIONS["generative"])
    return {"benchmark": kind, "method": method, "edits_per_turn": edits_per_turn, "edits_so_far": edits_so_far,
            "evaluated": evaluated, "evaluated_when": EVALUATED.get(evaluated, "not evaluated"),
            "evaluated_records": 0 if evaluated is None else len(records) if evaluated_records is None
            else evaluated_records,
            "metrics": metrics, "teacher_forced": evaluated is not None,
            "generative": bool(generative) and evaluated is not None,
            "model": {"name": model_name, "fingerprint": fp,
                      "config": None if model is None else {"family": model.config.family,
                                                            "layers": model.config.n_layers,
                                                            "d_model": model.config.d_model}},
            "stream": {"source": source, "records": len(records), "fingerprint": stream_fingerprint(records)}}


# ---- tables ----

def format_summary(summary: dict, title: Optional[str] = None) -> str:
    """The summary as a one-row table, every value x100 as the papers print them (fluency too: 6.2 bits shows as
    620)."""
    keys = [k for k in ("efficacy", "generalization", "specificity", "efficacy_magnitude",
                        "generalization_magnitude", "specificity_magnitude", "score", "fluency", "consistency",
                        *GEN_KEYS)
            if summary.get(k) is not None]
    names = {"efficacy_magnitude": "eff. mag.", "generalization_magnitude": "gen. mag.",
             "specificity_magnitude": "spec. mag.", "gen_efficacy": "gen. eff.", "gen_generalization": "gen. gen.",
             "gen_specificity": "gen. spec."}
    head = [names.get(k, k) for k in keys]
    vals = [f"{100 * summary[k]:.1f}" for k in keys]
    width = [max(len(h), len(v)) for h, v in zip(head, vals)]
    lines = ([title] if title else []) + [
        "  ".join(h.rjust(w) for h, w in zip(head, width)),
        "  ".join(v.rjust(w) for v, w in zip(vals, width))]
    return "\n".join(lines)
