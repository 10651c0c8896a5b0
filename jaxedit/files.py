"""Small file helpers shared by the resumable runs: JSONL rows appended durably, read back with a torn last line
(a killed write) dropped, and whole files written atomically (a temporary file, then a rename)."""
from __future__ import annotations

import json
import os


def append_jsonl(path: str, rows) -> None:
    """Append rows (dicts) to a JSONL file and flush them to disk."""
    if isinstance(rows, dict):
        rows = [rows]
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def read_rows(path: str) -> list:
    """The complete rows of a JSONL file written by :func:`append_jsonl`; a torn last line is cut off the file."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    rows, good = [], 0
    for raw in data.splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            break
        try:
            rows.append(json.loads(raw))
        except json.JSONDecodeError:
            break
        good += len(raw)
    if good != len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return rows


def write_atomic(path: str, text: str) -> None:
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1) + "\n")


def write_jsonl(path: str, rows) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
