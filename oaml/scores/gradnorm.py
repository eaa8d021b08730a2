"""GradNorm (Huang et al. 2021), closed form from features and logits."""

from __future__ import annotations

import numpy as np
import torch

from .base import SCORES, FeatureSet, Score, check_number


@SCORES.register("gradnorm")
class GradNorm(Score):
    r"""L1 norm of the gradient of KL(uniform || softmax(z/T)) w.r.t. the last-layer weight.

    With :math:`z = W f + b`, :math:`p = \mathrm{softmax}(z/T)` and
    :math:`L = \mathrm{KL}(u \,\|\, p) = -\frac1C\sum_c \log p_c - \log C`,
    :math:`\partial L / \partial z_j = (p_j - 1/C)/T` and
    :math:`\partial L / \partial W = (\partial L / \partial z)\, f^\top`, a rank-one matrix, so

    .. math:: s(x) = \|\partial L/\partial W\|_1 = \frac{1}{T}\,\|f\|_1 \sum_j |p_j - 1/C|.

    Higher = ID (confident predictions are far from uniform). Paper: Huang, Geng & Li, "On the
    Importance of Gradients for Detecting Distributional Shifts in the Wild", NeurIPS 2021.
    Default ``temperature=1``. No fit; reads the logits from the FeatureSet (they must be the
    head's output on these features), so no head is needed.

    Differences: the authors' code and OpenOOD use ``sum_c -log p_c`` (no 1/C) and backprop one
    sample at a time; their value is exactly ``C`` times ours (same ranking, same metrics); the
    bias gradient is excluded in both. pytorch-ood 0.2.0 had only Lee & AlRegib's GradNorm (a
    different method); pytorch-ood 0.4.0's ``GradNorm`` (installed) is Huang et al. with the
    1/C mean like ours, computed by per-sample ``vmap`` gradients of the parameters chosen by
    ``param_filter`` (default: all parameters, not only the last weight), negated.
    """

    name = "gradnorm"
    fit_on = "none"

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = check_number("temperature", temperature, low=0.0, low_open=True, score=self.name)

    def _score(self, data: FeatureSet) -> np.ndarray:
        z = data.logits.to(torch.float64) / self.temperature
        p = torch.softmax(z, dim=1)
        C = p.shape[1]
        dev = (p - 1.0 / C).abs().sum(dim=1)
        f1 = data.features.to(torch.float64).abs().sum(dim=1)
        return (f1 * dev / self.temperature).numpy()
