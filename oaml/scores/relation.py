"""Relation: summed edge weights of the neural relation graph to the ID train samples."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from .base import SCORES, FeatureSet, Score, check_choice, check_number
from .knn import l2_normalise

_BLOCK = 1 << 22  # elements of one (query rows x bank) block, 16 MB in float32 (measured best of 2^18..2^25)


@SCORES.register("relation")
class Relation(Score):
    r"""Sum over the ID train bank of the thresholded relation kernel,

    .. math:: s(x) = \sum_i r_i^{\,\gamma}\, \mathbb 1[r_i > t], \qquad
              r_i = \max(\hat f^\top \hat f_i,\, 0)\; p^\top p_i,

    with :math:`\hat f = f/\|f\|`, :math:`p = \mathrm{softmax}(z)` and the bank
    :math:`(\hat f_i, p_i)` of ID **train** samples; :math:`\gamma` = ``pow``, :math:`t` =
    ``threshold``.

    Paper: Kim, Yun & Song, "Neural Relation Graph: A Unified Framework for Identifying Label
    Noise and Outlier Data", NeurIPS 2023. Defaults ``pow=1``, ``threshold=0.03`` (OpenOOD v1.5's
    ``relation.yml`` and the authors' cut-off); grid ``pow in [1, 2, 4, 6, 8]`` (OpenOOD's sweep).
    ``bank_fraction < 1`` keeps a seeded random subset of the train split (default 1.0, the whole
    split, as OpenOOD). The score sums over the bank, so its scale grows with the bank size.

    Fit on ID **train** (``fit_on="train"``, no labels); reads the FeatureSet's logits, no head.
    Cost: one (N x D) @ (D x N_bank) and one (N x C) @ (C x N_bank) product, like KNN; computed
    in ``dtype`` (float32 by default, like OpenOOD on GPU, row sums too) on ``device`` (default CPU;
    pass ``"cuda"`` for large banks), in blocks of about 2^22 kernel entries. Same as OpenOOD's
    ``relation_postprocessor.py`` (whose normaliser is ``f/sqrt(||f||^2 + 1e-10)``; here
    ``f/max(||f||, 1e-10)``). pytorch-ood 0.4.0 has no Relation detector.
    """

    name = "relation"
    fit_on = "train"
    grid: ClassVar[dict] = {"pow": [1, 2, 4, 6, 8]}

    def __init__(
        self,
        pow: float = 1,
        threshold: float = 0.03,
        bank_fraction: float = 1.0,
        seed: int = 0,
        device: str | None = None,
        dtype: str = "float32",
    ):
        super().__init__()
        self.pow = check_number("pow", pow, low=0.0, low_open=True, score=self.name)
        self.threshold = check_number("threshold", threshold, low=0.0, score=self.name)
        self.bank_fraction = check_number(
            "bank_fraction", bank_fraction, low=0.0, high=1.0, low_open=True, score=self.name
        )
        self.seed = check_number("seed", seed, low=0, integer=True, score=self.name)
        self.device = device
        self.dtype = check_choice("dtype", dtype, ("float32", "float64"), self.name)

    def _prepare(self, data: FeatureSet) -> tuple[torch.Tensor, torch.Tensor]:
        f = l2_normalise(data.features.detach().to("cpu", torch.float64))
        p = torch.softmax(data.logits.detach().to("cpu", torch.float64), dim=1)
        dt = getattr(torch, self.dtype)
        return f.to(self._dev, dt), p.to(self._dev, dt)

    def _fit(self, data: FeatureSet, W, b) -> None:
        self._dev = torch.device(self.device) if self.device is not None else torch.device("cpu")
        if self.bank_fraction < 1.0:
            m = max(1, int(round(self.bank_fraction * len(data))))
            g = torch.Generator().manual_seed(self.seed)
            idx = torch.randperm(len(data), generator=g)[:m].sort().values
            data = FeatureSet(data.logits[idx], data.features[idx])
        f, p = self._prepare(data)
        self._bank_f_t = f.T.contiguous()
        self._bank_p_t = p.T.contiguous()
        self.bank_size_ = int(f.shape[0])

    def _score(self, data: FeatureSet) -> np.ndarray:
        f, p = self._prepare(data)
        rows = min(f.shape[0], max(1, _BLOCK // max(1, self.bank_size_)))
        out = torch.empty(f.shape[0], dtype=torch.float64)
        # two reused (rows x bank) buffers; every elementwise step in place. threshold_ (x if x > t else 0) also
        # does the clamp at 0: max(cos, 0) * pp and cos * pp agree wherever either exceeds t >= 0 (pp >= 0).
        rel_buf = torch.empty(rows, self.bank_size_, dtype=f.dtype, device=f.device)
        pp_buf = torch.empty_like(rel_buf)
        with torch.no_grad():
            for i in range(0, f.shape[0], rows):
                r = min(rows, f.shape[0] - i)
                rel = torch.mm(f[i : i + r], self._bank_f_t, out=rel_buf[:r])
                rel.mul_(torch.mm(p[i : i + r], self._bank_p_t, out=pp_buf[:r]))
                torch.nn.functional.threshold_(rel, self.threshold, 0.0)
                if self.pow != 1:
                    rel.pow_(self.pow)
                out[i : i + r] = rel.sum(dim=1).cpu()  # in the kernel's dtype (OpenOOD: float32)
        return out.numpy()
