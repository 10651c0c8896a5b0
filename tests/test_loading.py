"""Checkpoint sources and their errors: sharded index, missing/unexpected tensors, shape mismatch, pickles."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import jaxedit
from jaxedit import JaxeditError
from conftest import hf_logits
from tiny_models import VOCAB, build_hf_model

IDS = np.random.default_rng(3).integers(0, VOCAB, size=(1, 6))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_tensors(path, fn):
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-untied"])
def test_sharded_safetensors_index(tmp_path, name):
    hf = build_hf_model(name)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    model, tok = jaxedit.load(str(tmp_path))
    assert tok is None  # no tokenizer files in this directory
    ref, _ = hf_logits(hf, IDS)
    assert np.abs(np.asarray(jaxedit.forward(model, IDS).logits) - ref).max() < 1e-4


def test_missing_shard_is_an_error(tmp_path):
    build_hf_model("gpt2").save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[-1]
    os.remove(tmp_path / shard)
    with pytest.raises(JaxeditError, match=f"shard {shard}.*missing"):
        jaxedit.load(str(tmp_path))


def test_missing_tensor_names_it(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["gpt2"][0], tmp_path / "m")
    _edit_tensors(path, lambda t: t.pop("transformer.h.1.mlp.c_fc.weight"))
    with pytest.raises(JaxeditError, match=r"missing tensor 'h\.1\.mlp\.c_fc\.weight'"):
        jaxedit.load(path)


def test_missing_untied_head_names_it(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["llama-gqa-untied"][0], tmp_path / "m")
    _edit_tensors(path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(JaxeditError, match=r"missing tensor 'lm_head\.weight'"):
        jaxedit.load(path)


def test_shape_mismatch_names_it(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["llama-gqa-untied"][0], tmp_path / "m")

    def cut(t):
        t["model.layers.2.self_attn.k_proj.weight"] = t["model.layers.2.self_attn.k_proj.weight"][:-1]
    _edit_tensors(path, cut)
    with pytest.raises(JaxeditError, match=r"shape mismatch for checkpoint tensor 'model\.layers\.2\.self_attn\.k_proj"):
        jaxedit.load(path)


def test_unexpected_tensor_names_it(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["llama-mha-tied"][0], tmp_path / "m")
    _edit_tensors(path, lambda t: t.__setitem__("model.layers.0.mystery.weight", np.zeros(3, np.float32)))
    with pytest.raises(JaxeditError, match=r"unexpected tensor 'model\.layers\.0\.mystery\.weight'"):
        jaxedit.load(path)


def test_extra_layer_is_unexpected(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["gpt2"][0], tmp_path / "m")
    _edit_tensors(path, lambda t: t.__setitem__("transformer.h.3.ln_1.weight", np.ones(32, np.float32)))
    with pytest.raises(JaxeditError, match=r"unexpected tensor 'transformer\.h\.3\.ln_1\.weight'.*3 layers"):
        jaxedit.load(path)


def test_pickle_refused_without_flag(tmp_path):
    hf = build_hf_model("gpt2")
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(JaxeditError, match="pickle.*allow_pickle=True"):
        jaxedit.load(str(tmp_path))
    model, _ = jaxedit.load(str(tmp_path), allow_pickle=True)
    ref, _ = hf_logits(hf, IDS)
    assert np.abs(np.asarray(jaxedit.forward(model, IDS).logits) - ref).max() < 1e-4


def test_unsupported_config_is_an_error(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["gpt2"][0], tmp_path / "m")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["model_type"] = "mamba"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(JaxeditError, match="unsupported model_type 'mamba'"):
        jaxedit.load(path)


def test_bad_paths(tmp_path):
    with pytest.raises(JaxeditError, match="no such GGUF file"):
        jaxedit.load(str(tmp_path / "x.gguf"))
    with pytest.raises(JaxeditError, match="no such model directory"):
        jaxedit.load(str(tmp_path / "nothing"))
    with pytest.raises(JaxeditError, match="no config.json"):
        jaxedit.load(str(tmp_path))


def test_native_round_trip(tiny_dirs, tmp_path):
    from jaxedit.loading.native import save_native

    model, tok = jaxedit.load(tiny_dirs["llama3-rope"][0])
    save_native(model, tok, str(tmp_path / "saved"))
    again, tok2 = jaxedit.load(str(tmp_path / "saved"))
    assert again.config == model.config
    np.testing.assert_array_equal(np.asarray(jaxedit.forward(again, IDS).logits),
                                  np.asarray(jaxedit.forward(model, IDS).logits))
    assert tok2("Paris")["input_ids"] == tok("Paris")["input_ids"]


def test_hub_id_goes_through_snapshot_download(tiny_dirs, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return tiny_dirs["gpt2"][0]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    model, tok = jaxedit.load("someone/tiny-gpt2", revision="main")
    assert calls[0][0] == "someone/tiny-gpt2" and calls[0][1] == "main"
    assert "*.safetensors" in calls[0][2] and "config.json" in calls[0][2]
    assert "*.bin" not in calls[0][2]  # pickles are never fetched
    assert model.config.family == "gpt2" and tok is not None


def test_unreachable_hub_is_one_clear_error(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("We couldn't connect to the hub.\nmore details")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(JaxeditError, match=r"could not fetch 'gpt2-xl' from the Hugging Face hub \(We couldn't connect"):
        jaxedit.load("gpt2-xl")
