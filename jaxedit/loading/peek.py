"""A model's config and tokenizer without its weights (:func:`peek`), so that a command can check its options
against the model (layer indices, what tokenizes to nothing) before a load that can take minutes. Not part of the
GGUF conversion (nothing here decides what is converted)."""
from __future__ import annotations

import json
import os

from jaxedit.cache import cache_dir
from jaxedit.config import ModelConfig
from jaxedit.errors import JaxeditError
from jaxedit.loading import EMBEDDED, _cache_key, embedded_gguf_path
from jaxedit.loading.gguf_file import gguf_config
from jaxedit.loading.hf import load_tokenizer, read_config
from jaxedit.loading.native import FORMAT_VERSION, MARKER, is_native_dir, load_native_tokenizer


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Field:
    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


class _Tensor:
    def __init__(self, name, shape):
        self.name, self.shape = name, shape


class _GGUFHeader:
    """The metadata and tensor names and shapes of a GGUF file, read from its header alone (``gguf.GGUFReader``
    maps every tensor too, seconds for a small model). Quacks like the reader for :func:`gguf_config`."""

    def __init__(self, path: str):
        import struct

        with open(path, "rb") as f:
            data = f.read(1 << 20)
            pos = 0

            def need(n):
                nonlocal data
                while pos + n > len(data):
                    more = f.read(max(1 << 20, n))
                    if not more:
                        raise JaxeditError(f"{path}: not a readable GGUF file (header cut short)")
                    data += more

            def scalar(fmt):
                nonlocal pos
                size = struct.calcsize(fmt)
                need(size)
                (v,) = struct.unpack_from(fmt, data, pos)
                pos += size
                return v

            def string():
                nonlocal pos
                n = scalar("<Q")
                need(n)
                v = data[pos:pos + n].decode("utf-8", "replace")
                pos += n
                return v

            def value(t):
                if t == 8:
                    return string()
                if t == 9:
                    et, n = scalar("<I"), scalar("<Q")
                    return [value(et) for _ in range(n)]
                if t not in _SCALARS:
                    raise JaxeditError(f"{path}: not a readable GGUF file (value type {t})")
                return scalar(_SCALARS[t])

            need(4)
            if data[:4] != b"GGUF":
                raise JaxeditError(f"{path}: not a readable GGUF file (no GGUF magic)")
            pos = 4
            if scalar("<I") < 2:
                raise JaxeditError(f"{path}: GGUF version 1 is not supported")
            n_tensors, n_kv = scalar("<Q"), scalar("<Q")
            self.fields = {}
            for _ in range(n_kv):
                key = string()
                self.fields[key] = _Field(value(scalar("<I")))
            self.tensors = []
            for _ in range(n_tensors):
                name = string()
                dims = [scalar("<Q") for _ in range(scalar("<I"))]
                scalar("<I"), scalar("<Q")  # type, offset
                self.tensors.append(_Tensor(name, dims))


def gguf_header_config(path: str) -> ModelConfig:
    """The config of a GGUF file from its header (what :func:`jaxedit.loading.gguf_file.gguf_config` reads)."""
    try:
        header = _GGUFHeader(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise JaxeditError(f"{path}: not a readable GGUF file ({e})") from None
    return gguf_config(header)


def native_config(path: str) -> ModelConfig:
    """The config of a jaxedit directory (``jaxedit.json``), without reading its parameters."""
    with open(os.path.join(path, MARKER)) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise JaxeditError(f"{path}: unsupported jaxedit format version {meta.get('format_version')}")
    return ModelConfig.from_json(json.dumps(meta["config"]))


def peek(name_or_path: str = "smollm2", *, revision=None, tokenizer: bool = True) -> tuple:
    """``(config, tokenizer)`` of what :func:`jaxedit.load` would load, without reading the weights.

    Either is None where it cannot be had cheaply: a hub id whose ``config.json`` is not in the local Hugging Face
    cache (nothing is downloaded), the tokenizer of a GGUF file not yet converted into jaxedit's cache (building it
    takes seconds), or ``tokenizer=False``. A path that does not exist raises the error :func:`jaxedit.load` would."""
    name = str(name_or_path)
    if name in EMBEDDED:
        name = embedded_gguf_path(name)
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise JaxeditError(f"no such GGUF file: {name}")
        target = os.path.join(cache_dir(), f"{os.path.splitext(os.path.basename(name))[0]}-{_cache_key(name)}")
        if not is_native_dir(target):
            return gguf_header_config(name), None
        name = target
    if os.path.isdir(name):
        if is_native_dir(name):
            return native_config(name), (load_native_tokenizer(name) if tokenizer else None)
        return read_config(name), (load_tokenizer(name) if tokenizer else None)
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise JaxeditError(f"no such model directory or file: {name}")
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:
        path = None
    if not isinstance(path, str) or not os.path.isfile(path):
        return None, None
    return read_config(os.path.dirname(path)), None
