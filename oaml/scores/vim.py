"""ViM: virtual-logit matching."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ConfigError
from . import mds as _f32
from .base import SCORES, FeatureSet, Score, check_number


def residual_sensitivity(evals: torch.Tensor, n_res: int, err: float) -> float:
    r"""First-order RMS relative change of :math:`\|xR\|^2` over the fit distribution when the
    second-moment matrix (eigenvalues ``evals``, ascending; the residual space is the first
    ``n_res``) is perturbed by :math:`E` with entries up to ``err`` in its eigenbasis:

    .. math:: \delta = 2\,\mathrm{err}\,\Big(\sum_{i \in res,\, j \in top}
              \frac{\lambda_i\lambda_j}{(\lambda_i-\lambda_j)^2}\Big)^{1/2} \Big/ \sum_{i\in res}\lambda_i

    (the projector moves by :math:`E_{ij}/(\lambda_i-\lambda_j)` between a residual and a
    principal direction; directions with nearly equal eigenvalues may mix freely at little cost
    because both carry the same energy). ``inf`` for a degenerate boundary."""
    lam = evals.clamp_min(0.0)
    res, top = lam[:n_res], lam[n_res:]
    denom = float(res.sum())
    if not denom > 0:
        return math.inf
    gap = res[:, None] - top[None, :]
    if bool((gap == 0).any()):
        return math.inf
    s = float((res[:, None] * top[None, :] / (gap * gap)).sum())
    return 2.0 * err * math.sqrt(s) / denom


@SCORES.register("vim")
class ViM(Score):
    r"""Energy minus the scaled norm of the feature residual outside the principal subspace,

    .. math:: s(x) = \log\sum_c e^{z_c} - \alpha\, \| (f - u)\, R \|_2,

    with :math:`u = -W^{+} b` (the origin that makes the head bias-free), :math:`R` the
    eigenvectors of the uncentred covariance :math:`\frac1N\sum (f-u)(f-u)^\top` of ID train
    features *outside* the top-``dim`` ones (``torch.linalg.eigh``, float64), and
    :math:`\alpha = \mathrm{mean}_{train}\max_c z_c / \mathrm{mean}_{train}\|(f-u)R\|`.

    Paper: Wang et al., "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022.
    Default ``dim=None``: 256 for features of 512 or more dimensions (OpenOOD's setting for
    ResNet-18), ``D // 2`` below that (pytorch-ood also halves). An explicit ``dim`` must satisfy
    ``1 <= dim < D``, checked at fit (ConfigError), which avoids OpenOOD's empty null space
    (alpha = inf, NaN scores) for dim >= D.

    **Precision** (``precision_`` after fit). Fits with :math:`N D^2 <` 2^25 are float64
    throughout. Larger fits compute the covariance of the features centred on their own mean
    :math:`m` from float32 GEMMs (row chunks summed in float64,
    :func:`~oaml.scores.mds.gram32`), add :math:`(m-u)(m-u)^\top` in float64 and take ``eigh``
    in float64; the residuals :math:`(f-m)R + (m-u)R` are float32 GEMMs. :func:`~oaml.scores.mds.gram32` measures
    the covariance's float32 error (48 random columns recomputed in float64: the RMS error of
    one entry, times 3 as a margin). Float32 is kept when both (a) the first-order RMS
    relative change of :math:`\|(f-u)R\|^2` caused by that error, :func:`residual_sensitivity`
    (``sensitivity_``; it grows as the eigen-gaps between residual and principal directions
    shrink), and (b) the float32 rounding of the residual GEMM relative to the residual,
    :math:`2^{-24}\sqrt{D\,\mathrm{tr}\Sigma_m / \sum_{res}\lambda}` (large when the residuals
    are tiny next to the features), are at most ``tolerance`` = 1e-3; otherwise everything is
    redone in float64, as before (in row chunks, :func:`~oaml.scores.mds.gram64`).

    Fit on ID **train** (``fit_on="train"``) with ``head=(W, b)`` (``model.fc_weights()``;
    ``b=None`` gives ``u=0``). The logits are read from the FeatureSet (for train: alpha; for
    test: the energy), so they must be the head's output. Differences: OpenOOD uses ``np.linalg.eig``
    on a symmetric matrix (here ``eigh``: real, sorted, stable). pytorch-ood requires ``d``
    with no default and silently halves it when D < d (0.2.0 and 0.4.0); 0.2.0 clipped logits to
    +-100; 0.4.0 (installed) recomputes the logits from (W, b) in float32 and decomposes in
    float32 without a check; both return the negation.
    """

    name = "vim"
    fit_on = "train"
    needs_head = True

    #: float32 is kept when both error estimates (see the class docstring) are at most this
    tolerance = 1e-3

    def __init__(self, dim: int | None = None):
        super().__init__()
        self.dim = None if dim is None else check_number("dim", dim, low=1, integer=True, score=self.name)

    def _fit_residual(self, data: FeatureSet, W, b) -> None:
        """``u``, the residual basis and ``precision_`` (shared with :class:`~oaml.scores.residual.Residual`)."""
        D = data.feature_dim
        dim = self.dim if self.dim is not None else (256 if D >= 512 else max(1, D // 2))
        self.dim_ = dim
        if dim >= D:
            raise ConfigError(
                f"{self.name}: dim={dim} must be < the feature dimension D={D} (allowed: 1..{D - 1}); "
                "the residual space would be empty"
            )
        u = -(torch.linalg.pinv(W) @ b) if b is not None else torch.zeros(D, dtype=torch.float64)
        self.u_ = u
        feats = data.features.detach()
        N = feats.shape[0]
        self.precision_ = "float64"
        if N * D * D >= _f32.FLOAT32_MIN_WORK and self._fit32(feats, u, D, dim):
            return
        cov = _f32.gram64(feats, u) / N  # float64, in row chunks (no full float64 copy of the features)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        self.residual_basis_ = evecs[:, : D - dim].contiguous()  # the smallest D - dim

    def _vlogit(self, feats: torch.Tensor) -> torch.Tensor:
        """(N,) float64 residual norms ``|(f - u) R|`` in the fitted precision."""
        return self._vlogit32(feats) if self.precision_ == "float32" else self._vlogit64(feats)

    def _fit(self, data: FeatureSet, W, b) -> None:
        self._fit_residual(data, W, b)
        dim = self.dim_
        vlogit = self._vlogit(data.features.detach())
        max_logit = data.logits.detach().to("cpu", torch.float64).max(dim=1).values
        denom = float(vlogit.mean())
        if not denom > 0:
            raise ConfigError(
                f"vim: the train features have no component outside the top-{dim} principal "
                "subspace (residual norm 0); use a smaller dim"
            )
        self.alpha_ = float(max_logit.mean()) / denom

    def _fit32(self, feats: torch.Tensor, u: torch.Tensor, D: int, dim: int) -> bool:
        """The float32 fit; False (nothing set) when the error estimates exceed ``tolerance``."""
        X32 = feats.to(torch.float32)
        N = X32.shape[0]
        zeros = torch.zeros(N, dtype=torch.long)
        m = _f32.row_sums64(X32, zeros, 1)[0] / N
        G, _, err_rms = _f32.gram32(X32, m)
        cov_m = G / N
        shift = m - u
        cov = cov_m + shift[:, None] * shift[None, :]
        evals, evecs = torch.linalg.eigh(cov)  # ascending, float64
        err = 3.0 * err_rms / N  # one entry of the covariance's error, with a margin of 3
        n_res = D - dim
        res_energy = float(evals[:n_res].clamp_min(0.0).sum())
        self.sensitivity_ = residual_sensitivity(evals, n_res, err)
        rounding = (
            _f32._U32 * math.sqrt(D * float(torch.trace(cov_m)) / res_energy) if res_energy > 0 else math.inf
        )
        if not (self.sensitivity_ <= self.tolerance and rounding <= self.tolerance):
            return False
        self.precision_ = "float32"
        self.residual_basis_ = evecs[:, :n_res].contiguous()
        self._centre32 = m.to(torch.float32)
        self._rt32 = self.residual_basis_.T.contiguous().to(torch.float32)  # (D - dim, D)
        self._r0 = (shift @ self.residual_basis_).to(torch.float32)  # (m - u) R
        return True

    def _vlogit32(self, X: torch.Tensor) -> torch.Tensor:
        out = []
        step = 4096
        for i in range(0, X.shape[0], step):
            xc = X[i : i + step].to(torch.float32) - self._centre32
            r = _f32.linear32(xc, self._rt32, self._r0)
            out.append(r.norm(dim=1).to(torch.float64))
        return torch.cat(out)

    def _vlogit64(self, X: torch.Tensor) -> torch.Tensor:
        step = 4096
        return torch.cat(
            [
                ((X[i : i + step].to(torch.float64) - self.u_) @ self.residual_basis_).norm(dim=1)
                for i in range(0, X.shape[0], step)
            ]
        )

    def _score(self, data: FeatureSet) -> np.ndarray:
        vlogit = self._vlogit(data.features.detach())
        energy = torch.logsumexp(data.logits.detach().to("cpu", torch.float64), dim=1)
        return (energy - self.alpha_ * vlogit).numpy()
