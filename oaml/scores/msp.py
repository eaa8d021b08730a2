"""MSP: maximum softmax probability."""

from __future__ import annotations

import numpy as np

from .base import SCORES, FeatureSet, Score, check_number, softmax64


@SCORES.register("msp")
class MSP(Score):
    r"""Maximum softmax probability, :math:`s(x) = \max_c \mathrm{softmax}(z/T)_c`.

    Paper: Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution
    Examples in Neural Networks", ICLR 2017. Default ``temperature=1``. No fit (``fit_on="none"``).

    Same as OpenOOD's base postprocessor; pytorch-ood's ``MaxSoftmax`` returns the negation
    (higher = OOD). Computed in float64 from logits (stable for logits ~1e4).
    """

    name = "msp"
    fit_on = "none"
    uses = ("logits",)

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = check_number("temperature", temperature, low=0.0, low_open=True, score=self.name)

    def _score(self, data: FeatureSet) -> np.ndarray:
        return softmax64(data.logits, self.temperature).max(dim=1).values.numpy()
