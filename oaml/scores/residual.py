"""Residual: norm of the feature outside the principal subspace of the ID features (ViM's residual)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from .base import SCORES, FeatureSet
from .vim import ViM


@SCORES.register("residual")
class Residual(ViM):
    r"""Negative norm of the feature's residual outside the principal subspace,

    .. math:: s(x) = -\| (f - u)\, R \|_2, \qquad u = -W^{+} b,

    with :math:`R` the eigenvectors of the uncentred covariance
    :math:`\frac1N\sum (f-u)(f-u)^\top` of ID **train** features outside the top-``dim`` ones
    (``torch.linalg.eigh``, float64). This is ViM without the energy term, and it is fitted by ViM's
    code: float32 GEMMs for large fits when the measured error allows, float64 otherwise (see
    :class:`~oaml.scores.vim.ViM`, **Precision**; ``precision_`` after fit).

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

    def _fit(self, data: FeatureSet, W, b) -> None:
        self._fit_residual(data, W, b)

    def _score(self, data: FeatureSet) -> np.ndarray:
        return (-self._vlogit(data.features.detach())).numpy()
