"""OOD detection metrics: float64 numpy, one sort shared by every metric, no sigmoid anywhere.

Convention: a score is **higher for more in-distribution (ID)** inputs. Every metric is a
fraction in [0, 1]; the report layer converts to percent.

Thresholds are the distinct score values, so tied scores always fall on the same side of a
threshold (ties are never broken by input order). This is exactly how scikit-learn's
``roc_curve`` / ``precision_recall_curve`` / ``average_precision_score`` treat ties.

Keys returned by :func:`ood_metrics`:

``fpr95`` (OOD positive; OpenOOD v1.5, pytorch-ood, the OAML paper)
    OOD is the positive class, flagged when ``score <= t``. At the *first* (smallest) threshold
    whose OOD recall (TPR) is >= 0.95, the fraction of ID samples flagged as OOD. No
    interpolation. Identical to ``roc_curve(is_ood, -score)`` read at the first TPR >= 0.95.
``fpr95_id_pos`` (ID positive; the classic ODIN / Energy / KNN papers)
    ID is the positive class, accepted when ``score >= t``. At the first (largest) threshold
    that keeps >= 95% of ID, the fraction of OOD samples accepted. Identical to
    ``roc_curve(is_id, score)`` read at the first TPR >= 0.95. It is a different number from
    ``fpr95``, not a relabelling.
``auroc``
    Area under the ROC curve (trapezoid over the tie-grouped points); the same with either
    class as positive. Equals ``roc_auc_score(is_id, score)``.
``aupr_in`` / ``aupr_out``
    By default (``aupr="ap"``) **average precision** exactly as scikit-learn's
    ``average_precision_score``: sum_k (R_k - R_{k-1}) P_k over the distinct thresholds, with
    ID positive on ``score`` (``aupr_in``) or OOD positive on ``-score`` (``aupr_out``).
    ``aupr="trapezoid"`` gives OpenOOD's number instead: ``sklearn.metrics.auc(recall,
    precision)`` over ``precision_recall_curve`` (linear interpolation, slightly optimistic).
``detection_error``
    min over all thresholds (including accept-all and reject-all) of
    ``0.5 * (1 - TPR_id) + 0.5 * FPR_id``: the best achievable error with equal class priors.
    At most 0.5. Symmetric in the choice of positive class.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

from .errors import ConfigError, DataError, NonFiniteError, ShapeError

__all__ = ["ood_metrics", "accuracy", "METRIC_KEYS", "HIGHER_IS_BETTER"]

METRIC_KEYS = ("fpr95", "fpr95_id_pos", "auroc", "aupr_in", "aupr_out", "detection_error")
HIGHER_IS_BETTER = {
    "fpr95": False,
    "fpr95_id_pos": False,
    "auroc": True,
    "aupr_in": True,
    "aupr_out": True,
    "detection_error": False,
}


def _as_1d_float64(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        arr = np.squeeze(arr)
        if arr.ndim != 1:
            raise ShapeError(f"{what} must be a 1-D array of scores, got shape {np.shape(x)}")
    if arr.size == 0:
        raise ShapeError(f"{what} is empty: every metric needs at least one ID and one OOD score")
    bad = int(np.count_nonzero(~np.isfinite(arr)))
    if bad:
        raise NonFiniteError(
            f"{what} contains {bad} non-finite value(s) (NaN or inf) out of {arr.size}; "
            "fix the score (or the features it was computed from) before computing metrics"
        )
    return arr


def _first_at_least(num: np.ndarray, den: int, level: float) -> int:
    """Index of the first entry with num/den >= level (num non-decreasing, last == den)."""
    return int(np.argmax(num / den >= level))


def ood_metrics(
    id_scores: Any,
    ood_scores: Any,
    *,
    recall_level: float = 0.95,
    aupr: str = "ap",
) -> Dict[str, float]:
    """All OOD metrics from one sort. Scores: higher = more ID. Returns fractions in [0, 1].

    ``recall_level`` sets the 95% of both FPR@95 keys (keys keep their names). ``aupr`` is
    ``"ap"`` (sklearn average precision; default) or ``"trapezoid"`` (OpenOOD). See the module
    docstring for every definition.
    """
    if not 0.0 < recall_level <= 1.0:
        raise ConfigError(f"recall_level must be in (0, 1], got {recall_level!r}")
    if aupr not in ("ap", "trapezoid"):
        raise ConfigError(f"aupr must be 'ap' or 'trapezoid', got {aupr!r}")
    s_id = _as_1d_float64(id_scores, "id_scores")
    s_ood = _as_1d_float64(ood_scores, "ood_scores")
    n_id, n_ood = s_id.size, s_ood.size

    s = np.concatenate([s_id, s_ood])
    is_id = np.concatenate([np.ones(n_id, dtype=np.int64), np.zeros(n_ood, dtype=np.int64)])
    # the one sort; ascending. Not stable: only the last index of each group of equal scores and the
    # ID count up to it are read, which do not depend on the order inside a group.
    order = np.argsort(s)
    s_sorted = s[order]
    y_sorted = is_id[order]
    # last index of every group of equal scores (distinct thresholds u_0 < u_1 < ... < u_{m-1})
    ends = np.append(np.flatnonzero(np.diff(s_sorted)), s.size - 1).astype(np.int64)
    cum_id = np.cumsum(y_sorted)
    id_le = cum_id[ends].astype(np.float64)  # #ID with score <= u_k
    ood_le = (ends + 1 - cum_id[ends]).astype(np.float64)  # #OOD with score <= u_k

    # ---- ID positive, accept when score >= t; thresholds descending, with the (0, 0) origin.
    id_lt = np.concatenate([[0.0], id_le[:-1]])  # #ID with score < u_k
    ood_lt = np.concatenate([[0.0], ood_le[:-1]])
    tp_in = np.concatenate([[0.0], (n_id - id_lt)[::-1]])  # ID accepted
    fp_in = np.concatenate([[0.0], (n_ood - ood_lt)[::-1]])  # OOD accepted

    # ---- OOD positive, flag when score <= t; thresholds ascending, with the origin.
    tp_out = np.concatenate([[0.0], ood_le])  # OOD caught
    fp_out = np.concatenate([[0.0], id_le])  # ID flagged

    auroc = float(np.sum(np.diff(fp_in) * (tp_in[1:] + tp_in[:-1])) / (2.0 * n_id * n_ood))

    k = _first_at_least(tp_out, n_ood, recall_level)
    fpr95 = float(fp_out[k] / n_id)
    k = _first_at_least(tp_in, n_id, recall_level)
    fpr95_id_pos = float(fp_in[k] / n_ood)

    det_err = float(np.min(0.5 * (1.0 - tp_in / n_id) + 0.5 * fp_in / n_ood))

    aupr_in = _aupr(tp_in[1:], fp_in[1:], n_id, aupr)
    aupr_out = _aupr(tp_out[1:], fp_out[1:], n_ood, aupr)

    return {
        "fpr95": fpr95,
        "fpr95_id_pos": fpr95_id_pos,
        "auroc": auroc,
        "aupr_in": aupr_in,
        "aupr_out": aupr_out,
        "detection_error": det_err,
    }


def _aupr(tp: np.ndarray, fp: np.ndarray, n_pos: int, method: str) -> float:
    """Area under precision-recall over tie-grouped points (thresholds from strict to lax)."""
    precision = tp / (tp + fp)  # tp + fp > 0 at every real threshold
    recall = tp / n_pos
    if method == "ap":
        d_recall = np.diff(np.concatenate([[0.0], recall]))
        return float(np.sum(d_recall * precision))
    # OpenOOD: sklearn.metrics.auc over precision_recall_curve, which stops at the first point
    # of full recall and prepends (recall=0, precision=1).
    last = int(np.searchsorted(tp, tp[-1]))
    r = np.concatenate([[0.0], recall[: last + 1]])
    p = np.concatenate([[1.0], precision[: last + 1]])
    return float(np.trapezoid(p, r) if hasattr(np, "trapezoid") else np.trapz(p, r))


def accuracy(logits_or_pred: Any, labels: Any) -> float:
    """Top-1 accuracy as a fraction. ``logits_or_pred``: ``(N, C)`` scores (argmax taken;
    ties go to the lowest class index as ``argmax`` does) or ``(N,)`` integer predictions.
    ``labels``: ``(N,)`` class indices >= 0 (drop OOD samples, marked -1, first)."""
    x = logits_or_pred.detach().cpu().numpy() if hasattr(logits_or_pred, "detach") else np.asarray(logits_or_pred)
    y = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if y.ndim != 1:
        raise ShapeError(f"labels must be 1-D, got shape {y.shape}")
    if y.size == 0:
        raise ShapeError("labels is empty: accuracy needs at least one sample")
    if not np.issubdtype(y.dtype, np.integer):
        raise ShapeError(f"labels must be integer class indices, got dtype {y.dtype}")
    if x.ndim == 2:
        if x.shape[0] != y.size:
            raise ShapeError(f"logits have {x.shape[0]} rows but labels have {y.size}")
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            raise NonFiniteError(f"logits contain {bad} non-finite value(s) (NaN or inf)")
        pred = np.argmax(x, axis=1)
    elif x.ndim == 1:
        if x.size != y.size:
            raise ShapeError(f"predictions have {x.size} entries but labels have {y.size}")
        if not np.issubdtype(x.dtype, np.integer):
            raise ShapeError(
                f"1-D predictions must be integer class indices, got dtype {x.dtype}; "
                "pass (N, C) logits to have the argmax taken"
            )
        pred = x
    else:
        raise ShapeError(f"expected (N, C) logits or (N,) predictions, got shape {x.shape}")
    neg = int(np.count_nonzero(y < 0))
    if neg:
        raise DataError(
            f"labels contain {neg} negative value(s) (OOD marker -1); accuracy is defined on ID "
            "samples only: select labels >= 0 first"
        )
    return float(np.mean(pred == y))
