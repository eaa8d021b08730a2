"""Entropy: negative Shannon entropy of the softmax."""

from __future__ import annotations

import numpy as np
import torch

from .base import SCORES, FeatureSet, Score


@SCORES.register("entropy")
class Entropy(Score):
    r"""Negative entropy of the softmax, :math:`s(x) = \sum_c p_c \log p_c`, :math:`p = \mathrm{softmax}(z)`.

    Paper: Chan et al., "Entropy Maximization and Meta Classification for Out-of-Distribution
    Detection in Semantic Segmentation", ICCV 2021 (the score is older; pytorch-ood cites this
    paper). No hyperparameters, no fit (``fit_on="none"``). Computed in float64 from
    ``log_softmax`` (exact for any finite logits, ~1e4 included; a class with underflowing
    probability contributes 0, its limit). pytorch-ood 0.4.0's ``Entropy`` returns the entropy
    (higher = OOD), in the logits' dtype, with probabilities clipped to [1e-7, 1]: a class with
    :math:`p_c < 10^{-7}` contributes :math:`-10^{-7} \log 10^{-7} \approx 1.6\cdot10^{-6}` to
    its entropy instead of :math:`-p_c \log p_c` (so at most C·1.6e-6 apart).
    """

    name = "entropy"
    fit_on = "none"
    uses = ("logits",)

    def __init__(self) -> None:
        super().__init__()

    def _score(self, data: FeatureSet) -> np.ndarray:
        logp = torch.log_softmax(data.logits.detach().to(torch.float64), dim=1)
        return (logp.exp() * logp).sum(dim=1).numpy()
