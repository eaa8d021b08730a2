"""GEN: generalized entropy score."""

from __future__ import annotations

import numpy as np
import torch

from .base import SCORES, FeatureSet, Score, check_number, exp_shifted, row_sums


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
    Computed from the shifted exponentials :math:`e_c = e^{z_c - \max z}` of
    :func:`~oaml.scores.base.exp_shifted` (row chunks, float64), :math:`S = \sum_c e_c`: each
    term is :math:`(p_c (1-p_c))^\gamma = (e_c (S - e_c) / S^2)^\gamma` (one power instead of
    two), with :math:`S - e_c` for the largest class taken as the sum of the other classes, not
    as a difference: for a confident sample :math:`1 - p_{(1)}` keeps its relative precision
    (``1 - p`` in float64 is a multiple of 1e-16, whose 0.1-th power would be off by up to 0.03).
    """

    name = "gen"
    fit_on = "none"
    uses = ("logits",)
    checks_inline = ("logits",)

    def __init__(self, gamma: float = 0.1, M: int = 100):
        super().__init__()
        self.gamma = check_number("gamma", gamma, low=0.0, low_open=True, score=self.name)
        self.M = check_number("M", M, low=1, integer=True, score=self.name)

    def _score(self, data: FeatureSet) -> np.ndarray:
        out = torch.empty(len(data), dtype=torch.float64)
        C = data.num_classes
        m = min(self.M, C)
        for rows, _, e in exp_shifted(data.logits, check=f"{self.name}.score(): logits"):
            s = row_sums(e)[:, None]
            one = e == 1.0  # the row's maximum (e = 2^0 exactly)
            # S - e_c >= 0: for a maximum, the sum of the other entries (no cancellation)
            rest = e.masked_fill(one, 0.0).sum(dim=1, keepdim=True) + (one.sum(dim=1, keepdim=True) - 1)
            q = torch.where(one, rest, s - e)
            if m < C:
                e, idx = torch.topk(e, m, dim=1, sorted=False)  # the M largest probabilities
                q = q.gather(1, idx)
            # p (1 - p) = e (S - e) / S^2 >= 0; 0^gamma = 0
            g = row_sums(e.mul(q).div_(s.square()).pow_(self.gamma))
            out[rows] = g.neg_()
        return out.numpy()
