"""Residual: norm of the feature outside the principal subspace of the ID features (ViM's residual)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from ..errors import ConfigError
from .base import SCORES, FeatureSet, Score, check_number


@SCORES.register("residual")
class Residual(Score):
    r"""Negative norm of the feature's residual outside the principal subspace,

    .. math:: s(x) = -\| (f - u)\, R \|_2, \qquad u = -W^{+} b,

    with :math:`R` the eigenvectors of the uncentred covariance
    :math:`\frac1N\sum (f-u)(f-u)^\top` of ID **train** features outside the top-``dim`` ones
    (``torch.linalg.eigh``, float64). This is ViM without the energy term.

    Paper: Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR
    2022 (the "Residual" baseline). Default ``dim=None``: 256 for features of 512 or more
    dimensions, ``D // 2`` below (as :class:`~oaml.scores.vim.ViM`); an explicit ``dim`` must
    satisfy ``1 <= dim < D`` (checked at fit, ConfigError). No grid (OpenOOD has no sweep).

    Fit on ID **train** (``fit_on="train"``, as the paper and our ViM), needs ``head=(W, b)``
    (``b=None`` gives ``u=0``); the logits are not used. Differences from OpenOOD v1.5's
    ``residual_postprocessor.py``: it fits on the ID **val** split (``id_loader_dict['val']``,
    although it names it train), defaults to ``dim=512`` for every network (an empty residual
    space, hence constant scores, for 512-d ResNet-18 features), and uses ``np.linalg.eig`` and
    sklearn's ``EmpiricalCovariance(assume_centered=True)`` (the same matrix). pytorch-ood 0.4.0
    has no Residual detector.
    """

    name = "residual"
    fit_on = "train"
    uses = ("features",)
    needs_head = True
    grid: ClassVar[dict] = {}

    def __init__(self, dim: int | None = None):
        super().__init__()
        self.dim = None if dim is None else check_number("dim", dim, low=1, integer=True, score=self.name)

    def _fit(self, data: FeatureSet, W, b) -> None:
        D = data.feature_dim
        dim = self.dim if self.dim is not None else (256 if D >= 512 else max(1, D // 2))
        if dim >= D:
            raise ConfigError(
                f"residual: dim={dim} must be < the feature dimension D={D} (allowed: 1..{D - 1}); "
                "the residual space would be empty"
            )
        self.dim_ = dim
        u = -(torch.linalg.pinv(W) @ b) if b is not None else torch.zeros(D, dtype=torch.float64)
        X = data.features.detach().to("cpu", torch.float64) - u
        cov = X.T @ X / X.shape[0]
        _, evecs = torch.linalg.eigh(cov)  # ascending eigenvalues
        self.u_ = u
        self.residual_basis_ = evecs[:, : D - dim].contiguous()  # the smallest D - dim

    def _score(self, data: FeatureSet) -> np.ndarray:
        X = data.features.detach().to("cpu", torch.float64) - self.u_
        return (-(X @ self.residual_basis_).norm(dim=1)).numpy()
