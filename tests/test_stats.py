"""Key statistics E[k k^T] against torch: the inputs of the HF model's MLP output projection, captured by hooks,
summed in float64 over every token of the corpus."""
import os

import numpy as np
import pytest
import torch

import jaxedit
from jaxedit import JaxeditError
from jaxedit.edit import stats as st

TEXTS = ["The Eiffel Tower is located in the city of Paris.", "Miles Davis plays the trumpet.",
         "Beats Music is owned by Apple.", "The Space Needle is in Seattle.", "Toko Yasuda produces music.",
         "The capital of France is Paris. The Space Needle is in Seattle."]


def torch_mom2(hf, tokenizer, texts, layers, max_len):
    gpt2 = hf.config.model_type == "gpt2"
    mods = [(hf.transformer.h[l].mlp.c_proj if gpt2 else hf.model.layers[l].mlp.down_proj) for l in layers]
    got = {l: [] for l in layers}
    hooks = [m.register_forward_pre_hook(lambda m, a, l=l: got[l].append(a[0][0].double().numpy()))
             for l, m in zip(layers, mods)]
    with torch.no_grad():
        for t in texts:
            hf(torch.tensor([tokenizer(t)["input_ids"][:max_len]]))
    for h in hooks:
        h.remove()
    out = {}
    for l in layers:
        k = np.concatenate(got[l])
        out[l] = k.T @ k / len(k)
    return out


@pytest.fixture
def corpus_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(TEXTS) + "\n")
    return str(p)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-untied"])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_mom2_matches_torch(tiny_dirs, tokenizer, tmp_path, corpus_file, name, precision):
    model, tok = jaxedit.load(tiny_dirs[name][0])
    layers = [0, 2]
    got = st.layer_stats(model, layers, tokenizer=tok, corpus=corpus_file, stats_samples=5, max_len=9, batch_size=2,
                         precision=precision, cache_dir=str(tmp_path / "c"), progress=False)
    ref = torch_mom2(tiny_dirs[name][1], tok, TEXTS[:5], layers, 9)
    for l in layers:
        assert got[l].dtype == np.dtype(precision)
        np.testing.assert_allclose(got[l], ref[l], rtol=1e-5, atol=1e-7 * np.abs(ref[l]).max())


def test_cache_and_resume(tiny_dirs, tokenizer, tmp_path, corpus_file, monkeypatch):
    model, tok = jaxedit.load(tiny_dirs["llama-mha-tied"][0])
    kw = dict(corpus=corpus_file, stats_samples=6, max_len=12, batch_size=1, cache_dir=str(tmp_path / "c"),
              progress=False, save_every=1)
    full = st.layer_stats(model, [1, 2], tokenizer=tok, **dict(kw, cache_dir=str(tmp_path / "fresh")))

    real, calls = st.accumulate, []

    def killed_after_three(*a, **k):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(st, "accumulate", killed_after_three)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(KeyboardInterrupt):
        st.layer_stats(model, [1, 2], tokenizer=tok, **kw)
    # the partial sums are kept in the cache folder (nothing lands in the working directory)
    assert len(list((tmp_path / "c").rglob("partial-1_2-*.npz"))) == 1 and not os.listdir(tmp_path / "cwd")
    monkeypatch.setattr(st, "accumulate", real)
    seen = []
    monkeypatch.setattr(st, "accumulate", lambda *a, **k: seen.append(1) or real(*a, **k))
    resumed = st.layer_stats(model, [1, 2], tokenizer=tok, **kw)
    assert len(seen) == 3  # texts 4..6 only
    for l in (1, 2):
        np.testing.assert_allclose(resumed[l], full[l], rtol=1e-6)
    # cached now: a further call (any subset of the layers) computes nothing
    monkeypatch.setattr(st, "accumulate", lambda *a, **k: pytest.fail("recomputed a cached layer"))
    again = st.layer_stats(model, [2], tokenizer=tok, **kw)
    np.testing.assert_array_equal(again[2], resumed[2])


def test_model_sampled_corpus_and_errors(tiny_dirs, tokenizer, tmp_path):
    model, tok = jaxedit.load(tiny_dirs["gpt2"][0])
    kw = dict(corpus="model", stats_samples=4, max_len=16, batch_size=2, progress=False)
    a = st.layer_stats(model, [1], tokenizer=tok, cache_dir=str(tmp_path / "a"), **kw)[1]
    b = st.layer_stats(model, [1], tokenizer=tok, cache_dir=str(tmp_path / "b"), **kw)[1]
    np.testing.assert_array_equal(a, b)  # seeded
    assert a.shape == (128, 128) and np.all(np.linalg.eigvalsh(a.astype(np.float64)) > -1e-6)
    with pytest.raises(JaxeditError, match="outside"):
        st.layer_stats(model, [3], tokenizer=tok, cache_dir=str(tmp_path), **kw)
    with pytest.raises(JaxeditError, match="no such corpus"):
        st.layer_stats(model, [1], tokenizer=tok, cache_dir=str(tmp_path), **dict(kw, corpus="missing.txt"))
    with pytest.raises(JaxeditError, match="corpus"):  # a datasets name, offline or without datasets
        st.layer_stats(model, [1], tokenizer=tok, cache_dir=str(tmp_path), **dict(kw, corpus="no-such-dataset-xyz"))


def test_cache_key_changes_with_the_code(tiny_dirs, tokenizer, tmp_path, corpus_file, monkeypatch):
    """Cached statistics are served only to the code that computed them: another source of a computing module or
    another version of a dependency gives another key, so a stale (here: corrupted) entry is not read."""
    import glob
    import importlib.util
    from importlib import metadata

    model, tok = jaxedit.load(tiny_dirs["gpt2"][0])
    kw = dict(corpus=corpus_file, stats_samples=5, max_len=9, batch_size=2, cache_dir=str(tmp_path / "c"),
              progress=False)
    ref = torch_mom2(tiny_dirs["gpt2"][1], tok, TEXTS[:5], [1], 9)[1]
    first = st.layer_stats(model, [1], tokenizer=tok, **kw)[1]
    np.testing.assert_allclose(first, ref, rtol=1e-5, atol=1e-7 * np.abs(ref).max())
    (entry,) = glob.glob(str(tmp_path / "c" / "*" / "*" / "layer1-*.npz"))
    np.savez(entry, mom2=first * 2)  # as an older computation with a bug would have left it
    assert np.abs(st.layer_stats(model, [1], tokenizer=tok, **kw)[1] - ref).max() > 0.5 * np.abs(ref).max()  # same code: read

    base = st.stats_fingerprint()
    real_version, real_find_spec = metadata.version, importlib.util.find_spec
    changed = tmp_path / "forward.py"
    changed.write_text(open(real_find_spec("jaxedit.forward").origin).read() + "\n# changed\n")

    def find_spec(name, *a):
        return importlib.util.spec_from_file_location(name, str(changed)) if name == "jaxedit.forward" \
            else real_find_spec(name, *a)

    for patch in (lambda: monkeypatch.setattr(metadata, "version", lambda d: "0.0.1" if d == "jax" else
                                              real_version(d)),
                  lambda: monkeypatch.setattr(importlib.util, "find_spec", find_spec)):
        st.stats_fingerprint.cache_clear()
        patch()
        try:
            assert st.stats_fingerprint() != base
            fresh = st.layer_stats(model, [1], tokenizer=tok, **kw)[1]
        finally:
            monkeypatch.undo()
            st.stats_fingerprint.cache_clear()
        np.testing.assert_allclose(fresh, ref, rtol=1e-5, atol=1e-7 * np.abs(ref).max())
    assert st.stats_fingerprint() == base
    assert len(glob.glob(str(tmp_path / "c" / "*"))) == 3  # computed again twice, beside the stale entry


# jaxedit modules the statistics' modules import that do not decide the statistics' values
NOT_COMPUTING = {
    "jaxedit.errors": "error messages only",
    "jaxedit.runtime": "status lines, progress bars, the compile cache and the memory budget (how many rows at "
                       "once): no values",
    "jaxedit.cache": "where the cache lives and how keys are hashed",
    "jaxedit.layer_selection": "checks the layer indices",
    "jaxedit.calls": "checks how a public function is called; its progress scope",
}


def test_stats_modules_cover_what_they_import():
    """Every jaxedit module imported by a module of the statistics' key is in the key or named above."""
    from conftest import jaxedit_imports

    listed = set(st.STATS_MODULES)
    for name in listed:
        for mod in jaxedit_imports(name):
            assert mod in listed or mod in NOT_COMPUTING, f"{name} imports {mod}: in the key or not?"


def test_corpus_key_names_what_fixes_the_texts(tmp_path):
    """The statistics' cache folder per corpus: model samples by their seed and batch size; a local corpus by its
    name (made filename-safe) and a hash of its files' paths, sizes and times, so that an edited file is a new key."""
    keys = {st.corpus_key("model", s, b) for s, b in [(0, 8), (1, 8), (0, 4)]}
    assert keys == {"model-samples-seed0-b8", "model-samples-seed1-b8", "model-samples-seed0-b4"}
    f = tmp_path / "My corpus (v2).txt"
    f.write_text("one text\n")
    key = st.corpus_key(str(f), 0, 8)
    assert key.startswith("My_corpus__v2_.txt-") and len(key) == len("My_corpus__v2_.txt-") + 12
    g = tmp_path / "other.txt"
    g.write_text("one text\n")
    assert st.corpus_key(str(g), 0, 8).startswith("other.txt-")
    f.write_text("one text, edited\n")
    assert st.corpus_key(str(f), 0, 8) != key
    assert st.corpus_key("Salesforce/wikitext:wikitext-103-raw-v1", 0, 8) == "Salesforce_wikitext_wikitext-103-raw-v1"


def test_default_length_and_bad_counts(tiny_dirs, tokenizer, tmp_path, corpus_file):
    """Without max_len the texts are cut at the model's positions (at most 1024): the same statistics as max_len=64
    on this 64-position model, equal to torch's; counts below 1 are refused."""
    model, tok = jaxedit.load(tiny_dirs["gpt2"][0])
    assert model.config.max_positions == 64
    got = st.layer_stats(model, [1], tokenizer=tok, corpus=corpus_file, stats_samples=2, batch_size=2,
                         cache_dir=str(tmp_path / "c"), progress=False)
    ref = torch_mom2(tiny_dirs["gpt2"][1], tok, TEXTS[:2], [1], 64)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-7 * np.abs(ref[1]).max())
    for kw in (dict(stats_samples=0), dict(batch_size=0)):
        with pytest.raises(JaxeditError, match="^stats_samples and batch_size must be >= 1$"):
            st.layer_stats(model, [1], tokenizer=tok,
                           **dict(dict(corpus=corpus_file, stats_samples=2, batch_size=2), **kw))


def test_model_fingerprint_follows_the_weights(tiny_dirs):
    """The statistics' cache key of a model: equal for the same weights loaded twice, different for another model
    and for one changed weight."""
    from jaxedit.model import model_from_params
    from jaxedit.models.common import params_of

    a, _ = jaxedit.load(tiny_dirs["gpt2"][0])
    fp = st.model_fingerprint(a)
    assert fp == st.model_fingerprint(jaxedit.load(tiny_dirs["gpt2"][0])[0]) and len(fp) == 16
    assert fp != st.model_fingerprint(jaxedit.load(tiny_dirs["llama-mha-tied"][0])[0])
    p = params_of(a)
    w = p["blocks"]["w_out"]
    changed = dict(p, blocks=dict(p["blocks"], w_out=w.at[(0,) * w.ndim].add(1.0)))
    assert st.model_fingerprint(model_from_params(a.config, changed)) != fp


def test_cached_elsewhere_picks_the_most_texts(tmp_path):
    """The statistics of another corpus that hold every asked layer at the asked precision, with the most texts
    (then the longest), from the cache's file names; the excluded corpus, stray files and partial sets are passed."""
    def put(key, layers, n, t, precision="float32"):
        (tmp_path / key).mkdir(exist_ok=True)
        for l in layers:
            (tmp_path / key / f"layer{l}-n{n}-t{t}-{precision}.npz").write_bytes(b"")

    put("aaa", [0, 1], 50, 16)  # excluded below
    (tmp_path / "bbb").write_text("a file, not a corpus folder")
    put("ccc", [0, 1], 10, 16)
    (tmp_path / "ccc" / "notes.txt").write_text("")
    put("ddd", [0, 1], 20, 8)
    put("eee", [0], 100, 16)  # layer 1 missing
    put("fff", [0, 1], 20, 8)  # a tie with ddd: the first keeps it
    put("ggg", [0, 1], 1000, 16, "float64")  # another precision
    assert st.cached_elsewhere(str(tmp_path), [0, 1], "float32", exclude="aaa") == ("ddd", 20, 8)
    assert st.cached_elsewhere(str(tmp_path), [0, 1], "float32") == ("aaa", 50, 16)
    assert st.cached_elsewhere(str(tmp_path), [0], "float32", exclude="aaa") == ("eee", 100, 16)
    assert st.cached_elsewhere(str(tmp_path), [0, 1], "float64") == ("ggg", 1000, 16)
    assert st.cached_elsewhere(str(tmp_path), [2], "float32") is None
    assert st.cached_elsewhere(str(tmp_path / "none"), [0], "float32") is None


def test_local_corpus_files_and_texts(tmp_path):
    """A local corpus: a .txt/.jsonl file or a folder of them (sorted; other files ignored); .txt lines stripped and
    blank ones skipped, .jsonl rows' "text" (blank ones skipped); a bad row is FILE:LINE."""
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "b.txt").write_text("  first line  \n\n\tsecond\n")
    (d / "a.jsonl").write_text('{"text": "json one"}\n\n{"text": "  "}\n{"text": "", "x": 1}\n{"text": "json two"}\n')
    (d / "c.md").write_text("not a corpus file\n")
    files = st._local_files(str(d))
    assert files == [str(d / "a.jsonl"), str(d / "b.txt")]
    assert st._local_files(str(d / "b.txt")) == [str(d / "b.txt")]
    assert list(st._file_texts(files)) == ["json one", "json two", "first line", "second"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(JaxeditError) as err:
        st._local_files(str(tmp_path / "empty"))
    assert str(err.value) == f"corpus folder {tmp_path / 'empty'} holds no .txt or .jsonl file"
    for row in ('["a list"]', '{"title": "no text"}', "not json"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": "fine"}\n\n' + row + "\n")
        with pytest.raises(JaxeditError) as err:
            list(st._file_texts([str(bad)]))
        assert str(err.value) == f'{bad}:3: expected a JSON object with a "text" field'


def test_dataset_corpus_through_datasets(stand_in_datasets):
    """A datasets corpus NAME[:CONFIG] is streamed from load_dataset(NAME, CONFIG or None, split="train",
    streaming=True); rows without text are skipped; failures are one line naming the corpus and the way out."""
    stand_in_datasets(None)  # not installed
    with pytest.raises(JaxeditError) as err:
        list(st._dataset_texts("wikitext:wikitext-2-raw-v1"))
    assert str(err.value) == (
        "corpus 'wikitext:wikitext-2-raw-v1' is a datasets name, and the datasets package is not installed (pip "
        "install datasets); or use a local .txt/.jsonl corpus, or the corpus \"model\" (text sampled from the model; "
        "works offline; on the command line: --corpus model)")
    calls = []

    def load_dataset(*args, **kw):
        calls.append((args, kw))
        return [{"text": "first"}, {"text": ""}, {"text": "  \n"}, {"title": "no text"}, {"text": "last"}]

    datasets = stand_in_datasets(load_dataset)
    assert list(st._dataset_texts("wikitext:wikitext-2-raw-v1")) == ["first", "last"]
    assert list(st._dataset_texts("c4")) == ["first", "last"]
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "train", "streaming": True}),
                     (("c4", None), {"split": "train", "streaming": True})]
    datasets.load_dataset = lambda *a, **k: iter([{"text": "only"}])
    assert list(st._dataset_texts("c4")) == ["only"]

    for exc, shown in ((ConnectionError("offline\nsecond line"), "offline"), (ValueError(), "ValueError")):
        def failing(*a, exc=exc, **k):
            raise exc
        datasets.load_dataset = failing
        with pytest.raises(JaxeditError) as err:
            list(st._dataset_texts("c4"))
        assert str(err.value) == (f"cannot reach corpus 'c4' ({shown}); use a local .txt/.jsonl corpus, or the corpus "
                                  f"\"model\" (text sampled from the model itself; works offline; on the command line: "
                                  f"--corpus model)")
    datasets.load_dataset = lambda *a, **k: iter([])  # an empty split: next() raises StopIteration
    with pytest.raises(JaxeditError, match=r"^cannot reach corpus 'c4' \(StopIteration\)"):
        list(st._dataset_texts("c4"))


def test_model_sampled_texts_count_skip_and_starters(tiny_dirs, tokenizer):
    """The model-sampled corpus: n_samples texts in batches of batch_size (the last one short), each at most max_len
    tokens and opening with its starter (text i: starter i mod the starters' count); skip drops the first texts
    and keeps the others as they were (each batch has its own seed)."""
    model, tok = jaxedit.load(tiny_dirs["gpt2"][0])
    kw = dict(corpus="model", n_samples=5, max_len=12, batch_size=2)
    full = list(st.token_batches(model, tok, **kw))
    assert [len(b) for b in full] == [2, 2, 1]
    texts = [t for b in full for t in b]
    for i, t in enumerate(texts):
        starter = tok(st.SAMPLE_STARTERS[i % len(st.SAMPLE_STARTERS)], add_special_tokens=False)["input_ids"]
        assert t[:len(starter)] == starter and len(starter) < len(t) <= 12
    skipped = list(st.token_batches(model, tok, skip=3, **kw))
    assert [len(b) for b in skipped] == [1, 1] and [t for b in skipped for t in b] == texts[3:]
