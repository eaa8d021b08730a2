"""SCALE: scale the (unpruned) penultimate features by the ASH-S factor, then energy."""

from __future__ import annotations

import torch

from .ash import PercentileShaping, head_logits, shape_ratio, top_k_sum
from .base import SCORES


@SCORES.register("scale")
class SCALE(PercentileShaping):
    r"""Energy of the head applied to the penultimate features scaled per sample,

    .. math:: s(x) = \log \sum_c \exp\big(e^{s_1/s_2}\, W f + b\big)_c,
              \quad s_1 = \textstyle\sum_j f_j,\; s_2 = \sum_{j \in \mathrm{top}_k(f)} f_j,

    with :math:`k = D - \mathrm{round}(D\,p/100)` the number of largest activations in
    :math:`s_2`. Unlike ASH-S nothing is pruned: the top-k only defines the factor (the bias is
    not scaled). Rows with :math:`s_2 = 0` (all-zero for non-negative features) get factor 1.

    Paper: Xu, Chen, Franchi & Yao, "Scaling for Training Time and Post-hoc Out-of-distribution
    Detection Enhancement", ICLR 2024. Default ``percentile=85`` (OpenOOD v1.5 and the paper's
    ImageNet setting; pytorch-ood 0.4.0: 0.65), in percent in [0, 100); grid ``[65, ..., 95]``
    (OpenOOD's sweep). The same paper's training-time method ISH (OpenOOD's ``ISHTrainer``)
    changes only training; ISH models are evaluated with this score.

    No fit data (``fit_on="none"``), but ``fit(head=(W, b))`` is required (the FeatureSet's
    logits are not used); ``fit`` checks k >= 1. Applied to the pooled penultimate features, as
    the paper and OpenOOD (``ScaleNet``: (B, D, 1, 1) view); pytorch-ood's ``SCALE`` takes
    whatever 4-D tensor its backbone returns and equals this on (B, D, 1, 1) (negated). Ties in
    the top-k do not matter here (only the sum of the k largest values is used). Float64 (the
    peers: float32).
    """

    name = "scale"

    def __init__(self, percentile: float = 85.0):
        super().__init__(percentile)

    def _logits(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        z = head_logits(f, self._W)
        z *= torch.exp(shape_ratio(f.sum(dim=1), top_k_sum(x, self.k_)))[:, None]  # W (c f) = c (W f)
        if self._b is not None:
            z += self._b
        return z
