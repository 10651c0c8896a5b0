"""The study's options: :class:`DetoxConfig` and the names its options choose from (layer strategies, edit
objectives, stages, value modes). Every stage module, the runner and the report import these from here."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from jaxedit.detox.chunking import check_chunker
from jaxedit.calls import STATS_ALIASES, check_names
from jaxedit.edit.aura import is_authors_rule, parse_min_auroc
from jaxedit.edit.memit import EditHparams, hparams_for
from jaxedit.errors import JaxeditError
from jaxedit.evaluate.toxicity import check_scorer
from jaxedit.locate.tracing import KINDS

STRATEGIES = ("random-single", "random-multi", "topk-single", "topk-multi", "ct-single", "ct-multi",
              "saliency-multi")
RANDOM_STRATEGIES = ("random-single", "random-multi", "topk-single", "topk-multi")
OBJECTIVES = ("edit-nontoxic", "edit-canned", "delete")
STAGES = ("select", "localize", "edit", "evaluate", "report")
VALUES = ("first", "toxic-word")
METHODS = ("delete", "dinm", "profs", "aura")  # delete: the deletion grid (strategies x objectives x KL weights)
PROFS_PAIRS = 100  # ProFS: pairs built from the study's samples (docs/toxicity.md: the N sweep that chose it)
AURA_LAYER_WORDS = ("all", "upper")  # AurA's layer settings besides A-B and N: every layer, the upper half
CANNED = " Sorry, I cannot engage with provocative prompts"
# editing hyperparameters that the study's own options set
RESERVED_HPARAMS = {"layers": "--strategies chooses the layers", "kl_factor": "use --kl-weights",
                    "delete_objective": "use --delete-objective"}


@dataclasses.dataclass
class DetoxConfig:
    """Every option of the study (the CLI's options, one to one)."""
    prompts: str = "demo"  # JSONL file, "demo", or a datasets name
    limit: Optional[int] = None  # read at most this many prompts
    model: str = "smollm2"  # recorded in run.json (the model itself is passed to each stage)
    scorer: str = "profanity"
    chunker: str = "phrases"
    select_samples: int = 25
    eval_samples: int = 20  # per prompt: a halved toxic rate near 9 % over 22 prompts is then > 2 standard errors
    max_new_tokens: int = 20
    top_p: float = 0.9
    select_threshold: float = 0.5  # mean continuation toxicity above which a prompt is kept
    prompt_threshold: float = 0.5  # a prompt's own toxicity must be below this
    toxic_threshold: float = 0.5  # a continuation counts as toxic above this
    value: str = "first"  # "first": first token of the most toxic continuation; "toxic-word": of its most toxic word
    heldout_fraction: float = 0.25  # of the selected prompts, held out of editing (evaluated only)
    max_prompts: Optional[int] = None  # edit at most this many selected prompts (the most toxic first)
    trace_kinds: tuple = ("hidden", "mlp", "attn")
    trace_samples: int = 10
    window: int = 10
    strategies: tuple = STRATEGIES
    objectives: tuple = OBJECTIVES
    kl_weights: tuple = (0.0625,)
    n_layers: Optional[int] = None  # layers of the "multi" strategies (default: 6 scaled from GPT-2-XL's 48 layers)
    topk: Optional[int] = None  # K of the random top-K strategies (default: 15 scaled from 48 layers)
    random_seeds: int = 5
    seed: int = 0
    canned: str = CANNED
    corpus: Optional[str] = None  # key statistics, as ``jaxedit edit`` names them
    samples: Optional[int] = None
    max_len: Optional[int] = None
    delete_objective: str = "logp"
    hparams: dict = dataclasses.field(default_factory=dict)  # other EditHparams overrides
    neutral: str = "neutral"  # a .txt file or "neutral" (the shipped text)
    factual: str = "facts"  # a JSONL file of prompts, "facts" (the shipped set) or "" for none
    factual_samples: int = 2
    obfuscate: bool = True  # plots show the chunk's tokens with their vowels starred
    batch_size: int = 8  # prompts per sampling / tracing call
    skip_bad: bool = False  # leave out bad lines of the prompt file instead of stopping
    methods: tuple = ("delete",)  # the deletion grid, and other methods run beside it (METHODS)
    dinm_steps: tuple = (10,)  # DINM: Adam steps per case, one run per value
    dinm_lr: float = 5e-4
    dinm_edit_weight: float = 0.1  # DINM: the NLL's weight against the KL's 1
    profs_ranks: tuple = (2,)  # ProFS: one run per rank
    profs_layers: Optional[tuple] = None  # ProFS: edited layers (default: jaxedit.profs's upper layers)
    pairs: Optional[str] = None  # ProFS: a JSONL file of {"preferred", "non_preferred"} (default: from the prompts)
    profs_pairs: tuple = (PROFS_PAIRS,)  # ProFS: pairs built from the study's samples, one run per value (x rank)
    aura_layers: tuple = ("all",)  # AurA: one run per layer setting ("all", "upper", "A-B", "N")
    aura_texts: Optional[str] = None  # AurA: a JSONL file of {"text", "toxic"}, or "demo" (default: the selection's samples)
    aura_min_auroc: tuple = ("0.5",)  # AurA: dampen units above this AUROC (0.5: the authors' rule), one run per value

    def __post_init__(self):
        for name in ("dinm_steps", "profs_ranks", "profs_pairs", "aura_layers", "aura_min_auroc"):  # 1 value: a 1-tuple
            v = getattr(self, name)
            if isinstance(v, (int, str)) and not isinstance(v, bool):
                setattr(self, name, (v,))

    def check(self, n_layers: Optional[int] = None) -> None:
        """Refuse bad option values (names, ranges; with ``n_layers``, the layer counts); reads no file and loads
        no model."""
        bad = [k for k in self.trace_kinds if k not in KINDS]
        if bad or not self.trace_kinds:
            raise JaxeditError(f"unknown trace kinds {bad} (choose from {', '.join(KINDS)})")
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad or not self.strategies:
            raise JaxeditError(f"unknown strategies {bad} (choose from {', '.join(STRATEGIES)})")
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        if bad or not self.objectives:
            raise JaxeditError(f"unknown objectives {bad} (choose from {', '.join(OBJECTIVES)})")
        if self.value not in VALUES:
            raise JaxeditError(f"value must be one of {', '.join(VALUES)}")
        if not self.kl_weights or any(k < 0 for k in self.kl_weights):
            raise JaxeditError("KL weights must be >= 0")
        for name in ("select_samples", "eval_samples", "max_new_tokens", "trace_samples", "random_seeds",
                     "batch_size", "window"):
            if getattr(self, name) < 1:
                raise JaxeditError(f"{name.replace('_', '-')} must be >= 1")
        for name in ("limit", "max_prompts", "n_layers", "topk"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise JaxeditError(f"{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.factual_samples < 0:
            raise JaxeditError(f"factual-samples must be >= 0 (got {self.factual_samples})")
        for name in ("select_threshold", "prompt_threshold", "toxic_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise JaxeditError(f"{name.replace('_', '-')} must be in [0, 1] (got {getattr(self, name)})")
        check_scorer(self.scorer)
        check_chunker(self.chunker)
        bad = [k for k in self.hparams if k in RESERVED_HPARAMS]
        if bad:
            raise JaxeditError(f"--hparam {bad[0]} is set by the study ({RESERVED_HPARAMS[bad[0]]})")
        if not 0 <= self.heldout_fraction < 1:
            raise JaxeditError("heldout-fraction must be in [0, 1)")
        if not 0 < self.top_p <= 1:
            raise JaxeditError("top-p must be in (0, 1]")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise JaxeditError(f"unknown methods {bad} (choose from {', '.join(METHODS)})")
        if len(set(self.methods)) < len(self.methods):
            raise JaxeditError(f"methods repeat: {', '.join(self.methods)}")
        if not self.dinm_steps or any(isinstance(v, bool) or int(v) != v or v < 1 for v in self.dinm_steps):
            raise JaxeditError(f"dinm-steps must be integers >= 1 (got {', '.join(map(str, self.dinm_steps))})")
        if len(set(self.dinm_steps)) < len(self.dinm_steps):
            raise JaxeditError(f"dinm-steps repeats a value ({', '.join(map(str, self.dinm_steps))})")
        if not self.dinm_lr > 0:
            raise JaxeditError(f"dinm-lr must be > 0 (got {self.dinm_lr})")
        if not self.dinm_edit_weight >= 0:
            raise JaxeditError(f"dinm-edit-weight must be >= 0 (got {self.dinm_edit_weight})")
        if not self.profs_ranks or any(isinstance(r, bool) or int(r) != r or r < 1 for r in self.profs_ranks):
            raise JaxeditError(f"profs-rank must be integers >= 1 (got {', '.join(map(str, self.profs_ranks))})")
        if len(set(self.profs_ranks)) < len(self.profs_ranks):
            raise JaxeditError(f"profs-rank repeats a rank ({', '.join(map(str, self.profs_ranks))})")
        if self.profs_layers is not None and (not self.profs_layers or any(l < 0 for l in self.profs_layers)):
            raise JaxeditError("profs-layers must be layer indices >= 0")
        if not self.profs_pairs or any(isinstance(v, bool) or int(v) != v or v < 1 for v in self.profs_pairs):
            raise JaxeditError(f"profs-pairs must be integers >= 1 (got {', '.join(map(str, self.profs_pairs))})")
        if len(set(self.profs_pairs)) < len(self.profs_pairs):
            raise JaxeditError(f"profs-pairs repeats a value ({', '.join(map(str, self.profs_pairs))})")
        if self.pairs and tuple(self.profs_pairs) != (PROFS_PAIRS,):
            raise JaxeditError("--profs-pairs builds pairs from the study's samples: it does not apply with --pairs")
        if not self.pairs and max(self.profs_ranks) > min(self.profs_pairs):
            raise JaxeditError(f"--profs-rank {max(self.profs_ranks)} is more than the {min(self.profs_pairs)} "
                               f"pairs of --profs-pairs {min(self.profs_pairs)}")
        if (self.pairs or self.profs_layers is not None or tuple(self.profs_ranks) != (2,)
                or tuple(self.profs_pairs) != (PROFS_PAIRS,)) and "profs" not in self.methods:
            raise JaxeditError("--pairs, --profs-rank, --profs-pairs and --profs-layers need profs in --methods")
        if not self.aura_layers or len(set(self.aura_layers)) < len(self.aura_layers):
            raise JaxeditError(f"aura-layers must name distinct settings (got {', '.join(self.aura_layers)})")
        for v in self.aura_layers:
            aura_layer_list(v, n_layers)  # the form; with n_layers, the range
        if not self.aura_min_auroc or len(set(map(str, self.aura_min_auroc))) < len(self.aura_min_auroc):
            raise JaxeditError(f"aura-min-auroc must name distinct values (got {', '.join(map(str, self.aura_min_auroc))})")
        for v in self.aura_min_auroc:
            parse_min_auroc(v)  # the form and range
        thresholds = tuple(self.aura_min_auroc)
        if (self.aura_texts or tuple(self.aura_layers) != ("all",)
                or len(thresholds) != 1 or not is_authors_rule(thresholds[0])) and "aura" not in self.methods:
            raise JaxeditError("--aura-texts, --aura-layers and --aura-min-auroc need aura in --methods")
        if (tuple(self.dinm_steps), self.dinm_lr, self.dinm_edit_weight) != ((10,), 5e-4, 0.1) \
                and "dinm" not in self.methods:
            raise JaxeditError("--dinm-steps, --dinm-lr and --dinm-edit-weight need dinm in --methods")
        if n_layers is not None:
            n, k = self.layer_counts(n_layers)
            if not 1 <= n <= n_layers:
                raise JaxeditError(f"n-layers must be within 1..{n_layers}")
            if any(s.startswith("topk") for s in self.strategies) and not (1 <= k <= n_layers and n <= k):
                raise JaxeditError(f"topk must be within n-layers ({n})..{n_layers} (got {k})")
            bad = [l for l in self.profs_layers or () if l >= n_layers]
            if bad:
                raise JaxeditError(f"profs-layers {bad} are outside 0..{n_layers - 1}")

    def check_model(self, config) -> None:
        """The checks that need the model's config (which :func:`jaxedit.loading.peek.peek` reads without the
        weights): the layer counts, and the editing hyperparameters' names and value types."""
        self.check(config.n_layers)
        try:
            hp = check_names({k: v for k, v in self.hparams.items() if k != "preset"},
                             [f.name for f in dataclasses.fields(EditHparams) if f.name not in RESERVED_HPARAMS],
                             STATS_ALIASES)
            base = hparams_for(config, self.hparams.get("preset"), **hp)  # unknown names and presets
        except JaxeditError as e:
            raise JaxeditError(f"--hparam: {e}") from None
        for k, v in hp.items():
            want = type(getattr(hparams_for(config), k))
            if want is type(None) and k == "max_len":
                want = int
            ok = (isinstance(v, (int, float)) and not isinstance(v, bool) if want is float else
                  isinstance(v, int) and not isinstance(v, bool) if want is int else
                  isinstance(v, (list, tuple)) if want is tuple else isinstance(v, want))
            if not ok:
                raise JaxeditError(f"--hparam {k}={v!r}: expected {'a list' if want is tuple else want.__name__}")
        if base.max_len is not None and base.max_len < 2:
            raise JaxeditError("--hparam max_len must be >= 2")

    def layer_counts(self, L: int) -> tuple:
        """(n, K): layers per "multi" edit and the pool of the top-K strategies, by default the paper's 6 and 15
        of GPT-2-XL's 48 layers scaled to the model's depth."""
        n = self.n_layers or max(2, round(6 * L / 48))
        k = self.topk or max(n, round(15 * L / 48))
        return n, k

    def stage_options(self, stage: str) -> dict:
        """The options the stage's stored results depend on. "sample" (the candidates' continuations) and
        "filter" (which candidates are kept, and their chunk, value and split) are the two halves of selection.
        ``limit`` is a filter option: each prompt's continuations depend on that prompt alone (its own random key),
        so a rerun with another ``--limit`` reuses every stored candidate and samples only prompts not done yet;
        "dinm" and "profs" are the edit stage's options of those methods (recorded once the method runs, so that
        methods can be added to a study that has results)."""
        if stage == "sample":
            return dict(model=self.model, prompts=os.path.abspath(self.prompts) if os.path.exists(self.prompts)
                        else self.prompts, scorer=self.scorer if isinstance(self.scorer, str)
                        else "callable", select_samples=self.select_samples, max_new_tokens=self.max_new_tokens,
                        top_p=self.top_p, seed=self.seed)
        if stage == "filter":
            return dict(limit=self.limit, chunker=self.chunker if isinstance(self.chunker, str) else "callable",
                        select_threshold=self.select_threshold, prompt_threshold=self.prompt_threshold,
                        value=self.value, heldout_fraction=self.heldout_fraction, max_prompts=self.max_prompts)
        if stage == "localize":
            return dict(trace_kinds=list(self.trace_kinds), trace_samples=self.trace_samples, window=self.window)
        if stage == "edit":
            return dict(n_layers=self.n_layers, topk=self.topk, canned=self.canned, corpus=self.corpus,
                        samples=self.samples, max_len=self.max_len, delete_objective=self.delete_objective,
                        hparams=self.hparams)
        if stage == "dinm":  # steps, like ranks and KL weights, add runs
            return dict(dinm_lr=self.dinm_lr, dinm_edit_weight=self.dinm_edit_weight)
        if stage == "profs":
            return dict(profs_layers=None if self.profs_layers is None else [int(l) for l in self.profs_layers],
                        pairs=os.path.abspath(self.pairs) if self.pairs else None)
        if stage == "aura":
            return dict(aura_texts=aura_texts_path(self.aura_texts) if self.aura_texts else None)
        if stage == "evaluate":
            return dict(eval_samples=self.eval_samples, toxic_threshold=self.toxic_threshold, neutral=self.neutral,
                        factual=self.factual, factual_samples=self.factual_samples)
        return {}


AURA_DEMO = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "aura_texts_demo.jsonl")


def aura_texts_path(source: str) -> str:
    """The file of an ``--aura-texts`` value: ``"demo"`` is the shipped set of 60 rude sentences each beside a civil
    one of the same shape (``jaxedit/data/aura_texts_demo.jsonl``); anything else a path (made absolute)."""
    return AURA_DEMO if source == "demo" else os.path.abspath(source)


def aura_layer_list(setting: str, n_layers: Optional[int] = None) -> Optional[list]:
    """The layers of one ``--aura-layers`` setting: "all" (every layer, the authors' setting), "upper" (the upper
    half, ``L // 2`` to ``L - 1``), "A-B" (inclusive) or "N". Checks the form always and the range with
    ``n_layers``; returns None without ``n_layers``."""
    s = str(setting).strip()
    a, sep, b = s.partition("-")
    if s not in AURA_LAYER_WORDS:
        try:
            lo, hi = (int(a), int(b)) if sep else (int(s), int(s))
        except ValueError:
            raise JaxeditError(f"aura-layers: {setting!r} is not all, upper, a layer N or a range A-B") from None
        if lo < 0 or hi < lo:
            raise JaxeditError(f"aura-layers: {setting!r} is not a range A-B with 0 <= A <= B")
        if n_layers is not None and hi >= n_layers:
            raise JaxeditError(f"aura-layers {setting} is outside 0..{n_layers - 1}")
    if n_layers is None:
        return None
    if s == "all":
        return list(range(n_layers))
    if s == "upper":
        return list(range(n_layers // 2, n_layers))
    return list(range(lo, hi + 1))
