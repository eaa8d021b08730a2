"""GradUncertainty: squared norm of the per-sample parameter gradient of a 'confounding label' loss."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import ShapeError
from .base import SCORES, Score, check_choice, check_finite, frozen, loader_batches, model_device

__all__ = ["GradUncertainty"]

_CHUNK_FLOATS = 1 << 25  # per-sample gradients held at once ("all"): about 128 MiB of float32


@SCORES.register("grad_uncertainty")
class GradUncertainty(Score):
    r"""Sum over parameters of the squared L2 norm of the per-sample gradient of the loss against
    the all-ones "confounding label",

    .. math::
        L(x) = \mathrm{BCE}(\mathrm{softmax}(z), \mathbf 1) = -\sum_c \log p_c, \qquad
        s(x) = \sum_{\theta} \big\|\partial L(x) / \partial \theta\big\|_2^2 .

    :math:`\partial L/\partial z = C p - 1` vanishes for a uniform softmax and grows with
    confidence, so a larger norm means more in-distribution. Paper: Lee & AlRegib, "Gradients as
    a Measure of Uncertainty in Neural Networks", ICIP 2020 (its experiments train a small
    classifier on the per-layer norms with OOD data; like pytorch-ood we use the plain sum, which
    needs no OOD data). No fit, no grid.

    ``params="all"`` (default, pytorch-ood's default ``param_filter``): every parameter of the
    model, per-sample gradients by ``torch.func`` (``vmap`` of ``grad``) in chunks (about 128 MiB
    of gradients at once; the cost of a backward pass per sample). ``params="head"``:
    only the last linear layer (``model.fc_weights()``, what pytorch-ood's example selects),
    computed in closed form from one forward pass: with :math:`g = Cp - 1` and the penultimate
    feature :math:`f`, :math:`s = \|g\|^2 (\|f\|^2 + 1)` (the 1 for the bias, if any). Needs
    ``model`` and ``loader``; eval mode (pytorch-ood leaves the mode to the caller).

    Differences from pytorch-ood 0.4.0 ``GradUncertainty`` (returns the negated sum): it
    evaluates ``binary_cross_entropy(softmax(z), 1)``, whose log is clamped at -100 and whose
    backward clamps :math:`p(1-p)` at 1e-12, so its gradient is wrong where some :math:`p_c`
    underflows or rounds to 1 in float32; here :math:`L = -\sum_c \mathrm{log\_softmax}(z)_c`,
    the same function without clamps (equal gradients otherwise). OpenOOD v1.5 has no such score.
    """

    name = "grad_uncertainty"
    fit_on = "none"
    requires_model = True
    grid: ClassVar[dict] = {}

    def __init__(self, params: str = "all"):
        super().__init__()
        self.params = check_choice("params", params, ("all", "head"), self.name)

    def _head(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        W, b = model.fc_weights()
        logits, f = model.forward_features(x)
        if f.ndim != 2 or W.shape != (logits.shape[1], f.shape[1]):
            raise ShapeError(f"{self.name}: head W {tuple(W.shape)} does not map features {tuple(f.shape)} to logits "
                             f"{tuple(logits.shape)}")
        z = logits.to(torch.float64)
        check_finite(z, f"{self.name}: logits")
        g = z.shape[1] * torch.softmax(z, dim=1) - 1.0
        f2 = (f.to(torch.float64) ** 2).sum(dim=1) + (0.0 if b is None else 1.0)
        return (g * g).sum(dim=1) * f2

    def _all(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, grad, vmap

        params = {n: p.detach() for n, p in model.named_parameters()}
        if not params:
            raise ShapeError(f"{self.name}: the model has no parameters")
        buffers = {n: b.detach() for n, b in model.named_buffers()}

        def loss(prm, xi):
            z = functional_call(model, (prm, buffers), (xi.unsqueeze(0),))
            return -torch.log_softmax(z, dim=1).sum()

        per_sample = vmap(grad(loss), in_dims=(None, 0))
        size = sum(p.numel() for p in params.values())
        step = max(1, _CHUNK_FLOATS // size)
        out = []
        for i in range(0, x.shape[0], step):
            gs = per_sample(params, x[i : i + step])
            # per-sample norms of the float32 gradients (a vectorised float32 reduction, relative error ~1e-7; a
            # float64 copy of the gradients cost 60x more), squared and summed over parameters in float64
            out.append(sum(torch.linalg.vector_norm(t.flatten(1), dim=1).double() ** 2 for t in gs.values()))
        return torch.cat(out)

    def _score_model(self, model: Any, loader: Any) -> np.ndarray:
        fn = self._head if self.params == "head" else self._all
        out = []
        with frozen(model):
            # torch.func reparametrises the module it is given; on a model that registers one module
            # under two names (tied) it leaves functorch-wrapped parameters behind, and a later
            # model.to() fails. A copy (ties kept) is reparametrised instead; the model is untouched.
            net = model if self.params == "head" else copy.deepcopy(model)
            for x, _ in loader_batches(loader, model_device(model), self.name):
                with torch.no_grad() if self.params == "head" else torch.enable_grad():
                    out.append(fn(net, x).detach().cpu())
        return torch.cat(out).numpy()
