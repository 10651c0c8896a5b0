"""The study's other detoxification methods, run beside the deletion grid and evaluated on the same random streams
(``--methods delete,dinm,profs``):

* ``dinm`` (:func:`jaxedit.dinm`): one case per edited prompt, its safe response the model's own least toxic sample
  for the prompt and its unsafe response the most toxic one (both from ``candidates.jsonl``), its knowledge
  constraint one of the general-knowledge questions of the shipped SafeEdit demo cases (in turn), no system suffix
  (the study samples continuations of the bare openings). The cases go into one model in order, each at the layer
  DINM locates for it on the model edited so far (``per_instance=False``, one case at a time). One run.
* ``profs`` (:func:`jaxedit.profs`): ``profs_pairs`` pairs built from the edited prompts' samples
  (:func:`sample_pairs`: per prompt the most toxic against the least toxic sample, the second most against the
  second least, ...; taken round-robin over the prompts; more samples are drawn for the purpose when the selection's
  are too few), or the pairs of a ``--pairs`` file; one run per (number of pairs, rank).
* ``aura`` (:func:`jaxedit.aura`, its default unit: the MLP's hidden units, folded into the output projection's
  rows): texts = prompt + sample of every selection sample of the prompts not held out, toxic (1) when the study's
  scorer put the sample above the selection threshold; or the texts of an ``--aura-texts`` file. One run per layer
  setting (``aura_layers``).

Each run writes ``edits/RUN.npz`` (the edited layers' output projections, as the deletion runs do) and
``edits/RUN.json`` (its method, settings, layers, seconds, or the reason it failed).
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from jaxedit.detox.common import read_selected, stage_scorer
from jaxedit.detox.config import DetoxConfig, aura_layer_list, aura_texts_path
from jaxedit.edit.aura import aura, is_authors_rule
from jaxedit.edit.dinm import dinm
from jaxedit.edit.profs import profs
from jaxedit.errors import JaxeditError
from jaxedit.files import read_rows, write_json, write_jsonl
from jaxedit.generate import sample
from jaxedit.model import params_of
from jaxedit.request_files import RequestFile

DEMO_CASES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "safeedit_demo.json")


def pair_of(obj: dict) -> tuple:
    """(preferred, non_preferred) of one ``--pairs`` line."""
    out = []
    for k in ("preferred", "non_preferred"):
        v = obj.get(k)
        if not isinstance(v, str) or not v.strip():
            raise JaxeditError(f"expected \"{k}\" as a non-empty string")
        out.append(v)
    return tuple(out)


def read_pairs_file(path: str) -> list:
    """[(preferred, non_preferred)] of a JSONL file of {"preferred", "non_preferred"} lines (FILE:LINE errors)."""
    if os.path.isdir(path):
        raise JaxeditError(f"{path} is a directory, not a JSONL file of pairs")
    return [p for _, p in RequestFile(path, "pairs").check(pair_of)]


def aura_text_of(obj: dict) -> tuple:
    """(text, label) of one ``--aura-texts`` line: {"text": non-empty string, "toxic": 0 or 1 (or a boolean)}."""
    t = obj.get("text")
    if not isinstance(t, str) or not t.strip():
        raise JaxeditError('expected "text" as a non-empty string')
    v = obj.get("toxic")
    if isinstance(v, bool):
        v = int(v)
    if not isinstance(v, (int, float)) or v not in (0, 1):
        raise JaxeditError(f'expected "toxic" as 0 or 1 (got {json.dumps(v)})')
    return t, int(v)


def check_classes(labels, where: str) -> None:
    """Refuse fewer than 2 texts of a class (AurA's AUROC needs both)."""
    for cls, name in ((1, "toxic"), (0, "non-toxic")):
        k = sum(1 for v in labels if v == cls)
        if k < 2:
            raise JaxeditError(f"{where}: AurA needs at least 2 {name} texts (got {k})")


def read_aura_texts(path: str) -> tuple:
    """(texts, labels) of a JSONL file of {"text", "toxic"} lines, or of ``"demo"`` (:func:`aura_texts_path`);
    FILE:LINE errors; at least 2 of each class."""
    path = aura_texts_path(path)
    if os.path.isdir(path):
        raise JaxeditError(f"{path} is a directory, not a JSONL file of texts")
    rows = [t for _, t in RequestFile(path, "texts").check(aura_text_of)]
    check_classes([v for _, v in rows], path)
    return [t for t, _ in rows], [v for _, v in rows]


def study_aura_texts(out: str, cfg: DetoxConfig) -> tuple:
    """(texts, labels) from the selection's samples: prompt + sample for every non-blank sample of every prompt
    not held out (``candidates.jsonl``), toxic (1) when its stored score is above ``select_threshold``."""
    held = {r["line"] for r in read_selected(out) if r["split"] == "heldout"}
    texts, labels = [], []
    for c in read_rows(os.path.join(out, "candidates.jsonl")):
        if c["line"] in held or c["prompt_toxicity"] >= cfg.prompt_threshold:
            continue
        for t, sc in zip(c["samples"], c["scores"]):
            if t.strip():
                texts.append(c["prompt"] + t)
                labels.append(int(sc > cfg.select_threshold))
    return texts, labels


def extremes(out: str) -> list:
    """[(line, prompt, least toxic sample, most toxic sample)] of the edited prompts, the samples chosen among the
    prompt's non-blank selection samples by their stored scores (ties: the earlier sample). Prompts without a
    non-blank sample are left out."""
    cands = {c["line"]: c for c in read_rows(os.path.join(out, "candidates.jsonl"))}
    rows = []
    for r in read_selected(out):
        if r["split"] != "edit":
            continue
        c = cands[r["line"]]
        ok = [j for j, t in enumerate(c["samples"]) if t.strip()]
        if not ok:
            continue
        lo = min(ok, key=lambda j: (c["scores"][j], j))
        hi = max(ok, key=lambda j: (c["scores"][j], -j))
        rows.append((r["line"], r["prompt"], c["samples"][lo], c["samples"][hi]))
    return rows


def study_pairs(out: str) -> list:
    """ProFS pairs from the edited prompts: (prompt + least toxic sample, prompt + most toxic sample)."""
    return [(p + lo, p + hi) for _, p, lo, hi in extremes(out)]


def ranked_pairs(samples: list, scores: list) -> list:
    """A prompt's pairs of samples, the widest first: [(least toxic, most toxic), (second least, second most), ...]
    among its non-blank samples, each sample in one pair at most. Ties: the earlier sample is the less toxic, except
    among the most toxic samples, where the earlier one counts as the most toxic (so the first pair is
    :func:`extremes`')."""
    ok = [j for j, t in enumerate(samples) if t.strip()]
    if not ok:
        return []
    top = max(scores[j] for j in ok)
    asc = sorted(ok, key=lambda j: (scores[j], j if scores[j] < top else -j))
    return [(samples[asc[i]], samples[asc[-1 - i]]) for i in range(len(asc) // 2)]


def pairs_per_prompt(n_pairs: int, n_prompts: int) -> int:
    return -(-n_pairs // max(n_prompts, 1))


def extra_samples_needed(cfg: DetoxConfig, n_prompts: int, n_pairs: int = None) -> int:
    """Samples per edited prompt drawn beyond the selection's so that ``n_pairs`` pairs (default: the largest of
    ``profs_pairs``) can be built: 2 per pair, 2 to spare for blank samples; 0 when the selection's suffice."""
    k = pairs_per_prompt(n_pairs or max(cfg.profs_pairs), n_prompts)
    return 0 if 2 * k <= cfg.select_samples else 2 * k - cfg.select_samples + 2


def draw_pair_samples(model, tokenizer, cfg: DetoxConfig, out: str, scorer, n_extra: int) -> dict:
    """{line: (samples, scores)} of ``n_extra`` more samples per edited prompt (``pair_samples.jsonl``, kept; drawn
    with seed + 2, so from streams that neither the selection (seed) nor the evaluation (seed + 1) uses; sample j of
    a prompt has its own stream, so a larger count redraws the same first ones)."""
    path = os.path.join(out, "pair_samples.jsonl")
    have = {r["line"]: r for r in read_rows(path)} if os.path.isfile(path) else {}
    rows = [r for r in read_selected(out) if r["split"] == "edit"]
    todo = [r for r in rows if len(have.get(r["line"], {}).get("samples", ())) < n_extra]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None
    for i in range(0, len(todo), cfg.batch_size):
        part = todo[i:i + cfg.batch_size]
        new = sample(model, [tokenizer(r["prompt"])["input_ids"] for r in part], cfg.max_new_tokens,
                     samples=n_extra, seed=cfg.seed + 2, top_p=cfg.top_p, stop_ids=eos,
                     prompt_keys=[r["line"] for r in part])
        for r, ids in zip(part, new):
            texts = [tokenizer.decode(s, skip_special_tokens=True) for s in ids]
            have[r["line"]] = {"line": r["line"], "samples": texts, "scores": [float(v) for v in scorer(texts)]}
        write_jsonl(path, list(have.values()))
    return {line: (r["samples"][:n_extra], r["scores"][:n_extra]) for line, r in have.items()}


def pairs_by_prompt(out: str, extra: dict = None) -> list:
    """Per edited prompt (in the selection's order), its :func:`ranked_pairs` as ProFS pairs (prompt + less toxic
    sample, prompt + more toxic sample), from its selection samples and ``extra`` {line: (samples, scores)}."""
    cands = {c["line"]: c for c in read_rows(os.path.join(out, "candidates.jsonl"))}
    per = []
    for r in read_selected(out):
        if r["split"] != "edit":
            continue
        c = cands[r["line"]]
        more, more_sc = (extra or {}).get(r["line"], ([], []))
        per.append([(r["prompt"] + lo, r["prompt"] + hi)
                    for lo, hi in ranked_pairs(list(c["samples"]) + list(more), list(c["scores"]) + list(more_sc))])
    return per


def round_robin(per: list) -> list:
    """Every list's first item, then every list's second, ..."""
    out = []
    for i in range(max(map(len, per), default=0)):
        out += [p[i] for p in per if i < len(p)]
    return out


def sample_pairs(out: str, n_pairs, extra: dict = None) -> list:
    """``n_pairs`` (None: all) ProFS pairs from the edited prompts' selection samples (and ``extra``): each prompt's
    :func:`ranked_pairs` (:func:`pairs_by_prompt`), taken round-robin over the prompts (every prompt's widest pair
    first, then every prompt's second, ...). With ``n_pairs`` = the number of edited prompts these are
    :func:`study_pairs`."""
    per = pairs_by_prompt(out, extra)
    out_pairs = round_robin(per)
    if n_pairs is None:
        return out_pairs
    if len(out_pairs) < n_pairs:
        raise JaxeditError(f"only {len(out_pairs)} pairs from the {len(per)} edited prompts' non-blank samples "
                           f"({n_pairs} asked for)")
    return out_pairs[:n_pairs]


def dinm_cases(out: str) -> list:
    """SafeEdit-shaped cases of the edited prompts (see the module docstring)."""
    with open(DEMO_CASES, encoding="utf-8") as f:
        kcs = [c["knowledge constrain"] for c in json.load(f)]
    return [{"id": line, "adversarial prompt": p, "safe generation": lo, "unsafe generation": hi,
             "knowledge constrain": kcs[i % len(kcs)]} for i, (line, p, lo, hi) in enumerate(extremes(out))]


def plan_method_runs(cfg: DetoxConfig) -> list:
    """[(run id, method, settings)] of the methods other than the deletion grid."""
    runs = []
    for m in cfg.methods:
        if m == "dinm":
            for steps in cfg.dinm_steps:
                runs.append((f"dinm__steps{steps}", "dinm", {"steps": int(steps), "lr": cfg.dinm_lr,
                                                              "edit_weight": cfg.dinm_edit_weight}))
        elif m == "profs" and cfg.pairs:
            for r in cfg.profs_ranks:
                runs.append((f"profs__rank{r}", "profs", {"rank": int(r)}))
        elif m == "profs":
            for n in cfg.profs_pairs:
                for r in cfg.profs_ranks:
                    runs.append((f"profs__rank{r}__pairs{n}", "profs", {"rank": int(r), "pairs": int(n)}))
        elif m == "aura":
            for setting in cfg.aura_layers:
                for v in cfg.aura_min_auroc:  # the authors' rule keeps the run id it had before the option
                    rid = f"aura__{setting}" + ("" if is_authors_rule(v) else f"__auc{str(v).replace(':', '')}")
                    runs.append((rid, "aura", {"layers": str(setting), "min_auroc": str(v)}))
    return runs


def run_method(model, tokenizer, cfg: DetoxConfig, out: str, rid: str, method: str, settings: dict) -> dict:
    """Run one method run and write ``edits/RUN.npz`` and ``edits/RUN.json`` (or the error to the json). Returns the
    json's contents."""
    edir = os.path.join(out, "edits")
    t0 = time.perf_counter()
    info = {"run": rid, "method": method, "settings": dict(settings)}
    try:
        if method == "dinm":
            cases = dinm_cases(out)
            if not cases:
                raise JaxeditError("no edited prompt has a non-blank sample")
            edited, rep = dinm(model, cases, tokenizer=tokenizer, per_instance=False, suffix=None,
                               steps=settings["steps"],
                               lr=cfg.dinm_lr, edit_weight=cfg.dinm_edit_weight, batch_size=1)
            layers = sorted(set(rep["layers"]))
            info.update(cases=len(cases), case_layers=rep["layers"], steps_run=rep["steps"],
                        final=rep["final"], update_norm=rep["update_norm"])
        elif method == "aura":
            texts, labels = read_aura_texts(cfg.aura_texts) if cfg.aura_texts else study_aura_texts(out, cfg)
            layers = aura_layer_list(settings["layers"], model.config.n_layers)
            edited, rep = aura(model, texts, labels, tokenizer=tokenizer, layers=layers, progress=False,
                               min_auroc=settings.get("min_auroc", 0.5))
            info.update(texts_from=aura_texts_path(cfg.aura_texts) if cfg.aura_texts else "samples",
                        min_auroc=rep["min_auroc"], chance_sd=rep["chance_sd"],
                        texts=rep["texts"], toxic=rep["toxic"], truncated=rep["truncated"],
                        dampened={str(l): n for l, n in rep["dampened"].items()}, alpha=rep["alpha"])
        else:
            if cfg.pairs:
                pairs = read_pairs_file(cfg.pairs)
            else:
                n_pairs = int(settings.get("pairs", 0)) or len(extremes(out))
                n_edit = sum(r["split"] == "edit" for r in read_selected(out))
                n_extra = extra_samples_needed(cfg, n_edit, n_pairs) if "pairs" in settings else 0
                extra = None
                if n_extra:
                    extra = draw_pair_samples(model, tokenizer, cfg, out, stage_scorer(cfg, out), n_extra)
                pairs = sample_pairs(out, n_pairs, extra) if n_pairs else []
                info.update(extra_samples=n_extra)
            if not pairs:
                raise JaxeditError("no edited prompt has a non-blank sample")
            edited, rep = profs(model, pairs, tokenizer=tokenizer, layers=list(cfg.profs_layers) if cfg.profs_layers else None,
                                rank=int(settings["rank"]), progress=False)
            layers = list(rep["layers"])
            info.update(pairs=os.path.abspath(cfg.pairs) if cfg.pairs else "selected", n_pairs=rep["n_pairs"],
                        truncated=rep["truncated"],
                        singular_values={str(l): [float(s) for s in rep["singular_values"][l][:4]] for l in layers})
    except JaxeditError as e:
        info["error"] = str(e)
        write_json(os.path.join(edir, rid + ".json"), info)
        return info
    w = np.asarray(jax.device_get(params_of(edited)["blocks"]["w_out"][np.asarray(layers)]))
    tmp = os.path.join(edir, f".{rid}.tmp.npz")
    np.savez(tmp, layers=np.asarray(layers), w_out=w)
    os.replace(tmp, os.path.join(edir, rid + ".npz"))
    info.update(layers=layers, seconds=time.perf_counter() - t0)
    write_json(os.path.join(edir, rid + ".json"), info)
    return info
