"""Logits and per-layer hidden states of jaxedit equal transformers (torch) on tiny random checkpoints."""
import numpy as np
import pytest

import jaxedit
from conftest import hf_logits
from tiny_models import TINY_CONFIGS, VOCAB

RNG = np.random.default_rng(0)
IDS = RNG.integers(0, VOCAB, size=(2, 11))


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_logits_and_hidden_states_match_hf(tiny_dirs, name):
    path, hf = tiny_dirs[name]
    model, tok = jaxedit.load(path)
    assert model.config.family == ("gpt2" if name == "gpt2" else "llama")
    assert model.config.n_layers == hf.config.num_hidden_layers
    out = jaxedit.forward(model, IDS, capture=("hidden", "embeds"))
    ref_logits, ref_hidden = hf_logits(hf, IDS)
    assert out.logits.shape == ref_logits.shape
    err = np.abs(np.asarray(out.logits) - ref_logits).max()
    assert err < 1e-4, err
    # HF hidden_states: [embeddings, block 0 out, ..., block L-2 out, final-normed block L-1 out]
    np.testing.assert_allclose(np.asarray(out.embeds), ref_hidden[0], atol=1e-5)
    L = model.config.n_layers
    for layer in range(L - 1):
        np.testing.assert_allclose(np.asarray(out.hidden[:, layer]), ref_hidden[layer + 1], atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-untied", "llama3-rope"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_unpadded(tiny_dirs, name, side):
    """Each prompt in a padded batch gets exactly its unpadded HF logits at its real positions."""
    path, hf = tiny_dirs[name]
    model, _ = jaxedit.load(path)
    lengths = [9, 5, 7]
    T = max(lengths)
    ids = np.zeros((3, T), np.int64)
    mask = np.zeros((3, T), np.int64)
    prompts = [RNG.integers(0, VOCAB, size=n) for n in lengths]
    for b, p in enumerate(prompts):
        sl = slice(T - len(p), T) if side == "left" else slice(0, len(p))
        ids[b, sl], mask[b, sl] = p, 1
    out = np.asarray(jaxedit.forward(model, ids, mask).logits)
    for b, p in enumerate(prompts):
        ref, _ = hf_logits(hf, p[None])
        sl = slice(T - len(p), T) if side == "left" else slice(0, len(p))
        assert np.abs(out[b, sl] - ref[0]).max() < 1e-4


def test_bfloat16_params_close_to_float32(tiny_dirs):
    path, _ = tiny_dirs["llama-gqa-untied"]
    m32, _ = jaxedit.load(path)
    m16, _ = jaxedit.load(path, dtype="bfloat16")
    assert jaxedit.params_of(m16)["blocks"]["wq"].dtype.name == "bfloat16"
    a = np.asarray(jaxedit.forward(m32, IDS).logits)
    b = jaxedit.forward(m16, IDS).logits
    assert b.dtype.name == "float32"  # logits are float32 whatever the parameters
    assert np.abs(a - np.asarray(b)).max() < 0.05 * np.abs(a).max() + 1e-2
