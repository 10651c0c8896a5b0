"""``jaxedit edit`` beyond one MEMIT batch: AlphaEdit, sequential batches, CounterFact / zsRE files and their
evaluation (``--method``, ``--batch-size``, ``--eval``, ``--eval-every``)."""
from __future__ import annotations

import json
import os
from typing import Optional

import jaxedit
from jaxedit import runtime
from jaxedit.cli.app import echo, request_file
from jaxedit.edit.alphaedit import DEFAULT_THRESHOLD, parse_threshold
from jaxedit.edit.memit import parse_request
from jaxedit.edit.sequential import dataset_requests
from jaxedit.edit.ultraedit import parse_record
from jaxedit.errors import JaxeditError
from jaxedit.evaluate.editing import format_summary, load_counterfact, load_zsre, protocol_record
from jaxedit.sharding import is_main_process
from jaxedit.synthetic import parse_synthetic, synthetic_edits


def detect_kind(path: str) -> str:
    """"counterfact" / "zsre" (records in the public JSON or JSONL formats, told apart by their fields) or
    "requests" (jaxedit's JSONL request lines). ``synthetic:N[:SEED]`` (jaxedit.synthetic_edits) is "zsre";
    WikiBigEdit's and UltraEditBench's files are "zsre" too (read as zsRE records, jaxedit.evaluate.editing.as_zsre)."""
    if path.startswith("synthetic:"):
        parse_synthetic(path)
        return "zsre"
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(65536).lstrip()
    except OSError as e:
        raise JaxeditError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise JaxeditError(f"{path}: not UTF-8 text") from None
    first = head.split("\n", 1)[0]
    if head.startswith("["):
        if '"requested_rewrite"' in head:
            return "counterfact"
        if ('"src"' in head or '"update"' in head or '"rephrase_prompt"' in head) and '"loc"' in head:
            return "zsre"
        raise JaxeditError(f"{path}: a JSON array of neither CounterFact records (\"requested_rewrite\") nor zsRE "
                           f"records (\"src\", \"loc\"); edit requests go one a line (JSONL)")
    if '"requested_rewrite"' in first:
        return "counterfact"
    if ('"src"' in first or '"update"' in first or '"rephrase_prompt"' in first) and '"loc"' in first:
        return "zsre"
    return "requests"


def read_edit_file(path: str, kind: str, skip_bad: bool, limit: Optional[int] = None):
    """(kind, records or None, requests, where-labels) of an edit file of ``kind`` (:func:`detect_kind`), its first
    ``limit`` records or requests when given."""
    if path.startswith("synthetic:"):  # the offline stream: n records, SEED, the default model's known facts
        n, seed = parse_synthetic(path)
        records = synthetic_edits(min(n, limit) if limit else n, seed=seed)
        requests = dataset_requests(records, "zsre", where=path)
        return "zsre", records, requests, [f"{path}: record {i}" for i in range(len(records))]
    if kind in ("counterfact", "zsre"):
        records = load_counterfact(path) if kind == "counterfact" else load_zsre(path)
        records = records[:limit] if limit else records
        requests = dataset_requests(records, kind, where=path)
        return kind, records, requests, [f"{path}: record {i}" for i in range(len(records))]
    rf = request_file(path, "requests", skip_bad)
    if limit:
        rf.items = rf.items[:limit]
    return "requests", None, rf.objects, [rf.where(line) for line in rf.lines]


def check_options(method, batch_size, evaluate, eval_every, kind, null_space_threshold, l2, lr=None,
                  memit_options=()):
    """Everything that can be checked before the model loads. ``lr``: UltraEdit's step; ``memit_options``: the
    MEMIT / AlphaEdit options given (their command-line names), which UltraEdit refuses."""
    if method == "ultraedit":
        if null_space_threshold is not None or l2 is not None:
            raise JaxeditError("--null-space-threshold and --l2 are AlphaEdit's options (--method alphaedit); "
                               "ultraedit takes --lr")
        if memit_options:
            raise JaxeditError(f"{memit_options[0]} is a MEMIT / AlphaEdit option; ultraedit takes --layers and --lr")
        if lr is not None and not lr > 0:
            raise JaxeditError(f"--lr must be > 0 (got {lr:g})")
    elif lr is not None:
        raise JaxeditError("--lr is UltraEdit's option (--method ultraedit)")
    if method == "alphaedit":
        parse_threshold(DEFAULT_THRESHOLD if null_space_threshold is None else null_space_threshold)
    elif null_space_threshold is not None or l2 is not None:
        raise JaxeditError("--null-space-threshold and --l2 are AlphaEdit's options (--method alphaedit)")
    if eval_every is not None and not evaluate:
        raise JaxeditError("--eval-every needs --eval")
    if evaluate and kind == "requests":
        raise JaxeditError("--eval needs a CounterFact or zsRE file as --requests (their records hold the "
                           "prompts and true targets the metrics use)")


def _evaluate(model, tok, kind, records, generative=False):
    if kind == "counterfact":
        return jaxedit.counterfact_eval(model, records, tokenizer=tok, generative=generative)
    return jaxedit.zsre_eval(model, records, tokenizer=tok, generative=generative)


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def plot_curve(points, kind, out):
    """The metrics of the edits so far against their number (PNG and PDF)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = [p["edits"] for p in points]
    for key in ("efficacy", "generalization", "specificity"):
        ax.plot(xs, [100 * p["summary"][key] for p in points], marker="o", label=key)
    ax.set_xlabel("edits so far")
    ax.set_ylabel(f"{'CounterFact' if kind == 'counterfact' else 'zsRE'} metric (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(os.path.join(out, f"curve.{ext}"))
    plt.close(fig)


def run_sequence(load, kind, records, requests, wheres, *, method, batch_size, layers, out, evaluate,
                 eval_every, hp, null_space_threshold, l2, generative=False, model_name=None, lr=None):
    """Edit (batch after batch, resumable under ``out/sequence/``), evaluate, save; prints the summary table.
    ``load()`` gives (model, tokenizer): the unedited model is let go once the edits are done, before the edited
    one is written. Every result (eval.json, each curve.jsonl point, report.json) carries a "protocol" entry
    (:func:`jaxedit.evaluate.editing.protocol_record`); ``generative`` adds the generative scores."""
    model, tok = load()
    for r, where in zip(requests, wheres):  # FILE:LINE (or FILE: record i) errors before any work
        mode = "delete" if "suppress" in r and "target" not in r else "edit"
        try:
            if method == "ultraedit":
                parse_record(r, tok)
            else:
                parse_request(r, tok, mode, other="jaxedit delete")
        except JaxeditError as e:
            raise JaxeditError(f"{where}: {e}") from None
    batch_size = batch_size or len(requests)
    n_batches = -(-len(requests) // batch_size)
    os.makedirs(out, exist_ok=True)
    curve_path = os.path.join(out, "curve.jsonl")
    points = []
    if eval_every and os.path.exists(curve_path):
        with open(curve_path) as f:
            points = [json.loads(line) for line in f if line.strip()]

    source = wheres[0].rsplit(":", 1)[0] if wheres else None

    def protocol(m, n_eval, edits_so_far, evaluated="stream"):
        return protocol_record(m, records if records is not None else requests,
                               kind=kind if kind in ("counterfact", "zsre") else "requests",
                               edits_per_turn=batch_size, evaluated=evaluated, evaluated_records=n_eval,
                               edits_so_far=edits_so_far, generative=generative, source=source,
                               model_name=model_name, method=method)

    last = {}  # the evaluation of the last batch's model on every record, reused for eval.json

    def record_point(done, m):
        if not any(p["batches"] == done for p in points):
            n = min(done * batch_size, len(records))
            runtime.stage(f"evaluating the {n} edits so far")
            evaluated = records[:n] if n else records[:batch_size]
            res = _evaluate(m, tok, kind, evaluated, generative)
            if done == n_batches:
                last["res"] = res
            points.append({"batches": done, "edits": n, "summary": res["summary"],
                           "protocol": protocol(m, len(evaluated), n)})
            points.sort(key=lambda p: p["batches"])
            if is_main_process():
                with open(curve_path + ".tmp", "w") as f:
                    f.writelines(json.dumps(p) + "\n" for p in points)
                os.replace(curve_path + ".tmp", curve_path)

    if eval_every:
        record_point(0, model)  # the unedited model on the first batch's records

    def on_batch(done, m):
        if eval_every and (done % eval_every == 0 or done == n_batches):
            record_point(done, m)

    kw = dict(hp)
    if method == "alphaedit":
        if null_space_threshold is not None:
            kw["null_space_threshold"] = null_space_threshold
        if l2 is not None:
            kw["l2"] = l2
    if method == "ultraedit" and lr is not None:
        kw["lr"] = lr
    edited, report = jaxedit.edit_sequential(model, requests, method=method, batch_size=batch_size, layers=layers,
                                             tokenizer=tok, out=os.path.join(out, "sequence"), on_batch=on_batch,
                                             donate=True, **kw)
    del model  # MEMIT and AlphaEdit used it up (donate=True: its edited projection became the edited model's)
    report.pop("state", None)  # P and C_p stay in out/sequence/
    if eval_every:  # a resumed run that had finished: the points of batches done before are in the file already
        on_batch(n_batches, edited)
    runtime.set_resume_note(f"the edits are kept in {out}/sequence/; rerun to finish")
    runtime.stage(f"writing {out}/model/")
    jaxedit.save(edited, os.path.join(out, "model"), tokenizer=tok)
    report["requests_file"] = wheres[0].rsplit(":", 1)[0] if wheres else None
    summary = None
    if evaluate:
        runtime.stage(f"evaluating all {len(records)} edits")
        res = last.get("res") or _evaluate(edited, tok, kind, records, generative)
        summary = res["summary"]
        res["protocol"] = protocol(edited, len(records), len(requests))
        if is_main_process():
            _write_json(os.path.join(out, "eval.json"), res)
    report["protocol"] = res["protocol"] if evaluate else protocol(edited, 0, len(requests), evaluated=None)
    if is_main_process():
        report["summary"] = summary
        _write_json(os.path.join(out, "report.json"), report)
        if eval_every and points:
            plot_curve(points, kind, out)
    if not is_main_process():
        return
    echo(f"{method}: {len(requests)} edits in {n_batches} batch{'es' * (n_batches > 1)} of {batch_size}, "
         f"layers {report['layers']}, {report['seconds']:.1f} s"
         + ("" if not report["resumed_at"] else " (every batch was done earlier)" if report["resumed_at"] >= n_batches
            else f" (resumed at batch {report['resumed_at'] + 1})"))
    if summary is not None:
        title = f"{'CounterFact' if kind == 'counterfact' else 'zsRE'} after {len(requests)} edits (x100)"
        echo(format_summary(summary, title))
    extra = ", eval.json" if evaluate else ""
    extra += ", curve.jsonl / .png / .pdf" if eval_every else ""
    echo(f"wrote {out}/ (model/: the edited model; report.json{extra}; checkpoints in sequence/)")
