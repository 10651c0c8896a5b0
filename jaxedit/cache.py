"""The on-disk cache: where it lives, and the fingerprint of the code that wrote an entry.

Two things are cached from computation: converted GGUF models (``jaxedit.loading``) and key statistics
(``jaxedit.edit.stats``). Each entry's key includes :func:`code_fingerprint` of the modules whose code decides its
values and the versions of the distributions they compute with, so an entry written by other code (an older
jaxedit, another numpy) is never served: it is computed again beside the old one.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from importlib import metadata
from typing import Sequence


def cache_dir() -> str:
    """``$JAXEDIT_CACHE``, else ``$XDG_CACHE_HOME/jaxedit``, else ``~/.cache/jaxedit``."""
    return os.environ.get("JAXEDIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxedit")


def code_fingerprint(modules: Sequence[str], dependencies: Sequence[str] = (), extra: str = "") -> str:
    """A sha256 hex digest of the source files of ``modules`` (importable names), the installed versions of
    ``dependencies`` (distribution names; "absent" when not installed) and ``extra``. Callers cache it per process (it reads files)."""
    h = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        h.update(name.encode() + b"\0")
        try:
            with open(spec.origin, "rb") as f:
                h.update(f.read())
        except (OSError, TypeError, AttributeError):  # no readable source (e.g. a zipped install): its version
            h.update(f"jaxedit {metadata.version('jaxedit')}".encode())
    for dist in dependencies:
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = "absent"
        h.update(f"\0{dist}=={version}".encode())
    h.update(b"\0" + extra.encode())
    return h.hexdigest()
