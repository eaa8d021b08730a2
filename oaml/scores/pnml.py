"""pNML: negative single-layer predictive-normalized-maximum-likelihood regret."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .base import SCORES, FeatureSet, Score, check_rcond, exp_shifted, log_, row_sums
from .mds import FLOAT32_MIN_WORK, float32_verdict, linear32
from .rmd import whitener_from_eigh

#: rows per chunk of the normalisation and of scoring
PNML_CHUNK = 1024
#: columns whose Gram entries are also summed exactly (float64) from the float64-normalised rows,
#: to measure the error of the float32 Gram (as :func:`~oaml.scores.mds.gram32`)
PNML_PROBE = 48
#: rows whose projection is recomputed in float64 to measure the float32 one
PNML_CHECK_ROWS = 256
_U32 = 2.0**-24


@SCORES.register("pnml")
class PNML(Score):
    r"""Negative pNML regret of the last layer (Bibas et al., "Single Layer Predictive Normalized
    Maximum Likelihood for Out-of-Distribution Detection", NeurIPS 2021):

    .. math:: s(x) = -\frac{1}{\log C} \log \sum_{c=1}^{C}
              \frac{p_c}{p_c + (1 - p_c)\, p_c^{\,g}}, \qquad
              g = \frac{u^\top (X^\top X)^{+} u}{1 + u^\top (X^\top X)^{+} u},

    where :math:`u = f/\|f\|` and the rows of :math:`X` are the L2-normalised ID **train**
    features, :math:`p = \mathrm{softmax}(W u + b)`: the head applied to the **normalised**
    feature (as the official code's ``logits_w_norm_features`` and pytorch-ood), so the
    FeatureSet's logits are not used and ``fit`` needs ``head=(W, b)`` (``model.fc_weights()``).
    The regret lies in [0, 1]; a sample in a direction the train features barely span, or
    with a flat prediction, has a high regret. Fit on ID **train** (``fit_on="train"``; labels
    are not needed, rows labelled -1 are dropped when labels are given).

    Computation: :math:`(X^\top X)^{+}` once, through float64 ``eigh`` (pinvh cutoff ``rcond``,
    default D·eps) as a whitening matrix, so :math:`u^\top (X^\top X)^+ u` is a squared norm.
    Each term is :math:`1 / (1 + (1 - p_c)\, p_c^{g-1})`, with :math:`p_c = e_c/S`,
    :math:`1 - p_c = (S - e_c)/S` and :math:`p_c^{g-1} = 2^{(g-1)\log_2 p_c}` from the shifted
    exponentials :math:`e_c` (sum :math:`S`) of :func:`~oaml.scores.base.exp_shifted` (float64),
    so no probability is clamped and logits ~1e4 are safe (a term whose power overflows is 0,
    its limit). pytorch-ood 0.4.0's ``PNML`` (same formula, fit through
    ``pinv`` of the float32 D×D Gram matrix; the official code inverts it unless singular)
    clamps probabilities to [1e-12, 1 - 1e-12] (only the lower clamp acts in float32) and
    returns the regret (higher = OOD). A zero feature vector has :math:`u = 0`, hence
    :math:`g = 0` and regret 0 (its most-ID value), in all three implementations.

    **Precision** (``precision_`` after fit). Fits with :math:`N D^2 <` 2^25 are float64
    throughout. Larger fits take the Gram matrix from float32 GEMMs of the normalised rows
    (as :func:`~oaml.scores.mds.gram32`: chunk sums in float64) and measure its error :math:`E`:
    the entries of 48 seeded columns are also summed in float64 from the float64-normalised rows,
    so the rounding of the rows to float32 is included (``float32_error_`` = the estimate of
    :math:`\|E\|_2/\lambda_{max}`). Since :math:`u^\top G^+ u` changes by at most a relative
    :math:`\|E\|_2/\lambda_{min}`, float32 is kept only if that is at most ``tolerance`` (1e-4)
    and no eigenvalue lies within :math:`\|E\|_2` of the ``rcond`` cut
    (:func:`~oaml.scores.mds.float32_resolves`; a singular Gram matrix always falls back);
    otherwise the Gram matrix is recomputed in float64 (row chunks). In float32 mode the
    whitening of the test features is one float32 GEMM, and ``PNML_CHECK_ROWS`` (256) evenly
    spaced rows are recomputed in float64: if their projections differ by more than a relative
    ``tolerance / 10``, all rows are done in float64. The head and everything after it are
    float64 in both modes.
    """

    name = "pnml"
    fit_on = "train"
    needs_head = True
    uses = ("features",)

    #: float32 Gram kept when ||E||_2 <= tolerance * lambda_min (see the docstring)
    tolerance = 1e-4

    def __init__(self, rcond: float | None = None):
        super().__init__()
        self.rcond = check_rcond(rcond, self.name)

    @staticmethod
    def _normalise(f: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(f.detach().to("cpu", torch.float64), p=2.0, dim=1, eps=1e-12)

    def _fit(self, data: FeatureSet, W, b) -> None:
        if data.num_classes < 2:
            raise ConfigError("pnml: the regret is normalised by log C and needs C >= 2 classes")
        X = data.features.detach()
        if data.labels is not None:
            known = data.labels >= 0
            if not bool(known.any()):
                raise DataError("pnml: every fit sample is labelled OOD (-1); fit on ID train features")
            if not bool(known.all()):
                X = X[known]
        N, D = X.shape
        rcond = self.rcond if self.rcond is not None else D * float(np.finfo(np.float64).eps)
        self.precision_ = "float64"
        evals = evecs = None
        if N * D * D >= FLOAT32_MIN_WORK:
            G, err = self._gram32(X)
            evals, evecs = torch.linalg.eigh(G)
            ok, self.condition_, self.float32_error_ = float32_verdict(evals, err, self.tolerance, rcond)
            if ok:
                self.precision_ = "float32"
            else:
                evals = evecs = None
        if evals is None:  # float64 Gram, in row chunks (no float64 copy of the features)
            G = torch.zeros(D, D, dtype=torch.float64)
            for i in range(0, N, PNML_CHUNK):
                u = self._normalise(X[i : i + PNML_CHUNK])
                G += u.T @ u
            evals, evecs = torch.linalg.eigh(G)
            lmin = float(evals.min())
            self.condition_ = float(evals.max()) / lmin if lmin > 0 else math.inf
        self.projector_ = whitener_from_eigh(evals, evecs, rcond, "normalised-feature Gram", self.name)  # (D, r), P P^T = pinv(X^T X)
        self.rank_ = int(self.projector_.shape[1])
        self._P32t = self.projector_.T.contiguous().to(torch.float32) if self.precision_ == "float32" else None
        self._W = W
        self._b = b if b is not None else torch.zeros(W.shape[0], dtype=torch.float64)

    def _gram32(self, X: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(G, err)``: the Gram matrix (D, D) float64 of the normalised rows of ``X`` from
        float32 GEMMs over row chunks (normalised in float64, chunk sums added in float64; for
        D >= 256 the upper block triangle only, mirrored: exactly symmetric), in one pass with
        the exact float64 Gram of ``PNML_PROBE`` seeded columns of the float64-normalised rows,
        from which ``err`` estimates ||E||_2 of the error as :func:`~oaml.scores.mds.gram32`
        does (here the rounding of the rows to float32 is part of the measured error)."""
        N, D = X.shape
        k = 4 if D >= 256 else 1
        edges = [round(i * D / k) for i in range(k + 1)]
        p = min(D, PNML_PROBE)
        probe = torch.randperm(D, generator=torch.Generator().manual_seed(0))[:p].sort().values
        acc = torch.zeros(D, D, dtype=torch.float64)
        exact = torch.zeros(p, p, dtype=torch.float64)
        for i in range(0, N, PNML_CHUNK):
            u = self._normalise(X[i : i + PNML_CHUNK])
            up = u[:, probe]
            exact += up.T @ up
            t = u.to(torch.float32).T.contiguous()  # (D, B): its row blocks are contiguous GEMM operands
            for a in range(k):
                s, e = edges[a], edges[a + 1]
                acc[s:e, s:] += linear32(t[s:e], t[s:]).to(torch.float64)
        G = acc.triu() + acc.triu(1).T
        E_P = G[probe][:, probe] - exact
        scale = 1.0 if p == D else 2.0 * math.sqrt(D / p)
        # floor: float32 results carry at least one rounding of the largest entry
        err = max(scale * float(torch.linalg.matrix_norm(E_P, ord=2)), _U32 * float(G.diagonal().max().clamp_min(0.0)))
        return G, err

    def regret(self, data: FeatureSet) -> np.ndarray:
        """The pNML regret in [0, 1] (pytorch-ood's score; higher = OOD)."""
        return -self.score(data)

    def _score(self, data: FeatureSet) -> np.ndarray:
        X = data.features.detach()
        n, C = len(data), data.num_classes
        f32 = self._P32t is not None
        proj = torch.empty(n, dtype=torch.float64)
        logits = torch.empty(n, C, dtype=torch.float64)
        for i in range(0, n, PNML_CHUNK):  # u = f / |f| once per row: logits (float64) and projection
            u = self._normalise(X[i : i + PNML_CHUNK])
            torch.addmm(self._b, u, self._W.T, out=logits[i : i + PNML_CHUNK])
            if f32:
                v = linear32(u.to(torch.float32), self._P32t).to(torch.float64)
            else:
                v = u @ self.projector_
            torch.sum(v.square_(), dim=1, out=proj[i : i + PNML_CHUNK])
        if f32:  # measure the float32 projections on evenly spaced rows; all in float64 if off
            idx = torch.linspace(0, n - 1, min(n, PNML_CHECK_ROWS)).round().long().unique()
            ref = (self._normalise(X[idx]) @ self.projector_).square_().sum(dim=1)
            if not float(((proj[idx] - ref).abs() / ref.clamp_min(1e-300)).max()) <= self.tolerance / 10:
                for i in range(0, n, PNML_CHUNK):
                    v = self._normalise(X[i : i + PNML_CHUNK]) @ self.projector_
                    torch.sum(v.square_(), dim=1, out=proj[i : i + PNML_CHUNK])
        gm1 = (proj / (1.0 + proj)).sub_(1.0)  # g - 1 in (-1, 0]
        out = torch.empty(n, dtype=torch.float64)
        for rows, _, e, d2 in exp_shifted(logits, exponent=True):
            s = row_sums(e)[:, None]
            # p^(g-1) = 2^((g-1) log2 p), log2 p = d2 - log2 S <= 0: >= 1, may overflow to inf
            y = d2.sub_(torch.log2(s)).mul_(gm1[rows, None]).exp2_()
            # term_c = 1 / (1 + (1 - p_c) p_c^(g-1)) = S / (S + (S - e_c) y_c);  S - e_c >= 0,
            # 0 only for a single max class with S = 1, where y = 1 (no 0 * inf)
            w = e.neg_().add_(s).mul_(y).add_(s).reciprocal_()
            out[rows] = row_sums(w).mul_(s[:, 0])
        return log_(out).div_(-math.log(C)).numpy()
