"""Identities of the intervention arrays in the one forward function."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxedit
from jaxedit.forward import Interventions, apply
from tiny_models import VOCAB

IDS = np.random.default_rng(1).integers(0, VOCAB, size=(3, 8))
# the other model family's run of the jit/vmap identity (tests/conftest.py: SLOW_CASES)
SLOW_CASES = {"test_jit_vmap_equals_python_loop[llama-gqa-untied]"}


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa-untied"])
def model(request, tiny_dirs):
    return jaxedit.load(tiny_dirs[request.param][0])[0]


def _noise_iv(model, scale=1.0, replace=False):
    B, T = IDS.shape
    mask = np.zeros((B, T), bool)
    mask[:, 1:4] = True
    noise = scale * np.random.default_rng(2).standard_normal((B, T, model.config.d_model)).astype(np.float32)
    return mask, noise


def test_all_false_masks_equal_plain_forward(model):
    c = model.config
    B, T = IDS.shape
    clean = jaxedit.forward(model, IDS, capture=("hidden", "attn", "mlp"))
    junk = jnp.full((B, c.n_layers, T, c.d_model), 7.0)
    off = jnp.zeros((B, c.n_layers, T), bool)
    iv = Interventions(embed_mask=jnp.zeros((B, T), bool), embed_values=junk[:, 0],
                       restore_hidden=off, clean_hidden=junk, restore_attn=off, clean_attn=junk,
                       restore_mlp=off, clean_mlp=junk, resid_delta=jnp.zeros_like(junk))
    out = jaxedit.forward(model, IDS, interventions=iv, capture=("hidden", "attn", "mlp"))
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(clean.logits))
    np.testing.assert_array_equal(np.asarray(out.hidden), np.asarray(clean.hidden))


def test_embedding_noise_changes_only_later_tokens(model):
    mask, noise = _noise_iv(model)
    mask[:] = False
    mask[:, 3] = True
    clean = np.asarray(jaxedit.forward(model, IDS).logits)
    out = np.asarray(jaxedit.forward(model, IDS, interventions=Interventions(embed_mask=mask, embed_values=noise)).logits)
    np.testing.assert_allclose(out[:, :3], clean[:, :3], atol=1e-6)  # causal: earlier tokens untouched
    assert np.abs(out[:, 3:] - clean[:, 3:]).max() > 1e-3


def test_restoring_every_hidden_state_turns_corrupted_into_clean(model):
    c = model.config
    B, T = IDS.shape
    clean = jaxedit.forward(model, IDS, capture=("hidden",))
    mask, noise = _noise_iv(model, scale=3.0)
    corrupted = jaxedit.forward(model, IDS, interventions=Interventions(embed_mask=mask, embed_values=noise))
    assert np.abs(np.asarray(corrupted.logits) - np.asarray(clean.logits)).max() > 1e-2
    on = jnp.ones((B, c.n_layers, T), bool)
    iv = Interventions(embed_mask=mask, embed_values=noise, restore_hidden=on, clean_hidden=clean.hidden)
    restored = jaxedit.forward(model, IDS, interventions=iv)
    np.testing.assert_allclose(np.asarray(restored.logits), np.asarray(clean.logits), atol=1e-5)


def test_restoring_every_sublayer_output_leaves_only_the_embedding_noise(model):
    """With every attention and MLP output restored, the residual stream is clean except for the noise that was
    added to the embedding, which it carries unchanged to the last layer."""
    c = model.config
    B, T = IDS.shape
    clean = jaxedit.forward(model, IDS, capture=("hidden", "attn", "mlp"))
    mask, noise = _noise_iv(model, scale=3.0)
    on = jnp.ones((B, c.n_layers, T), bool)
    iv = Interventions(embed_mask=mask, embed_values=noise, restore_attn=on, clean_attn=clean.attn,
                       restore_mlp=on, clean_mlp=clean.mlp)
    out = jaxedit.forward(model, IDS, interventions=iv, capture=("hidden",))
    diff = np.asarray(out.hidden[:, -1]) - np.asarray(clean.hidden[:, -1])
    np.testing.assert_allclose(diff, noise * mask[..., None], atol=1e-4)


def test_replace_mode_sets_embedding(model):
    mask, noise = _noise_iv(model)
    out = jaxedit.forward(model, IDS, capture=("embeds",),
                          interventions=Interventions(embed_mask=mask, embed_values=noise, embed_replace=True))
    ref = jaxedit.forward(model, IDS, capture=("embeds",))
    emb = np.asarray(out.embeds)
    # llama: the embedding is the replaced value; gpt2: the replaced value plus the position embedding
    pos = np.asarray(ref.embeds) - np.asarray(jnp.take(jaxedit.params_of(model)["wte" if model.config.family == "gpt2"
                                                                              else "embed"], IDS, axis=0))
    np.testing.assert_allclose(emb[mask], (noise + pos)[mask], atol=1e-6)
    np.testing.assert_allclose(emb[~mask], np.asarray(ref.embeds)[~mask], atol=1e-6)


def test_resid_delta_adds_to_block_output(model):
    c = model.config
    B, T = IDS.shape
    delta = np.zeros((B, c.n_layers, T, c.d_model), np.float32)
    delta[:, 1, 2] = 0.5
    base = jaxedit.forward(model, IDS, capture=("hidden",))
    out = jaxedit.forward(model, IDS, capture=("hidden",), interventions=Interventions(resid_delta=delta))
    np.testing.assert_allclose(np.asarray(out.hidden[:, 0]), np.asarray(base.hidden[:, 0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.hidden[:, 1, :2]), np.asarray(base.hidden[:, 1, :2]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.hidden[:, 1, 2]), np.asarray(base.hidden[:, 1, 2]) + 0.5, atol=1e-5)


def test_jit_vmap_equals_python_loop(model):
    c = model.config
    params = jaxedit.params_of(model)
    mask, noise = _noise_iv(model)
    clean = jaxedit.forward(model, IDS, capture=("hidden",))
    # one restoration mask per example: restore layer b at token b
    restore = np.zeros((IDS.shape[0], c.n_layers, IDS.shape[1]), bool)
    for b in range(IDS.shape[0]):
        restore[b, b % c.n_layers, b] = True

    def one(ids, m, n, r, h):
        iv = Interventions(embed_mask=m[None], embed_values=n[None], restore_hidden=r[None], clean_hidden=h[None])
        return apply(c, params, ids[None], interventions=iv).logits[0]

    batched = jax.jit(jax.vmap(one))(IDS, mask, noise, restore, clean.hidden)
    loop = [np.asarray(one(IDS[b], mask[b], noise[b], restore[b], clean.hidden[b])) for b in range(IDS.shape[0])]
    np.testing.assert_allclose(np.asarray(batched), np.stack(loop), atol=1e-5)
