"""Tests of oaml.metrics against scikit-learn, hand-computed cases and properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from oaml.errors import ConfigError, DataError, NonFiniteError, ShapeError
from oaml.metrics import METRIC_KEYS, accuracy, ood_metrics


def sklearn_reference(id_s, ood_s, level=0.95):
    s = np.concatenate([id_s, ood_s]).astype(np.float64)
    y = np.concatenate([np.ones(len(id_s)), np.zeros(len(ood_s))])
    fpr_o, tpr_o, _ = roc_curve(1 - y, -s)  # OOD positive (OpenOOD)
    fpr_i, tpr_i, _ = roc_curve(y, s)  # ID positive (classic papers)
    fpr_i_all, tpr_i_all, _ = roc_curve(y, s, drop_intermediate=False)
    p_in, r_in, _ = precision_recall_curve(y, s)
    p_out, r_out, _ = precision_recall_curve(1 - y, -s)
    return {
        "fpr95": fpr_o[np.argmax(tpr_o >= level)],
        "fpr95_id_pos": fpr_i[np.argmax(tpr_i >= level)],
        "auroc": roc_auc_score(y, s),
        "aupr_in": average_precision_score(y, s),
        "aupr_out": average_precision_score(1 - y, -s),
        "detection_error": np.min(0.5 * (1 - tpr_i_all) + 0.5 * fpr_i_all),
        "aupr_in_trapz": auc(r_in, p_in),
        "aupr_out_trapz": auc(r_out, p_out),
    }


def assert_matches_sklearn(id_s, ood_s):
    ref = sklearn_reference(id_s, ood_s)
    got = ood_metrics(id_s, ood_s)
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(ref[k], abs=1e-12), k
    trap = ood_metrics(id_s, ood_s, aupr="trapezoid")
    assert trap["aupr_in"] == pytest.approx(ref["aupr_in_trapz"], abs=1e-12)
    assert trap["aupr_out"] == pytest.approx(ref["aupr_out_trapz"], abs=1e-12)


def test_matches_sklearn_continuous_scores():
    rng = np.random.default_rng(0)
    for _ in range(20):
        id_s = rng.normal(1.0, 1.0, rng.integers(1, 400))
        ood_s = rng.normal(0.0, 1.5, rng.integers(1, 400))
        assert_matches_sklearn(id_s, ood_s)


@settings(max_examples=200, deadline=None)
@given(
    id_s=st.lists(st.integers(-3, 3), min_size=1, max_size=60),
    ood_s=st.lists(st.integers(-3, 3), min_size=1, max_size=60),
    scale=st.sampled_from([1.0, 1e-3, 1e6]),
)
def test_matches_sklearn_with_heavy_ties(id_s, ood_s, scale):
    assert_matches_sklearn(np.array(id_s) * scale, np.array(ood_s) * scale)


@settings(max_examples=100, deadline=None)
@given(
    id_s=st.lists(st.integers(0, 4), min_size=1, max_size=40),
    ood_s=st.lists(st.integers(0, 4), min_size=1, max_size=40),
    seed=st.integers(0, 2**31 - 1),
)
def test_ties_not_broken_by_order(id_s, ood_s, seed):
    rng = np.random.default_rng(seed)
    a = ood_metrics(np.array(id_s, float), np.array(ood_s, float))
    b = ood_metrics(rng.permutation(np.array(id_s, float)), rng.permutation(np.array(ood_s, float)))
    assert a == b


@settings(max_examples=100, deadline=None)
@given(
    id_s=st.lists(st.integers(-500, 500), min_size=1, max_size=40),
    ood_s=st.lists(st.integers(-500, 500), min_size=1, max_size=40),
)
def test_invariant_to_strictly_increasing_maps_and_no_sigmoid(id_s, ood_s):
    # values on a 0.01 grid so the maps below stay strictly increasing in float64
    id_s, ood_s = np.array(id_s) / 100.0, np.array(ood_s) / 100.0
    base = ood_metrics(id_s, ood_s)
    # a sigmoid would saturate these; rank metrics must not change
    shifted = ood_metrics(id_s * 1e3 + 1e8, ood_s * 1e3 + 1e8)
    cubed = ood_metrics(np.cbrt(id_s) * 7, np.cbrt(ood_s) * 7)
    for k in METRIC_KEYS:
        assert shifted[k] == pytest.approx(base[k], abs=1e-12)
        assert cubed[k] == pytest.approx(base[k], abs=1e-12)


def test_ties_across_classes_hand_case():
    # one ID and one OOD at the same score: AUROC counts the tie as 1/2
    m = ood_metrics([1.0, 2.0], [1.0, 0.0])
    assert m["auroc"] == pytest.approx((1 + 1 + 1 + 0.5) / 4)


def test_perfect_and_reversed_separation():
    m = ood_metrics(np.arange(10, 20), np.arange(10))
    assert m == {"fpr95": 0.0, "fpr95_id_pos": 0.0, "auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "detection_error": 0.0}
    r = ood_metrics(np.arange(10), np.arange(10, 20))
    assert r["auroc"] == 0.0 and r["fpr95"] == 1.0 and r["fpr95_id_pos"] == 1.0
    assert r["detection_error"] == 0.5


def test_constant_scores():
    m = ood_metrics(np.full(30, 2.5), np.full(10, 2.5))
    assert m["auroc"] == 0.5
    assert m["fpr95"] == 1.0 and m["fpr95_id_pos"] == 1.0
    assert m["detection_error"] == 0.5
    assert m["aupr_in"] == pytest.approx(30 / 40)
    assert m["aupr_out"] == pytest.approx(10 / 40)


def test_fpr95_conventions_differ_by_hand():
    id_s = np.arange(1, 21, dtype=float)  # 20 ID scores 1..20
    ood_s = np.array([0.0] * 19 + [10.0])  # 19 clear OOD, one inside the ID range
    m = ood_metrics(id_s, ood_s)
    # OOD positive: catching 19/20 = 95% of OOD at t=0 flags no ID sample
    assert m["fpr95"] == 0.0
    # ID positive: keeping 19/20 ID (score >= 2) accepts the OOD sample at 10
    assert m["fpr95_id_pos"] == pytest.approx(1 / 20)


def test_detection_error_hand_case():
    # best threshold keeps ID {3, 4} and rejects OOD {1, 2}; OOD 3.5 slips through
    m = ood_metrics([3.0, 4.0], [1.0, 2.0, 3.5])
    assert m["detection_error"] == pytest.approx(0.5 * 0 + 0.5 * (1 / 3))


def test_rejects_non_finite_and_empty():
    with pytest.raises(NonFiniteError, match="2 non-finite"):
        ood_metrics([1.0, np.nan, np.inf], [0.0])
    with pytest.raises(NonFiniteError, match="ood_scores"):
        ood_metrics([1.0], [-np.inf])
    with pytest.raises(ShapeError, match="empty"):
        ood_metrics([], [1.0])
    with pytest.raises(ShapeError, match="empty"):
        ood_metrics([1.0], np.array([]))
    with pytest.raises(ShapeError):
        ood_metrics(np.ones((3, 2)), [1.0])
    with pytest.raises(ConfigError, match="recall_level"):
        ood_metrics([1.0], [0.0], recall_level=1.5)
    with pytest.raises(ConfigError, match="aupr"):
        ood_metrics([1.0], [0.0], aupr="roc")


def test_recall_level_other_than_95():
    rng = np.random.default_rng(4)
    id_s, ood_s = rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    s = np.concatenate([id_s, ood_s])
    y = np.concatenate([np.ones(300), np.zeros(200)])
    fpr, tpr, _ = roc_curve(1 - y, -s)
    assert ood_metrics(id_s, ood_s, recall_level=0.8)["fpr95"] == pytest.approx(fpr[np.argmax(tpr >= 0.8)])


def test_accepts_torch_and_float32():
    torch = pytest.importorskip("torch")
    a = ood_metrics(torch.tensor([0.3, 0.9], dtype=torch.float32), np.array([0.1], dtype=np.float32))
    assert a["auroc"] == 1.0


def test_accuracy():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0]])
    assert accuracy(logits, np.array([0, 1, 1])) == pytest.approx(2 / 3)
    assert accuracy(np.array([1, 1, 0]), np.array([1, 0, 0])) == pytest.approx(2 / 3)
    with pytest.raises(ShapeError):
        accuracy(logits, np.array([0, 1]))
    with pytest.raises(DataError, match="1 negative"):
        accuracy(logits, np.array([0, 1, -1]))
    with pytest.raises(NonFiniteError):
        accuracy(np.array([[np.nan, 1.0]]), np.array([0]))
    with pytest.raises(ShapeError):
        accuracy(np.array([0.5, 1.0]), np.array([0, 1]))  # float 1-D is not predictions
