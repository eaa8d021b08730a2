"""SHE: simplified Hopfield energy, the similarity to the stored pattern of the predicted class."""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import torch

from ..errors import DataError
from .base import SCORES, FeatureSet, Score, check_choice, class_sums, float64_chunks

log = logging.getLogger(__name__)


@SCORES.register("she")
class SHE(Score):
    r"""Similarity of the features to the stored pattern of the predicted class,

    .. math:: s(x) = \langle f, S_{\hat y} \rangle, \qquad \hat y = \arg\max_c z_c, \qquad
              S_c = \mathrm{mean}\{f_i : y_i = c,\ \hat y_i = c\},

    the patterns :math:`S_c` being the mean ID **train** features of the correctly classified
    samples of each class. ``metric="inner_product"`` (default, the paper and both peers);
    OpenOOD also offers ``"euclidean"`` (:math:`-\|f - S_{\hat y}\|`) and ``"cosine"``.

    Paper: Zhang, Fu, Chen, Shi, Zhang & Liu, "Out-of-Distribution Detection based on
    In-Distribution Data Patterns Memorization with Modern Hopfield Energy", ICLR 2023.

    Fit on ID **train** (``fit_on="train"``, needs labels); predictions are the argmax of the
    FeatureSet's logits (fit and score), so no head is needed. A class with no correctly
    classified train sample gets the mean of all its train samples (a warning is logged); a
    class with no train sample at all is a DataError. OpenOOD (``she_postprocessor.py``) leaves
    such patterns NaN (NaN scores); pytorch-ood 0.4.0 raises ValueError, recomputes the
    predictions with ``head(z)`` and returns the negated inner product. Otherwise identical
    (float64 here). No hyperparameter grid (OpenOOD has no sweep).
    """

    name = "she"
    fit_on = "train"
    needs_fit_labels = True
    grid: ClassVar[dict] = {}

    def __init__(self, metric: str = "inner_product"):
        super().__init__()
        self.metric = check_choice("metric", metric, ("inner_product", "euclidean", "cosine"), self.name)

    def _fit(self, data: FeatureSet, W, b) -> None:
        f = data.features.detach().cpu()
        y = data.labels.detach().cpu().long()
        pred = data.logits.detach().cpu().argmax(dim=1)
        C = data.num_classes
        correct = pred == y
        n_all = torch.bincount(y, minlength=C)
        missing = torch.nonzero(n_all == 0).flatten().tolist()
        if missing:
            raise DataError(
                f"she: no train sample of class(es) {missing[:10]}{'...' if len(missing) > 10 else ''}; "
                "every class needs a stored pattern (fit on the full ID train split)"
            )
        n_ok = torch.bincount(y[correct], minlength=C)
        # the sums of the correctly classified rows: the others go to an extra row C, dropped
        # (no boolean-indexed copy of the train set)
        patterns = class_sums(f, torch.where(correct, y, C), C + 1)[:C]
        patterns = patterns / n_ok.clamp_min(1).to(torch.float64)[:, None]
        fallback = torch.nonzero(n_ok == 0).flatten()
        if len(fallback):
            sums = class_sums(f, y, C)
            patterns[fallback] = sums[fallback] / n_all[fallback].to(torch.float64)[:, None]
            log.warning(
                "she: class(es) %s have no correctly classified train sample; their pattern is the "
                "mean of all their train samples", fallback.tolist()[:10],
            )
        self.patterns_ = patterns
        self.fallback_classes_ = [int(c) for c in fallback]

    def _score(self, data: FeatureSet) -> np.ndarray:
        X = data.features.detach()
        pred = data.logits.detach().argmax(dim=1)
        out = torch.empty(X.shape[0], dtype=torch.float64)
        # float64 in row chunks (in cache), the upcast into a reused buffer
        for sl, f in float64_chunks(X):
            S = self.patterns_.index_select(0, pred[sl])  # a copy, free to change in place
            if self.metric == "inner_product":
                out[sl] = S.mul_(f).sum(dim=1)
            elif self.metric == "euclidean":
                out[sl] = -torch.linalg.vector_norm(S.sub_(f), dim=1)
            else:
                out[sl] = torch.nn.functional.cosine_similarity(f, S, dim=1)
        return out.numpy()
