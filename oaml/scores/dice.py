"""DICE: sparsify the last layer by the mean ID contribution of each weight, then energy."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from .base import SCORES, FeatureSet, Score, checked_mean32, check_number


@SCORES.register("dice")
class DICE(Score):
    r"""Energy of a sparsified head,

    .. math:: s(x) = \log \sum_c \exp\big((M \odot W) f + b\big)_c, \qquad
              M_{cj} = \mathbb 1\big[\bar f_j W_{cj} > \tau_p\big],

    where :math:`\bar f` is the mean ID **train** feature and :math:`\tau_p` the ``p``-th
    percentile of all C·D contributions :math:`\bar f_j W_{cj}` (numpy's linear
    interpolation), i.e. the fraction p/100 of weights with the smallest contribution is dropped.

    Paper: Sun & Li, "DICE: Leveraging Sparsification for Out-of-Distribution Detection", ECCV
    2022. Default ``p=90`` (percent in [0, 100), OpenOOD v1.5 and the paper's CIFAR setting; the
    paper used 70 on ImageNet). Grid ``[10, 30, 50, 70, 90]`` (pytorch-ood 0.4.0's search
    space, the paper's ablation range; OpenOOD's sweep is the single value 90).

    Fit on ID **train** (``fit_on="train"``, no labels), needs ``head=(W, b)`` (``b=None``:
    no bias). The FeatureSet's logits are not used. Same as OpenOOD (``np.percentile``, strict
    ``>``) and pytorch-ood's ``DICE`` (``torch.quantile``, also linear; float32; negated). The train
    mean and the masked head's GEMM are float32, as both peers (the mean a cascaded sum; a logit's
    absolute error at most about D u |f| |w_c|, u = 2^-24, and the log-sum-exp's no more than the
    largest of them); the contributions, percentile and log-sum-exp are float64.
    """

    name = "dice"
    fit_on = "train"
    uses = ("features",)
    fit_checks_inline = ("features",)  # from the train mean
    needs_head = True
    grid: ClassVar[dict] = {"p": [10, 30, 50, 70, 90]}

    def __init__(self, p: float = 90.0):
        super().__init__()
        self.p = check_number("p", p, low=0.0, high=100.0, high_open=True, score=self.name)

    def _fit(self, data: FeatureSet, W, b) -> None:
        mean = checked_mean32(data.features, "dice.fit(): features").to(torch.float64)
        contrib = mean[None, :] * W
        self.threshold_ = float(np.percentile(contrib.numpy().ravel(), self.p))
        mask = contrib > self.threshold_
        self.kept_fraction_ = float(mask.double().mean())
        self.mean_activation_ = mean
        self._W = W * mask
        self._W32 = self._W.to(torch.float32).t()
        self._b = b

    def _score(self, data: FeatureSet) -> np.ndarray:
        z = torch.mm(data.features.detach().to(torch.float32), self._W32).to(torch.float64)  # (N, C), one GEMM
        if self._b is not None:
            z += self._b
        return torch.logsumexp(z, dim=1).numpy()
