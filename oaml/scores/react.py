"""ReAct: rectified activations, then energy through the last layer."""

from __future__ import annotations

import numpy as np
import torch

from .base import SCORES, FeatureSet, Score, check_number


@SCORES.register("react")
class ReAct(Score):
    r"""Energy of the logits computed from clipped penultimate features,

    .. math:: s(x) = T \log \sum_c \exp\big((W \min(f, \tau) + b)_c / T\big),

    with :math:`\tau` the ``percentile``-th percentile of **all** feature activations of the fit
    split (flattened). Paper: Sun, Guo & Li, "ReAct: Out-of-distribution Detection With
    Rectified Activations", NeurIPS 2021. Defaults ``percentile=90``, ``temperature=1``.

    Fit on ID **val** (``fit_on="val"``, as OpenOOD; the paper used train), needs
    ``head=(W, b)`` (``model.fc_weights()``), i.e. the head must be one linear layer. Matches
    OpenOOD (upper clip only, energy with T=1). pytorch-ood 0.2.0's ``ReAct`` took an absolute
    threshold (default 1.0) with no percentile fit; 0.4.0 (installed) fits the percentile (given
    as a fraction, 0.9) on whatever data ``fit`` receives and returns the negated energy. The
    percentile uses numpy's default linear interpolation, like OpenOOD.
    """

    name = "react"
    fit_on = "val"
    uses = ("features",)
    needs_head = True

    def __init__(self, percentile: float = 90.0, temperature: float = 1.0):
        super().__init__()
        self.percentile = check_number("percentile", percentile, low=0.0, high=100.0, score=self.name)
        self.temperature = check_number("temperature", temperature, low=0.0, low_open=True, score=self.name)

    def _fit(self, data: FeatureSet, W, b) -> None:
        self.threshold_ = float(np.percentile(data.features.detach().cpu().numpy().ravel(), self.percentile))
        self._W = W
        self._b = b

    def _score(self, data: FeatureSet) -> np.ndarray:
        f = data.features.to(torch.float64).clamp(max=self.threshold_)
        z = f @ self._W.T
        if self._b is not None:
            z = z + self._b
        T = self.temperature
        return (T * torch.logsumexp(z / T, dim=1)).numpy()
