"""NNGuide: energy guided by the similarity to energy-scaled ID train features."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from ..errors import ConfigError
from .ash import top_k_sum
from .base import SCORES, FeatureSet, Score, check_number
from .knn import l2_normalise


@SCORES.register("nnguide")
class NNGuide(Score):
    r"""Energy times the mean of the K largest similarities to an energy-scaled bank,

    .. math:: s(x) = E(x) \cdot \frac1K \sum_{i \in \mathcal N_K(x)} \langle \hat f(x),\, E(x_i)\,\hat f(x_i) \rangle,
              \qquad E = \log\sum_c e^{z_c}, \quad \hat f = f/\|f\|,

    where the bank holds :math:`E(x_i)\hat f(x_i)` for ID **train** samples and
    :math:`\mathcal N_K(x)` are the K bank entries with the largest inner products (exact search,
    chunked, float64).

    Paper: Park, Jung & Teoh, "Nearest Neighbor Guidance for Out-of-Distribution Detection",
    ICCV 2023. Defaults ``K=100`` and ``bank_fraction=0.01`` (OpenOOD v1.5: ``K: 100``,
    ``alpha: 0.01``, the paper's 1% of ImageNet train), taken as a seeded random subset (``seed``);
    K <= bank size is checked at fit (ConfigError), so small train splits need a larger
    ``bank_fraction``. No grid (OpenOOD's sweep is the single point K=100, alpha=0.01).

    Fit on ID **train** (``fit_on="train"``, no labels). Energies are read from the FeatureSet's
    logits (they must be the head's output), so no head is needed. Differences: OpenOOD takes
    the first ``alpha`` fraction of batches of its (shuffled) train loader, normalises as
    ``x/||x|| + 1e-10`` and searches with faiss ``IndexFlatIP`` in float32; pytorch-ood 0.4.0's
    ``NNGuide`` uses the whole fit set (default k=10), recomputes logits with ``head(z)`` in
    float32 and returns the negation. A zero feature vector normalises to zero here.
    """

    name = "nnguide"
    fit_on = "train"
    grid: ClassVar[dict] = {}

    def __init__(self, K: int = 100, bank_fraction: float = 0.01, seed: int = 0, chunk_size: int = 2048):
        super().__init__()
        self.K = check_number("K", K, low=1, integer=True, score=self.name)
        self.bank_fraction = check_number(
            "bank_fraction", bank_fraction, low=0.0, high=1.0, low_open=True, score=self.name
        )
        self.seed = check_number("seed", seed, low=0, integer=True, score=self.name)
        self.chunk_size = check_number("chunk_size", chunk_size, low=1, integer=True, score=self.name)

    def _fit(self, data: FeatureSet, W, b) -> None:
        f, z = data.features, data.logits
        if self.bank_fraction < 1.0:
            m = max(1, int(round(self.bank_fraction * len(data))))
            g = torch.Generator().manual_seed(self.seed)
            idx = torch.randperm(len(data), generator=g)[:m].sort().values
            f, z = f[idx], z[idx]
        n = f.shape[0]
        if self.K > n:
            raise ConfigError(
                f"nnguide: K={self.K} exceeds the bank size {n} (allowed: 1..{n}; "
                f"bank_fraction={self.bank_fraction} of {len(data)} train samples); "
                "lower K or raise bank_fraction"
            )
        energy = torch.logsumexp(z.detach().to("cpu", torch.float64), dim=1)
        bank = l2_normalise(f.detach().to("cpu", torch.float64)) * energy[:, None]
        self._bank_t = bank.T.contiguous()  # (D, Nb)
        self.bank_size_ = int(n)

    def _score(self, data: FeatureSet) -> np.ndarray:
        X, Z = data.features.detach(), data.logits.detach()
        K = self.K
        out = torch.empty(X.shape[0], dtype=torch.float64)
        for i in range(0, X.shape[0], self.chunk_size):  # float64 temporaries of one chunk at a time
            sl = slice(i, i + self.chunk_size)
            sims = l2_normalise(X[sl].to(torch.float64)) @ self._bank_t
            # the K largest similarities of each row: a partition (O(bank) per row), not a sort
            guide = top_k_sum(sims, K) / K
            out[sl] = guide * torch.logsumexp(Z[sl].to(torch.float64), dim=1)
        return out.numpy()
