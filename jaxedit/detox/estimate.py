"""How long a study's stages take on this machine, for the plan a run (or ``--dry-run``) prints first.

Each stage's progress bar times its work (:mod:`jaxedit.calibration`): the first unit (a batch of prompts, one edit
run, one evaluated model), timed from the stage's start (the compile and any set-up, such as the key statistics,
are in it), and the units after it. The edit stage is timed in two parts, the deletion grid's runs and the DINM /
ProFS runs, whose costs differ by an order of magnitude. When a stage has done work, those times are kept per model,
batch size, dtype and mesh shape in the jaxedit cache (``<cache>/calibration/detox.json``), with the sizes that set
a unit's cost (samples x tokens for the sampling stages, noisy samples x kinds for tracing). The plan extrapolates
them to the work left:

    estimate = fixed part (the first unit's seconds beyond one unit's: compile, set-up; once per stage)
               + seconds per later unit x units left x (this run's unit size / the measured run's unit size)

A stage not measured yet for this model and set-up is priced from its FLOPs instead (:func:`flop_seconds`, marked
"estimated from FLOPs" in the plan): its counts of prompts, samples, tokens, runs and models, the model's shape (its
config, read without the weights) and this machine's probe (:func:`jaxedit.calibration.machine`). Before the select
stage has run, the stages after it are priced as if every prompt were selected (an upper bound, "<=" in the plan).
"""
from __future__ import annotations

from typing import Optional

from jaxedit import calibration
from jaxedit.calibration import block_flops, forward_flops
from jaxedit.calibration import TimedBar, begin, human, setup_key  # noqa: F401  (the stages and the pipeline use them)
from jaxedit.detox.config import DetoxConfig
from jaxedit.edit.memit import hparams_for
from jaxedit.model import params_of
from jaxedit.sharding import mesh_of

STAGES_TIMED = ("select", "localize", "edit", "edit-methods", "evaluate")
# the edit stage is timed in two parts: the deletion grid's runs (minutes each) and the DINM / ProFS / AurA runs
# (seconds to a minute or two each), so that a plan of one kind is not extrapolated from the other's times
TIMED_PARTS = {"edit": ("edit", "edit-methods")}
SHOWN = {"edit": "edit (deletions)", "edit-methods": "edit (DINM / ProFS / AurA)"}


def unit_size(cfg: DetoxConfig, stage: str) -> float:
    """What a unit of ``stage`` costs in proportion to: prompts are the units of select and localize, runs those
    of edit, models those of evaluate. An edit run and an evaluated model handle all selected prompts in batched
    calls, whose cost grew far less than the prompt count in the runs measured (docs/toxicity.md); they are not
    scaled by it."""
    if stage == "select":
        return float(cfg.select_samples * cfg.max_new_tokens)
    if stage == "localize":
        return float(cfg.trace_samples * len(cfg.trace_kinds))
    if stage == "evaluate":
        return float(cfg.eval_samples * cfg.max_new_tokens)
    return 1.0


def model_setup(model) -> str:
    """:func:`setup_key` of a loaded model."""
    return setup_key(str(params_of(model)["blocks"]["w_out"].dtype), mesh_of(model))


def _key(cfg: DetoxConfig, setup: str) -> str:
    return f"{calibration.model_key(cfg.model)} | batch {cfg.batch_size} | {setup}"


def load_calibration(cfg: DetoxConfig, setup: str = setup_key()) -> dict:
    return calibration.read("detox").get(_key(cfg, setup), {})


def record(cfg: DetoxConfig, stage: str, setup: str = setup_key()) -> None:
    """Keep what this process measured of ``stage`` (if it did any work) as the calibration of this model, batch
    size and set-up."""
    rec = calibration.measured(stage)
    if rec is not None:
        calibration.store("detox", _key(cfg, setup), stage, rec, unit_size(cfg, stage))


def stage_seconds(cal: dict, cfg: DetoxConfig, stage: str, units: Optional[int]) -> Optional[float]:
    """Estimated seconds for ``units`` units of ``stage`` (None: no measurement, or the units are not known yet):
    the measured run's fixed part (its first unit's time beyond one unit's: compile, set-up) plus its seconds per
    unit, scaled by the unit's size, for every unit left."""
    return calibration.extrapolate(cal.get(stage), units, unit_size(cfg, stage))


# What a stage's compiles and set-up cost, in compiles of the machine probe (jaxedit.calibration.probe), and what
# fraction of the probe's FLOP rate its counted FLOPs reach: read off the quick study of docs/toxicity.md on SmolLM2
# on the 2-core CPU machine (benchmarks/bench_estimate.py; docs/benchmarks.md has the tables), first under other jobs'
# load, then refit to the idle machine (the probe keeps the fastest rate it saw: the idle one) by each stage's
# measured / estimated ratio there (select 1.44, localize 2.17, edit 1.82, evaluate 1.03). Sampling decodes one token
# per step (small matmuls, a nucleus cut per step): a fraction of the probe's rate. The edit's count is an upper
# bound (the target vector's gradient stops at its layer, and its steps stop early).
SETUP_UNITS = {"select": 21.6, "localize": 26.0, "edit": 109.0, "edit-methods": 9.1, "evaluate": 82.0}
METHOD_SETUP_UNITS = {"profs": 9.1, "dinm": 36.4, "aura": 9.1}  # edit-methods: the largest of the methods left
RATE_FACTOR = {"select": 0.35, "localize": 0.55, "edit": 1.48, "edit-methods": 0.27, "evaluate": 0.63}
# DINM's count (every step a forward and backward of the whole model on each prompt) is a large upper bound (it
# tunes one layer, the forward up to it is shared, steps stop early): the share of it that costs, read off the
# 40-opening study's DINM runs on the idle machine (10 and 30 steps on 22 prompts: 134 s measured, about 1,140 s
# from the full count at the edit-methods factor), the only DINM runs measured inside a study so far.
DINM_COUNT_SHARE = 0.118
NEUTRAL_TOKENS = 320  # the shipped neutral text (220 words) in tokens, about; a given file is measured by its size
CHARS_PER_TOKEN = 4.0  # English text in a BPE vocabulary, about (the plan does not tokenize)


def text_tokens(text: str) -> int:
    """A text's token count as the plan guesses it, without a tokenizer: its characters / 4, at least 1."""
    return max(1, round(len(text) / CHARS_PER_TOKEN))


def stage_flops(cfg: DetoxConfig, config, stage: str, sizes: dict) -> tuple:
    """``(fixed, per_unit)`` FLOPs of ``stage`` (fixed: once per stage, such as the key statistics; per unit: a
    prompt for select and localize, a run for edit, an evaluated model for evaluate, and for edit-methods the mean
    over the DINM / ProFS / AurA runs left). ``sizes``: ``prompt_tokens`` (mean tokens of a prompt), ``edited`` and
    ``heldout`` (prompts), ``facts`` (factual prompts) and ``fact_tokens`` (their mean tokens), ``neutral_tokens``,
    ``methods`` (the method of each DINM / ProFS / AurA run left; ``method_runs``: (method, settings) of each;
    ``extra_samples``: ProFS samples per prompt still to draw; ``aura_texts``, ``file_pairs``: their counts)."""
    P, N = sizes.get("prompt_tokens", 12), cfg.max_new_tokens
    n_edit, n_held = sizes.get("edited", 0), sizes.get("heldout", 0)
    if stage == "select":  # select_samples continuations of N tokens after the prompt, per prompt
        return 0.0, cfg.select_samples * forward_flops(config, P + N)
    if stage == "localize":  # per kind and noisy sample: the packed grid (restore layer l runs blocks l..L-1 over
        # the T(T+1)/2 positions of its token rows) and the LM head at each row's last token; saliency: fwd + bwd
        L, T = config.n_layers, P
        grid = L * (L + 1) / 2 * T * (T + 1) / 2 * block_flops(config, T) + L * T * 2.0 * config.d_model * \
            config.vocab_size
        sal = 3 * forward_flops(config, T) if "saliency-multi" in cfg.strategies else 0.0
        return 0.0, len(cfg.trace_kinds) * cfg.trace_samples * grid + sal
    if stage == "edit":  # per run: the target vector's Adam steps (fwd + bwd) over every edited prompt in its
        # context prefixes and the KL prompt; once: the key statistics (the corpus sampled from the model and read)
        hp = hparams_for(config, cfg.hparams.get("preset"), **{k: v for k, v in cfg.hparams.items()
                                                                   if k not in ("preset",)})
        ctx = len(hp.context_prefixes) + 1
        per_run = hp.v_num_grad_steps * 3 * n_edit * ctx * forward_flops(config, hp.context_length + P)
        field = lambda *names: next((getattr(hp, n) for n in names if hasattr(hp, n)), None)  # noqa: E731
        samples = cfg.samples or field("stats_samples", "mom2_samples") or 100_000
        max_len = cfg.max_len or field("max_len", "mom2_max_len") or min(config.max_positions, 1024)
        corpus = cfg.corpus or field("corpus", "mom2_corpus")
        stats = samples * forward_flops(config, max_len) * (2 if corpus == "model" else 1)
        return stats, per_run
    if stage == "edit-methods":  # DINM: per prompt, the location (2 forwards) and its Adam steps (fwd + bwd) on the
        # unsafe / safe sample and the KL input; ProFS: the pairs' forwards (its SVD is small), and once the extra
        # samples its pairs need (sampling, as select); AurA: one forward per text (its AUROCs are host sorts)
        seq = forward_flops(config, P + N)
        runs = sizes.get("method_runs") or [(m, {}) for m in sizes.get("methods") or ["dinm"]]

        def cost(m, st):
            if m == "dinm":
                return DINM_COUNT_SHARE * n_edit * (2 + int(st.get("steps", max(cfg.dinm_steps))) * 3 * 2) * seq
            if m == "profs":
                return 2 * int(st.get("pairs") or sizes.get("file_pairs") or n_edit) * seq
            if m == "aura":
                return sizes.get("aura_texts", n_edit * cfg.select_samples) * seq
            return 0.0

        fixed = sizes.get("extra_samples", 0) * n_edit * seq
        return fixed, sum(cost(m, st) for m, st in runs) / len(runs)
    if stage == "evaluate":  # per model: the continuations on the edited, held-out and factual prompts, and the
        # perplexities (prompts, neutral text, factual answers)
        F, FT = sizes.get("facts", 0), sizes.get("fact_tokens", 8)
        flops = (n_edit + n_held) * (cfg.eval_samples * forward_flops(config, P + N) + forward_flops(config, P))
        flops += F * (cfg.factual_samples * forward_flops(config, FT + N) + forward_flops(config, FT + N))
        flops += forward_flops(config, sizes.get("neutral_tokens", NEUTRAL_TOKENS))
        return 0.0, flops
    return 0.0, 0.0


def flop_seconds(cfg: DetoxConfig, config, stage: str, units: Optional[int], sizes: dict,
                 probe: dict) -> Optional[float]:
    """Estimated seconds of ``units`` units of ``stage`` never measured here: the stage's set-up (SETUP_UNITS probe
    compiles) plus its FLOPs (:func:`stage_flops`) at RATE_FACTOR x the probe's rate; 0 with nothing left, None when
    the units are not known."""
    if units is not None and units <= 0:
        return 0.0
    if units is None:
        return None
    fixed, per = stage_flops(cfg, config, stage, sizes)
    setup = SETUP_UNITS[stage]
    if stage == "edit-methods":  # DINM's tuning loop compiles far more than ProFS's forwards
        setup = max(METHOD_SETUP_UNITS[m] for m in sizes.get("methods") or ["dinm"])
    return calibration.from_flops(fixed + per * units, setup, probe, RATE_FACTOR[stage])


def estimate_lines(cfg: DetoxConfig, units: dict, setup: str = setup_key(), config=None, sizes=None) -> list:
    """The plan's time lines: per stage ``units`` (stage -> units left, None when unknown before an earlier stage
    runs), and the total. A stage measured on this machine is extrapolated from its measurement; one never measured
    is priced from its FLOPs (with the model's ``config`` and the plan's ``sizes``, see :func:`stage_flops`; the
    machine is probed once, about a second, and kept)."""
    cal = load_calibration(cfg, setup)
    sizes = sizes or {}
    probe = None
    parts, total, unknown, measured, guessed = [], 0.0, [], False, False
    for stage in STAGES_TIMED:
        if stage not in units:
            continue
        s = stage_seconds(cal, cfg, stage, units[stage])
        tag = ""
        if s is not None:
            measured = measured or bool(units[stage])
        elif config is not None and units[stage] is not None:
            if probe is None and units[stage] > 0:
                probe = calibration.machine(config)
            s = flop_seconds(cfg, config, stage, units[stage], sizes, probe) if units[stage] > 0 else 0.0
            tag = "*" if units[stage] else ""
            if tag and sizes.get("bound", {}).get(stage):
                tag = "*<="
                guessed = True
        if s is None:
            unknown.append(stage)
            continue
        total += s
        parts.append(f"{SHOWN.get(stage, stage)} {tag.lstrip('*')}~{human(s)}{tag[:1]}")
    unknown = [SHOWN.get(u, u) for u in unknown]
    if not parts:
        return [f"time: no estimate yet for {', '.join(unknown)} (not measured for {cfg.model} at batch size "
                f"{cfg.batch_size} ({setup}) on this machine, or sized by an earlier stage)"]
    line = f"time: {'<=' if guessed else ''}~{human(total)}" + (
        " + " + ", ".join(unknown) + " (not measured yet, or sized by an earlier stage)" if unknown else "")
    notes = []
    if measured:
        dates = sorted({c["date"] for c in cal.values()})
        notes.append(f"from runs on this machine, {dates[-1]}")
    if probe is not None:
        notes.append("*: estimated from FLOPs and a probe of this machine; the first run measures it")
    if guessed:
        notes.append("<=: sized as if every prompt were selected")
    return [line + f" ({', '.join(parts)}; {'; '.join(notes)})"]
