"""LTS: energy of logits scaled by a per-sample activation-shape factor."""

from __future__ import annotations

import numpy as np
import torch

from .base import SCORES, FeatureSet, Score, check_number, exp_shifted, float64_chunks, log_, row_sums


def lts_factor(features: torch.Tensor, p: float) -> torch.Tensor:
    r"""LTS's scaling factor :math:`S(z) = (\sum_i z^+_i / \sum_{i \in \mathrm{top}k} z^+_i)^2`
    of pooled features (N, D), float64, with :math:`k = \max(1, D - \mathrm{round}((1-p) D))`;
    1 for a sample with no positive activation (0/0).

    Both sums are exact float64 sums of the features' own values: the top k are found by
    ``numpy.partition`` in the features' dtype (float32 for float16/bfloat16, both exact; the
    ReLU commutes with taking the top k), in row chunks, without a float64 copy of the features.
    """
    z = features.detach().cpu()
    if z.dtype not in (torch.float32, torch.float64):
        z = z.to(torch.float32)
    n, d = z.shape
    k = max(1, d - round(d * (1.0 - p)))
    s1 = torch.empty(n, dtype=torch.float64)
    s2 = torch.empty(n, dtype=torch.float64)
    zn = z.numpy()
    for sl, b in float64_chunks(z):
        torch.sum(b.clamp_min_(0.0), dim=1, out=s1[sl])
        top = torch.from_numpy(np.partition(zn[sl], d - k, axis=1)[:, d - k :])
        row_sums(top.to(torch.float64).clamp_min_(0.0), out=s2[sl])
    ratio = torch.where(s2 > 0, s1 / torch.where(s2 > 0, s2, torch.ones_like(s2)), torch.ones_like(s2))
    return ratio.square()


@SCORES.register("lts")
class LTS(Score):
    r"""Energy of the logits scaled per sample by the shape of the penultimate activations,

    .. math:: s(x) = \log \sum_c e^{S(f)\, z_c}, \qquad
              S(f) = \Big(\frac{\sum_{i=1}^{D} \max(f_i, 0)}{\sum_{i \in \mathrm{top}\text{-}k} \max(f_i, 0)}\Big)^2,

    with :math:`k = \max(1, D - \mathrm{round}((1-p)D))` (Python's ``round``, half to even, as
    pytorch-ood; the official code's ``np.round`` rounds the same way).

    Paper: Djurisic et al., "Logit Scaling for Out-of-Distribution Detection", Machine Vision and
    Applications 2025 (code: github.com/andrijazz/lts). ``p`` is the fraction of top activations,
    default 0.05 (pytorch-ood's default; the official code's ``percentile`` is ``100 (1 - p)``).
    No fit (``fit_on="none"``). Reads the pooled penultimate ``features`` and the ``logits``
    (which must be the head's output on those features, as everywhere in a FeatureSet).

    Same as pytorch-ood 0.4.0's ``LTS`` with its default ``EnergyBased`` detector, which computes
    :math:`S` from the pooled features :math:`B\times D` and multiplies ``head(z)`` by it; the
    official code also takes the features after global average pooling (``lts`` asserts a
    2-D input), so no feature map before pooling is needed. The ReLU is in the official code (the
    paper omits it). Differences: float64 here (pytorch-ood: the features' dtype); a sample
    without any positive activation has :math:`0/0` there (NaN score) and :math:`S = 1` here
    (its plain energy). pytorch-ood returns the negation (higher = OOD).

    The energy is :math:`S m + \log \sum_c e^{S (z_c - m)}`, :math:`m = \max_c z_c`, from
    :func:`~oaml.scores.base.exp_shifted` (float64, no overflow for large :math:`S z`).
    """

    name = "lts"
    fit_on = "none"
    uses = ("logits", "features")

    def __init__(self, p: float = 0.05):
        super().__init__()
        self.p = check_number("p", p, low=0.0, high=1.0, score=self.name)

    def _score(self, data: FeatureSet) -> np.ndarray:
        s = lts_factor(data.features, self.p)
        out = torch.empty(len(data), dtype=torch.float64)
        for rows, m, e in exp_shifted(data.logits, scale=s):
            log_(row_sums(e, out=out[rows])).addcmul_(m, s[rows])
        return out.numpy()
