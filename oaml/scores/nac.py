"""NAC-UE: neuron activation coverage of inner layers, from activation-times-gradient states."""

from __future__ import annotations

import math
from contextlib import closing
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from ..errors import ConfigError, ShapeError
from .base import (SCORES, Score, check_finite, check_number, check_ran_once, frozen, loader_batches, model_device,
                   pool_activation, resnet_modules, tap_layers)
from .mds_multi import check_layer_names

__all__ = ["NAC", "geometric_bins"]


def geometric_bins(z: torch.Tensor, m: int, eps: float = 1e-6) -> torch.Tensor:
    """Bin index in {0..m-1} of each value of ``z`` in (0, 1) for ``m`` bins spaced geometrically
    towards 0 and towards 1, symmetric about 0.5 (pytorch-ood 0.4.0's ``_bin_indices_geometric``;
    edges in ``z``'s dtype)."""
    z = z.clamp(eps, 1 - eps)
    left = torch.logspace(math.log10(eps), math.log10(0.5), steps=m // 2 + 1, device=z.device, dtype=z.dtype)
    edges = torch.cat([left, (1.0 - left.flip(0))[1:]])  # m + 1 edges
    return (torch.bucketize(z, edges, right=False) - 1).clamp(0, m - 1)


@SCORES.register("nac")
class NAC(Score):
    r"""Neuron activation coverage (NAC-UE): how often ID data put each neuron in the same state.

    For each of the ``layers`` (outputs :math:`a_l`, channel-first) and each neuron (channel)
    :math:`i`, the state is :math:`\hat z_i = \mathrm{sigmoid}\big(\alpha\, \overline{a_{l}
    \odot \partial L/\partial a_{l}}_i\big)` (spatial mean of activation times gradient), with
    :math:`L = -\frac1C\sum_c \log(p_c + 10^{-12})` (KL(uniform || softmax) up to a constant),
    binned into ``m_bins`` geometric bins (dense near 0 and 1). Fit: the count :math:`o_i(b)` of
    ID-train samples in each bin of each neuron. Score:

    .. math:: s(x) = \sum_l \frac{1}{N_l}\sum_{i} \min\big(o_i(b_i(x)) / O^*,\ 1\big).

    Paper: Liu, Tian, Li, Ma & Wang, "Neuron Activation Coverage: Rethinking
    Out-of-distribution Detection and Generalization", ICLR 2024. Fit on ID **train**
    (``fit_on="train"``; labels unused; the coverage grows with the fit count, so ``o_star`` is
    relative to it). Defaults (pytorch-ood 0.4.0 ``NACUE``): ``m_bins=50`` (even), ``alpha=100``,
    ``o_star=50``, shared by the layers. ``layers=None`` = ``layer1``, ``layer2``, ``layer3`` and
    ``avgpool`` of a ResNet-layout model (the layers of OpenOOD's NAC postprocessor, as read in a
    fork of OpenOOD); other models need module
    names (NotImplementedError otherwise: the evaluator skips the score). No grid: OpenOOD tunes
    (O*, M, alpha) per layer on OOD-val, with a balanced 1000-image train subset; not reproduced.

    Needs ``model`` and ``loader``; one forward and one backward pass per batch (gradients w.r.t.
    the activations only: parameters frozen, eval mode, both restored). The tapped outputs are
    copied before the rest of the network runs, so later in-place operations cannot alter them.
    Like VRA, ``score`` refuses counts fitted under other hyperparameters; each fit starts afresh.

    Differences from pytorch-ood 0.4.0 ``NACUE`` (returns the negated coverage): it makes an extra
    pass over the loader to size the histograms, reduces non-4-D outputs by flattening (here: the
    mean over the dimensions after the channel one), and allows per-layer hyperparameters.
    """

    name = "nac"
    fit_on = "train"
    requires_model = True
    grid: ClassVar[dict] = {}

    def __init__(self, layers: Sequence[str] | str | None = None, m_bins: int = 50, alpha: float = 100.0,
                 o_star: float = 50):
        super().__init__()
        self.layers = check_layer_names(layers, self.name)
        self.m_bins = check_number("m_bins", m_bins, low=2, integer=True, score=self.name)
        if self.m_bins % 2:
            raise ConfigError(f"{self.name}: m_bins must be even (the bins are symmetric about 0.5), got {m_bins!r}")
        self.alpha = check_number("alpha", alpha, low=0.0, low_open=True, score=self.name)
        self.o_star = check_number("o_star", o_star, low=0.0, low_open=True, score=self.name)

    def model_layers(self, model: Any) -> tuple:
        if self.layers is not None:
            return self.layers
        names = resnet_modules(model, self.name)
        return (names["layer1"], names["layer2"], names["layer3"], names["avgpool"])

    def _states(self, model: Any, names: tuple, loader: Any):
        """Per batch: the bin index (B, N_l) of every neuron of every layer."""
        caps: dict = {}

        def keep(n: str, a: torch.Tensor) -> torch.Tensor:
            caps[n] = a
            return a.clone()

        with frozen(model), tap_layers(model, names, keep, self.name) as counts:
            for x, _ in loader_batches(loader, model_device(model), self.name):
                caps.clear()
                x = x.detach().clone().requires_grad_(True)  # builds the graph through the activations
                with torch.enable_grad():
                    logits = model(x)
                    check_ran_once(counts, self.name)
                    check_finite(logits, f"{self.name}: logits")
                    p = torch.softmax(logits, dim=1)
                    loss = (-torch.log(p + 1e-12).mean(dim=1)).sum()  # per-sample terms: independent grads
                    grads = torch.autograd.grad(loss, [caps[n] for n in names])
                bins = []
                for n, g in zip(names, grads):
                    prod = pool_activation(caps[n].detach() * g, f"{self.name}: output of {n!r}")
                    bins.append(geometric_bins(torch.sigmoid(self.alpha * prod), self.m_bins).cpu())
                yield bins

    def _fit_model(self, model: Any, loader: Any) -> None:
        names = self.model_layers(model)
        M = self.m_bins
        hist = None
        with closing(self._states(model, names, loader)) as states:  # hooks and frozen() undone on errors too
            for bins in states:
                if hist is None:
                    hist = [torch.zeros(b.shape[1] * M, dtype=torch.long) for b in bins]
                for h, b in zip(hist, bins):
                    flat = (torch.arange(b.shape[1]) * M)[None, :] + b
                    h.scatter_add_(0, flat.flatten(), torch.ones(flat.numel(), dtype=torch.long))
        # fresh state on every fit, tied to these settings
        self._counts = [h.view(-1, M) for h in hist]
        self._fitted_with = self.hyperparameters()
        self.layers_ = list(names)

    def _score_model(self, model: Any, loader: Any) -> np.ndarray:
        if self.hyperparameters() != self._fitted_with:
            raise ConfigError(
                f"{self.name}: the hyperparameters changed since fit ({self._fitted_with} -> {self.hyperparameters()}); "
                "call fit() again"
            )
        out = []
        with closing(self._states(model, tuple(self.layers_), loader)) as states:
            for bins in states:
                s = torch.zeros(bins[0].shape[0], dtype=torch.float64)
                for n, b, c in zip(self.layers_, bins, self._counts):
                    if b.shape[1] != c.shape[0]:
                        raise ShapeError(f"{self.name}: layer {n!r} had {c.shape[0]} channels at fit, got {b.shape[1]}")
                    o = c.gather(1, b.T).T.to(torch.float64)  # (B, N_l) counts of the bins hit
                    s += (o / self.o_star).clamp(max=1.0).mean(dim=1)
                out.append(s)
        return torch.cat(out).numpy()
