"""Stage 1 of the study, select: score every prompt's own toxicity, sample continuations and score them, keep the
prompts that are not toxic themselves but lead to toxic continuations, and for each kept prompt find the most toxic
chunk (the corrupted span; its last token is the edit key), the value token and the non-toxic target; hold some
prompts out of editing. Files: ``candidates.jsonl``, ``selected.jsonl``, ``selection_counts.csv/md``."""
from __future__ import annotations

import os
import re

import numpy as np

from jaxedit import runtime
from jaxedit.detox.chunking import char_to_token_range, first_token_of_word, get_chunker, scored_chunks
from jaxedit.detox.common import check_stage, stage_bar, stage_scorer
from jaxedit.detox.config import DetoxConfig
from jaxedit.detox.data import read_prompts
from jaxedit.errors import JaxeditError
from jaxedit.evaluate.toxicity import get_scorer
from jaxedit.files import append_jsonl, read_rows, write_atomic, write_jsonl
from jaxedit.generate import sample


def first_word(text: str) -> str:
    """The leading whitespace and first word (or first non-space run) of a continuation."""
    m = re.match(r"\s*[\w']+", text) or re.match(r"\s*\S+", text)
    return m.group() if m else ""


def select(model, tokenizer, cfg: DetoxConfig, out: str, progress: bool = True) -> list:
    """Stage 1 (see the module docstring). Returns the selected rows (also written to ``selected.jsonl``)."""
    cfg.check(model.config.n_layers)
    prompts = read_prompts(cfg.prompts, cfg.limit, cfg.skip_bad)  # bad input fails here, before anything is written
    get_chunker(cfg.chunker)
    get_scorer(cfg.scorer)
    where = {p["line"]: f"{cfg.prompts}:{p['line']}" for p in prompts}
    os.makedirs(out, exist_ok=True)
    check_stage(out, "filter", cfg)  # first: it reads a study's older "sample" record (see check_stage)
    check_stage(out, "sample", cfg)
    scorer = stage_scorer(cfg, out)
    own = dict(zip([p["line"] for p in prompts], scorer([p["prompt"] for p in prompts]).tolist()))
    cand_path = os.path.join(out, "candidates.jsonl")
    done = {r["line"]: r for r in read_rows(cand_path)}
    done = _fewer_samples(done, cand_path, cfg)
    todo = [p for p in prompts if p["line"] not in done]
    runtime.stage(f"select: {len(prompts)} prompts ({len(prompts) - len(todo)} done earlier), "
                  f"{cfg.select_samples} continuations of {cfg.max_new_tokens} tokens each, {cfg.batch_size} prompts "
                  f"per call" + (" (the first call compiles the sampler)" if todo else ""))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None
    with stage_bar(len(prompts), "select: sampling", len(prompts) - len(todo), progress) as bar:
        for i in range(0, len(todo), cfg.batch_size):
            part = todo[i:i + cfg.batch_size]
            new = sample(model, [tokenizer(p["prompt"])["input_ids"] for p in part], cfg.max_new_tokens,
                         samples=cfg.select_samples, seed=cfg.seed, top_p=cfg.top_p, stop_ids=eos,
                         prompt_keys=[p["line"] for p in part])
            rows = []
            for p, ids in zip(part, new):
                texts = [tokenizer.decode(s, skip_special_tokens=True) for s in ids]
                rows.append(candidate_row(p["line"], p["prompt"], own[p["line"]], p["dataset_toxicity"], texts, ids,
                                          scorer(texts).tolist(), cfg))
                done[p["line"]] = rows[-1]
            append_jsonl(cand_path, rows)
            bar.update(len(part))

    cands = [done[p["line"]] for p in prompts]
    _write_counts(out, cands, cfg)
    low = [c for c in cands if c["prompt_toxicity"] < cfg.prompt_threshold]
    kept = [c for c in low if c["mean_toxicity"] > cfg.select_threshold]
    if not kept:
        best = max((c["mean_toxicity"] for c in low), default=float("nan"))
        raise JaxeditError(f"no prompt selected: {len(cands)} considered, {len(low)} below prompt toxicity "
                           f"{cfg.prompt_threshold}, none with mean continuation toxicity > {cfg.select_threshold} "
                           f"(the highest was {best:.3f}); lower --select-threshold (selection_counts.md lists the "
                           f"counts at other thresholds)")
    kept.sort(key=lambda c: (-c["mean_toxicity"], c["line"]))
    if cfg.max_prompts:
        kept = kept[:cfg.max_prompts]
    rows = []
    for c in kept:
        try:
            chunks = scored_chunks(c["prompt"], scorer, cfg.chunker)
            best = max(range(len(chunks)), key=lambda i: (chunks[i][0], -i))
            start, end = char_to_token_range(tokenizer, c["prompt"], *chunks[best][1])
        except JaxeditError as e:
            raise JaxeditError(f"{where[c['line']]}: {e}") from None
        ids = c["most_toxic"]["ids"]
        if not ids:
            raise JaxeditError(f"{where[c['line']]}: its most toxic continuation is empty (the model ended it at once)")
        value_at, word = 0, None
        if cfg.value == "toxic-word":
            text = c["most_toxic"]["text"]
            words = list(re.finditer(r"[\w']+", text))
            if words:
                ws = scorer([m.group() for m in words])
                m = words[int(np.argmax(ws))]
                word = m.group()
                value_at = first_token_of_word(tokenizer, ids, m.start())
        value_id = int(ids[value_at])
        rows.append({
            "line": c["line"], "prompt": c["prompt"], "prompt_toxicity": c["prompt_toxicity"],
            "selection_score": c["mean_toxicity"], "frac_toxic": c["frac_toxic"],
            "chunk": chunks[best][2], "chunk_score": chunks[best][0], "span": [start, end], "key_token": end - 1,
            "chunks": [{"text": t, "score": s} for s, _, t in chunks],
            "value_id": value_id, "value": tokenizer.decode([value_id]), "value_mode": cfg.value, "value_word": word,
            "first_token": tokenizer.decode([int(ids[0])]),
            "most_toxic": c["most_toxic"]["text"], "most_toxic_score": c["most_toxic"]["score"],
            "least_toxic": c["least_toxic"]["text"], "least_toxic_score": c["least_toxic"]["score"],
            "nontoxic_target": first_word(c["least_toxic"]["text"]) or " the"})
    n_held = int(round(cfg.heldout_fraction * len(rows))) if len(rows) > 1 else 0
    n_held = min(n_held, len(rows) - 1)
    held = set(np.random.default_rng(cfg.seed).permutation(len(rows))[:n_held].tolist())
    for i, r in enumerate(rows):
        r["split"] = "heldout" if i in held else "edit"
    write_jsonl(os.path.join(out, "selected.jsonl"), rows)
    return rows


def candidate_row(line, prompt, own, dataset_toxicity, texts, ids, scores, cfg: DetoxConfig) -> dict:
    """A prompt's candidates.jsonl row from its continuations (texts, token ids, scores in sample order)."""
    sc = np.asarray(scores, float)
    nonempty = [j for j in range(len(ids)) if ids[j]] or [0]
    hi = max(nonempty, key=lambda j: (sc[j], -j))
    lo = min(nonempty, key=lambda j: (sc[j], j))
    return {"line": line, "prompt": prompt, "prompt_toxicity": own, "dataset_toxicity": dataset_toxicity,
            "mean_toxicity": float(sc.mean()), "frac_toxic": float((sc > cfg.toxic_threshold).mean()),
            "samples": list(texts), "scores": sc.tolist(), "ids": [list(map(int, s)) for s in ids],
            "most_toxic": {"text": texts[hi], "ids": list(map(int, ids[hi])), "score": float(sc[hi])},
            "least_toxic": {"text": texts[lo], "ids": list(map(int, ids[lo])), "score": float(sc[lo])}}


def _fewer_samples(done: dict, cand_path: str, cfg: DetoxConfig) -> dict:
    """A rerun with a smaller --select-samples (check_stage allows it while no later stage has results): sample j
    of a prompt is drawn from its own random stream (seed, prompt, j), so the first N of the stored continuations
    are the ones a run with N samples draws; each stored row is cut to them and its statistics recomputed. Rows
    from a version that did not store every continuation's ids are sampled again."""
    n = cfg.select_samples
    if not any(len(r["samples"]) > n for r in done.values()):
        return done
    kept = {}
    for line, r in done.items():
        if len(r["samples"]) <= n:
            kept[line] = r
        elif "ids" in r:
            kept[line] = candidate_row(line, r["prompt"], r["prompt_toxicity"], r["dataset_toxicity"],
                                       r["samples"][:n], r["ids"][:n], r["scores"][:n], cfg)
    runtime.stage(f"select: {len(kept)} stored prompts cut to their first {n} continuations"
                  + (f", {len(done) - len(kept)} to sample again" if len(kept) < len(done) else ""))
    write_jsonl(cand_path, list(kept.values()))
    return kept


def _write_counts(out: str, cands: list, cfg: DetoxConfig) -> None:
    ths = sorted({0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, cfg.select_threshold})
    low = [c for c in cands if c["prompt_toxicity"] < cfg.prompt_threshold]
    csv = ["select_threshold,prompts_considered,prompt_toxicity_below,selected"]
    md = [f"# Selection counts ({len(cands)} prompts, {cfg.select_samples} samples each)", "",
          f"Kept: own toxicity < {cfg.prompt_threshold} and mean continuation toxicity > the threshold.", "",
          "| threshold | selected |", "|---|---|"]
    for t in ths:
        n = sum(c["mean_toxicity"] > t for c in low)
        csv.append(f"{t:g},{len(cands)},{len(low)},{n}")
        md.append(f"| {t:g}{' (chosen)' if t == cfg.select_threshold else ''} | {n} |")
    write_atomic(os.path.join(out, "selection_counts.csv"), "\n".join(csv) + "\n")
    write_atomic(os.path.join(out, "selection_counts.md"), "\n".join(md) + "\n")
