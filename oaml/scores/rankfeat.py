"""RankFeat: remove the rank-1 component of late feature maps, then energy of the logits."""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from ..errors import ShapeError
from .base import (SCORES, Score, check_choice, check_finite, check_number, check_ran_once, frozen, loader_batches,
                   model_device, resnet_modules, tap_layers)
from .mds_multi import check_layer_names

__all__ = ["RankFeat", "remove_rank1"]


def _l2n(v: torch.Tensor) -> torch.Tensor:
    return v / (torch.linalg.vector_norm(v, dim=2, keepdim=True) + 1e-10)


def remove_rank1(fmap: torch.Tensor, method: str = "svd", iterations: int = 20, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Each sample's (C, HW) matrix minus its leading singular component :math:`\sigma_1 u_1
    v_1^\top` (float64, from the leading eigenvector of the smaller Gram matrix; returned in
    ``fmap``'s dtype and shape). ``method="power"``: OpenOOD's
    power iteration (``iterations`` steps, one random start shared by the batch, drawn from
    ``generator``) instead of the SVD."""
    if not isinstance(fmap, torch.Tensor) or fmap.ndim < 3:
        raise ShapeError(f"rankfeat: the feature map must be (B, C, H, W) (or (B, C, L)), got "
                         f"{tuple(fmap.shape) if isinstance(fmap, torch.Tensor) else type(fmap).__name__}")
    M = fmap.flatten(2).to(torch.float64)
    if method == "svd":
        # sigma_1 u_1 v_1^T = M v_1 v_1^T = u_1 u_1^T M, with v_1 (u_1) the leading eigenvector of the smaller
        # Gram matrix M^T M (M M^T): one batched symmetric eigendecomposition of a min(C, HW)-square matrix,
        # about 2.5x faster than the SVD on 64 x 49 maps, float64 throughout
        Mt = M.transpose(1, 2)
        if M.shape[2] <= M.shape[1]:
            v = torch.linalg.eigh(Mt @ M).eigenvectors[:, :, -1:]  # (B, HW, 1)
            rank1 = (M @ v) @ v.transpose(1, 2)
        else:
            u = torch.linalg.eigh(M @ Mt).eigenvectors[:, :, -1:]  # (B, C, 1)
            rank1 = u @ (u.transpose(1, 2) @ M)
    else:
        B, C, L = M.shape
        u = torch.randn(1, 1, C, generator=generator, dtype=torch.float64).to(M.device).repeat(B, 1, 1)
        v = torch.randn(1, L, 1, generator=generator, dtype=torch.float64).to(M.device).repeat(B, 1, 1)
        for _ in range(iterations):
            v = _l2n(u @ M).transpose(1, 2)
            u = _l2n((M @ v).transpose(1, 2))
        sigma = u @ M @ v
        rank1 = sigma * (u.transpose(1, 2) @ v.transpose(1, 2))
    return (M - rank1).to(fmap.dtype).reshape(fmap.shape)


@SCORES.register("rankfeat")
class RankFeat(Score):
    r"""Energy of the logits after removing the rank-1 component of inner feature maps,

    .. math::
        X' = X - \sigma_1 u_1 v_1^\top \ \ (X \in \mathbb{R}^{C\times HW}\text{ a sample's map}),
        \qquad s(x) = T \log \sum_c \exp\big(\bar z_c / T\big),

    where :math:`\bar z` is the mean over the ``layers`` of the logits obtained by replacing that
    layer's output by :math:`X'` and running the rest of the network (one forward pass per
    layer; for our ResNets: ``layer4`` -> avgpool -> fc, ``layer3`` -> layer4 -> avgpool -> fc).
    Paper: Song, Sebe & Wang, "RankFeat: Rank-1 Feature Removal for Out-of-distribution
    Detection", NeurIPS 2022. No fit (``fit_on="none"``), no grid (OpenOOD: no APS).

    Defaults: ``layers=None`` = the outputs of ``layer3`` and ``layer4`` of a ResNet-layout model,
    fused at the logits (the paper's Block 3 + Block 4, OpenOOD v1.5's ``rankfeat``); pass
    ``layers="layer4"`` for Block 4 alone (pytorch-ood's single backbone/head split). Other models
    need explicit module names (NotImplementedError otherwise: the evaluator skips the score with
    the reason); each named module must output a (B, C, ...) map and run once per forward.
    ``temperature=1``; ``method="svd"`` (exact, float64) or ``"power"`` (OpenOOD's accelerated
    power iteration, ``iterations=20``, seeded by ``seed``; OpenOOD's start is unseeded).

    Differences: OpenOOD and pytorch-ood 0.4.0 take the SVD in float32; pytorch-ood returns the
    negated energy (``EnergyBased.score``, T=1) of one split point. Same scores otherwise
    (up to float32 rounding). Needs ``model`` and ``loader``; eval mode, no gradients.
    """

    name = "rankfeat"
    fit_on = "none"
    requires_model = True
    grid: ClassVar[dict] = {}

    def __init__(self, layers: Sequence[str] | str | None = None, temperature: float = 1.0, method: str = "svd",
                 iterations: int = 20, seed: int = 0):
        super().__init__()
        self.layers = check_layer_names(layers, self.name)
        self.temperature = check_number("temperature", temperature, low=0.0, low_open=True, score=self.name)
        self.method = check_choice("method", method, ("svd", "power"), self.name)
        self.iterations = check_number("iterations", iterations, low=1, integer=True, score=self.name)
        self.seed = check_number("seed", seed, low=0, integer=True, score=self.name)

    def model_layers(self, model: Any) -> tuple:
        """The module names whose outputs are edited (``layers``, or layer3 and layer4)."""
        if self.layers is not None:
            return self.layers
        names = resnet_modules(model, self.name)
        return (names["layer3"], names["layer4"])

    def _score_model(self, model: Any, loader: Any) -> np.ndarray:
        names = self.model_layers(model)
        gen = torch.Generator().manual_seed(self.seed)
        T = self.temperature
        out = []

        def edit(name: str, fmap: torch.Tensor) -> torch.Tensor:
            return remove_rank1(fmap, self.method, self.iterations, gen)

        with frozen(model), torch.no_grad():
            for x, _ in loader_batches(loader, model_device(model), self.name):
                z = 0.0
                for n in names:
                    with tap_layers(model, [n], edit, self.name) as counts:
                        logits = model(x)
                        check_ran_once(counts, self.name)
                    check_finite(logits, f"{self.name}: logits after rank-1 removal at {n!r}")
                    z = z + logits.to(torch.float64)
                z = z / len(names)
                out.append((T * torch.logsumexp(z / T, dim=1)).cpu())
        return torch.cat(out).numpy()
