"""MSP: maximum softmax probability."""

from __future__ import annotations

import numpy as np
import torch

from .base import SCORES, FeatureSet, Score, check_number, exp_shifted, row_sums


@SCORES.register("msp")
class MSP(Score):
    r"""Maximum softmax probability, :math:`s(x) = \max_c \mathrm{softmax}(z/T)_c`.

    Paper: Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution
    Examples in Neural Networks", ICLR 2017. Default ``temperature=1``. No fit (``fit_on="none"``).

    Same as OpenOOD's base postprocessor; pytorch-ood's ``MaxSoftmax`` returns the negation
    (higher = OOD). Computed in float64 from logits (stable for logits ~1e4): the largest
    probability is :math:`1 / \sum_c e^{(z_c - \max z)/T}` (the max term is exactly 1), from
    :func:`~oaml.scores.base.exp_shifted` in row chunks, the same number as float64
    ``softmax(z / T).max()`` to a few ulps without forming the softmax.
    """

    name = "msp"
    fit_on = "none"
    uses = ("logits",)
    checks_inline = ("logits",)

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = check_number("temperature", temperature, low=0.0, low_open=True, score=self.name)

    def _score(self, data: FeatureSet) -> np.ndarray:
        out = torch.empty(len(data), dtype=torch.float64)
        for rows, _, e in exp_shifted(data.logits, 1.0 / self.temperature, check=f"{self.name}.score(): logits"):
            row_sums(e, out=out[rows])
        return out.reciprocal_().numpy()
