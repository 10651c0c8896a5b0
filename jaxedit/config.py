"""Model configuration shared by every family.

A :class:`ModelConfig` is frozen and hashable so that it can be a static argument of jitted functions.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from jaxedit.errors import JaxeditError

FAMILIES = ("gpt2", "llama")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # "gpt2" or "llama"
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    max_positions: int
    norm_eps: float
    tie_embeddings: bool
    activation: str = "gelu_new"  # gpt2: gelu_new / gelu; llama: silu
    rope_theta: float = 10000.0
    # llama3-style rope scaling as a sorted tuple of (key, value) pairs (hashable), or () for none
    rope_scaling: tuple = ()

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise JaxeditError(f"unknown model family {self.family!r} (known: {', '.join(FAMILIES)})")
        if self.n_heads % self.n_kv_heads:
            raise JaxeditError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        d = json.loads(text)
        d["rope_scaling"] = tuple(tuple(kv) for kv in d.get("rope_scaling", ()))
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Build a config from a Hugging Face ``config.json`` dict (GPT-2 or LLaMA)."""
        mt = hf.get("model_type")
        if mt == "gpt2":
            for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
                if hf.get(flag):
                    raise JaxeditError(f"GPT-2 option {flag}=True is not supported")
            if not hf.get("scale_attn_weights", True):
                raise JaxeditError("GPT-2 option scale_attn_weights=False is not supported")
            act = hf.get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
                raise JaxeditError(f"GPT-2 activation {act!r} is not supported")
            d = hf["n_embd"]
            return cls(
                family="gpt2", n_layers=hf["n_layer"], d_model=d, n_heads=hf["n_head"], n_kv_heads=hf["n_head"],
                head_dim=d // hf["n_head"], d_ff=hf.get("n_inner") or 4 * d, vocab_size=hf["vocab_size"],
                max_positions=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=True, activation="gelu" if act == "gelu" else "gelu_new",
            )
        if mt == "llama":
            if hf.get("attention_bias") or hf.get("mlp_bias"):
                raise JaxeditError("LLaMA checkpoints with attention_bias or mlp_bias are not supported")
            if hf.get("hidden_act", "silu") != "silu":
                raise JaxeditError(f"LLaMA activation {hf.get('hidden_act')!r} is not supported")
            n_heads = hf["num_attention_heads"]
            d = hf["hidden_size"]
            # transformers 5 nests rope settings under "rope_parameters"; older files use rope_theta/rope_scaling
            rope = dict(hf.get("rope_parameters") or {})
            theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
            if not rope or rope.get("rope_type", rope.get("type", "default")) == "default":
                rope = dict(hf.get("rope_scaling") or {})
            rtype = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
            if rtype == "default":
                scaling: tuple = ()
            elif rtype == "llama3":
                keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                scaling = tuple(sorted((k, float(rope[k])) for k in keys))
            else:
                raise JaxeditError(f"rope scaling type {rtype!r} is not supported (supported: default, llama3)")
            return cls(
                family="llama", n_layers=hf["num_hidden_layers"], d_model=d, n_heads=n_heads,
                n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                head_dim=hf.get("head_dim") or d // n_heads, d_ff=hf["intermediate_size"],
                vocab_size=hf["vocab_size"], max_positions=hf.get("max_position_embeddings", 2048),
                norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                activation="silu", rope_theta=float(theta), rope_scaling=scaling,
            )
        raise JaxeditError(f"unsupported model_type {mt!r} (supported: gpt2, llama)")
