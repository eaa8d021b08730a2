"""Entropy: negative Shannon entropy of the softmax."""

from __future__ import annotations

import numpy as np
import torch

from .base import LOG2E, SCORES, FeatureSet, Score, exp_shifted, log_, row_sums


@SCORES.register("entropy")
class Entropy(Score):
    r"""Negative entropy of the softmax, :math:`s(x) = \sum_c p_c \log p_c`, :math:`p = \mathrm{softmax}(z)`.

    Paper: Chan et al., "Entropy Maximization and Meta Classification for Out-of-Distribution
    Detection in Semantic Segmentation", ICCV 2021 (the score is older; pytorch-ood cites this
    paper). No hyperparameters, no fit (``fit_on="none"``). Computed in float64 (exact for any
    finite logits, ~1e4 included; a class with underflowing probability contributes 0, its
    limit) from the shifted exponentials :math:`e_c = e^{d_c}`, :math:`d_c = z_c - \max z \le 0`
    of :func:`~oaml.scores.base.exp_shifted`: with :math:`S = \sum_c e_c`,
    :math:`\log p_c = d_c - \log S` and :math:`\sum_c p_c \log p_c = \sum_c e_c d_c / S - \log S`,
    both terms :math:`\le 0` (no cancellation), without forming :math:`p` or :math:`\log p`.
    pytorch-ood 0.4.0's ``Entropy`` returns the entropy (higher = OOD), in the logits' dtype,
    with probabilities clipped to [1e-7, 1]: a class with
    :math:`p_c < 10^{-7}` contributes :math:`-10^{-7} \log 10^{-7} \approx 1.6\cdot10^{-6}` to
    its entropy instead of :math:`-p_c \log p_c` (so at most C·1.6e-6 apart).
    """

    name = "entropy"
    fit_on = "none"
    uses = ("logits",)
    checks_inline = ("logits",)

    def __init__(self) -> None:
        super().__init__()

    def _score(self, data: FeatureSet) -> np.ndarray:
        out = torch.empty(len(data), dtype=torch.float64)
        for rows, _, e, d2 in exp_shifted(data.logits, exponent=True, check=f"{self.name}.score(): logits"):
            s = row_sums(e)
            ed = row_sums(d2.mul_(e))  # sum_c e_c d_c log2(e)
            out[rows] = ed.div_(s * LOG2E).sub_(log_(s))
        return out.numpy()
