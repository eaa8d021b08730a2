"""ViM: virtual-logit matching."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from .base import SCORES, FeatureSet, Score, check_number


@SCORES.register("vim")
class ViM(Score):
    r"""Energy minus the scaled norm of the feature residual outside the principal subspace,

    .. math:: s(x) = \log\sum_c e^{z_c} - \alpha\, \| (f - u)\, R \|_2,

    with :math:`u = -W^{+} b` (the origin that makes the head bias-free), :math:`R` the
    eigenvectors of the uncentred covariance :math:`\frac1N\sum (f-u)(f-u)^\top` of ID train
    features *outside* the top-``dim`` ones (``torch.linalg.eigh``, float64), and
    :math:`\alpha = \mathrm{mean}_{train}\max_c z_c / \mathrm{mean}_{train}\|(f-u)R\|`.

    Paper: Wang et al., "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022.
    Default ``dim=None``: 256 for features of 512 or more dimensions (OpenOOD's setting for
    ResNet-18), ``D // 2`` below that (pytorch-ood also halves). An explicit ``dim`` must satisfy
    ``1 <= dim < D``, checked at fit (ConfigError), which avoids OpenOOD's empty null space
    (alpha = inf, NaN scores) for dim >= D.

    Fit on ID **train** (``fit_on="train"``) with ``head=(W, b)`` (``model.fc_weights()``;
    ``b=None`` gives ``u=0``). The logits are read from the FeatureSet (for train: alpha; for
    test: the energy), so they must be the head's output. Differences: OpenOOD uses ``np.linalg.eig``
    on a symmetric matrix (here ``eigh``: real, sorted, stable). pytorch-ood requires ``d``
    with no default and silently halves it when D < d (0.2.0 and 0.4.0); 0.2.0 clipped logits to
    +-100; 0.4.0 (installed) recomputes the logits from (W, b) in float32; both return the
    negation.
    """

    name = "vim"
    fit_on = "train"
    needs_head = True

    def __init__(self, dim: int | None = None):
        super().__init__()
        self.dim = None if dim is None else check_number("dim", dim, low=1, integer=True, score=self.name)

    def _fit(self, data: FeatureSet, W, b) -> None:
        D = data.feature_dim
        dim = self.dim if self.dim is not None else (256 if D >= 512 else max(1, D // 2))
        self.dim_ = dim
        if dim >= D:
            raise ConfigError(
                f"vim: dim={dim} must be < the feature dimension D={D} (allowed: 1..{D - 1}); "
                "the residual space would be empty"
            )
        u = -(torch.linalg.pinv(W) @ b) if b is not None else torch.zeros(D, dtype=torch.float64)
        X = data.features.detach().to("cpu", torch.float64) - u
        cov = X.T @ X / X.shape[0]
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        self.u_ = u
        self.residual_basis_ = evecs[:, : D - dim].contiguous()  # the smallest D - dim
        vlogit = (X @ self.residual_basis_).norm(dim=1)
        max_logit = data.logits.detach().to("cpu", torch.float64).max(dim=1).values
        denom = float(vlogit.mean())
        if not denom > 0:
            raise ConfigError(
                f"vim: the train features have no component outside the top-{dim} principal "
                "subspace (residual norm 0); use a smaller dim"
            )
        self.alpha_ = float(max_logit.mean()) / denom

    def _score(self, data: FeatureSet) -> np.ndarray:
        X = data.features.detach().to("cpu", torch.float64) - self.u_
        vlogit = (X @ self.residual_basis_).norm(dim=1)
        energy = torch.logsumexp(data.logits.detach().to("cpu", torch.float64), dim=1)
        return (energy - self.alpha_ * vlogit).numpy()
