"""MEMIT and deletion on the embedded real model (SmolLM2-135M), with key statistics from text sampled from the
model itself (the offline fallback corpus), and the export of the edited model read back by transformers."""
import json
import os

import numpy as np
import pytest
import torch

import jaxedit
from jaxedit.edit.memit import next_token_probs

HERE = os.path.dirname(__file__)
LAYERS = [4, 5, 6, 7, 8]
FACTS = [json.loads(l) for l in open(os.path.join(HERE, "..", "jaxedit", "data", "facts.jsonl"))]
EIFFEL = {"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower", "target": " Rome",
          "paraphrases": ["Where is the Eiffel Tower? It stands in the city of"]}
EDITED = [(1, " London"), (4, " Berlin"), (8, " violin")]
BATCH = [EIFFEL] + [{"prompt": FACTS[i]["prompt"], "subject": FACTS[i]["subject"], "target": t} for i, t in EDITED]
EXTRA_NEIGHBOURS = ["The capital of France is the city of", "The Louvre is located in the city of",
                    "Barack Obama was born in the state of", "The Beatles were a band from the city of",
                    "The currency of Japan is the", "Water is made of hydrogen and"]
TEXT = ("The river flows slowly through the valley, past old farms and quiet villages. In the spring, farmers plant "
        "wheat and corn in the fields near the water. Children walk to school along the road every morning, and "
        "their parents work in the town until the evening.")


@pytest.fixture(scope="module")
def stats(smollm2_stats):
    return {l: smollm2_stats[l] for l in LAYERS}


def perplexity(model, tok, texts=(TEXT,)):
    """exp of the mean next-token NLL over all the tokens of ``texts`` (each text on its own)."""
    nll = []
    for text in texts:
        ids = np.array([tok(text)["input_ids"]])
        logp = torch.log_softmax(torch.tensor(np.asarray(jaxedit.forward(model, ids).logits[0, :-1])), -1)
        nll.append(-logp[torch.arange(ids.shape[1] - 1), torch.tensor(ids[0, 1:])])
    return float(torch.exp(torch.cat(nll).mean()))


@pytest.mark.slow
def test_batch_of_edits_and_export(smollm2, stats, tmp_path):
    """Four facts rewritten in one MEMIT batch (Eiffel Tower -> Rome among them, with a paraphrase and the unedited
    facts as its neighbourhood); the exported checkpoint, loaded by transformers alone, gives the edited logits.
    Measured (statistics from 32 sampled texts): p(target) 0.968-0.991, 26 of 26 neighbours keep their argmax, the
    paraphrase 0.001 -> 0.978. (The batch's arithmetic is pinned against the reference on tiny models in
    test_editing.py; batches of six and ten here showed the same, every p >= 0.87, at 1.5 and 2.5 times the cost.)"""
    model, tok = smollm2
    edited_ids = {0} | {i for i, _ in EDITED}
    neighbours = [f["prompt"] for i, f in enumerate(FACTS) if i not in edited_ids] + EXTRA_NEIGHBOURS
    batch = [dict(BATCH[0], neighborhood=neighbours)] + BATCH[1:]
    # lambda = 5000: with the LLaMA-7B preset's 15000 and statistics from 64 sampled texts, 2 of a batch of 10 edits
    # stayed below p = 0.8 on this model (measured: 0.48 and 0.07)
    edited, rep = jaxedit.memit(model, batch, layers=LAYERS, tokenizer=tok, stats=stats, progress=False,
                                mom2_update_weight=5000.0)
    p = [r["p_after"][0] for r in rep["requests"]]
    won = [r["p_after"][0] > r["p_original_after"] for r in rep["requests"]]
    r = rep["requests"][0]
    kept = [n["argmax_kept"] for n in r["neighborhood"]]
    print("\nbatch p(target):", np.round(p, 3).tolist(), "argmax hits:",
          sum(r["argmax_after"] == b["target"] for r, b in zip(rep["requests"], BATCH)),
          f"neighbourhood argmax kept: {sum(kept)}/{len(kept)}", f"{rep['seconds']:.0f} s")
    assert min(p) >= 0.8 and all(won)
    assert r["argmax_after"] == " Rome" and len(kept) >= 20 and np.mean(kept) >= 0.8
    para = r["paraphrases"][0]
    print("paraphrase:", para["p_before"], "->", para["p_after"])
    assert para["p_after"][0] > 5 * para["p_before"][0]

    # the exported checkpoint, loaded by transformers alone, gives the edited logits
    import transformers

    jaxedit.export_hf(edited, str(tmp_path / "hf"), tokenizer=tok)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ids = np.array([tok(EIFFEL["prompt"])["input_ids"]])
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    got = np.asarray(jaxedit.forward(edited, ids).logits)
    print("export max-abs logit difference:", np.abs(got - ref).max(), "largest logit:", np.abs(ref).max())
    # float32 arithmetic through 30 layers (hidden norms ~200): the two differ by ~1e-4 at logits ~18 to 30
    # (measured 1.3e-4 at a largest logit of 30), an error of the logits' scale, so 1e-5 of the largest logit
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max(), rtol=1e-5)
    from safetensors.numpy import load_file

    saved = load_file(str(tmp_path / "hf" / "model.safetensors"))
    w = np.asarray(jaxedit.params_of(edited)["blocks"]["w_out"])
    for l in LAYERS:  # the edited weights are in the file bit for bit
        np.testing.assert_array_equal(saved[f"model.layers.{l}.mlp.down_proj.weight"], w[l].T)


@pytest.mark.slow
def test_delete_keeps_text_perplexity(smollm2, stats):
    """Deleting three facts with the bounded unlikelihood objective -log(1 - P) at a middle KL weight: suppressed,
    text perplexity kept. (The default objective, mean log P, has no floor: on this model it drops p by 8e10 and more
    at every KL weight, measured over a sweep in docs/editing.md; both objectives' terms are pinned against float64
    torch/numpy on tiny models in test_editing.py.)"""
    model, tok = smollm2
    prompts = [FACTS[i] for i in (0, 9, 16)]
    _, greedy = next_token_probs(model, tok, [f["prompt"] for f in prompts], [[0]] * len(prompts))
    reqs = [{"prompt": f["prompt"], "subject": f["subject"], "suppress": tok.decode([g])}
            for f, g in zip(prompts, greedy)]
    texts = [r["prompt"] for r in reqs]
    ppl0, ppl0_prompts = perplexity(model, tok), perplexity(model, tok, texts)
    edited, rep = jaxedit.delete(model, reqs, layers=LAYERS, tokenizer=tok, stats=stats, progress=False,
                                 kl_weight=0.5, delete_objective="unlikelihood")
    drop = [r["p_before"][0] / r["p_after"][0] for r in rep["requests"]]
    geo, low = float(np.exp(np.mean(np.log(drop)))), min(drop)
    rise, rise_prompts = perplexity(edited, tok) / ppl0 - 1, perplexity(edited, tok, texts) / ppl0_prompts - 1
    print(f"\nunlikelihood at KL weight 0.5: geo-mean p drop {geo:.4g}, min {low:.4g}, perplexity rise "
          f"{rise:.2%} (text), {rise_prompts:.2%} (the prompts)")
    # measured with statistics from 32 sampled texts: min drop 807 (geo-mean 2221), text perplexity -0.01 %
    # (from 64 texts: min drop 82, geo-mean 340, +0.49 %)
    assert low >= 20 and rise < 0.02
