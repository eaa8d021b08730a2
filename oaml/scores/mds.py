"""MDS: Mahalanobis distance to the closest class mean, tied covariance.

Also home of the float32 helpers shared by MDS, ViM, ReAct and KNN: :func:`linear32` (a float32
GEMM through oneDNN where torch has it), :func:`gram32` (a covariance from float32 GEMMs summed
in float64) and the precision constants.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ..errors import DataError
from .base import SCORES, FeatureSet, Score, check_number, check_rcond

# ------------------------------------------------------------------------ float32 arithmetic

#: Fits whose float64 arithmetic is smaller than this many multiply-adds (N·D² for MDS and ViM:
#: about a millisecond) are done in float64 outright; float32 is a speed measure only.
FLOAT32_MIN_WORK = 1 << 25

#: Rows per float32 GEMM of :func:`gram32` (partial sums added in float64).
GRAM_CHUNK = 1024
#: Columns whose float32 Gram entries :func:`gram32` recomputes in float64 to measure its error.
GRAM_PROBE = 48

_U32 = 2.0**-24
_ONEDNN: Optional[bool] = None


def _fp32_matmul_is_ieee() -> bool:
    if torch.get_float32_matmul_precision() != "highest":
        return False
    try:  # torch >= 2.9: reduced-precision modes for oneDNN float32 matmuls
        if torch.backends.mkldnn.matmul.fp32_precision not in ("none", "ieee"):
            return False
    except AttributeError:
        pass
    return True


def onednn_available() -> bool:
    """True when torch's oneDNN float32 linear (``torch.ops.mkldnn._linear_pointwise``) exists
    and passes a one-time accuracy self-test, and float32 matmuls are in full precision.

    On CPUs where MKL runs its AVX2 code (AMD), oneDNN's AVX-512 kernels are about 2x faster
    than ``torch.matmul`` for the shapes used here; elsewhere they are about as fast."""
    global _ONEDNN
    if _ONEDNN is None:
        ok = False
        try:
            op = torch.ops.mkldnn._linear_pointwise
            g = torch.Generator().manual_seed(0)
            a = torch.randn(67, 129, generator=g)
            w = torch.randn(35, 129, generator=g)
            b = torch.randn(35, generator=g)
            with torch.no_grad():
                out = op(a, w, b, "none", [], "")
            ref = a.double() @ w.double().T + b.double()
            ok = (
                out.dtype == torch.float32
                and tuple(out.shape) == (67, 35)
                and float((out.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
            )
        except Exception:  # no mkldnn build, op renamed, ...: plain torch.matmul
            ok = False
        _ONEDNN = ok
    return _ONEDNN and _fp32_matmul_is_ieee()


def _gemm_operand(t: torch.Tensor) -> torch.Tensor:
    # oneDNN takes row-major or transposed (column-major) operands at full speed; other strides
    # (e.g. a column slice) fall to a reference kernel hundreds of times slower: copy those
    if t.dim() != 2 or t.is_contiguous() or t.T.is_contiguous():
        return t
    return t.contiguous()


def linear32(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T (+ bias)`` for float32 ``x`` (n, k), ``w`` (m, k), ``bias`` (m,): oneDNN on the
    CPU where available (:func:`onednn_available`), else ``torch.nn.functional.linear``."""
    with torch.no_grad():
        if (
            x.device.type == "cpu"
            and x.dtype == w.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32)
            and onednn_available()
        ):
            return torch.ops.mkldnn._linear_pointwise(
                _gemm_operand(x), _gemm_operand(w), bias, "none", [], ""
            )
        return torch.nn.functional.linear(x, w, bias)


def gram32(
    X: torch.Tensor, centers: torch.Tensor, index: torch.Tensor | None = None
) -> tuple[torch.Tensor, float, float]:
    r"""``(G, err2, err_rms)``: :math:`G = \sum_i (x_i - c_{k_i})(x_i - c_{k_i})^\top` in float64
    (D, D) from float32 GEMMs over row chunks of ``GRAM_CHUNK`` rows (chunk sums added in
    float64), with its error :math:`E` measured, not assumed: the entries of ``GRAM_PROBE``
    seeded random columns are also accumulated in float64, and from that principal submatrix
    :math:`E_P` of the error, ``err2`` :math:`= 2\sqrt{D/p}\,\|E_P\|_2` estimates
    :math:`\|E\|_2` (exact :math:`\|E\|_2` when all columns are probed) and
    ``err_rms`` :math:`= \|E_P\|_F / p` the size of one entry (both at least one float32
    rounding of the largest diagonal entry). The probe costs about (p/D)^2 of the float32 work,
    in float64.

    ``centers`` (K, D) with ``index`` (N,) in [0, K), or ``centers`` (D,) for one centre.
    Centring first keeps the float32 error relative to the spread, not the mean. For D >= 256
    only the upper block triangle (4 x 4 blocks) is multiplied (10/16 of the flops), then
    mirrored, so ``G`` is exactly symmetric."""
    return _gram(X, centers, index, torch.float32)


def gram64(X: torch.Tensor, centers: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`gram32` in float64 throughout (torch's float64 GEMM, no probe): the same sum as
    ``Xc.T @ Xc`` of the centred float64 rows, chunked and with the upper block triangle only."""
    return _gram(X, centers, index, torch.float64)[0]


def _gram(X, centers, index, dt):
    N, D = X.shape
    k = 4 if D >= 256 else 1
    edges = [round(i * D / k) for i in range(k + 1)]
    p = min(D, GRAM_PROBE) if dt == torch.float32 else 0
    probe = torch.randperm(D, generator=torch.Generator().manual_seed(0))[:p].sort().values
    c = centers.to(dt)
    acc = torch.zeros(D, D, dtype=torch.float64)
    exact = torch.zeros(p, p, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, N, GRAM_CHUNK):
            xc = X[i : i + GRAM_CHUNK].to(dt) - (c[index[i : i + GRAM_CHUNK]] if index is not None else c)
            xt = xc.T.contiguous()  # (D, B): row blocks of it are contiguous GEMM operands
            for a in range(k):
                s, e = edges[a], edges[a + 1]
                if dt == torch.float32:
                    acc[s:e, s:] += linear32(xt[s:e], xt[s:]).to(torch.float64)
                else:
                    acc[s:e, s:] += xt[s:e] @ xt[s:].T
            if p:
                xp = xt[probe].to(torch.float64)
                exact += xp @ xp.T
    G = acc.triu() + acc.triu(1).T
    if not p:
        return G, 0.0, 0.0
    E_P = G[probe][:, probe] - exact
    scale = 1.0 if p == D else 2.0 * math.sqrt(D / p)
    # floor: float32 results carry at least one rounding of the largest entry (guards against
    # a probe that only hit dead, all-zero units)
    floor = _U32 * float(G.diagonal().max().clamp_min(0.0))
    err2 = max(scale * float(torch.linalg.matrix_norm(E_P, ord=2)), floor)
    return G, err2, max(float(E_P.norm()) / p, floor)


def row_sums64(X: torch.Tensor, index: torch.Tensor, K: int, exact: bool = False) -> torch.Tensor:
    """(K, D) float64 sums of the rows of ``X`` grouped by ``index``: partial sums over chunks
    of ``GRAM_CHUNK`` rows in ``X``'s dtype (in float64 with ``exact``), added in float64."""
    D = X.shape[1]
    acc = torch.zeros(K, D, dtype=torch.float64)
    for i in range(0, X.shape[0], GRAM_CHUNK):
        xb = X[i : i + GRAM_CHUNK]
        if exact:
            xb = xb.to(torch.float64)
        part = torch.zeros(K, D, dtype=xb.dtype).index_add_(0, index[i : i + GRAM_CHUNK], xb)
        acc += part.to(torch.float64)
    return acc


def float32_verdict(evals: torch.Tensor, err: float, tol: float, rcond: float) -> tuple[bool, float, float]:
    """For the eigenvalues of a float32-computed symmetric matrix known to within ``err``: whether
    float32 resolves them (:func:`float32_resolves` with the cut ``rcond`` x the largest), the
    condition number and the error relative to the largest eigenvalue (inf where undefined)."""
    lmax = max(float(evals.max()), 0.0)
    condition = lmax / float(evals.min()) if float(evals.min()) > 0 else math.inf
    relative = err / lmax if lmax > 0 else math.inf
    return float32_resolves(evals, err, tol, rcond * lmax), condition, relative


def float32_resolves(evals: torch.Tensor, err: float, tol: float, cutoff: float) -> bool:
    """Whether eigenvalues known to within ``err`` (absolute, an estimate of ||E||_2 of the
    matrix) are good enough for a pseudo-inverse that drops those ``<= cutoff``: every kept
    eigenvalue is at least ``err / tol`` (the relative error of its weight 1/lambda, and of
    any Mahalanobis distance, at most ``tol``), and none lies within ``err`` of the cutoff
    (kept/dropped could flip). A singular covariance with the default cutoff (~1e-13
    lambda_max) therefore always fails."""
    lmax = float(evals.max())
    if not lmax > 0 or not math.isfinite(err):
        return False
    kept = evals[evals > cutoff]
    if kept.numel() == 0 or float(kept.min()) * tol < err:
        return False
    near = (evals > cutoff - err) & (evals <= cutoff + err)
    return not bool(near.any())


# ------------------------------------------------------------------------------------ MDS


@SCORES.register("mds", "mahalanobis")
class MDS(Score):
    r"""Negative Mahalanobis distance to the closest class mean with a shared covariance,

    .. math:: s(x) = -\min_c (f - \mu_c)^\top \Sigma^{+} (f - \mu_c).

    Fit on ID **train** (``fit_on="train"``, needs labels): class means :math:`\mu_c` and the
    tied MLE covariance of the class-centred features (divides by N, like sklearn's
    ``EmpiricalCovariance``). Optional shrinkage :math:`\Sigma_\alpha = (1-\alpha)\Sigma +
    \alpha\,\mathrm{tr}(\Sigma)/D\, I` (``shrinkage=0`` by default). The pseudo-inverse is taken
    once through ``eigh`` (equivalent to ``scipy.linalg.pinvh``: eigenvalues below
    ``rcond * max eigenvalue`` are dropped, rank-deficient post-ReLU covariances are fine), as a
    whitening matrix :math:`L = U \Lambda^{-1/2}`; the score is then a squared distance between
    whitened vectors: one whitening GEMM and one (N, r) x (r, C) GEMM for all classes at once.
    Classes with no training sample get no mean and are left out of the min (OpenOOD would
    produce NaN).

    **Precision** (``precision_`` after fit). Fits with :math:`N D^2 <` ``FLOAT32_MIN_WORK``
    (2^25) are float64 throughout. Larger fits first compute :math:`\Sigma` from float32 GEMMs
    of the class-centred features (row chunks summed in float64) and its ``eigh`` in float64;
    :func:`gram32` also *measures* the error :math:`E` of that covariance (a random subset of
    48 columns recomputed in float64; ``float32_error_`` = estimate of
    :math:`\|E\|_2/\lambda_{max}`). A perturbation :math:`E` changes every Mahalanobis distance
    by at most a relative :math:`\|E\|_2/\lambda_{min}`, so float32 is kept only if
    :math:`\|E\|_2 \le 10^{-3}\lambda_{min}` (``tolerance``; over the kept eigenvalues, i.e.
    :math:`\kappa = \lambda_{max}/\lambda_{min} \le 10^{-3}/` ``float32_error_``, about 1e3 to
    1e4 for float32 errors of 1e-6 to 1e-7) and no eigenvalue lies within :math:`\|E\|_2` of the
    ``rcond`` cut (:func:`float32_resolves`; so any singular covariance, e.g. dead post-ReLU
    units, falls back). Otherwise everything is redone in float64, as before, in row chunks
    (:func:`gram64`; ``condition_`` is :math:`\kappa` either way). In float32 mode the test features are centred on the mean of
    the class means and whitened in float32 GEMMs; the scores agree with the float64 path to a
    relative 1e-5 (Spearman > 0.99999) on well-conditioned data.

    Paper: Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
    Adversarial Attacks", NeurIPS 2018. This is OpenOOD's ``mds`` (no input noise, no layer
    ensemble, no 0.5 factor). OpenOOD loops over classes and takes the diagonal of a B×B matrix
    per class (float32, sklearn ``pinvh``). pytorch-ood 0.2.0 divided by N-1, added 1e-6·I and
    inverted in float32 (its issue #81); pytorch-ood 0.4.0 (installed here) sums the centred
    outer products without dividing by N, adds 1e-6·I, inverts in float32 with
    ``torch.linalg.inv`` (no conditioning check), loops over classes, returns 0.5·min distance
    (higher = OOD) and perturbs inputs in ``MahalanobisODIN``. Without the ridge the ranking
    equals ours; the ridge and float32 change it slightly for ill-conditioned Σ.
    """

    name = "mds"
    fit_on = "train"
    uses = ("features",)
    needs_fit_labels = True

    #: float32 is kept when eps * kappa <= this (relative error bound of the distances)
    tolerance = 1e-3

    def __init__(self, shrinkage: float = 0.0, rcond: float | None = None):
        super().__init__()
        self.shrinkage = check_number("shrinkage", shrinkage, low=0.0, high=1.0, score=self.name)
        self.rcond = check_rcond(rcond, self.name)

    def _shrink(self, cov: torch.Tensor) -> torch.Tensor:
        if self.shrinkage > 0:
            D = cov.shape[0]
            mu = torch.trace(cov) / D
            cov = (1.0 - self.shrinkage) * cov + self.shrinkage * mu * torch.eye(D, dtype=torch.float64)
        return cov

    def _fit(self, data: FeatureSet, W, b) -> None:
        # all linear algebra in torch (one thread pool; mixing numpy's BLAS pool with torch's
        # OpenMP pool oversubscribes small machines badly)
        X = data.features.detach()
        y = data.labels.detach().cpu().long()
        N, D = X.shape
        C = data.num_classes
        rcond = self.rcond if self.rcond is not None else D * float(np.finfo(np.float64).eps)
        counts = torch.bincount(y, minlength=C).to(torch.float64)
        present = counts > 0
        self.precision_ = "float64"
        evals = evecs = None
        if N * D * D >= FLOAT32_MIN_WORK:
            X32 = X.to(torch.float32)
            all_means = row_sums64(X32, y, C) / counts.clamp_min(1.0)[:, None]
            G, err2, _ = gram32(X32, all_means, y)
            cov = self._shrink(G / N)
            err = (1.0 - self.shrinkage) * err2 / N
            evals, evecs = torch.linalg.eigh(cov)
            ok, self.condition_, self.float32_error_ = float32_verdict(evals, err, self.tolerance, rcond)
            if ok:
                self.precision_ = "float32"
            else:
                evals = evecs = None
        if evals is None:  # float64, in row chunks (no full float64 copy of the features)
            all_means = row_sums64(X, y, C, exact=True) / counts.clamp_min(1.0)[:, None]
            cov = self._shrink(gram64(X, all_means, y) / N)
            evals, evecs = torch.linalg.eigh(cov)
            lmin = float(evals.min())
            self.condition_ = float(evals.max()) / lmin if lmin > 0 else math.inf
        keep = evals > rcond * max(float(evals.max()), 0.0)
        if not bool(keep.any()):
            raise DataError("MDS: the feature covariance is zero; the features carry no information")
        self.whitener_ = evecs[:, keep] / evals[keep].sqrt()  # (D, r)
        self.rank_ = int(keep.sum())
        self.classes_ = torch.nonzero(present).flatten().numpy()
        self.means_ = all_means[present]
        if self.precision_ == "float32":
            # centre on the mean of the class means: float32 errors scale with |f - centre|
            centre = self.means_.mean(dim=0)
            mw = (self.means_ - centre) @ self.whitener_  # (C', r) float64
            self._centre32 = centre.to(torch.float32)
            self._wt32 = self.whitener_.T.contiguous().to(torch.float32)  # (r, D)
            self._mw_m2 = (-2.0 * mw).to(torch.float32)  # (C', r)
            self._mw_sq32 = (mw * mw).sum(dim=1).to(torch.float32)  # (C',)
        else:
            self._mw = self.means_ @ self.whitener_  # (C', r)
            self._mw_sq = (self._mw * self._mw).sum(dim=1)

    def _score(self, data: FeatureSet) -> np.ndarray:
        X = data.features.detach()
        out = []
        if self.precision_ == "float32":
            step = 4096
            for i in range(0, X.shape[0], step):
                xc = X[i : i + step].to(torch.float32) - self._centre32
                zw = linear32(xc, self._wt32)  # (B, r)
                d = linear32(zw, self._mw_m2, self._mw_sq32)  # |m|^2 - 2 z.m   (B, C')
                d += (zw * zw).sum(dim=1, keepdim=True)
                out.append(d.min(dim=1).values.clamp_min(0.0).to(torch.float64))
            return (-torch.cat(out)).numpy()
        step = 4096
        for i in range(0, X.shape[0], step):
            zw = X[i : i + step].to(torch.float64) @ self.whitener_
            d = (zw * zw).sum(dim=1, keepdim=True) - 2.0 * zw @ self._mw.T + self._mw_sq[None, :]
            out.append(-d.min(dim=1).values.clamp_min(0.0))
        return torch.cat(out).numpy()
