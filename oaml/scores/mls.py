"""MLS: maximum logit."""

from __future__ import annotations

import numpy as np
import torch

from .base import SCORES, FeatureSet, Score


@SCORES.register("mls", "maxlogit")
class MLS(Score):
    r"""Maximum logit, :math:`s(x) = \max_c z_c`.

    Paper: Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings",
    ICML 2022. No hyperparameters, no fit (``fit_on="none"``). Same as OpenOOD; pytorch-ood's
    ``MaxLogit`` returns the negation.
    """

    name = "mls"
    fit_on = "none"
    uses = ("logits",)

    def __init__(self) -> None:
        super().__init__()

    def _score(self, data: FeatureSet) -> np.ndarray:
        # the max in the logits' own dtype is one of them, so exact in float64 (amax: no indices)
        return data.logits.detach().amax(dim=1).to(torch.float64).numpy()
