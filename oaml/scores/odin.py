"""ODIN: temperature scaling plus input perturbation."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import SCORES, Score, check_finite, check_number, model_device


@SCORES.register("odin")
class ODIN(Score):
    r"""Tempered max softmax of a gradient-sign-perturbed input,

    .. math::
        \tilde x = x - \varepsilon\,\mathrm{sign}\big(\nabla_x\, \mathrm{CE}(z(x)/T, \hat y)\big) / \sigma,
        \qquad s(x) = \max_c \mathrm{softmax}(z(\tilde x)/T)_c,

    with :math:`\hat y = \arg\max_c z_c(x)` (untempered) and ``sign`` taking 0 to +1 (as OpenOOD).
    Paper: Liang, Li & Srikant, "Enhancing The Reliability of Out-of-distribution Image Detection
    in Neural Networks", ICLR 2018. Defaults ``temperature=1000``, ``noise=0.0014``. No fit.

    Needs ``model`` (a Classifier: ``model(x)`` gives logits) and ``loader`` (preprocessed
    ``(x, y)`` batches; y is ignored). ``std``: the per-channel normalisation std of the inputs
    (a float or one value per channel); the step is divided by it so that ``noise`` is in [0, 1]
    pixel units as in the paper and OpenOOD (which falls back to 0.5 when the std is unknown).
    ``std=None`` applies the step directly in model-input space. The model is run in eval mode,
    with parameter gradients disabled during the pass (both restored afterwards).

    Differences: pytorch-ood 0.2.0 defaulted to eps=0.05, used ``nll_loss`` on raw logits/T
    (the gradient of -z_ŷ/T, not cross-entropy) and returned -max softmax without T. pytorch-ood
    0.4.0 (installed) uses cross-entropy, eps=0.0014, T=1000 and -max softmax at T, like us.
    """

    name = "odin"
    fit_on = "none"
    requires_model = True

    def __init__(self, temperature: float = 1000.0, noise: float = 0.0014, std: float | Sequence[float] | None = None):
        super().__init__()
        self.temperature = check_number("temperature", temperature, low=0.0, low_open=True, score=self.name)
        self.noise = check_number("noise", noise, low=0.0, score=self.name)
        if std is not None:
            vals = [std] if isinstance(std, (int, float)) else list(std)
            for v in vals:
                check_number("std", v, low=0.0, low_open=True, score=self.name)
            std = float(std) if isinstance(std, (int, float)) else tuple(float(v) for v in vals)
        self.std = std

    def fit(self, data=None, *, model=None, loader=None, head=None) -> "ODIN":
        self._fitted = True
        return self

    def _std_tensor(self, x: torch.Tensor) -> torch.Tensor | float:
        if self.std is None:
            return 1.0
        if isinstance(self.std, float):
            return self.std
        s = torch.tensor(self.std, dtype=x.dtype, device=x.device)
        if x.ndim < 2 or x.shape[1] != s.numel():
            raise ConfigError(
                f"odin: std has {s.numel()} values but the inputs have {x.shape[1] if x.ndim > 1 else 1} channels"
            )
        return s.view(1, -1, *([1] * (x.ndim - 2)))

    def _score_model(self, model: Any, loader: Any) -> np.ndarray:
        dev = model_device(model)
        was_training = model.training
        flags = [p.requires_grad for p in model.parameters()]
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        T = self.temperature
        out = []
        try:
            for batch in loader:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                x = x.to(dev)
                check_finite(x, "odin: input batch")
                x = x.detach().clone().requires_grad_(True)
                with torch.enable_grad():
                    logits = model(x)
                    pseudo = logits.detach().argmax(dim=1)
                    loss = F.cross_entropy(logits / T, pseudo, reduction="sum")
                    (grad,) = torch.autograd.grad(loss, x)
                step = torch.where(grad >= 0, 1.0, -1.0).to(x.dtype) / self._std_tensor(x)
                with torch.no_grad():
                    x_t = x.detach() - self.noise * step
                    z = model(x_t).to(torch.float64)
                    out.append(torch.softmax(z / T, dim=1).max(dim=1).values.cpu())
        finally:
            for p, f in zip(model.parameters(), flags):
                p.requires_grad_(f)
            model.train(was_training)
        if not out:
            raise ConfigError("odin: the loader yielded no batches")
        return torch.cat(out).numpy()
