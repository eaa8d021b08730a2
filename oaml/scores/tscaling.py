"""TScaling: MSP at the temperature that minimises the ID-val negative log-likelihood."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.optimize import brentq

from ..errors import ConfigError
from .base import SCORES, FeatureSet, Score, check_number, softmax64


@SCORES.register("tscaling", "temperature_scaling")
class TemperatureScaling(Score):
    r"""Maximum softmax probability at a fitted temperature, :math:`s(x) = \max_c \mathrm{softmax}(z/T)_c`,

    .. math:: T = \arg\min_{T \in [t_{min}, t_{max}]} -\frac1N \sum_i \log \mathrm{softmax}(z_i/T)_{y_i}.

    Paper: Guo et al., "On Calibration of Modern Neural Networks", ICML 2017. Fit on ID **val**
    (``fit_on="val"``, needs labels), logits only. The NLL is convex in :math:`\beta = 1/T`, its
    derivative :math:`\frac1N\sum_i (\mathbb{E}_{p_i}[z] - z_{i,y_i})` is increasing in
    :math:`\beta`, so the optimum is found exactly (float64, Brent root of the derivative, to
    float64 precision). Where the optimum lies outside ``[t_min, t_max]`` (default [0.01, 100]) T
    is clamped to the bound with a warning: a val split the model classifies perfectly has its
    optimum at :math:`T \to 0` (every MSP would be 1), one no better than chance at
    :math:`T \to \infty`. Attributes: ``temperature_``, ``nll_`` (at T) and ``nll_t1_`` (at T=1).

    pytorch-ood 0.4.0's ``TemperatureScaling`` (= OpenOOD's ``temp_scaling``) runs 50 L-BFGS
    iterations with lr 0.01 on T from 1 in float32 ("the optimum is only approximately
    reached"), without bounds, and returns the negated MSP. At the same T the scores are equal;
    the T here is the exact optimum, so it can differ from theirs in the third or later digit.
    """

    name = "tscaling"
    fit_on = "val"
    needs_fit_labels = True
    uses = ("logits",)

    def __init__(self, t_min: float = 0.01, t_max: float = 100.0):
        super().__init__()
        self.t_min = check_number("t_min", t_min, low=0.0, low_open=True, score=self.name)
        self.t_max = check_number("t_max", t_max, low=0.0, low_open=True, score=self.name)
        if self.t_max < self.t_min:
            raise ConfigError(f"tscaling: t_max={t_max!r} must be >= t_min={t_min!r}")

    def _fit(self, data: FeatureSet, W, b) -> None:
        z = data.logits.detach().to(torch.float64)
        zy = z.gather(1, data.labels.long()[:, None])[:, 0]

        def grad(beta: float) -> float:  # d NLL / d beta
            p = torch.softmax(beta * z, dim=1)
            return float(((p * z).sum(dim=1) - zy).mean())

        b_lo, b_hi = 1.0 / self.t_max, 1.0 / self.t_min
        g_lo, g_hi = grad(b_lo), grad(b_hi)
        if g_lo >= 0.0:
            beta, bound = b_lo, "t_max"
        elif g_hi <= 0.0:
            beta, bound = b_hi, "t_min"
        else:
            beta = brentq(grad, b_lo, b_hi, xtol=1e-300, rtol=4 * np.finfo(np.float64).eps, maxiter=500)
            bound = None
        self.temperature_ = 1.0 / beta
        self.nll_ = _nll(z, zy, beta)
        self.nll_t1_ = _nll(z, zy, 1.0)
        if bound is not None:
            warnings.warn(
                f"tscaling: the NLL-optimal temperature lies beyond {bound}={getattr(self, bound)}; "
                f"using T={self.temperature_:g}"
                + (" (the val split looks perfectly classified: its NLL keeps falling as T -> 0)" if bound == "t_min" else ""),
                RuntimeWarning,
                stacklevel=3,
            )

    def _score(self, data: FeatureSet) -> np.ndarray:
        return softmax64(data.logits, self.temperature_).max(dim=1).values.numpy()


def _nll(z: torch.Tensor, zy: torch.Tensor, beta: float) -> float:
    return float((torch.logsumexp(beta * z, dim=1) - beta * zy).mean())


