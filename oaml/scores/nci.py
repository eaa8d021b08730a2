"""NCI: neural-collapse-inspired score (alignment with the predicted class weight + feature norm)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from .base import SCORES, FeatureSet, Score, check_number, mean64


@SCORES.register("nci")
class NCI(Score):
    r"""Alignment of the centred feature with the predicted class's weight vector plus an L1
    feature-norm term,

    .. math:: s(x) = \frac{w_{\hat y}^\top (f - \mu_G)}{\|f - \mu_G\|_2} + \alpha \|f\|_1,
              \qquad \hat y = \arg\max_c z_c,

    with :math:`\mu_G` the mean ID **train** feature and :math:`w_c` the rows of the head's W.

    Paper: Liu & Qin, "Detecting Out-of-Distribution Through the Lens of Neural Collapse", CVPR
    2025. Default ``alpha=1e-4`` and grid ``[1e-4, 1e-3, 1e-2, 0.1]`` (OpenOOD v1.5's
    ``nci.yml``; pytorch-ood 0.4.0: default 0, grid [0, 0.001, ..., 1]); ``alpha >= 0``.

    Fit on ID **train** (``fit_on="train"``, no labels), needs ``head=(W, b)`` (only W is used;
    the prediction is the argmax of the FeatureSet's logits, as OpenOOD). Same as OpenOOD's
    ``nci_postprocessor.py`` and pytorch-ood's ``NCI`` (which recomputes the prediction with
    ``head(features)`` in float32 and returns the negation). A feature exactly at
    :math:`\mu_G` (zero norm) gets cosine term 0 here (the peers: NaN).
    """

    name = "nci"
    fit_on = "train"
    needs_head = True
    grid: ClassVar[dict] = {"alpha": [0.0001, 0.001, 0.01, 0.1]}

    def __init__(self, alpha: float = 0.0001):
        super().__init__()
        self.alpha = check_number("alpha", alpha, low=0.0, score=self.name)

    def _fit(self, data: FeatureSet, W, b) -> None:
        self.train_mean_ = mean64(data.features)
        self._W = W

    def _score(self, data: FeatureSet) -> np.ndarray:
        f = data.features.detach().to("cpu", torch.float64)
        pred = data.logits.detach().cpu().argmax(dim=1)
        c = f - self.train_mean_
        norm = c.norm(dim=1)
        align = (self._W[pred] * c).sum(dim=1) / torch.where(norm > 0, norm, torch.ones_like(norm))
        return (align + self.alpha * f.abs().sum(dim=1)).numpy()
