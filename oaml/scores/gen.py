"""GEN: generalized entropy score."""

from __future__ import annotations

import numpy as np
import torch

from .base import SCORES, FeatureSet, Score, check_number, softmax64


@SCORES.register("gen")
class GEN(Score):
    r"""Generalized entropy over the top-M softmax probabilities,

    .. math:: s(x) = -\sum_{j=1}^{M} p_{(j)}^{\gamma} (1 - p_{(j)})^{\gamma},

    where :math:`p_{(1)} \ge p_{(2)} \ge \dots` are the sorted softmax probabilities.

    Paper: Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution
    Detection", CVPR 2023. Defaults ``gamma=0.1``, ``M=100``; M is capped at the number of
    classes C (so M >= C uses every class, as OpenOOD does for CIFAR). No fit.

    Same as OpenOOD. pytorch-ood 0.4.0 (installed) has ``M=None`` (all classes) by default,
    clamps p to [1e-7, 1-1e-7] in float32 and returns higher = OOD. Here p is
    float64 and unclamped: 0^gamma = 0, so one-hot probabilities from huge logits give 0, not NaN.
    """

    name = "gen"
    fit_on = "none"
    uses = ("logits",)

    def __init__(self, gamma: float = 0.1, M: int = 100):
        super().__init__()
        self.gamma = check_number("gamma", gamma, low=0.0, low_open=True, score=self.name)
        self.M = check_number("M", M, low=1, integer=True, score=self.name)

    def _score(self, data: FeatureSet) -> np.ndarray:
        p = softmax64(data.logits)
        m = min(self.M, p.shape[1])
        top = torch.topk(p, m, dim=1).values if m < p.shape[1] else p
        g = (top.pow(self.gamma) * (1.0 - top).clamp_min(0.0).pow(self.gamma)).sum(dim=1)
        return (-g).numpy()
