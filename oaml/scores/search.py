"""Hyperparameter search for post-hoc scores on ID-val vs OOD-val only (OpenOOD's APS, fixed).

Every grid point builds a **fresh** score and refits it, so all state that depends on a
hyperparameter (ViM's residual basis, ReAct's threshold, KNN's K, ...) is recomputed; OpenOOD
once forgot this (ViM, its PR #298) and pytorch-ood too (OpenMax #160, VRA #157).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np

from ..errors import ConfigError
from ..metrics import HIGHER_IS_BETTER, ood_metrics
from .base import SCORES, FeatureSet, Score, create_score

__all__ = ["SearchResult", "search_hyperparameters"]


@dataclass
class SearchResult:
    best_params: Dict[str, Any]
    best_value: float
    metric: str
    best_score: Score  # the score fitted with best_params (ready to use on test data)
    trials: List[Dict[str, Any]] = field(default_factory=list)  # {"params", "value", "metrics"}


def _grid_points(grid: Mapping[str, Sequence[Any]]) -> List[Dict[str, Any]]:
    if not isinstance(grid, Mapping) or not grid:
        raise ConfigError("search: grid must be a non-empty mapping {parameter: [values, ...]}")
    keys = list(grid)
    for k in keys:
        vals = grid[k]
        if isinstance(vals, (str, bytes)) or not isinstance(vals, Sequence) or len(vals) == 0:
            raise ConfigError(f"search: grid[{k!r}] must be a non-empty list of values, got {vals!r}")
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _as_list(x: Any) -> list:
    """A Mapping {name: set} or a list of FeatureSets is several sets; anything else is one
    (a loader may itself be a list of batches, so lists count only when they hold FeatureSets)."""
    if isinstance(x, Mapping):
        return list(x.values())
    if isinstance(x, (list, tuple)) and x and all(isinstance(v, FeatureSet) for v in x):
        return list(x)
    return [x]


def search_hyperparameters(
    name: str,
    grid: Mapping[str, Sequence[Any]],
    *,
    id_val: Any,
    ood_val: Any,
    fit_data: FeatureSet | None = None,
    head: Any = None,
    model: Any = None,
    fit_loader: Any = None,
    metric: str = "auroc",
    fixed: Mapping[str, Any] | None = None,
) -> SearchResult:
    """Grid search of score ``name`` over ``grid`` (cartesian product, in the grid's order).

    For each point: ``create_score(name, **fixed, **point).fit(fit_data, head=head,
    model=model, loader=fit_loader)``, then scores of ``id_val`` and of each set in ``ood_val``
    (FeatureSets, or loaders for model scores such as ODIN/Gram; several sets as a dict
    ``{name: set}`` or a list of FeatureSets), and ``metric`` (a key of
    :func:`oaml.metrics.ood_metrics`, default AUROC) averaged over the OOD-val sets.
    ``fit_data`` is the split named by the score's ``fit_on`` (ID train, or ID val: then pass
    the ID-val FeatureSet again). Best = max (AUROC, AUPR, ...) or min (FPR, detection error);
    ties keep the first point. Never pass test sets here.
    """
    cls = SCORES.get(name)
    if metric not in HIGHER_IS_BETTER:
        raise ConfigError(f"search: metric={metric!r} is unknown; choose one of {sorted(HIGHER_IS_BETTER)}")
    fixed = dict(fixed or {})
    clash = sorted(set(fixed) & set(grid))
    if clash:
        raise ConfigError(f"search: parameter(s) {clash} appear in both grid and fixed")
    oods = _as_list(ood_val)
    if not oods:
        raise ConfigError("search: ood_val is empty; give at least one OOD validation set")
    higher = HIGHER_IS_BETTER[metric]

    def run(score: Score, data: Any) -> np.ndarray:
        if cls.requires_model:
            return score.score(model=model, loader=data)
        return score.score(data)

    trials: List[Dict[str, Any]] = []
    best: tuple | None = None
    for point in _grid_points(grid):
        score = create_score(name, **fixed, **point)
        score.fit(fit_data, head=head, model=model, loader=fit_loader)
        s_id = run(score, id_val)
        per_set = [ood_metrics(s_id, run(score, o)) for o in oods]
        mean = {k: float(np.mean([m[k] for m in per_set])) for k in per_set[0]}
        value = mean[metric]
        trials.append({"params": dict(point), "value": value, "metrics": mean})
        if best is None or (value > best[0] if higher else value < best[0]):
            best = (value, point, score)
    assert best is not None
    return SearchResult(best_params=dict(best[1]), best_value=best[0], metric=metric, best_score=best[2], trials=trials)
