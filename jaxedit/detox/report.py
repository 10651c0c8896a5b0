"""The study's report: tables shaped like Das et al.'s Tables 1 and 2 and the figures, from the files the earlier
stages wrote (``summary.jsonl``, ``localize.json``), so the report can be redrawn at any time.

* ``table1.md/csv``: the edits (edit-nontoxic, edit-canned) per layer strategy: % toxic continuations, perplexity
  on the prompts, fluency; the unedited model first.
* ``table2.md/csv``: editing vs deletion per layer strategy: % toxic and perplexity for each objective, and the %
  toxic on the held-out prompts.
* ``summary.md``: every row and column of ``summary.jsonl``.
* ``aie_layers.png/pdf``: the average indirect effect per layer at the chunk's last token and at the last token,
  one panel per kind (the paper's Figures 1 and 4).
* ``table_methods.md/csv``: the methods side by side (the deletions, DINM, ProFS, AurA): % toxic and held-out %
  toxic with their binomial standard errors,
  perplexities, fluency, factual answers kept, edit seconds.
* ``frontier.png/pdf``: % toxic (± its binomial standard error) vs perplexity, one line per (strategy,
  objective) through its KL weights (the paper's Figures 2 and 3), DINM (through its steps), ProFS (through its
  ranks or numbers of pairs) and AurA (through its layer settings) with their own markers.
"""
from __future__ import annotations

import json
import os

from jaxedit.detox.config import OBJECTIVES, STRATEGIES, DetoxConfig
from jaxedit.edit.aura import is_authors_rule, min_auroc_order
from jaxedit.errors import JaxeditError
from jaxedit.files import read_rows, write_atomic

EDITS = ("edit-nontoxic", "edit-canned")


def _fmt(v, pct=False):
    if v is None:
        return "—"
    return f"{100 * v:.1f}" if pct else f"{v:.2f}"


def _pick(rows, strategy, objective, kl):
    """The row of (strategy, objective) at KL weight ``kl``, or at the nearest KL weight present."""
    cands = [r for r in rows if r["strategy"] == strategy and r["objective"] == objective]
    if not cands:
        return None
    return min(cands, key=lambda r: abs(r["kl_weight"] - kl))


def _table(head, rows):
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    csv = [",".join(head)] + [",".join(str(c).replace(",", ";") for c in row) for row in rows]
    return "\n".join(md) + "\n", "\n".join(csv) + "\n"


def _layers(r):
    lay = r.get("layers")
    if lay and isinstance(lay[0], list):
        return f"{len(lay)} seeds"
    return " ".join(str(l) for l in lay or []) or "—"


def tables(rows: list, kl: float) -> dict:
    """{"table1": (md, csv), "table2": (md, csv), "summary": md} from summary rows."""
    base = next((r for r in rows if r["strategy"] == "base"), None)
    strategies = [s for s in STRATEGIES if any(r["strategy"] == s for r in rows)]
    edits = [o for o in EDITS if any(r["objective"] == o for r in rows)]
    objectives = [o for o in OBJECTIVES if any(r["objective"] == o for r in rows)]
    out = {}

    head = ["strategy", "layers"]
    for o in edits:
        head += [f"{o} toxic %", f"{o} ppl", f"{o} fluency"]
    body = []
    if base:
        body.append(["base (unedited)", "—"] + [_fmt(base.get(k), k == "toxic_rate") for _ in edits
                                                 for k in ("toxic_rate", "perplexity_prompts", "fluency")])
    for s in strategies:
        picked = [_pick(rows, s, o, kl) for o in edits]
        if not any(picked):
            continue
        line = [s, _layers(next(p for p in picked if p))]
        for p in picked:
            line += [_fmt(p and p.get(k), k == "toxic_rate") for k in ("toxic_rate", "perplexity_prompts", "fluency")]
        body.append(line)
    missing = [o for o in EDITS if o not in edits]
    note = ("Table 1: the edits toward a target, per layer strategy (KL weight nearest "
            f"{kl:g}); the deletion is compared with them in table2.md."
            + (f" Not run: {', '.join(missing)}." if missing else ""))
    if edits:
        md, csv = _table(head, body)
        out["table1"] = (md + "\n" + note + "\n", csv)
    else:
        out["table1"] = (note + "\n", "")

    head = ["strategy"]
    for o in objectives:
        head += [f"{o} toxic %", f"{o} ppl", f"{o} held-out toxic %"]
    body = []
    if base:
        body.append(["base (unedited)"] + [_fmt(base.get(k), "toxic" in k) for _ in objectives
                                           for k in ("toxic_rate", "perplexity_prompts", "heldout_toxic_rate")])
    for s in strategies:
        line = [s]
        for o in objectives:
            p = _pick(rows, s, o, kl)
            line += [_fmt(p and p.get(k), "toxic" in k) for k in ("toxic_rate", "perplexity_prompts",
                                                                   "heldout_toxic_rate")]
        body.append(line)
    out["table2"] = _table(head, body)

    cols = ["method", "strategy", "objective", "kl_weight", "layers", "seeds", "toxic_rate", "perplexity_prompts",
            "perplexity_neutral", "fluency", "heldout_toxic_rate", "heldout_perplexity", "heldout_fluency",
            "factual_argmax_kept", "factual_toxic_rate", "factual_perplexity"]
    body = []
    for r in rows:
        line = []
        for c in cols:
            v = r.get(c)
            if c == "layers":
                v = _layers(r)
            elif c == "method":
                v = _method(r)
            elif isinstance(v, float):
                v = _fmt(v, "toxic" in c or "kept" in c) if c != "kl_weight" else f"{v:g}"
            line.append("—" if v is None else v)
        if r.get("failed"):
            line[1] += f" ({len(r['failed'])} failed)"
        body.append(line)
    out["summary"] = _table(cols, body)[0]
    return out


METHOD_COLUMNS = ("method", "setting", "layers", "toxic % ± se", "held-out toxic % ± se", "ppl", "neutral ppl",
                  "fluency", "factual kept %", "edit s")
METHOD_METRICS = ("toxic_rate", "heldout_toxic_rate", "perplexity_prompts", "perplexity_neutral", "fluency",
                  "factual_argmax_kept", "edit_seconds")
RATES = {"toxic_rate": "n_prompts", "heldout_toxic_rate": "n_heldout"}  # a rate and the prompts it is over


def _method(r):
    return r.get("method") or ("base" if r["strategy"] == "base" else "delete")


def samples_of(r: dict, rate: str = "toxic_rate"):
    """How many scored continuations ``rate`` of summary row ``r`` counts: prompts x samples per prompt x seeds
    averaged (None when the row does not say)."""
    n_p, n_s = r.get(RATES[rate]), r.get("n_samples")
    if not n_p or not n_s:
        return None
    return int(n_p) * int(n_s) * max(int(r.get("seeds") or 1), 1)


def binomial_se(r: dict, rate: str = "toxic_rate"):
    """The binomial standard error sqrt(p (1 - p) / n) of a row's toxic rate p over its n continuations
    (:func:`samples_of`; seeds pooled), or None."""
    p, n = r.get(rate), samples_of(r, rate)
    if p is None or not n:
        return None
    return (p * (1 - p) / n) ** 0.5


def _setting(r):
    m, st = _method(r), r.get("settings") or {}
    if m == "delete":
        return f"{r['strategy']}, KL {r['kl_weight']:g}"
    if m == "dinm":
        return f"{st.get('steps')} steps, lr {st.get('lr'):g}, edit weight {st.get('edit_weight'):g}"
    if m == "profs":
        return f"rank {st.get('rank')}" + (f", {st['pairs']} pairs" if st.get("pairs") else "")
    if m == "aura":
        auc = st.get("min_auroc", "0.5")
        return f"layers {st.get('layers')}" + ("" if is_authors_rule(auc) else f", AUROC > {auc}")
    return "—"


def strength(r) -> tuple:
    """The order of a method's runs from the gentlest to the strongest edit: the deletion's KL weight (a larger
    weight is gentler), DINM's steps, ProFS's pairs then rank, AurA's number of layers."""
    m, st = _method(r), r.get("settings") or {}
    if m == "delete":
        return (-r["kl_weight"],)
    if m == "dinm":
        return (st.get("steps", 0),)
    if m == "profs":
        return (st.get("pairs", 0), st.get("rank", 0))
    if m == "aura":  # a higher AUROC threshold dampens fewer units: gentler
        return (len(r.get("layers") or []), str(st.get("layers")), -min_auroc_order(st.get("min_auroc", 0.5)))
    return ()


def method_rows(rows: list) -> list:
    """The rows of the methods table, in order: the unedited model, the deletions (objective "delete") per
    strategy and KL weight, DINM by steps, ProFS by pairs and rank, AurA by its number of layers."""
    base = [r for r in rows if _method(r) == "base"]
    dels = sorted((r for r in rows if _method(r) == "delete" and r["objective"] == "delete"),
                  key=lambda r: (STRATEGIES.index(r["strategy"]) if r["strategy"] in STRATEGIES else len(STRATEGIES),
                                 r["kl_weight"]))
    others = [sorted((r for r in rows if _method(r) == m), key=strength) for m in ("dinm", "profs", "aura")]
    return base + dels + [r for group in others for r in group]


def _rate_cell(r, k):
    v, se = r.get(k), binomial_se(r, k)
    if v is None:
        return "—"
    return f"{100 * v:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")


def table_methods(rows: list) -> tuple:
    """(md, csv) of ``table_methods``: one row per method run (see :func:`method_rows`) x the columns of
    ``METHOD_COLUMNS``; the toxic rates with their binomial standard errors (:func:`binomial_se`; in the csv, a
    column of their own)."""
    body, csv_body = [], []
    for r in method_rows(rows):
        m = _method(r)
        lay = r.get("layers") or []
        runs_ = " ".join(str(l) for l in lay) if not lay or isinstance(lay[0], list) or len(lay) < 3 or \
            list(lay) != list(range(lay[0], lay[0] + len(lay))) else f"{lay[0]}-{lay[-1]}"
        line = ["base (unedited)" if m == "base" else m, _setting(r), _layers(r) if lay and isinstance(lay[0], list)
                else runs_ or "—"]
        csv_line = list(line)
        for k in METHOD_METRICS:
            v = r.get(k)
            if k in RATES:
                line.append(_rate_cell(r, k))
                se = binomial_se(r, k)
                csv_line += [_fmt(v, True), "—" if se is None else f"{100 * se:.2f}"]
                continue
            cell = _fmt(v, k == "factual_argmax_kept") if k != "edit_seconds" or v is None else f"{v:.1f}"
            line.append(cell)
            csv_line.append(cell)
        if r.get("failed"):
            line[0] += f" ({len(r['failed'])} failed: {r['failed'][0]})"
            csv_line[0] = line[0]
        body.append(line)
        csv_body.append(csv_line)
    md, _ = _table(list(METHOD_COLUMNS), body)
    head = ["method", "setting", "layers", "toxic %", "toxic % se", "held-out toxic %", "held-out toxic % se", "ppl",
            "neutral ppl", "fluency", "factual kept %", "edit s"]
    _, csv = _table(head, csv_body)
    note = ("Methods: toxic % of the continuations of the edited prompts (held-out: of the prompts no method edited), "
            "± its binomial standard error sqrt(p (1 - p) / n) over the n scored continuations (seeds pooled), "
            "ppl on the edited prompts and on the neutral text, fluency (n-gram entropy), factual kept % (greedy "
            "next token unchanged), edit s (seconds of the edit, averaged over seeds); every model sampled with the "
            "same random streams.")
    return md + "\n" + note + "\n", csv


def plot_aie(loc: dict, path_stem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(loc["kinds"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3), squeeze=False, constrained_layout=True)
    colors = {"hidden": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}
    for ax, kind in zip(axes[0], kinds):
        prof = loc["kinds"][kind]
        ax.plot(prof["chunk_last"], color=colors.get(kind), label="last token of the toxic chunk")
        ax.plot(prof["last"], color=colors.get(kind), ls="--", alpha=0.6, label="last token")
        ax.set_title(f"AIE, restoring {kind} ({loc['n_prompts']} prompts)", fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("average indirect effect on p(toxic token)", fontsize=8)
    fig.savefig(path_stem + ".png", dpi=110)
    fig.savefig(path_stem + ".pdf")
    plt.close(fig)


GOAL_PPL_RISE = 1.31  # the frontier figure's goal region: half the unedited toxic rate at <= 1.31 x its perplexity


def goal_region(base: dict) -> tuple:
    """(largest perplexity on the prompts, largest toxic %) of the goal Das et al.'s deletion reached on GPT-2-XL
    (62.9 % -> 22.3 % toxic at perplexity 78.2 -> 102.4): the unedited model's toxic rate halved at no more than
    +31 % perplexity, from the unedited row ``base`` of summary.jsonl."""
    return GOAL_PPL_RISE * base["perplexity_prompts"], 100 * base["toxic_rate"] / 2


METHOD_STYLE = {"dinm": ("D", "tab:olive", "DINM"), "profs": ("P", "tab:cyan", "ProFS"),
                "aura": ("v", "tab:pink", "AurA")}  # markers and colours no deletion strategy uses


def method_lines(rows: list) -> list:
    """The frontier's lines of the methods other than the deletion grid: per method, one line per group of runs
    that differ in one strength setting only, its points (label, perplexity, toxic %, standard error in points)
    in order of that setting (:func:`strength`): DINM through its steps (per lr and edit weight), ProFS through its
    ranks (per number of pairs; through the numbers of pairs when every run has one rank), AurA through its layer
    settings (fewest layers first)."""
    out = []
    for m, (marker, color, name) in METHOD_STYLE.items():
        runs = sorted((r for r in rows if _method(r) == m and r.get("toxic_rate") is not None), key=strength)
        if not runs:
            continue
        st = lambda r: r.get("settings") or {}  # noqa: E731
        if m == "dinm":
            group = lambda r: (st(r).get("lr"), st(r).get("edit_weight"))  # noqa: E731
            label = lambda r: f"{st(r).get('steps')} st"  # noqa: E731
            title = lambda g: name if len(groups) == 1 else f"{name}, lr {g[0]:g}, w {g[1]:g}"  # noqa: E731
        elif m == "profs":
            by_rank = len({st(r).get("rank") for r in runs}) > 1
            group = (lambda r: st(r).get("pairs")) if by_rank else (lambda r: st(r).get("rank"))  # noqa: E731
            label = (lambda r: f"r{st(r).get('rank')}") if by_rank else (  # noqa: E731
                lambda r: f"N{st(r).get('pairs')}" if st(r).get("pairs") else f"r{st(r).get('rank')}")
            title = ((lambda g: name if len(groups) == 1 or g is None else f"{name}, {g} pairs")  # noqa: E731
                     if by_rank else (lambda g: f"{name}, rank {g}"))
        else:  # one line per layer setting through its AUROC thresholds, or through the layer settings
            by_auc = len({str(st(r).get("min_auroc", "0.5")) for r in runs}) > 1
            group = (lambda r: st(r).get("layers")) if by_auc else (lambda r: None)  # noqa: E731
            label = ((lambda r: f">{st(r).get('min_auroc', '0.5')}") if by_auc  # noqa: E731
                     else (lambda r: str(st(r).get("layers"))))
            title = (lambda g: f"{name}, layers {g}") if by_auc else (lambda g: name)  # noqa: E731
        groups = {}
        for r in runs:
            groups.setdefault(group(r), []).append(r)
        for g, members in groups.items():
            out.append({"method": m, "marker": marker, "color": color, "label": title(g),
                        "points": [(label(r), r["perplexity_prompts"], 100 * r["toxic_rate"],
                                    100 * (binomial_se(r) or 0.0)) for r in members]})
    return out


def plot_frontier(rows: list, path_stem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
    markers = {"edit-nontoxic": "s", "edit-canned": "^", "delete": "o"}
    cmap = plt.get_cmap("tab10")
    for si, s in enumerate(STRATEGIES):
        for o in OBJECTIVES:
            pts = sorted((r["kl_weight"], r["perplexity_prompts"], 100 * r["toxic_rate"],
                          100 * (binomial_se(r) or 0.0)) for r in rows
                         if r["strategy"] == s and r["objective"] == o and r.get("toxic_rate") is not None)
            if not pts:
                continue
            ax.errorbar([p[1] for p in pts], [p[2] for p in pts], yerr=[p[3] for p in pts], marker=markers[o],
                        color=cmap(si), ms=5, lw=1, capsize=2, elinewidth=0.6, label=f"{s}, {o}")
            for kl, x, y, _ in pts:  # every point names its KL weight
                ax.annotate(f"{kl:g}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    for line in method_lines(rows):
        pts = line["points"]
        ax.errorbar([p[1] for p in pts], [p[2] for p in pts], yerr=[p[3] for p in pts], marker=line["marker"],
                    color=line["color"], ms=6, lw=1, ls="-" if len(pts) > 1 else "none", capsize=2, elinewidth=0.6,
                    label=line["label"])
        for lab, x, y, _ in pts:
            ax.annotate(lab, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    base = next((r for r in rows if r["strategy"] == "base"), None)
    if base:
        x0, y0 = base["perplexity_prompts"], 100 * base["toxic_rate"]
        ax.errorbar([x0], [y0], yerr=[100 * (binomial_se(base) or 0.0)], fmt="k*", ms=12, capsize=2, elinewidth=0.6,
                    label="unedited")
        gx, gy = goal_region(base)
        (xlo, xhi), (ylo, yhi) = ax.get_xlim(), ax.get_ylim()
        ylo = min(ylo, 0.9 * gy)
        ax.fill_between([xlo, gx], ylo, gy, color="tab:green", alpha=0.12, lw=0,
                        label=f"toxic % halved at <= +{GOAL_PPL_RISE - 1:.0%} ppl")
        ax.set_xlim(xlo, max(xhi, gx))
        ax.set_ylim(ylo, yhi)
    ax.set_xlabel("perplexity on the prompts")
    ax.set_ylabel("% toxic continuations")
    labels = ((["KL weight"] if any(_method(r) == "delete" for r in rows) else [])
              + (["DINM: steps"] if any(_method(r) == "dinm" for r in rows) else [])
              + (["ProFS: rank r, pairs N"] if any(_method(r) == "profs" for r in rows) else [])
              + (["AurA: layers (or >AUROC threshold)"] if any(_method(r) == "aura" for r in rows) else []))
    ax.set_title("toxicity vs perplexity (bars: ± 1 standard error)" + ("\nlabels: " + "; ".join(labels) if labels
                                                                        else ""), fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.savefig(path_stem + ".png", dpi=110)
    fig.savefig(path_stem + ".pdf")
    plt.close(fig)


def report(cfg: DetoxConfig, out: str) -> dict:
    """Stage 5: write the tables and figures; returns the tables."""
    path = os.path.join(out, "summary.jsonl")
    if not os.path.isfile(path):
        raise JaxeditError(f"{path} is missing: run the evaluate stage first (--stage evaluate)")
    rows = read_rows(path)
    t = tables(rows, cfg.kl_weights[0])
    for name in ("table1", "table2"):
        if t[name] is None:
            continue
        md, csv = t[name]
        write_atomic(os.path.join(out, f"{name}.md"), md)
        if csv:
            write_atomic(os.path.join(out, f"{name}.csv"), csv)
        elif os.path.isfile(os.path.join(out, f"{name}.csv")):
            os.remove(os.path.join(out, f"{name}.csv"))  # an earlier report's table of runs no longer summarized
    write_atomic(os.path.join(out, "summary.md"), t["summary"])
    md, csv = table_methods(rows)
    write_atomic(os.path.join(out, "table_methods.md"), md)
    write_atomic(os.path.join(out, "table_methods.csv"), csv)
    t["table_methods"] = (md, csv)
    loc_path = os.path.join(out, "localize.json")
    if os.path.isfile(loc_path):
        with open(loc_path) as f:
            plot_aie(json.load(f), os.path.join(out, "aie_layers"))
    plot_frontier(rows, os.path.join(out, "frontier"))
    return t
