"""EBO: energy-based score."""

from __future__ import annotations

import numpy as np

from .base import SCORES, FeatureSet, Score, check_number, energy64


@SCORES.register("ebo", "energy")
class EBO(Score):
    r"""Negative free energy, :math:`s(x) = T \log \sum_c \exp(z_c / T)`.

    Paper: Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020. Default
    ``temperature=1``. No fit (``fit_on="none"``). Same as OpenOOD; pytorch-ood's
    ``EnergyBased`` returns the negation. float64 logsumexp (:func:`~oaml.scores.base.energy64`):
    no overflow for logits ~1e4.
    """

    name = "ebo"
    fit_on = "none"
    uses = ("logits",)
    checks_inline = ("logits",)

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = check_number("temperature", temperature, low=0.0, low_open=True, score=self.name)

    def _score(self, data: FeatureSet) -> np.ndarray:
        return energy64(data.logits, self.temperature, check=f"{self.name}.score(): logits").numpy()
