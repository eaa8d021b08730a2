"""ReAct: rectified activations, then energy through the last layer."""

from __future__ import annotations

import math

import numpy as np
import torch

from . import mds as _f32
from .base import SCORES, FeatureSet, Score, check_number

#: Heads with at least this many weights (D·C) are applied in float32 GEMMs; smaller ones in
#: float64 (there the GEMM costs about as much as reading the features).
FLOAT32_MIN_HEAD = 1 << 12

_NUMPY2 = np.lib.NumpyVersion(np.__version__) >= "2.0.0"


def _order_stats(a: np.ndarray, k: int) -> tuple:
    """The values at sorted positions ``k`` and ``k + 1`` of the 1-D array ``a`` (exact).

    Brackets them between two order statistics of a seeded random sample of 2^14 entries
    (6 sigma either side), counts the entries below the bracket and partitions only those
    inside it: a few vectorised passes instead of ``np.partition`` of a full copy. Any miss
    (a bracket that does not contain both ranks) falls back to ``np.partition``."""
    n = a.size
    m = 1 << 14
    if n > 8 * m:
        s = np.sort(a[np.random.default_rng(0).integers(0, n, m)])
        f = k / n
        half = 6.0 * math.sqrt(f * (1.0 - f) / m) + 2.0 / m
        lo = s[max(0, int(math.floor((f - half) * m)))]
        hi = s[min(m - 1, int(math.ceil((f + half) * m)))]
        n_le_lo = int(np.count_nonzero(a <= lo))
        n_lt_lo = int(np.count_nonzero(a < lo)) if k < n_le_lo else 0
        mid = a[(a > lo) & (a <= hi)]
        n_le_hi = n_le_lo + mid.size
        if n_lt_lo <= k and k + 1 < n_le_hi:
            ranks = [r - n_le_lo for r in (k, k + 1) if r >= n_le_lo]
            part = np.partition(mid, ranks) if ranks else mid
            return tuple(lo if r < n_le_lo else part[r - n_le_lo] for r in (k, k + 1))
    part = np.partition(a, [k, k + 1])
    return part[k], part[k + 1]


def percentile(a: np.ndarray, p: float):
    """``np.percentile(a, p)`` (linear method) of a 1-D float array without NaN, same value
    and dtype (numpy >= 2: the same float arithmetic as numpy's ``_lerp``), in a few
    vectorised passes instead of a full partition of a copy (:func:`_order_stats`)."""
    a = np.asarray(a).reshape(-1)
    n = a.size
    if not _NUMPY2 or n < 2 or a.dtype not in (np.float32, np.float64):
        return np.percentile(a, p)
    q = np.true_divide(p, 100)
    vi = (n - 1) * q
    if vi >= n - 1:
        return a.max()
    k = int(math.floor(vi))
    t = float(vi - k)
    lo, hi = _order_stats(a, k)
    lo, hi = a.dtype.type(lo), a.dtype.type(hi)
    diff = hi - lo
    # numpy's _lerp with a weak (python float) gamma: arithmetic in the array's dtype
    return hi - diff * (1 - t) if t >= 0.5 else lo + diff * t


@SCORES.register("react")
class ReAct(Score):
    r"""Energy of the logits computed from clipped penultimate features,

    .. math:: s(x) = T \log \sum_c \exp\big((W \min(f, \tau) + b)_c / T\big),

    with :math:`\tau` the ``percentile``-th percentile of **all** feature activations of the fit
    split (flattened). Paper: Sun, Guo & Li, "ReAct: Out-of-distribution Detection With
    Rectified Activations", NeurIPS 2021. Defaults ``percentile=90``, ``temperature=1``.

    Fit on ID **val** (``fit_on="val"``, as OpenOOD; the paper used train), needs
    ``head=(W, b)`` (``model.fc_weights()``), i.e. the head must be one linear layer. Matches
    OpenOOD (upper clip only, energy with T=1). pytorch-ood 0.2.0's ``ReAct`` took an absolute
    threshold (default 1.0) with no percentile fit; 0.4.0 (installed) fits the percentile (given
    as a fraction, 0.9) on whatever data ``fit`` receives and returns the negated energy. The
    percentile is numpy's default linear interpolation, like OpenOOD, computed by
    :func:`percentile` (the same value as ``np.percentile``, bit for bit, without sorting a copy
    of all activations).

    **Precision** (``precision_`` after fit). Heads with :math:`D\,C \ge` 4096 weights are
    applied to the clipped features in float32 GEMMs (row chunks; the logsumexp in float64);
    there is no conditioning issue (no inverse; the logits' error is at most about
    :math:`2^{-24}\sqrt{D}\,\|\min(f,\tau)\|\,\|W_c\|`, ~1e-6 relative), so no fallback is needed.
    Smaller heads are applied in float64, as before. The threshold is the features' own
    dtype (float32 for float32 features, as numpy returns), so clipping is exact either way.
    """

    name = "react"
    fit_on = "val"
    uses = ("features",)
    needs_head = True

    def __init__(self, percentile: float = 90.0, temperature: float = 1.0):
        super().__init__()
        self.percentile = check_number("percentile", percentile, low=0.0, high=100.0, score=self.name)
        self.temperature = check_number("temperature", temperature, low=0.0, low_open=True, score=self.name)

    def _fit(self, data: FeatureSet, W, b) -> None:
        self.threshold_ = float(percentile(data.features.detach().cpu().numpy().reshape(-1), self.percentile))
        self._W = W
        self._b = b
        C, D = W.shape
        self.precision_ = "float32" if C * D >= FLOAT32_MIN_HEAD else "float64"
        if self.precision_ == "float32":
            self._W32 = W.to(torch.float32).contiguous()
            self._b32 = b.to(torch.float32) if b is not None else None

    def _score(self, data: FeatureSet) -> np.ndarray:
        T = self.temperature
        X = data.features.detach()
        if self.precision_ == "float32":
            out = torch.empty(X.shape[0], dtype=torch.float64)
            step = 4096
            for i in range(0, X.shape[0], step):
                f = X[i : i + step].to(torch.float32).clamp(max=self.threshold_)
                z = _f32.linear32(f, self._W32, self._b32).to(torch.float64)
                out[i : i + step] = T * torch.logsumexp(z / T, dim=1)
            return out.numpy()
        f = X.to(torch.float64).clamp(max=self.threshold_)
        z = f @ self._W.T
        if self._b is not None:
            z = z + self._b
        return (T * torch.logsumexp(z / T, dim=1)).numpy()
