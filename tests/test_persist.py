"""Saving edited models (orbax) and exporting them as Hugging Face checkpoints that transformers loads."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxedit
from jaxedit import JaxeditError

IDS = np.array([[5, 17, 42, 99, 3, 250, 7, 1]])


def perturbed(model, scale=0.05, seed=0):
    """The model with every MLP output projection changed (as an edit would)."""
    params = jaxedit.params_of(model)
    w = params["blocks"]["w_out"]
    noise = np.random.default_rng(seed).normal(size=w.shape).astype(np.float32) * scale
    params = dict(params, blocks=dict(params["blocks"], w_out=w + jnp.asarray(noise, w.dtype)))
    return jaxedit.model_from_params(model.config, params)


@pytest.mark.parametrize("name", ["gpt2", "llama-mha-tied", "llama-gqa-untied", "llama3-rope"])
def test_export_hf_round_trip(tiny_dirs, tokenizer, tmp_path, name):
    model, tok = jaxedit.load(tiny_dirs[name][0])
    edited = perturbed(model)
    out = tmp_path / "hf"
    jaxedit.export_hf(edited, str(out), tokenizer=tok)
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary directory left behind
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(IDS)).logits.numpy()
    got = np.asarray(jaxedit.forward(edited, IDS).logits)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert np.abs(got - np.asarray(jaxedit.forward(model, IDS).logits)).max() > 1e-3  # the edit is in the file
    tok2 = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok2("Miles Davis")["input_ids"] == tok("Miles Davis")["input_ids"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_save_load(tiny_dirs, tokenizer, tmp_path, dtype):
    model, tok = jaxedit.load(tiny_dirs["llama-gqa-untied"][0], dtype=dtype)
    edited = perturbed(model)
    jaxedit.save(edited, str(tmp_path / "m"), tokenizer=tok)
    back, tok2 = jaxedit.load(str(tmp_path / "m"))
    a, b = jaxedit.params_of(edited), jaxedit.params_of(back)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    assert back.config == model.config and tok2("Miles")["input_ids"] == tok("Miles")["input_ids"]


def test_non_finite_weights_are_refused(tiny_dirs, tmp_path):
    model, tok = jaxedit.load(tiny_dirs["gpt2"][0])
    params = jaxedit.params_of(model)
    bad = dict(params, blocks=dict(params["blocks"], w_out=params["blocks"]["w_out"].at[1, 0, 0].set(jnp.nan)))
    bad = jaxedit.model_from_params(model.config, bad)
    for fn in (lambda p: jaxedit.save(bad, p, tokenizer=tok), lambda p: jaxedit.export_hf(bad, p, tokenizer=tok)):
        with pytest.raises(JaxeditError, match="blocks.w_out.*non-finite"):
            fn(str(tmp_path / "x"))
        assert os.listdir(tmp_path) == []  # nothing written
