"""pNML: negative single-layer predictive-normalized-maximum-likelihood regret."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .base import SCORES, FeatureSet, Score, check_rcond
from .rmd import eigh_whitener


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a <= 0, accurate at both ends (-inf at a = 0)."""
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


@SCORES.register("pnml")
class PNML(Score):
    r"""Negative pNML regret of the last layer (Bibas et al., "Single Layer Predictive Normalized
    Maximum Likelihood for Out-of-Distribution Detection", NeurIPS 2021):

    .. math:: s(x) = -\frac{1}{\log C} \log \sum_{c=1}^{C}
              \frac{p_c}{p_c + (1 - p_c)\, p_c^{\,g}}, \qquad
              g = \frac{u^\top (X^\top X)^{+} u}{1 + u^\top (X^\top X)^{+} u},

    where :math:`u = f/\|f\|` and the rows of :math:`X` are the L2-normalised ID **train**
    features, :math:`p = \mathrm{softmax}(W u + b)`: the head applied to the **normalised**
    feature (as the official code's ``logits_w_norm_features`` and pytorch-ood), so the
    FeatureSet's logits are not used and ``fit`` needs ``head=(W, b)`` (``model.fc_weights()``).
    The regret lies in [0, 1]; a sample in a direction the train features barely span, or
    with a flat prediction, has a high regret. Fit on ID **train** (``fit_on="train"``; labels
    are not needed, rows labelled -1 are dropped when labels are given).

    Computation: :math:`(X^\top X)^{+}` once, through float64 ``eigh`` (pinvh cutoff ``rcond``,
    default D·eps) as a whitening matrix, so :math:`u^\top (X^\top X)^+ u` is a squared norm;
    the sum is taken in log space, :math:`\log \frac{p}{p + (1-p)p^g} =
    -\log(1 + e^{\log(1-p) + (g-1)\log p})`, from ``log_softmax``, so no probability is
    clamped and logits ~1e4 are safe. pytorch-ood 0.4.0's ``PNML`` (same formula, fit through
    ``pinv`` of the float32 D×D Gram matrix; the official code inverts it unless singular)
    clamps probabilities to [1e-12, 1 - 1e-12] (only the lower clamp acts in float32) and
    returns the regret (higher = OOD). A zero feature vector has :math:`u = 0`, hence
    :math:`g = 0` and regret 0 (its most-ID value), in all three implementations.
    """

    name = "pnml"
    fit_on = "train"
    needs_head = True
    uses = ("features",)

    def __init__(self, rcond: float | None = None):
        super().__init__()
        self.rcond = check_rcond(rcond, self.name)

    @staticmethod
    def _normalise(f: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(f.detach().to("cpu", torch.float64), p=2.0, dim=1, eps=1e-12)

    def _fit(self, data: FeatureSet, W, b) -> None:
        if data.num_classes < 2:
            raise ConfigError("pnml: the regret is normalised by log C and needs C >= 2 classes")
        X = data.features
        if data.labels is not None:
            known = data.labels >= 0
            if not bool(known.any()):
                raise DataError("pnml: every fit sample is labelled OOD (-1); fit on ID train features")
            X = X[known]
        U = self._normalise(X)
        self.projector_ = eigh_whitener(U.T @ U, self.rcond, "normalised-feature Gram", self.name)  # (D, r)
        self.rank_ = int(self.projector_.shape[1])
        self._W = W
        self._b = b if b is not None else torch.zeros(W.shape[0], dtype=torch.float64)

    def regret(self, data: FeatureSet) -> np.ndarray:
        """The pNML regret in [0, 1] (pytorch-ood's score; higher = OOD)."""
        return -self.score(data)

    def _score(self, data: FeatureSet) -> np.ndarray:
        out = []
        log_c = math.log(data.num_classes)
        for i in range(0, len(data), 8192):
            u = self._normalise(data.features[i : i + 8192])
            v = u @ self.projector_
            proj = (v * v).sum(dim=1, keepdim=True)
            g = proj / (1.0 + proj)
            logp = torch.log_softmax(u @ self._W.T + self._b, dim=1)
            a = _log1mexp(logp) + (g - 1.0) * logp
            log_terms = -torch.logaddexp(torch.zeros_like(a), a)  # log(1 / (1 + e^a))
            out.append(-torch.logsumexp(log_terms, dim=1) / log_c)
        return torch.cat(out).numpy()
