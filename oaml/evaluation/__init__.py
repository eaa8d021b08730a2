"""Evaluation: post-hoc OOD scores of a classifier on a benchmark or your own data.

    import oaml
    results = oaml.evaluate(model, "fmnist", scores=["msp", "knn"])   # any torch classifier
    print(results)                                                     # markdown table
    results.to_csv("results.csv")

:func:`evaluate` (any model), :func:`evaluate_checkpoint` (oaml students) and
:func:`evaluate_teacher` run one :class:`Evaluator` and return :class:`Results`; metrics are in
:mod:`oaml.evaluation.metrics`, report files in :mod:`oaml.evaluation.report`.
"""

from .api import Results, evaluate, evaluate_checkpoint, evaluate_teacher
from .evaluator import DEFAULT_GRIDS, DEFAULT_SCORES, GROUPS, METRIC_KEYS, Evaluator, OODSet, score_settings
from .features import FeatureCache, extract_features
from .metrics import ood_metrics
from .report import markdown_table, write_report

__all__ = [
    "evaluate", "evaluate_checkpoint", "evaluate_teacher", "Results", "Evaluator", "OODSet", "DEFAULT_SCORES",
    "DEFAULT_GRIDS", "GROUPS", "METRIC_KEYS", "score_settings", "extract_features", "FeatureCache", "ood_metrics",
    "markdown_table", "write_report",
]
