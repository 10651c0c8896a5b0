"""Files of a tracing run: JSONL requests in, one .npz per prompt and kind, ``results.jsonl``, heatmaps, and the
aggregate AIE table and plot. A run directory can be resumed: rows already in ``results.jsonl`` are not recomputed."""
from __future__ import annotations

import json
import math
import os

from typing import Optional

import numpy as np

from jaxedit.errors import JaxeditError
from jaxedit.files import append_jsonl, read_rows, write_json, write_jsonl
from jaxedit.request_files import RequestFile

GROUPS = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
          "further tokens", "last token")
CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
TITLES = {"hidden": "single restored layer", "mlp": "MLP, window", "attn": "attention, window"}


def read_jsonl(path: str, what: str = "lines") -> list:
    """[(line_number, object)] of a JSONL file of JSON objects (blank lines skipped); raises on the first bad line
    and on a file holding none."""
    return RequestFile(path, what).items


def check_request(req: dict) -> dict:
    """A trace request's fields (no model needed): "prompt", "subject" or "span", optional "target". Returns it
    with "span" as a tuple; raises :class:`JaxeditError` (without the FILE:LINE, which the caller adds)."""
    if not isinstance(req.get("prompt"), str):
        raise JaxeditError("missing \"prompt\" (a string)")
    if "span" in req:
        sp = req["span"]
        if not (isinstance(sp, list) and len(sp) == 2 and all(isinstance(v, int) for v in sp)):
            raise JaxeditError("\"span\" must be [start, end] token indices")
        req = dict(req, span=tuple(sp))
    elif not isinstance(req.get("subject"), str):
        raise JaxeditError("give \"subject\" (a string) or \"span\" ([start, end])")
    if "target" in req and not isinstance(req["target"], (str, int)):
        raise JaxeditError("\"target\" must be a string or a token id")
    return req


def read_requests(path: str) -> list:
    """Parse a JSONL file of trace requests. Returns [(line_number, request)]; raises on the first bad line."""
    rf = RequestFile(path, "requests")
    return rf.check(check_request)


def options_differ(out_dir: str, options: dict, close=("level",)) -> Optional[list]:
    """``[(name, recorded value, new value)]`` for the options that differ from the run recorded in
    ``out_dir/run.json`` (None: no run there). Numbers named in ``close`` are compared to 1e-6 (NaN equals NaN); an
    option the recorded run does not name (an older version) counts as its default when the new value is falsy."""
    path = os.path.join(out_dir, "run.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            earlier = json.load(f)
    except (OSError, ValueError):
        return None

    def same(k):
        a, b = earlier.get(k), options.get(k)
        if k not in earlier and not b:
            return True
        if k in close and isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6)
        return a == b

    return [(k, earlier.get(k), options.get(k)) for k in sorted(set(earlier) | set(options)) if not same(k)]


def write_run(out_dir: str, options: dict) -> None:
    write_json(os.path.join(out_dir, "run.json"), options)


def sort_results(out_dir: str) -> None:
    """Rewrite results.jsonl with its rows in input-line order (rows are appended as they finish; this runs once
    a run is complete). Atomic: a reader sees the old file or the new one."""
    rows = read_done(out_dir)
    write_jsonl(os.path.join(out_dir, "results.jsonl"), [rows[line] for line in sorted(rows)])


def read_done(out_dir: str) -> dict:
    """Rows of an earlier run's results.jsonl by line number; a torn last line (killed mid-write) is dropped."""
    return {row["line"]: row for row in read_rows(os.path.join(out_dir, "results.jsonl"))}


def stem(line: int) -> str:
    return f"prompt{line:05d}"


def save_prompt(out_dir: str, line: int, request: dict, results: dict, plots: bool = True,
                extra: Optional[dict] = None) -> dict:
    """Write one prompt's .npz files (and heatmaps); return its results.jsonl row (not yet appended): the input's
    ``line``, the request, the answer, clean / corrupted p, the noise level, the files, the best cell per kind and
    ``extra``."""
    for kind, r in results.items():
        tmp = os.path.join(out_dir, f".{stem(line)}_{kind}.tmp.npz")
        np.savez(tmp, **r.npz_fields())
        os.replace(tmp, os.path.join(out_dir, f"{stem(line)}_{kind}.npz"))
    r0 = next(iter(results.values()))
    if plots:
        plot_heatmaps(results, os.path.join(out_dir, stem(line)), title=heatmap_title(request.get("prompt"), r0))
    row = {"line": line, "prompt": request.get("prompt"), "subject": request.get("subject"),
           "span": list(r0.span), "answer": r0.answer, "answer_id": r0.answer_id,
           "high_score": r0.high_score, "low_score": r0.low_score, "noise_level": r0.noise_level,
           "files": {k: f"{stem(line)}_{k}.npz" for k in results}, **(extra or {})}
    for kind, r in results.items():
        t, l = np.unravel_index(np.argmax(r.scores), r.scores.shape)
        last = r.span[1] - 1  # the token select_layers("ct") ranks layers by
        ll = int(np.argmax(r.scores[last]))
        row[kind] = {"max_ie": float(r.scores[t, l] - r.low_score), "token": int(t), "layer": int(l),
                     "last_subject": {"token": last, "layer": ll, "max_ie": float(r.scores[last, ll] - r.low_score)}}
    return row


def append_row(out_dir: str, row: dict) -> None:
    append_jsonl(os.path.join(out_dir, "results.jsonl"), row)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap_title(prompt, r) -> str:
    """The prompt (or its tokens), the answer and its clean / corrupted probabilities."""
    text = prompt if isinstance(prompt, str) else "".join(r.tokens)
    if len(text) > 90:
        text = text[:87] + "..."
    return f"{text!r} -> {r.answer!r}: clean p = {r.high_score:.3f}, corrupted p = {r.low_score:.3f}"


def wrap_title(text: str, fig, fontsize: float) -> str:
    """``text`` broken into lines that fit the figure's width (about 0.6 x the font size per character)."""
    import textwrap

    width = max(20, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.wrap(text, width)) if len(text) > width else text


def plot_heatmaps(results: dict, path_stem: str, title: Optional[str] = None) -> None:
    """One panel per kind: rows = tokens (the corrupted span marked with *), columns = layers; PNG and PDF, under
    ``title`` (default :func:`heatmap_title`)."""
    plt = _plt()
    kinds = list(results)
    r0 = results[kinds[0]]
    T, L = r0.scores.shape
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds) + 0.5, 0.28 * T + 1.6), squeeze=False,
                             constrained_layout=True)
    labels = [repr(t)[1:-1] + ("*" if r0.span[0] <= i < r0.span[1] else "") for i, t in enumerate(r0.tokens)]
    for ax, kind in zip(axes[0], kinds):
        r = results[kind]
        im = ax.pcolor(r.scores, cmap=CMAPS[kind], vmin=r.low_score)
        ax.invert_yaxis()
        ax.set_yticks(np.arange(T) + 0.5)
        ax.set_yticklabels(labels if ax is axes[0][0] else [], fontsize=7)
        ax.set_xticks(np.arange(0, L, max(1, L // 6)) + 0.5)
        ax.set_xticklabels(np.arange(0, L, max(1, L // 6)), fontsize=7)
        ax.set_xlabel(f"layer ({TITLES[kind]}{'' if kind == 'hidden' else ' ' + str(r.window)})", fontsize=8)
        ax.set_title(f"restoring {kind}", fontsize=9)
        cb = fig.colorbar(im, ax=ax)
        cb.ax.tick_params(labelsize=7)
        cb.ax.set_title(f"p({r.answer.strip()})", fontsize=7)
    fig.suptitle(wrap_title(title or heatmap_title(None, r0), fig, 9), fontsize=9)
    fig.savefig(path_stem + ".png", dpi=110)
    fig.savefig(path_stem + ".pdf")
    plt.close(fig)


def token_groups(span: tuple, T: int) -> dict:
    """ROME's token groups of one prompt: group name -> token indices (empty groups omitted)."""
    s, e = span
    groups = {"first subject token": [s], "middle subject tokens": list(range(s + 1, e - 1)),
              "last subject token": [e - 1], "first subsequent token": [e] if e < T - 1 else [],
              "further tokens": list(range(e + 1, T - 1)), "last token": [T - 1]}
    return {g: v for g, v in groups.items() if v}


def aggregate_aie(out_dir: str, rows: list, kinds) -> dict:
    """AIE [group, layer] per kind over the prompts of ``rows`` (IE averaged within a group, then over prompts)."""
    sums, counts = {}, {}
    for row in rows:
        for kind in kinds:
            f = row["files"].get(kind)
            if f is None:
                continue
            with np.load(os.path.join(out_dir, f)) as z:
                ie = z["scores"] - z["low_score"]
                span = tuple(int(v) for v in z["subject_range"])
            for gi, g in enumerate(GROUPS):
                idx = token_groups(span, ie.shape[0]).get(g)
                if idx is None:
                    continue
                key = (kind, gi)
                sums[key] = sums.get(key, 0) + ie[idx].mean(0)
                counts[key] = counts.get(key, 0) + 1
    out = {}
    for kind in kinds:
        mats = [sums[(kind, gi)] / counts[(kind, gi)] if (kind, gi) in sums else None for gi in range(len(GROUPS))]
        L = next((m.shape[0] for m in mats if m is not None), 0)
        out[kind] = (np.stack([m if m is not None else np.full(L, np.nan) for m in mats]) if L else None,
                     [counts.get((kind, gi), 0) for gi in range(len(GROUPS))])
    return out


def write_aggregate(out_dir: str, agg: dict, n_prompts: int) -> None:
    """aie.csv (kind, group, n, one column per layer), aie.md (the same, rounded) and aie.png / aie.pdf."""
    lines_csv, lines_md = [], [f"# Average indirect effect over {n_prompts} prompts", ""]
    for kind, (mat, counts) in agg.items():
        if mat is None:
            continue
        L = mat.shape[1]
        if not lines_csv:
            lines_csv.append("kind,group,n," + ",".join(f"layer{l}" for l in range(L)))
        lines_md += [f"## {kind}", "", "| group | n | peak layer | peak AIE | " + " | ".join(
            str(l) for l in range(L)) + " |", "|---|---|---|---|" + "---|" * L]
        for gi, g in enumerate(GROUPS):
            row = mat[gi]
            lines_csv.append(f"{kind},{g},{counts[gi]}," + ",".join(f"{v:.6g}" for v in row))
            if counts[gi]:
                peak = int(np.nanargmax(row))
                lines_md.append(f"| {g} | {counts[gi]} | {peak} | {row[peak]:.4f} | " +
                                " | ".join(f"{v:.3f}" for v in row) + " |")
        lines_md.append("")
    with open(os.path.join(out_dir, "aie.csv"), "w") as f:
        f.write("\n".join(lines_csv) + "\n")
    with open(os.path.join(out_dir, "aie.md"), "w") as f:
        f.write("\n".join(lines_md))
    plt = _plt()
    kinds = [k for k, (m, _) in agg.items() if m is not None]
    if not kinds:
        return
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds) + 1, 3.2), squeeze=False, constrained_layout=True)
    for ax, kind in zip(axes[0], kinds):
        mat = agg[kind][0]
        im = ax.pcolor(np.nan_to_num(mat), cmap=CMAPS[kind])
        ax.invert_yaxis()
        ax.set_yticks(np.arange(len(GROUPS)) + 0.5)
        ax.set_yticklabels(GROUPS if ax is axes[0][0] else [], fontsize=7)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_title(f"AIE, restoring {kind} ({n_prompts} prompts)", fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.savefig(os.path.join(out_dir, "aie.png"), dpi=110)
    fig.savefig(os.path.join(out_dir, "aie.pdf"))
    plt.close(fig)
