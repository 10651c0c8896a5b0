"""A tracing run's files with numbers known in advance: hand-built results of three prompts written with save_prompt,
the best cell per kind in results.jsonl and the aggregate AIE table (aie.csv, aie.md) against a hand computation."""
import csv
import json

import numpy as np
import pytest

from jaxedit.locate import trace_files as tf
from jaxedit.locate.tracing import TraceResult

L = 3
# indirect effects (scores - low_score) per token and layer
IE = {
    # 7 tokens, subject = tokens 1..3: first 1, middle 2, last 3, first subsequent 4, further 5, last token 6
    "A": (np.array([[0.00, 0.01, 0.02], [0.10, 0.16, 0.12], [0.20, 0.21, 0.27], [0.35, 0.31, 0.30],
                    [0.40, 0.44, 0.42], [0.05, 0.06, 0.07], [0.60, 0.61, 0.72]]), (1, 4), 0.05),
    # 9 tokens, subject = tokens 0..3 at the start: first 0, middle 1 and 2, last 3, first subsequent 4,
    # further 5..7, last token 8
    "B": (np.array([[0.30, 0.10, 0.20], [0.02, 0.04, 0.06], [0.08, 0.10, 0.12], [0.50, 0.90, 0.40],
                    [0.11, 0.13, 0.15], [0.01, 0.01, 0.01], [0.02, 0.05, 0.02], [0.03, 0.03, 0.09],
                    [0.20, 0.30, 0.40]]), (0, 4), 0.20),
    # 4 tokens, a one-token subject (token 2) right before the last token: it is the first and the last subject
    # token; no middle, first subsequent or further tokens; tokens 0 and 1 belong to no group
    "C": (np.array([[0.90, 0.85, 0.80], [0.80, 0.80, 0.80], [0.25, 0.15, 0.05], [0.00, 0.10, 0.20]]), (2, 3), 0.01),
    # 5 tokens, subject = tokens 1..2 ending two tokens before the end: first 1, last 2, first subsequent 3 (the
    # token right before the last), no middle and no further tokens, last token 4; token 0 in no group
    "D": (np.array([[0.07, 0.03, 0.01], [0.12, 0.14, 0.18], [0.33, 0.36, 0.29], [0.47, 0.52, 0.41],
                    [0.22, 0.25, 0.28]]), (1, 3), 0.02),
}
A, B, C, D = (IE[k][0] for k in "ABCD")
# the average over prompts of each prompt's mean over the group's tokens, by hand
EXPECTED = {
    "first subject token": ((A[1] + B[0] + C[2] + D[1]) / 4, 4),
    "middle subject tokens": ((A[2] + (B[1] + B[2]) / 2) / 2, 2),
    "last subject token": ((A[3] + B[3] + C[2] + D[2]) / 4, 4),
    "first subsequent token": ((A[4] + B[4] + D[3]) / 3, 3),
    "further tokens": ((A[5] + (B[5] + B[6] + B[7]) / 3) / 2, 2),
    "last token": ((A[6] + B[8] + C[3] + D[4]) / 4, 4),
}
# each prompt's best cell (max IE, its token, its layer) by inspection of the tables above
BEST = {"A": (0.72, 6, 2), "B": (0.90, 3, 1), "C": (0.90, 0, 0), "D": (0.52, 3, 1)}


def result(name, kind, scale):
    ie, span, low = IE[name]
    T = ie.shape[0]
    return TraceResult(kind=kind, scores=low + scale * ie, low_score=low, high_score=0.95, answer_id=7,
                       answer=" Paris", input_ids=np.arange(T), tokens=[f"t{i}" for i in range(T)], span=span,
                       window=10, samples=3, noise_level=0.1)


def test_run_files_against_hand_computation(tmp_path):
    """One test (no shared fixture): a mutation tool runs, for a mutant, the tests that call the mutated function."""
    out = str(tmp_path)
    rows = []
    for line, name in enumerate("ABCD", 1):
        # kind "mlp": the same tables doubled, so that a mixed-up kind shows
        res = {"hidden": result(name, "hidden", 1.0), "mlp": result(name, "mlp", 2.0)}
        row = tf.save_prompt(out, line, {"prompt": name, "subject": "s"}, res, plots=False)
        tf.append_row(out, row)
        rows.append(row)
    tf.write_aggregate(out, tf.aggregate_aie(out, rows, ("hidden", "mlp")), len(rows))

    # results.jsonl: each prompt's best cell
    for row, name in zip([json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()], "ABCD"):
        ie, span, low = IE[name]
        assert row["span"] == list(span) and row["low_score"] == pytest.approx(low)
        for kind, scale in (("hidden", 1.0), ("mlp", 2.0)):
            max_ie, token, layer = BEST[name]
            assert (row[kind]["token"], row[kind]["layer"]) == (token, layer), (name, kind)
            assert row[kind]["max_ie"] == pytest.approx(scale * max_ie)

    # aie.csv: every number and count
    with open(tmp_path / "aie.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["kind"], r["group"]) for r in table] == [(k, g) for k in ("hidden", "mlp") for g in EXPECTED]
    for r in table:
        want, n = EXPECTED[r["group"]]
        scale = 2.0 if r["kind"] == "mlp" else 1.0
        assert int(r["n"]) == n, r
        np.testing.assert_allclose([float(r[f"layer{l}"]) for l in range(L)], scale * want, rtol=1e-5,
                                   err_msg=str(r))

    # aie.md: the peak layer and value of each group
    lines = (tmp_path / "aie.md").read_text().splitlines()
    hidden = lines[lines.index("## hidden"):lines.index("## mlp")]
    assert hidden[2].startswith("| group | n | peak layer | peak AIE |")
    for g, (want, n) in EXPECTED.items():
        (line,) = [x for x in hidden if x.startswith(f"| {g} |")]
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert int(cells[1]) == n and int(cells[2]) == int(np.argmax(want)), line
        assert float(cells[3]) == pytest.approx(want.max(), abs=1e-4), line
