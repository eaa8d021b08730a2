"""NCI: neural-collapse-inspired score (alignment with the predicted class weight + feature norm)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from .base import SCORES, FeatureSet, Score, check_number, chunk_rows, float64_chunks, mean64


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
        self.train_mean_ = mean64(data.features, chunk=chunk_rows(data.feature_dim))
        self._W = W

    def _score(self, data: FeatureSet) -> np.ndarray:
        X = data.features.detach()
        pred = data.logits.detach().argmax(dim=1)
        out = torch.empty(X.shape[0], dtype=torch.float64)
        # float64 in row chunks, the upcast into a reused buffer then centred in place (in cache)
        for sl, c in float64_chunks(X):
            l1 = c.abs().sum(dim=1) if self.alpha else None
            c.sub_(self.train_mean_)
            norm = torch.linalg.vector_norm(c, dim=1)
            align = c.mul_(self._W.index_select(0, pred[sl])).sum(dim=1)
            o = torch.div(align, torch.where(norm > 0, norm, torch.ones_like(norm)), out=out[sl])
            if self.alpha:
                o += self.alpha * l1
        return out.numpy()
