"""JSONL request files (one JSON object a line), checked line by line with errors that say ``FILE:LINE``.

A :class:`RequestFile` parses the file, then runs checks over its lines in as many passes as needed (a first pass
without the model: fields and types; a later one with the tokenizer: subject in prompt, lengths). A bad line
raises a one-line :class:`~jaxedit.errors.JaxeditError` naming ``FILE:LINE``, or, with ``skip_bad=True``, is
reported through ``on_skip`` and dropped from the lines that later passes and the caller see. Blank lines are
ignored; line numbers are 1-based, as an editor shows them.
"""
from __future__ import annotations

import json
from typing import Callable, Optional

from jaxedit.errors import JaxeditError, json_problem


class RequestFile:
    """The objects of a JSONL file, as ``[(line_number, object)]`` in file order (``.items``)."""

    def __init__(self, path: str, what: str = "requests", *, skip_bad: bool = False,
                 on_skip: Optional[Callable[[str], None]] = None):
        self.path, self.what, self.skip_bad, self.on_skip = str(path), what, skip_bad, on_skip
        self.skipped: list = []  # "FILE:LINE: message" of every line dropped so far
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.readlines()
        except OSError as e:
            raise JaxeditError(f"cannot read {self.path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise JaxeditError(f"{self.path}: not UTF-8 text") from None
        self.items = []
        for no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                self.bad(no, f"malformed JSON ({json_problem(e)})")
                continue
            if not isinstance(obj, dict):
                self.bad(no, "expected a JSON object")
                continue
            self.items.append((no, obj))
        self._check_nonempty()

    def where(self, line: int) -> str:
        return f"{self.path}:{line}"

    def bad(self, line: int, message: str) -> None:
        """Raise ``FILE:LINE: message``, or with skip_bad record and report it (the caller drops the line)."""
        text = f"{self.where(line)}: {message}"
        if not self.skip_bad:
            raise JaxeditError(text)
        self.skipped.append(text)
        if self.on_skip is not None:
            self.on_skip(text)

    def check(self, fn: Callable[[dict], object]) -> list:
        """Run ``fn(obj)`` on every line: it returns the object to keep (None: keep the object as it is) or raises
        :class:`JaxeditError`, which becomes a bad line. Returns (and keeps) ``[(line, kept object)]``."""
        return self.check_lines(lambda no, obj: fn(obj))

    def check_lines(self, fn: Callable[[int, dict], object]) -> list:
        """:meth:`check` with ``fn(line_number, obj)``."""
        kept = []
        for no, obj in self.items:
            try:
                out = fn(no, obj)
            except JaxeditError as e:
                self.bad(no, str(e))
                continue
            kept.append((no, obj if out is None else out))
        self.items = kept
        self._check_nonempty()
        return kept

    def _check_nonempty(self) -> None:
        if not self.items:
            extra = f" ({len(self.skipped)} bad line{'s' * (len(self.skipped) != 1)} skipped)" if self.skipped else ""
            raise JaxeditError(f"{self.path}: no {'valid ' if self.skipped else ''}{self.what}{extra}")

    @property
    def lines(self) -> list:
        return [no for no, _ in self.items]

    @property
    def objects(self) -> list:
        return [obj for _, obj in self.items]
