"""MDS-ODIN: Mahalanobis distance of an input perturbed towards its closest class mean."""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from ..errors import ConfigError, ShapeError
from .base import SCORES, FeatureSet, check_number, frozen, loader_batches, model_device
from .mds_multi import TiedGaussian
from .odin import ODIN


@SCORES.register("mds_odin")
class MahalanobisODIN(ODIN):
    r"""Mahalanobis score (as ``mds``) of an input moved by one signed-gradient step that
    decreases its distance to the closest class mean,

    .. math::
        d_c(x) = (f(x) - \mu_c)^\top \Sigma^{+} (f(x) - \mu_c), \qquad \hat c = \arg\min_c d_c(x),

        \tilde x = x - \varepsilon\,\mathrm{sign}\big(\nabla_x\, d_{\hat c}(x)\big) / \sigma,
        \qquad s(x) = -\min_c d_c(\tilde x),

    with :math:`f` the penultimate feature (``model.features``) and ``sign`` taking 0 to +1 (the
    authors' code, OpenOOD, and our ``odin``). Paper: Lee, Lee, Lee & Shin, "A Simple Unified
    Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018.
    Defaults ``noise=0.0014`` (OpenOOD v1.5 ``mds.yml`` / ``mds_ensemble.yml``); grid: the
    paper's magnitude list [0, 0.0005, 0.001, 0.0014, 0.002, 0.0024, 0.005, 0.01, 0.05, 0.1, 0.2]
    (OpenOOD's sweep is the single value 0.0014). ``std``: the inputs' normalisation std, as in
    :class:`~oaml.scores.odin.ODIN` (this class reuses its ``std`` handling; the evaluator fills
    it from the preprocessing), so ``noise`` is in pixel units. ``shrinkage``: as ``mds``.

    Fit on ID **train** (``fit_on="train"``): the Gaussian of :class:`~oaml.scores.mds_multi.
    TiedGaussian` (the estimator of ``mds``) on the penultimate features, taken from the
    FeatureSet passed to ``fit`` (features and labels; the evaluator passes the cached ID-train
    set, whose features are ``model.features``) or else computed from ``model`` and ``loader``
    (``(x, y)`` batches, y the class). Scoring needs ``model`` and ``loader``; the model runs in
    eval mode with parameter gradients off (both restored after).

    Differences: pytorch-ood 0.4.0 ``MahalanobisODIN``: eps=0.002 by default, ``torch.sign``
    (0 stays 0), the loss ``mean(0.5 d)`` (same gradient signs), its ``Mahalanobis`` covariance
    (summed, not divided by N, + 1e-6·I, float32 inverse) and 0.5·min distance as outlier score:
    rank-equal to ours up to the ridge and float32. OpenOOD v1.5 (``mds``/``mds_ensemble``)
    divides the step by 0.5 for every channel instead of the real std.
    """

    name = "mds_odin"
    fit_on = "train"
    requires_model = True
    needs_fit_labels = True
    uses = ("features",)
    grid: ClassVar[dict] = {"noise": [0.0, 0.0005, 0.001, 0.0014, 0.002, 0.0024, 0.005, 0.01, 0.05, 0.1, 0.2]}

    def __init__(self, noise: float = 0.0014, std: float | Sequence[float] | None = None, shrinkage: float = 0.0):
        super().__init__(noise=noise, std=std)  # ODIN validates noise and std
        del self.temperature  # ODIN's; not used here
        self.shrinkage = check_number("shrinkage", shrinkage, low=0.0, high=1.0, score=self.name)

    def fit(self, data: FeatureSet | None = None, *, model: Any = None, loader: Any = None, head: Any = None) -> "MahalanobisODIN":
        """Fit the Gaussian on ``data`` (an ID-train FeatureSet with labels) when given, else on
        ``model.features`` over ``loader``."""
        if data is not None:
            self._check_data(data, "fit", need_labels=True)
            data = data.cpu()
            self._fit_gaussian(data.features, data.labels, data.num_classes)
        else:
            self._check_model_args(model, loader, "fit")
            self._fit_model(model, loader)
        self._fitted = True
        return self

    def _fit_gaussian(self, X: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
        self._gauss = TiedGaussian(X, y, num_classes, self.shrinkage, what=f"{self.name} features")
        self._dim = int(X.shape[1])

    def _fit_model(self, model: Any, loader: Any) -> None:
        feats, labels = [], []
        with frozen(model), torch.no_grad():
            for x, y in loader_batches(loader, model_device(model), self.name):
                if y is None:
                    raise ConfigError(f"{self.name}.fit() needs a loader yielding (x, y) with the class labels")
                feats.append(model.features(x).detach().to("cpu", torch.float64))
                labels.append(y.long().cpu())
        y = torch.cat(labels)
        C = int(getattr(model, "num_classes", 0)) or int(y.max()) + 1
        if int(y.min()) < 0 or int(y.max()) >= C:
            raise ShapeError(f"{self.name}.fit(): labels must be ID class indices in [0, {C - 1}], got "
                             f"range [{int(y.min())}, {int(y.max())}] (drop OOD samples, marked -1)")
        self._fit_gaussian(torch.cat(feats), y, C)

    def _features(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        f = model.features(x)
        if f.ndim != 2 or f.shape[1] != self._dim:
            raise ShapeError(f"{self.name}: fitted on D={self._dim} features, the model gives shape {tuple(f.shape)}")
        return f

    def _score_model(self, model: Any, loader: Any) -> np.ndarray:
        out = []
        g = self._gauss
        with frozen(model):
            for x, _ in loader_batches(loader, model_device(model), self.name):
                x = x.detach().clone().requires_grad_(True)
                with torch.enable_grad():
                    d = g.distances(self._features(model, x))
                    closest = d.detach().argmin(dim=1, keepdim=True)
                    # per-sample gradients are independent (eval mode): the sum gives each its own
                    (grad,) = torch.autograd.grad(d.gather(1, closest).sum(), x)
                step = torch.where(grad >= 0, 1.0, -1.0).to(x.dtype) / self._std_tensor(x)
                with torch.no_grad():
                    x_t = x.detach() - self.noise * step
                    out.append(-g.distances(self._features(model, x_t)).min(dim=1).values.cpu())
        return torch.cat(out).numpy()
