"""VRA: variational rectified activation of an inner layer (suppress low and high values), then energy."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import ConfigError, ShapeError
from .base import (SCORES, Score, check_choice, check_finite, check_number, check_ran_once, frozen, loader_batches,
                   model_device, resnet_modules, tap_layers)

__all__ = ["VRA"]


@SCORES.register("vra")
class VRA(Score):
    r"""Energy of the logits after rectifying the activations :math:`a` of one inner layer,

    .. math::
        g(a) = \begin{cases} 0 & a < \alpha \\ a & \alpha \le a \le \beta \\ \beta & a > \beta
        \end{cases}, \qquad s(x) = T \log \sum_c \exp\big(z_c(g(a))/T\big),

    with :math:`\alpha, \beta` the ``lower_percentile``-th / ``upper_percentile``-th percentiles
    (numpy's linear interpolation) of the layer's ID activations, and :math:`z(g(a))` the logits
    of the rest of the network run on the rectified output. Paper: Xu, Lian, Liu & Tao, "VRA:
    Variational Rectified Activation for Out-of-distribution Detection", NeurIPS 2023 (the basic
    VRA operator; VRA+'s offset :math:`\gamma` is not implemented).

    Fit on ID **train** (``fit_on="train"``, as the authors and pytorch-ood; labels unused): all
    fit activations of the layer are held to take the percentiles, N x (C·H·W) floats (cap N with
    the evaluator's ``fit_limit``). ``layer=None`` = the output of ``layer4`` of a ResNet-layout
    model (the last feature map, before pooling, as pytorch-ood's examples); e.g. ``"avgpool"``
    gives per-dimension thresholds on the pooled penultimate feature (the authors' code). Other
    models need a module name (NotImplementedError otherwise: the evaluator skips the score).
    ``thresholds="element"`` (default, pytorch-ood): one (α, β) per element of the layer's output
    (C×H×W); ``"global"`` (OpenOOD): one scalar pair over all values. ``below="zero"`` (default,
    the paper and the authors' code) sets activations under α to 0; ``"clip"`` raises them to α
    (pytorch-ood 0.4.0 and OpenOOD v1.5 clip). Defaults ``lower_percentile=1``,
    ``upper_percentile=99`` (pytorch-ood's 0.01 / 0.99, here in percent like ``react``; OpenOOD:
    10 / 90), ``temperature=1``; grid: OpenOOD's sweep, upper [85, 90, 95, 99] x lower [1, 5, 10, 15].

    Every ``fit`` recomputes the thresholds from its own data and the current percentiles, and
    ``score`` refuses thresholds fitted under other hyperparameters (ConfigError): pytorch-ood's
    bug #157 (thresholds not following changed percentiles, kept across refits) cannot occur.
    pytorch-ood takes the quantiles in float32 and returns the negated energy; otherwise with
    ``below="clip"`` it is the same score. Needs ``model`` and ``loader``; eval mode, no gradients.
    """

    name = "vra"
    fit_on = "train"
    requires_model = True
    grid: ClassVar[dict] = {"upper_percentile": [85, 90, 95, 99], "lower_percentile": [1, 5, 10, 15]}

    def __init__(self, layer: str | None = None, lower_percentile: float = 1.0, upper_percentile: float = 99.0,
                 thresholds: str = "element", below: str = "zero", temperature: float = 1.0):
        super().__init__()
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise ConfigError(f"{self.name}: layer must be None or a module name of model.named_modules(), got {layer!r}")
        self.layer = layer
        self.lower_percentile = check_number("lower_percentile", lower_percentile, low=0.0, high=100.0, score=self.name)
        self.upper_percentile = check_number("upper_percentile", upper_percentile, low=0.0, high=100.0, score=self.name)
        if self.lower_percentile > self.upper_percentile:
            raise ConfigError(
                f"{self.name}: lower_percentile={self.lower_percentile} exceeds upper_percentile={self.upper_percentile}"
            )
        self.thresholds = check_choice("thresholds", thresholds, ("element", "global"), self.name)
        self.below = check_choice("below", below, ("zero", "clip"), self.name)
        self.temperature = check_number("temperature", temperature, low=0.0, low_open=True, score=self.name)

    def model_layer(self, model: Any) -> str:
        return self.layer if self.layer is not None else resnet_modules(model, self.name)["layer4"]

    def rectify(self, a: torch.Tensor) -> torch.Tensor:
        """The VRA operator with the fitted thresholds (on ``a``'s device and dtype)."""
        lo = self._lo.to(a.device, a.dtype)
        hi = self._hi.to(a.device, a.dtype)
        if tuple(a.shape[1:]) != tuple(self._shape):
            raise ShapeError(f"{self.name}: the layer output has shape {tuple(a.shape[1:])} per sample, but "
                             f"{tuple(self._shape)} at fit (another input size?)")
        r = torch.minimum(a, hi)
        return torch.where(a < lo, torch.zeros_like(a) if self.below == "zero" else lo.expand_as(a), r)

    def _fit_model(self, model: Any, loader: Any) -> None:
        name = self.model_layer(model)
        acts: list = []
        with frozen(model), torch.no_grad():
            with tap_layers(model, [name], lambda n, a: acts.append(a.detach().float().cpu()), self.name) as counts:
                for x, _ in loader_batches(loader, model_device(model), self.name):
                    model(x)
                    check_ran_once(counts, self.name)
        A = torch.cat(acts)
        check_finite(A, f"{self.name}: activations of {name!r}")
        q = np.array([self.lower_percentile, self.upper_percentile]) / 100.0
        Z = A.flatten(1).numpy()
        if self.thresholds == "element":
            lo, hi = np.quantile(Z, q, axis=0)  # (K,) each; numpy's linear interpolation
        else:
            lo, hi = np.quantile(Z.ravel(), q)
            lo, hi = np.full(Z.shape[1], lo), np.full(Z.shape[1], hi)
        # fresh state on every fit (never merged with a previous one), tied to these settings
        self._shape = tuple(A.shape[1:])
        self._lo = torch.as_tensor(lo, dtype=torch.float64).reshape(self._shape)
        self._hi = torch.as_tensor(hi, dtype=torch.float64).reshape(self._shape)
        self._fitted_with = self.hyperparameters()
        self.layer_ = name
        # reported in the evaluator's settings: the thresholds (their mean for thresholds="element")
        self.lower_threshold_, self.upper_threshold_ = float(lo.mean()), float(hi.mean())

    def _score_model(self, model: Any, loader: Any) -> np.ndarray:
        if self.hyperparameters() != self._fitted_with:
            raise ConfigError(
                f"{self.name}: the hyperparameters changed since fit ({self._fitted_with} -> {self.hyperparameters()}); "
                "call fit() again so the thresholds follow them"
            )
        T = self.temperature
        out = []
        with frozen(model), torch.no_grad():
            with tap_layers(model, [self.layer_], lambda n, a: self.rectify(a), self.name) as counts:
                for x, _ in loader_batches(loader, model_device(model), self.name):
                    z = model(x).to(torch.float64)
                    check_ran_once(counts, self.name)
                    out.append((T * torch.logsumexp(z / T, dim=1)).cpu())
        return torch.cat(out).numpy()
