"""Writing a model back as a Hugging Face checkpoint directory (``config.json``, ``model.safetensors``, tokenizer)
that ``transformers`` loads without jaxedit. The tensor names come from the same mapping tables the loader uses,
run backwards: each rule's transform hook has an inverse here."""
from __future__ import annotations

import os

import jax.numpy as jnp

from jaxedit.calls import public
from jaxedit.errors import JaxeditError
from jaxedit.loading import check_finite, mappings as mp
from jaxedit.loading.native import atomic_dir
from jaxedit.model import params_of
from jaxedit.sharding import is_main_process, sync, to_host


def _concat3(arrays, cfg):
    return jnp.concatenate(arrays, axis=-1)


def _transpose(arrays, cfg):
    return arrays[0].T


def _identity(arrays, cfg):
    return arrays[0]


INVERSES = {None: _identity, mp.transpose: _transpose, mp.split3: _concat3}


def hf_config(cfg, tokenizer=None):
    """The ``transformers`` config object of a jaxedit :class:`~jaxedit.config.ModelConfig`."""
    import transformers

    special = {}
    if tokenizer is not None:
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(tokenizer, k, None)
            if v is not None:
                special[k] = int(v)
    if cfg.family == "gpt2":
        return transformers.GPT2Config(
            n_layer=cfg.n_layers, n_embd=cfg.d_model, n_head=cfg.n_heads, n_inner=cfg.d_ff,
            n_positions=cfg.max_positions, vocab_size=cfg.vocab_size, layer_norm_epsilon=cfg.norm_eps,
            activation_function=cfg.activation, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            architectures=["GPT2LMHeadModel"], tie_word_embeddings=True, **special)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = dict(cfg.rope_scaling_dict, rope_type="llama3", rope_theta=cfg.rope_theta)
        rope["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
    kw = dict(hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
              num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
              vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.norm_eps,
              tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", architectures=["LlamaForCausalLM"],
              **special)
    import inspect

    if "rope_parameters" in inspect.signature(transformers.LlamaConfig.__init__).parameters:
        return transformers.LlamaConfig(**kw, rope_parameters=rope)
    return transformers.LlamaConfig(**kw, rope_theta=cfg.rope_theta,
                                    rope_scaling=None if not cfg.rope_scaling else rope)


def iter_hf_tensors(cfg, params):
    """(HF tensor name, a function computing it) for every tensor, by running the family's HF mapping table
    backwards; each is computed on the devices holding its parameter (sharded like it) when called."""
    rules, _, prefix = mp.TABLES[("hf", cfg.family)]

    def get(target, i=None):  # an internal parameter by dotted name (layer i of a stacked one); None if absent
        node = params
        for part in target.split("."):
            if part not in node:
                return None
            node = node[part]
        return node if i is None else node[i]

    for rule in rules:
        if rule.transform not in INVERSES:
            raise JaxeditError(f"no inverse for the transform of {rule.source}")
        inverse = INVERSES[rule.transform]
        if "{i}" in rule.source:
            for i in range(cfg.n_layers):
                yield (prefix + rule.source.replace("{i}", str(i)),
                       lambda rule=rule, i=i, inverse=inverse: inverse([get(t, i) for t in rule.targets], cfg))
        else:
            if any(get(t) is None for t in rule.targets):  # e.g. the LM head of a tied model
                continue
            name = rule.source if rule.source.startswith("lm_head") else prefix + rule.source
            yield name, lambda rule=rule, inverse=inverse: inverse([get(t) for t in rule.targets], cfg)


def hf_tensors(cfg, params) -> dict:
    """{HF tensor name: array} by running the family's HF mapping table backwards."""
    return {name: fn() for name, fn in iter_hf_tensors(cfg, params)}


MAX_SHARD_BYTES = 5 * 2**30


@public("path", old=("tokenizer",))
def export_hf(model, path: str, *, tokenizer=None, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write ``model`` as a Hugging Face checkpoint directory at ``path`` (atomically: a temporary sibling directory
    renamed into place). Refuses models with non-finite weights.

    Tensors are gathered to the host one at a time (a sharded model is never assembled on one device) and written
    into ``model.safetensors``, or, past ``max_shard_bytes``, into numbered files with an index
    (``model.safetensors.index.json``), so the host holds at most one file's worth. With several processes every
    process takes part in the gathers and process 0 writes."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    check_finite(model)
    cfg = model.config
    path = os.path.abspath(path)
    if os.path.isfile(path):
        raise JaxeditError(f"{path} is a file, not a directory")
    main = is_main_process()
    with (atomic_dir(path) if main else _nowhere()) as tmp:
        files, current, size = [], {}, 0

        def flush():
            if current and main:
                fname = f"part-{len(files):05d}.safetensors"
                save_file(current, os.path.join(tmp, fname), metadata={"format": "pt"})
                files.append((fname, list(current)))
            current.clear()

        for name, fn in iter_hf_tensors(cfg, params_of(model)):
            arr = np.ascontiguousarray(to_host(fn()))
            if current and size + arr.nbytes > max_shard_bytes:
                flush()
                size = 0
            current[name] = arr
            size += arr.nbytes
        flush()
        if main:
            if len(files) == 1:
                os.replace(os.path.join(tmp, files[0][0]), os.path.join(tmp, "model.safetensors"))
            else:
                weight_map, total = {}, 0
                for k, (fname, names) in enumerate(files):
                    final = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
                    os.replace(os.path.join(tmp, fname), os.path.join(tmp, final))
                    weight_map.update({n: final for n in names})
                    total += os.path.getsize(os.path.join(tmp, final))
                with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
            hf_config(cfg, tokenizer).save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    sync("jaxedit-export-done")


class _nowhere:
    """The context of a process that gathers but does not write."""

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
