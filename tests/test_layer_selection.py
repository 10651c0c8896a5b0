import numpy as np
import pytest

from jaxedit import JaxeditError
from jaxedit.layer_selection import select_layers
from jaxedit.locate.saliency import SaliencyResult
from jaxedit.locate.tracing import TraceResult


def trace_result():
    scores = np.full((5, 6), 0.1)
    scores[2, 4] = 0.9  # last subject token (span (0, 3)), layer 4
    scores[2, 1] = 0.5
    scores[4, 5] = 0.95  # last token, layer 5: the max over tokens
    return TraceResult(kind="mlp", scores=scores, low_score=0.1, high_score=1.0, answer_id=0, answer="x",
                       input_ids=np.arange(5), tokens=list("abcde"), span=(0, 3), window=10, samples=10,
                       noise_level=1.0)


def test_ct_from_trace():
    r = trace_result()
    assert select_layers("ct", 6, evidence=r) == [4]
    assert select_layers("ct", 6, evidence=r, n=2) == [1, 4]
    assert select_layers("ct", 6, evidence=r, token="max") == [5]


def test_saliency_top_k():
    s = SaliencyResult(layer=np.array([0.1, 0.5, 0.3, 0.5]), modules={"mlp_out": np.array([4.0, 3, 2, 1])},
                       loss=1.0, n_examples=1)
    assert select_layers("saliency", 4, evidence=s, n=2) == [1, 3]  # tie broken by the lower layer
    assert select_layers("saliency", 4, evidence=s, module="mlp_out") == [0]


@pytest.mark.parametrize("strategy, kw", [("random", {}), ("random-topk", {"k": 15})])
def test_random_is_seeded_and_in_bounds(strategy, kw):
    a = select_layers(strategy, 48, n=5, seed=3, **kw)
    assert a == select_layers(strategy, 48, n=5, seed=3, **kw)
    assert len(set(a)) == 5 and all(0 <= l < kw.get("k", 48) for l in a)
    draws = {tuple(select_layers(strategy, 48, n=5, seed=s, **kw)) for s in range(20)}
    assert len(draws) > 10


def test_fixed():
    assert select_layers("fixed", 48, layers=[17, 13, 15]) == [13, 15, 17]


@pytest.mark.parametrize("args, kw, message", [
    (("random-topk", 12), dict(k=15, n=2), "k = 15 is more than the model's 12 layers"),
    (("random-topk", 48), dict(k=4, n=5), "cannot draw n = 5 distinct layers from 4"),
    (("random", 4), dict(n=5), "cannot draw n = 5"),
    (("random-topk", 48), dict(n=2), "needs k >= 1"),
    (("ct", 6), dict(), "needs evidence"),
    (("ct", 6), dict(evidence=np.array([])), "empty evidence"),
    (("saliency", 6), dict(evidence=np.ones(4)), "evidence has 4 layers, the model 6"),
    (("ct", 6), dict(evidence=np.ones(6), n=7), "more than the model's 6 layers"),
    (("fixed", 6), dict(layers=[2, 6]), r"layers \[6\] are outside"),
    (("fixed", 6), dict(), "non-empty list"),
    (("best", 6), dict(), "unknown layer strategy"),
    (("random", 6), dict(n=0), "n must be >= 1"),
])
def test_bounds_are_clear_errors(args, kw, message):
    with pytest.raises(JaxeditError, match=message):
        select_layers(*args, **kw)
