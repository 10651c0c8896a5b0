"""Parity report: max-abs logit difference between jaxedit and transformers (torch, float32) for the tiny random
test checkpoints and the embedded SmolLM2 GGUF. Prints a markdown table (numbers for docs and closing notes).

    python benchmarks/parity.py
"""
from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import jaxedit  # noqa: E402
from tiny_models import TINY_CONFIGS, VOCAB, build_hf_model  # noqa: E402


def main():
    rows = []
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(4, 16))
    for name in TINY_CONFIGS:
        hf = build_hf_model(name)
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            model, _ = jaxedit.load(d)
        ours = np.asarray(jaxedit.forward(model, ids).logits)
        with torch.no_grad():
            ref = hf(torch.tensor(ids)).logits.numpy()
        rows.append((name, np.abs(ours - ref).max(), (ours.argmax(-1) == ref.argmax(-1)).mean()))

    from transformers import AutoModelForCausalLM

    from jaxedit.loading import embedded_gguf_path

    path = embedded_gguf_path("smollm2")
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    model, tok = jaxedit.load("smollm2")
    prompts = ["The Eiffel Tower is located in the city of", "The capital of Japan is", "Miles Davis plays the",
               "Water is made of hydrogen and", "The first president of the United States was"]
    worst, agree, n = 0.0, 0, 0
    for p in prompts:
        x = tok(p)["input_ids"]
        ours = np.asarray(jaxedit.forward(model, [x]).logits[0])
        with torch.no_grad():
            ref = hf(torch.tensor([x])).logits[0].numpy()
        worst = max(worst, float(np.abs(ours - ref).max()))
        agree += int((ours.argmax(-1) == ref.argmax(-1)).sum())
        n += len(x)
    rows.append(("SmolLM2-135M GGUF (5 prompts)", worst, agree / n))
    print("| model | max-abs logit diff vs transformers | argmax agreement |")
    print("|---|---|---|")
    for name, err, ag in rows:
        print(f"| {name} | {err:.2e} | {ag:.3f} |")


if __name__ == "__main__":
    main()
