"""Moved to :mod:`oaml.metrics` (scores and evaluation both use it); kept so old imports work."""

from ..metrics import HIGHER_IS_BETTER, METRIC_KEYS, accuracy, ood_metrics

__all__ = ["ood_metrics", "accuracy", "METRIC_KEYS", "HIGHER_IS_BETTER"]
