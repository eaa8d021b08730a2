"""WEBO: weighted energy (VOS)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ConfigError, ShapeError
from .base import SCORES, FeatureSet, Score, energy64


@SCORES.register("webo", "weighted_energy")
class WeightedEBO(Score):
    r"""Weighted energy, :math:`s(x) = \log \sum_c \max(w_c, 0)\, e^{z_c}`.

    Paper: Du et al., "VOS: Learning What You Don't Know by Virtual Outlier Synthesis", ICLR
    2022, where the class weights :math:`w` are the weights of a ``Linear(C, 1)`` trained with
    VOS's uncertainty loss (pytorch-ood: ``VOSRegLoss``). ``weights``: C numbers (a list, an
    array or a tensor of shape (C,) or (1, C)); negative entries are clipped to 0 (the ReLU of
    VOS and pytorch-ood), at least one must be positive. Default ``None`` = all ones, which is
    EBO at T=1 (oaml trains no VOS head, so a user who has one passes its weights). The number
    of weights must equal C, checked at ``score`` (ShapeError). No fit (``fit_on="none"``).

    Computed as ``logsumexp(z_c + log w_c)`` over the classes with :math:`w_c > 0`, in float64
    (:func:`~oaml.scores.base.energy64` with the offsets :math:`\log w_c`, -inf for the others):
    no overflow for logits ~1e4 (pytorch-ood 0.4.0's ``WeightedEBO`` exponentiates the raw
    logits, which overflows to inf in float32 above ~88, and returns the negation, higher = OOD).
    """

    name = "webo"
    fit_on = "none"
    uses = ("logits",)
    checks_inline = ("logits",)

    def __init__(self, weights: Sequence[float] | np.ndarray | torch.Tensor | None = None):
        super().__init__()
        if weights is None:
            self.weights = None
            self._logw = None
            return
        w = _as_weights(weights)
        pos = w > 0
        if not bool(pos.any()):
            raise ConfigError(
                "webo: weights must have at least one positive entry (negative ones are clipped "
                f"to 0, so every class would be dropped); got {w.tolist()}"
            )
        self.weights = tuple(float(v) for v in w)
        self._logw = torch.where(pos, torch.log(w.clamp_min(0.0)), torch.full_like(w, -float("inf")))

    def _score(self, data: FeatureSet) -> np.ndarray:
        if self._logw is not None and self._logw.numel() != data.num_classes:
            raise ShapeError(f"webo: {self._logw.numel()} class weights but the logits have C={data.num_classes} classes")
        return energy64(data.logits, offset=self._logw, check=f"{self.name}.score(): logits").numpy()


def _as_weights(weights: Any) -> torch.Tensor:
    try:
        w = torch.as_tensor(
            weights.detach().cpu() if isinstance(weights, torch.Tensor) else np.asarray(weights, dtype=np.float64),
            dtype=torch.float64,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"webo: weights must be C numbers, got {weights!r}") from exc
    if w.ndim == 2 and w.shape[0] == 1:
        w = w[0]
    if w.ndim != 1 or w.numel() == 0:
        raise ConfigError(f"webo: weights must have shape (C,) or (1, C), got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ConfigError("webo: weights must be finite numbers")
    return w
