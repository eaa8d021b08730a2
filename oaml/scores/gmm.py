"""GMM: log-likelihood under class-conditional Gaussians with per-class covariances."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import DataError
from .base import SCORES, FeatureSet, Score, check_number, mean64
from .mds import gram64

#: the scoring's blocks: at most this many rows (measured fastest near 300-400 rows at D=512, K=10 and 100:
#: larger (K, rows, D) temporaries leave the cache) and at most _CHUNK_ELEMS entries (memory, for large K)
_ROWS = 384
_CHUNK_ELEMS = 1 << 24


@SCORES.register("gmm")
class GMM(Score):
    r"""Log-likelihood of the features under a mixture of one Gaussian per class,

    .. math:: s(x) = \log \sum_k \pi_k\, \mathcal{N}(f \mid \mu_k, \Sigma_k + r I),

    with :math:`\mu_k`, :math:`\Sigma_k` the mean and MLE covariance (divides by :math:`n_k`)
    of the class-k train features and :math:`\pi_k = n_k / N`. Fit on ID **train**
    (``fit_on="train"``, needs labels). ``reg`` (:math:`r`, default 1e-6, absolute, in squared
    feature units) keeps :math:`\Sigma_k + rI` positive definite for rank-deficient covariances
    (post-ReLU dead units, classes with fewer samples than dimensions); a covariance that is not
    positive definite even so raises DataError (increase ``reg``). Classes with no train sample
    are left out of the mixture.

    This is pytorch-ood 0.4.0's ``GMM`` (a classical baseline, no single paper), which returns
    the negative log-likelihood (higher = OOD); same float64 Cholesky, same formula. Computation
    here: per class the float64 covariance from row chunks of the features (no float64 copy of the
    whole set; the upper block triangle, :func:`~oaml.scores.mds.gram64`) and the inverse Cholesky
    factor :math:`L_k^{-1}`, then :math:`\|L_k^{-1}(f-\mu_k)\|^2` by batched matmuls over blocks of
    at most 384 samples, which keep the (K, rows, D) temporaries in cache (pytorch-ood
    multiplies the whole :math:`K\times B\times D` difference tensor by the precision matrices).
    Cost O(N·K·D²), memory K·D² float64 (200 MB for K=100, D=512). OpenOOD's ``gmm`` is a
    different method (sklearn mixtures with several components per class on reduced features).
    """

    name = "gmm"
    fit_on = "train"
    needs_fit_labels = True
    uses = ("features",)

    def __init__(self, reg: float = 1e-6):
        super().__init__()
        self.reg = check_number("reg", reg, low=0.0, score=self.name)

    def _fit(self, data: FeatureSet, W, b) -> None:
        X = data.features.detach().cpu()  # upcast to float64 per class and chunk, not as a whole
        y = data.labels.detach().cpu().long()
        N, D = X.shape
        counts = torch.bincount(y, minlength=data.num_classes)
        classes = torch.nonzero(counts > 0).flatten()
        eye = torch.eye(D, dtype=torch.float64)
        means, factors, log_dets = [], [], []
        for c in classes.tolist():
            Xc = X[y == c]
            mu = mean64(Xc)
            # float64 centred second moments in row chunks, the upper block triangle only (mds.gram64)
            cov = gram64(Xc, mu) / Xc.shape[0] + self.reg * eye
            L, info = torch.linalg.cholesky_ex(cov)
            if int(info) != 0:
                raise DataError(
                    f"gmm: the covariance of class {c} ({Xc.shape[0]} train samples, D={D}) is not "
                    f"positive definite with reg={self.reg}; increase reg (e.g. reg=1e-3)"
                )
            Linv = torch.linalg.solve_triangular(L, eye, upper=False)
            means.append(mu)
            factors.append(Linv.T.contiguous())  # (D, D): ||(f - mu) @ Linv^T||^2 = Mahalanobis
            log_dets.append(2.0 * torch.log(torch.diagonal(L)).sum())
        self.classes_ = classes.numpy()
        self.means_ = torch.stack(means)  # (K, D)
        self._factors = torch.stack(factors)  # (K, D, D)
        self.log_dets_ = torch.stack(log_dets)
        self.log_weights_ = torch.log(counts[classes].to(torch.float64) / N)
        self._const = self.log_weights_ - 0.5 * (self.log_dets_ + D * math.log(2.0 * math.pi))

    def _score(self, data: FeatureSet) -> np.ndarray:
        X = data.features.detach().to("cpu", torch.float64)
        K, D = self.means_.shape
        step = max(1, min(_ROWS, _CHUNK_ELEMS // max(1, K * D)))
        out = []
        for i in range(0, X.shape[0], step):
            x = X[i : i + step]
            w = torch.bmm(x[None, :, :] - self.means_[:, None, :], self._factors)  # (K, n, D)
            mahal = (w * w).sum(dim=2).T  # (n, K)
            out.append(torch.logsumexp(self._const[None, :] - 0.5 * mahal, dim=1))
        return torch.cat(out).numpy()
