"""Key covariance statistics for MEMIT: C_l = E[k k^T] (uncentered) of the MLP output projection's input at layer l,
over every non-pad token of a text corpus.

All requested layers are accumulated in **one pass** over the corpus; the forward stops at the last requested layer.
Sums accumulate in float32 on the device (``precision="float64"``: each batch's float32 sum is added into a float64
host accumulator). Results are cached on disk, one file per layer, keyed by the model's fingerprint, the code that
computes them (:func:`stats_fingerprint`), the corpus, the sample count, the truncation length and the precision;
a run saves its partial sums every ``save_every`` batches and a killed run resumes from there.

Corpora (``corpus=``):

* a local ``.txt`` file (one text per non-empty line), ``.jsonl`` file (a ``"text"`` field per line), or a folder of
  those;
* ``"model"``: text sampled from the model itself (the fallback when no corpus is reachable; seeded);
* anything else is a Hugging Face ``datasets`` name, ``"name"`` or ``"name:config"`` (e.g. ``"wikitext:wikitext-103-raw-v1"``),
  ``"text"`` field of the train split (needs ``pip install datasets`` and network access or a local datasets cache).
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import re
import time
from functools import partial
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxedit import runtime
from jaxedit.calls import STATS_ALIASES, check_names, public
from jaxedit.batching import pad_rows, round_up
from jaxedit.cache import cache_dir as default_cache_dir, code_fingerprint
from jaxedit.config import ModelConfig
from jaxedit.errors import JaxeditError
from jaxedit.forward import block, causal_allowed, embed, positions_from_mask, scan_layers
from jaxedit.generate import generate_ids
from jaxedit.layer_selection import check_layers
from jaxedit.model import params_of
from jaxedit.sharding import (data_size, global_max, global_sum, is_main_process, local_rows, mesh_of, padded,
                              put_batch, sync, to_host)

DEFAULT_CORPUS = "wikitext:wikitext-103-raw-v1"
MODEL_CORPUS = "model"
SAMPLE_STARTERS = ("The", "In", "A", "It", "This", "When", "One", "After", "There", "He", "She", "We", "They",
                   "Many", "Some", "On")
PRECISIONS = ("float32", "float64")
# The modules whose code decides the statistics' values: the corpus readers and the pass (this module), the forward
# it runs (and the model families' blocks), the model's own samples (the offline corpus), the cross-device sums,
# the padding of a batch's rows (jaxedit.batching: which positions the mask counts); and the distributions they
# compute or tokenize with. tests/test_stats.py checks that every jaxedit module these
# import is listed here or named there as not taking part.
STATS_MODULES = ("jaxedit.edit.stats", "jaxedit.forward", "jaxedit.models", "jaxedit.models.common",
                 "jaxedit.models.llama", "jaxedit.models.gpt2", "jaxedit.generate", "jaxedit.config",
                 "jaxedit.sharding", "jaxedit.model", "jaxedit.batching")
STATS_DEPENDENCIES = ("jax", "jaxlib", "numpy", "tokenizers", "transformers", "datasets")


# ---- corpora ----

def _local_files(path: str) -> list:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.txt")) + glob.glob(os.path.join(path, "*.jsonl")))
        if not files:
            raise JaxeditError(f"corpus folder {path} holds no .txt or .jsonl file")
        return files
    return [path]


def _file_texts(files: Sequence[str]) -> Iterator[str]:
    for fn in files:
        with open(fn, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                if fn.endswith(".jsonl"):
                    try:
                        text = json.loads(line)["text"]
                    except (ValueError, KeyError, TypeError):
                        raise JaxeditError(f"{fn}:{i}: expected a JSON object with a \"text\" field") from None
                    if text and text.strip():
                        yield text
                else:
                    yield line


def _dataset_texts(name: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise JaxeditError(f"corpus {name!r} is a datasets name, and the datasets package is not installed "
                           f"(pip install datasets); or use a local .txt/.jsonl corpus, or the corpus \"model\" "
                           f"(text sampled from the model; works offline; on the command line: --corpus model)"
                           ) from None
    ds_name, _, ds_config = name.partition(":")
    try:
        ds = datasets.load_dataset(ds_name, ds_config or None, split="train", streaming=True)
        it = iter(ds)
        first = next(it)
    except Exception as e:  # network, unknown name, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise JaxeditError(f"cannot reach corpus {name!r} ({msg}); use a local .txt/.jsonl corpus, or the corpus "
                           f"\"model\" (text sampled from the model itself; works offline; on the command line: "
                           f"--corpus model)") from None
    for row in _chain(first, it):
        text = row.get("text")
        if text and text.strip():
            yield text


def _chain(first, it):
    yield first
    yield from it


def corpus_key(corpus: str, seed: int, batch_size: int) -> str:
    """A short name for the corpus, part of the cache key (local files: path, size and mtime; model samples: the
    seed and the batch size, which together fix the samples)."""
    if corpus == MODEL_CORPUS:
        return f"model-samples-seed{seed}-b{batch_size}"
    if os.path.exists(corpus):
        h = hashlib.sha1()
        for fn in _local_files(corpus):
            st = os.stat(fn)
            h.update(f"{os.path.abspath(fn)}|{st.st_size}|{st.st_mtime_ns}".encode())
        return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', os.path.basename(os.path.abspath(corpus)))}-{h.hexdigest()[:12]}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", corpus)


def token_batches(model, tokenizer, corpus: str, n_samples: int, max_len: int, batch_size: int, seed: int = 0,
                  skip: int = 0, rows=None) -> Iterator[list]:
    """Lists of at most ``batch_size`` token-id lists (each truncated to ``max_len``), ``n_samples`` texts in all,
    after skipping the first ``skip`` texts. ``rows``: tokenize only the texts at these positions of each batch
    (the others are empty lists: another process's share of a batch)."""
    if corpus == MODEL_CORPUS:
        starters = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in SAMPLE_STARTERS]
        for b, start in enumerate(range(0, n_samples, batch_size)):
            n = min(batch_size, n_samples - start)
            if start + n <= skip:
                continue
            prompts = [starters[(start + i) % len(starters)] for i in range(n)]
            ids = generate_ids(model, prompts, max_len - max(len(p) for p in prompts), top_k=40, seed=seed + b)
            yield [x[:max_len] for x in ids][max(0, skip - start):]
        return
    if os.path.exists(corpus):
        texts = _file_texts(_local_files(corpus))
    elif corpus.endswith((".txt", ".jsonl")):
        raise JaxeditError(f"no such corpus file or folder: {corpus}")
    else:
        texts = _dataset_texts(corpus)
    batch, seen = [], 0
    for text in texts:
        if seen >= n_samples:
            break
        seen += 1
        if seen <= skip:
            continue
        mine = rows is None or len(batch) in rows
        batch.append(tokenizer(text, add_special_tokens=False)["input_ids"][:max_len] if mine else [])
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---- the pass ----

@partial(jax.jit, static_argnames=("cfg", "layers"), donate_argnums=(4,))
def accumulate(cfg: ModelConfig, params, ids, mask, acc, *, layers: tuple):
    """acc [len(layers), d_ff, d_ff] + the sum over non-pad tokens of k k^T at each of ``layers`` (sorted);
    the forward stops after the last of them. With ids/mask [D, B, T] and acc [D, len(layers), d_ff, d_ff] (the
    mesh layout: D = the data axis), each of the D parts adds to its own partial sum; sum them over D at the end."""
    if ids.ndim == 3:
        return jax.vmap(lambda i, m, a: _accumulate(cfg, params, i, m, a, layers))(ids, mask, acc)
    return _accumulate(cfg, params, ids, mask, acc, layers)


def _accumulate(cfg: ModelConfig, params, ids, mask, acc, layers: tuple):
    stop = layers[-1] + 1
    slot = np.full(stop, -1, np.int32)
    slot[list(layers)] = np.arange(len(layers))
    positions, allowed = positions_from_mask(mask), causal_allowed(mask)
    x = embed(cfg, params, ids, positions)
    w = mask.astype(jnp.float32)[..., None]

    def step(carry, xs):
        x, acc = carry
        pl, s = xs
        x, parts = block(cfg, pl, x, positions, allowed)

        def add(acc):
            k = parts["keys"].astype(jnp.float32) * w
            return acc.at[s].add(jnp.einsum("btf,btg->fg", k, k, precision=jax.lax.Precision.HIGHEST))

        return (x, jax.lax.cond(s >= 0, add, lambda a: a, acc)), None

    (_, acc), _ = scan_layers(step, (x, acc), params["blocks"], stop=stop, xs=jnp.asarray(slot))
    return acc


@jax.jit
def _strided_sample(leaf):
    """Every 997th element of the flattened ``leaf``, gathered by index (no reshape: a sharded parameter stays
    sharded; only the sample is reduced across devices)."""
    idx = np.unravel_index(np.arange(0, leaf.size, 997), leaf.shape)
    return leaf[tuple(jnp.asarray(i) for i in idx)]


@functools.lru_cache(maxsize=None)
def stats_fingerprint() -> str:
    """A hash of :data:`STATS_MODULES`' source and :data:`STATS_DEPENDENCIES`' versions: part of the cache key, so
    statistics computed by other code (an older jaxedit, another jax) are computed again, not served."""
    return code_fingerprint(STATS_MODULES, STATS_DEPENDENCIES)


def model_fingerprint(model) -> str:
    """A short hash of the config and a strided sample of every parameter (cheap; changes when weights change)."""
    h = hashlib.sha1(model.config.to_json().encode())
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params_of(model)), key=lambda kv: str(kv[0])):
        h.update(str(path).encode())
        h.update(np.asarray(to_host(_strided_sample(leaf)), np.float32).tobytes())
    return h.hexdigest()[:16]


def _atomic_savez(path: str, **arrays) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


class Stats(dict):
    """{layer: C_l}, with ``.source``: the corpus, sample count, truncation length and precision they come from."""
    source: dict = {}


_TAG = re.compile(r"layer(\d+)-n(\d+)-t(\d+)-(float32|float64)\.npz$")


def cached_elsewhere(model_root: str, layers: Sequence[int], precision: str, exclude: str = ""):
    """Statistics cached for this model from another corpus, holding every one of ``layers`` at ``precision``:
    ``(corpus_key, n_samples, max_len)`` with the most texts (then the longest texts), or None."""
    best = None
    if not os.path.isdir(model_root):
        return None
    for key in sorted(os.listdir(model_root)):
        d = os.path.join(model_root, key)
        if key == exclude or not os.path.isdir(d):
            continue
        have = {}
        for fn in os.listdir(d):
            m = _TAG.match(fn)
            if m and m.group(4) == precision:
                have.setdefault((int(m.group(2)), int(m.group(3))), set()).add(int(m.group(1)))
        for (n, t), ls in have.items():
            if set(layers) <= ls and (best is None or (n, t) > best[1:]):
                best = (key, n, t)
    return best


@public("layers")
def layer_stats(model, layers: Sequence[int], *, tokenizer=None, corpus: str = DEFAULT_CORPUS,
                stats_samples: int = 100_000, max_len: Optional[int] = None, batch_size: int = 8,
                precision: str = "float32", seed: int = 0, cache_dir: Optional[str] = None, save_every: int = 50,
                save_seconds: float = 60.0, progress: bool = True, **aliases) -> dict:
    """{layer: C_l [d_ff, d_ff] (numpy, ``precision``)} for the requested layers, from cache where present; the
    missing layers are computed together in one pass over ``stats_samples`` texts of ``corpus`` truncated to
    ``max_len`` tokens (default: the model's context, at most 1024). Partial sums are saved every ``save_every``
    batches or ``save_seconds``, whichever comes first; a killed run resumes from them. The names are those of
    ``jaxedit.memit``'s hyperparameters and of the command line (``--corpus --stats-samples --max-len``); the
    MEMIT paper's ``mom2_corpus``, ``mom2_samples``, ``mom2_max_len`` (and ``n_samples``) are accepted as aliases.

    When ``corpus`` is the default (:data:`DEFAULT_CORPUS`) and cannot be read (no ``datasets`` package, no
    network), statistics cached earlier for the same model and layers from another corpus are used instead, with a
    status line saying which (the returned :class:`Stats`' ``.source`` records it); with none cached, the error
    says how to use a local corpus or the model's own samples."""
    if aliases:
        given = dict(corpus=corpus, stats_samples=stats_samples, max_len=max_len, precision=precision)
        for k, v in check_names(aliases, ["corpus", "stats_samples", "max_len", "stats_precision"], STATS_ALIASES,
                                what="argument").items():
            given["precision" if k == "stats_precision" else k] = v
        corpus, stats_samples, max_len, precision = (given[k] for k in ("corpus", "stats_samples", "max_len",
                                                                        "precision"))
    if tokenizer is None:
        raise JaxeditError("layer_stats needs tokenizer= (the model's tokenizer, from jaxedit.load)")
    n_samples = stats_samples
    cfg = model.config
    layers = check_layers(cfg.n_layers, layers)
    if precision not in PRECISIONS:
        raise JaxeditError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    if n_samples < 1 or batch_size < 1:
        raise JaxeditError("stats_samples and batch_size must be >= 1")
    max_len = min(cfg.max_positions, 1024) if max_len is None else int(max_len)
    if not 2 <= max_len <= cfg.max_positions:
        raise JaxeditError(f"the truncation length (max_len, --max-len) must be within 2..{cfg.max_positions} "
                           f"(got {max_len})")

    model_root = os.path.join(cache_dir or os.path.join(default_cache_dir(), "stats"),
                              f"{model_fingerprint(model)}-{stats_fingerprint()[:12]}")
    root = os.path.join(model_root, corpus_key(corpus, seed, batch_size))
    tag = f"n{n_samples}-t{max_len}-{precision}"
    path_of = {l: os.path.join(root, f"layer{l}-{tag}.npz") for l in layers}
    out = Stats({l: np.load(path_of[l])["mom2"] for l in layers if os.path.isfile(path_of[l])})
    out.source = {"corpus": corpus, "samples": n_samples, "max_len": max_len, "precision": precision}
    todo = tuple(l for l in layers if l not in out)
    if not todo:
        runtime.stage(f"key statistics of layers {list(layers)}: cached ({corpus}, {n_samples} texts)")
        return out
    partial_path = os.path.join(root, f"partial-{'_'.join(map(str, todo))}-{tag}.npz")
    f = cfg.d_ff
    host = None
    done_texts, tokens = 0, 0
    if os.path.isfile(partial_path):
        z = np.load(partial_path)
        host, done_texts, tokens = z["sums"], int(z["texts"]), int(z["tokens"])
    acc_dtype = np.float64 if precision == "float64" else np.float32
    if host is None:
        host = np.zeros((len(todo), f, f), acc_dtype)
    params = params_of(model)
    mesh = mesh_of(model)
    D = data_size(mesh)
    rows = padded(batch_size, mesh)  # a batch's rows, split over the data axis (rows past the texts stay empty)
    if mesh is None:
        put = jnp.asarray
        zeros = lambda: jnp.zeros((len(todo), f, f), jnp.float32)
        total = lambda acc: acc
    else:  # one partial sum per data shard, [D, layers, d_ff, d_ff], its rows split like the keys over ``model``
        acc_sharding = NamedSharding(mesh, P("data", None, "model" if f % mesh.shape["model"] == 0 else None))
        put = lambda a: put_batch(mesh, a.reshape(D, rows // D, -1))
        zeros = jax.jit(lambda: jnp.zeros((D, len(todo), f, f), jnp.float32), out_shardings=acc_sharding)
        total = jax.jit(lambda acc: acc.sum(0))
    dev = None
    if precision == "float32" and mesh is None:
        dev = jnp.asarray(host, jnp.float32)
    elif precision == "float32":  # a resumed sum goes into the first data shard's partial sum

        def block(idx):
            parts = range(*idx[0].indices(D))
            out = np.zeros((len(parts),) + host[idx[1:]].shape, np.float32)
            if 0 in parts:
                out[0] = host[idx[1:]]
            return out

        dev = jax.make_array_from_callback((D, len(todo), f, f), acc_sharding, block)

    main = is_main_process()

    def save_partial():
        sums = to_host(total(dev)) if precision == "float32" else host
        if main:
            _atomic_savez(partial_path, sums=sums, texts=done_texts, tokens=tokens)

    batches_since, last_save = 0, time.monotonic()
    batches = token_batches(model, tokenizer, corpus, n_samples, max_len, batch_size, seed, skip=done_texts,
                            rows=None if jax.process_count() == 1 else set(local_rows(mesh, rows).tolist()))
    try:
        first = next(batches, None)  # opens the corpus: an unreachable one fails here, before any progress bar
    except JaxeditError as e:
        found = cached_elsewhere(model_root, layers, precision, os.path.basename(root)) \
            if corpus == DEFAULT_CORPUS else None
        if found is None:
            raise
        key, n, t = found
        runtime.stage(f"the default corpus {corpus} is unreachable; using the key statistics cached from corpus "
                      f"{key} ({n} texts of <= {t} tokens, {precision}) for layers {list(layers)}")
        other = Stats({l: np.load(os.path.join(model_root, key, f"layer{l}-n{n}-t{t}-{precision}.npz"))["mom2"]
                       for l in layers})
        other.source = {"corpus": key, "samples": n, "max_len": t, "precision": precision,
                        "instead_of": corpus, "reason": str(e)}
        return other
    if main:
        os.makedirs(root, exist_ok=True)  # and before anything is written
    runtime.stage(f"computing key statistics of layers {list(todo)} over {n_samples} texts of {corpus} "
                  f"(cached for later runs)")
    note = lambda: (f"key statistics: {done_texts} of {n_samples} texts done, "  # noqa: E731
                    f"{saved[0]} saved in the cache; rerun to resume")
    saved = [done_texts]
    pending = 0  # texts of the last batch dispatched and not yet counted by the bar
    with runtime.resume_note_while(note), \
            runtime.bar(n_samples, f"key statistics, layers {list(todo)}", "text", done_texts,
                        progress and main) as bar:
        for batch in _chain(first, batches) if first is not None else ():
            longest = global_max(max(len(x) for x in batch))  # every process's share of the batch
            T = max(32, round_up(longest, 32))  # round lengths up: few shapes to compile
            ids, mask = pad_rows(batch, T, n_rows=rows)
            if pending:  # the bar counts finished batches: wait for the one before (this batch's text was
                jax.block_until_ready(dev)  # read and tokenized while it ran)
                bar.update(pending)
            if precision == "float32":
                dev = accumulate(cfg, params, put(ids), put(mask), dev, layers=todo)
                pending = len(batch)
            else:
                host += to_host(total(accumulate(cfg, params, put(ids), put(mask), zeros(), layers=todo))
                                ).astype(np.float64)
                bar.update(len(batch))
            done_texts += len(batch)
            tokens += global_sum(int(mask.sum()))
            batches_since += 1
            if batches_since >= save_every or time.monotonic() - last_save >= save_seconds:
                save_partial()
                saved[0] = done_texts
                batches_since, last_save = 0, time.monotonic()
        if pending:
            jax.block_until_ready(dev)
            bar.update(pending)
    if tokens == 0:
        raise JaxeditError(f"corpus {corpus!r} gave no tokens")
    if precision == "float32":
        sums = to_host(total(dev))
        dev = None  # the device's sums go before the means are made (on CPU the device's memory is the host's)
        if sums.dtype != np.float32 or not sums.flags.writeable:
            sums = np.array(sums, np.float32)
    else:
        sums = host
    for i, l in enumerate(todo):
        sums[i] /= tokens  # in place: the layers' sums become their means without another copy of them all
        mom2 = sums[i]
        if not np.all(np.isfinite(mom2)):
            raise JaxeditError(f"non-finite key statistics at layer {l}")
        if main:
            _atomic_savez(path_of[l], mom2=mom2, tokens=tokens, texts=done_texts)
        out[l] = mom2
    if main and os.path.isfile(partial_path):
        os.remove(partial_path)
    sync("jaxedit-stats-written")
    return out
