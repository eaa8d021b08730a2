"""NCI: neural-collapse-inspired score (alignment with the predicted class weight + feature norm)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from .base import FLOAT32_CHUNK_ELEMS, SCORES, FeatureSet, Score, cast_chunks, check_finite, check_number, checked_mean32


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
    :math:`\mu_G` (zero norm) gets cosine term 0 here (the peers: NaN). Computed in float32, as both
    peers (the train mean too, a cascaded float32 sum); the result is returned as float64.
    """

    name = "nci"
    fit_on = "train"
    needs_head = True
    grid: ClassVar[dict] = {"alpha": [0.0001, 0.001, 0.01, 0.1]}
    checks_inline = ("features",)  # from each chunk's norms
    fit_uses = ("features",)
    fit_checks_inline = ("features",)  # from the train mean

    def __init__(self, alpha: float = 0.0001):
        super().__init__()
        self.alpha = check_number("alpha", alpha, low=0.0, score=self.name)

    def _fit(self, data: FeatureSet, W, b) -> None:
        self.train_mean_ = checked_mean32(data.features, "nci.fit(): features")
        self._W = W.detach().cpu().to(torch.float32)

    def _score(self, data: FeatureSet) -> np.ndarray:
        X = data.features.detach().cpu()
        pred = data.logits.detach().cpu().argmax(dim=1)
        out = torch.empty(X.shape[0], dtype=torch.float64)
        # float32 (as both peers) in row chunks cast into a reused buffer, centred in place; the cosine
        # term's absolute error is at most about D u |w| (u = 2^-24), the L1 term's relative error D u
        for sl, c in cast_chunks(X, torch.float32, FLOAT32_CHUNK_ELEMS):
            l1 = c.abs().sum(dim=1) if self.alpha else None
            c.sub_(self.train_mean_)
            norm = torch.linalg.vector_norm(c, dim=1)
            if not bool(torch.isfinite(norm).all()):  # a NaN or inf feature: the exact check of the chunk
                check_finite(X[sl], "nci.score(): features")
            align = c.mul_(self._W.index_select(0, pred[sl])).sum(dim=1)
            o = align.div_(torch.where(norm > 0, norm, torch.ones_like(norm)))
            if self.alpha:
                o += self.alpha * l1
            out[sl] = o
        return out.numpy()
