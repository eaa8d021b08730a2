"""fDBD: mean distance of the feature to the decision boundaries of the predicted class."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from ..errors import ConfigError, DataError, ShapeError
from .base import FLOAT32_CHUNK_ELEMS, SCORES, FeatureSet, Score, check_finite, checked_mean32, chunk_rows


@SCORES.register("fdbd")
class FDBD(Score):
    r"""Average closed-form distance from the feature to the boundaries between the predicted
    class and every other class, normalised by the distance to the train mean,

    .. math:: s(x) = \frac{1}{C-1} \sum_{c \ne \hat y}
              \frac{z_{\hat y} - z_c}{\|w_{\hat y} - w_c\|_2 \; \|f - \mu\|_2},
              \qquad \hat y = \arg\max_c z_c,

    with :math:`\mu` the mean ID **train** feature; ``distance_as_normalizer=False`` divides by
    :math:`\|f\|_2` instead (OpenOOD's variant, chosen on validation). For a linear head,
    :math:`(z_{\hat y} - z_c)/\|w_{\hat y} - w_c\|` is the distance of f to the boundary.

    Paper: Liu & Qin, "Fast Decision Boundary based Out-of-Distribution Detector", ICML 2024.
    Default ``distance_as_normalizer=True`` (the paper); grid ``[True, False]`` (OpenOOD v1.5's
    ``fdbd.yml``).

    Fit on ID **train** (``fit_on="train"``, no labels), needs ``head=(W, b)`` (W for the
    denominators; the logits z are the FeatureSet's, as OpenOOD; the bias enters through them).
    Needs C >= 2 and no two classes with identical weight rows (checked at fit). Differences:
    OpenOOD's ``fdbd_postprocessor.py`` sums without the 1/(C-1) (a constant: same ranking);
    pytorch-ood 0.4.0's ``fDBD`` recomputes the logits with ``head(z)`` in float32, has only the
    train-mean normaliser and returns the negation. The normaliser is clamped at 1e-12 (pytorch-ood:
    1e-8; OpenOOD: none, inf). Computed in float32, as both peers (the train mean too, a cascaded
    float32 sum); the result is returned as float64.
    """

    name = "fdbd"
    fit_on = "train"
    needs_head = True
    grid: ClassVar[dict] = {"distance_as_normalizer": [True, False]}
    checks_inline = ("logits", "features")  # from each chunk's sums and norms
    fit_uses = ("features",)
    fit_checks_inline = ("features",)  # from the train mean

    def __init__(self, distance_as_normalizer: bool = True):
        super().__init__()
        if not isinstance(distance_as_normalizer, (bool, np.bool_)):
            raise ConfigError(
                f"fdbd: distance_as_normalizer must be True or False, got {distance_as_normalizer!r}"
            )
        self.distance_as_normalizer = bool(distance_as_normalizer)

    def _fit(self, data: FeatureSet, W, b) -> None:
        C = W.shape[0]
        if C < 2:
            raise ShapeError("fdbd: needs at least 2 classes (decision boundaries between classes)")
        denom = torch.cdist(W, W, compute_mode="donot_use_mm_for_euclid_dist")  # ||w_p - w_c||, exact
        off = ~torch.eye(C, dtype=torch.bool)
        if bool((denom[off] == 0).any()):
            p, c = [int(v) for v in torch.nonzero((denom == 0) & off)[0]]
            raise DataError(f"fdbd: classes {p} and {c} have identical head weights (no decision boundary)")
        denom[~off] = 1.0
        self._denom = denom.to(torch.float32)
        self.train_mean_ = checked_mean32(data.features, "fdbd.fit(): features")

    def _score(self, data: FeatureSet) -> np.ndarray:
        Z, X = data.logits.detach().cpu(), data.features.detach().cpu()
        n, C = Z.shape
        out = torch.empty(n, dtype=torch.float64)
        # float32 (as both peers) in row chunks: the numerator's terms are positive, so its relative error
        # is that of C roundings; the normaliser's is about (D + |mu| / |f - mu|) u (u = 2^-24)
        step = chunk_rows(X.shape[1], FLOAT32_CHUNK_ELEMS)
        buf = torch.empty(min(step, n), X.shape[1])
        for a in range(0, n, step):
            z = Z[a : a + step].to(torch.float32, copy=True)  # a copy: changed in place below
            zmax, pred = z.max(dim=1)
            dist = z.neg_().add_(zmax[:, None]).div_(self._denom[pred]).sum(dim=1).div_(C - 1)
            f = buf[: z.shape[0]]
            if self.distance_as_normalizer:
                torch.sub(X[a : a + step], self.train_mean_, out=f)
            else:
                f.copy_(X[a : a + step])
            norm = torch.linalg.vector_norm(f, dim=1)
            # a NaN or inf input makes its row's sum or norm non-finite: then the exact check of the chunk
            if not bool(torch.isfinite(dist).all()):
                check_finite(Z[a : a + step], "fdbd.score(): logits")
            if not bool(torch.isfinite(norm).all()):
                check_finite(X[a : a + step], "fdbd.score(): features")
            out[a : a + step] = dist.div_(norm.clamp_min_(1e-12))
        return out.numpy()
