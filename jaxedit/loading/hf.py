"""Hugging Face checkpoints: a local directory or a hub id; safetensors (single or sharded), pickles on request."""
from __future__ import annotations

import json
import os

import numpy as np

from jaxedit.config import ModelConfig
from jaxedit.errors import JaxeditError
from jaxedit.loading.convert import convert, convert_sharded

HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*", "vocab.json",
                "merges.txt", "special_tokens_map.json", "generation_config.json"]


def read_config(path: str) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise JaxeditError(f"{path}: no config.json (not a Hugging Face model directory)")
    with open(cfg_path) as f:
        return ModelConfig.from_hf(json.load(f))


class SafetensorsSource:
    """Lazy access to the tensors of one or several (sharded) safetensors files."""

    def __init__(self, files_by_name: dict[str, str]):
        self.files_by_name = files_by_name
        self._handles: dict[str, object] = {}

    @classmethod
    def from_dir(cls, path: str) -> "SafetensorsSource":
        from safetensors import safe_open

        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = {n: os.path.join(path, fname) for n, fname in weight_map.items()}
            for fpath in set(files.values()):
                if not os.path.isfile(fpath):
                    raise JaxeditError(f"shard {os.path.basename(fpath)} named in model.safetensors.index.json "
                                       f"is missing from {path}")
            return cls(files)
        if os.path.isfile(single):
            with safe_open(single, "numpy") as f:
                return cls({n: single for n in f.keys()})
        raise FileNotFoundError(path)

    def names(self):
        return list(self.files_by_name)

    def _handle(self, name: str):
        from safetensors import safe_open

        fpath = self.files_by_name[name]
        if fpath not in self._handles:
            self._handles[fpath] = safe_open(fpath, "numpy")
        return self._handles[fpath]

    def get(self, name: str) -> np.ndarray:
        """One whole tensor, copied out of a mapping of its file that is closed again before returning: the process
        never holds the file's pages beyond the tensor being read (a kept mapping would count every page read so
        far in the resident memory, a second copy of the weights)."""
        from safetensors import safe_open

        try:
            with safe_open(self.files_by_name[name], "numpy") as f:
                return f.get_tensor(name)
        except Exception as e:  # a weight map that names a tensor its shard lacks
            raise JaxeditError(f"tensor {name!r} not found in {os.path.basename(self.files_by_name[name])}: "
                               f"{e}") from None

    def _slice(self, name: str):
        try:
            return self._handle(name).get_slice(name)
        except Exception as e:
            raise JaxeditError(f"tensor {name!r} not found in {os.path.basename(self.files_by_name[name])}: "
                               f"{e}") from None

    def shape(self, name: str) -> tuple:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, index: tuple) -> np.ndarray:
        """One block of a tensor (a tuple of slices), read from the file without the rest of it."""
        return np.asarray(self._slice(name)[index] if index else self.get(name))


class PickleSource:
    """``pytorch_model.bin`` checkpoints (needs torch; refused unless the caller allows pickles)."""

    def __init__(self, path: str):
        try:
            import torch
        except ImportError:
            raise JaxeditError("reading pytorch_model.bin needs torch, which is not installed") from None
        index = os.path.join(path, "pytorch_model.bin.index.json")
        files = [os.path.join(path, "pytorch_model.bin")]
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
        self.tensors = {}
        for fpath in files:
            for k, v in torch.load(fpath, map_location="cpu", weights_only=True).items():
                self.tensors[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()

    def names(self):
        return list(self.tensors)

    def get(self, name):
        return self.tensors[name]


def has_pickle(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def load_hf_dir(path: str, dtype="float32", allow_pickle: bool = False, mesh=None):
    cfg = read_config(path)
    try:
        source = SafetensorsSource.from_dir(path)
    except FileNotFoundError:
        if not has_pickle(path):
            raise JaxeditError(f"{path}: no model.safetensors or model.safetensors.index.json") from None
        if not allow_pickle:
            raise JaxeditError(f"{path} holds only a PyTorch pickle (pytorch_model.bin), which can run arbitrary "
                               "code when read; pass allow_pickle=True (CLI: --allow-pickle) to read it anyway") from None
        source = PickleSource(path)
    if mesh is not None:
        return convert_sharded(source.names(), source, cfg, "hf", dtype, mesh)
    return convert(source.names(), source.get, cfg, "hf", dtype)


def download(repo_id: str, revision=None) -> str:
    """Fetch config, safetensors and tokenizer files of a hub model (cached by huggingface_hub)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JaxeditError(f"could not fetch {repo_id!r} from the Hugging Face hub ({first}); "
                           "pass a local directory or a .gguf file instead") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path: str, **kwargs):
    """The directory's tokenizer, or None when it holds no tokenizer files at all."""
    from transformers import AutoTokenizer

    if "gguf_file" not in kwargs and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        return None

    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as e:
        raise JaxeditError(f"could not load a tokenizer from {path}: {str(e).splitlines()[0] if str(e) else e}") from None
