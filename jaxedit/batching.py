"""Batching variable-length token rows: length buckets, padding, and how many rows a batch may hold.

Every batched computation in jaxedit (sampling, causal tracing, perplexity, MEMIT's and DINM's training rows,
SafeEdit's answers) runs rows of different lengths through jitted functions, which compile once per shape. The
rules that keep the number of shapes small live here, once:

* :func:`round_up`: a length rounded up to its bucket (a multiple of ``multiple`` tokens, optionally capped at the
  model's context);
* :func:`group_by_bucket`: items grouped by the bucket of their length, shortest bucket first;
* :func:`batches`: a group cut into consecutive batches of a fixed number of rows;
* :func:`pad_rows`: token rows as ``(ids, mask)`` int32 arrays [rows, T], padded on the right or on the left;
* :func:`rows_within`, :func:`batch_rows`: how many rows fit a memory budget, and the row count of a batch (a
  power of two, so a few shapes serve any number of items).

The memory budget itself (how many bytes a chunk may use on this device) is
:func:`jaxedit.runtime.default_memory_budget`.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import numpy as np

def round_up(n: int, multiple: int, cap: Optional[int] = None) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (the length bucket of an ``n``-token row), at most ``cap``."""
    T = -(-int(n) // int(multiple)) * int(multiple)
    return T if cap is None else min(T, cap)


def group_by_bucket(items: Sequence, length: Callable[[object], int], multiple: int,
                    cap: Optional[int] = None) -> list:
    """``[(T, members)]``: ``items`` grouped by the bucket ``round_up(length(item), multiple, cap)`` of their
    length, shortest bucket first; each group keeps the items in the order given."""
    groups: dict = {}
    for item in items:
        groups.setdefault(round_up(length(item), multiple, cap), []).append(item)
    return sorted(groups.items(), key=lambda kv: kv[0])


def batches(members: Sequence, size: int) -> Iterator[list]:
    """Consecutive slices of ``members`` of ``size`` items (the last one shorter)."""
    for start in range(0, len(members), size):
        yield list(members[start:start + size])


def pad_rows(rows: Sequence[Sequence[int]], T: Optional[int] = None, *, n_rows: Optional[int] = None,
             value: int = 0, left: bool = False) -> tuple:
    """``(ids, mask)`` int32 arrays [n_rows, T]: row i holds ``rows[i]`` at its start (``left=True``: at its end)
    with mask 1 there; the rest of the row is ``value`` with mask 0. ``T`` defaults to the longest row,
    ``n_rows`` to ``len(rows)`` (rows past ``rows`` are all padding)."""
    T = T or max(len(r) for r in rows)
    n_rows = len(rows) if n_rows is None else n_rows
    ids = np.full((n_rows, T), value, np.int32)
    mask = np.zeros((n_rows, T), np.int32)
    for i, r in enumerate(rows):
        at = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, at], mask[i, at] = r, 1
    return ids, mask


def rows_within(budget_bytes: float, bytes_per_row: float, *, power_of_two: bool = False) -> int:
    """How many rows of ``bytes_per_row`` fit ``budget_bytes`` (at least 1); with ``power_of_two``, the largest
    power of two that fits."""
    rows = max(1, int(budget_bytes // bytes_per_row))
    return 1 << (rows.bit_length() - 1) if power_of_two else rows


def batch_rows(n_items: int, *most: int) -> int:
    """Rows of a batch for ``n_items`` items: the smallest power of two that holds them all, at most each of
    ``most`` (a memory limit, a batch-size limit)."""
    return min((1 << (max(n_items, 1) - 1).bit_length(),) + most)
