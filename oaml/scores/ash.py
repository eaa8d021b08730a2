"""ASH: activation shaping of the penultimate features, then energy through the head.

Three registered variants sharing one implementation: ``ash_p`` (prune), ``ash_b`` (prune and
binarise), ``ash_s`` (prune and scale). Also home of the helpers shared with SCALE
(:mod:`oaml.scores.scale`): the stable top-k of each row and :class:`HeadOnlyScore`, the base of
scores that need the head but no fitting data; and of the head helpers of the feature scores
(:func:`head_logits`, :func:`energy_through_head`; DICE), whose float64 temporaries are made one
cache-sized chunk of rows at a time (:func:`~oaml.scores.base.float64_chunks`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import ConfigError, ShapeError
from .base import SCORES, FeatureSet, Head, Score, check_finite, check_number, float64_chunks

__all__ = ["ASHP", "ASHB", "ASHS", "HeadOnlyScore", "kept_count", "top_k_mask", "top_k_sum", "shape_ratio",
           "energy_through_head", "head_logits"]

PERCENTILE_GRID = [65, 70, 75, 80, 85, 90, 95]  # OpenOOD v1.5 ash.yml / scale.yml percentile_list


def kept_count(D: int, percentile: float) -> int:
    """Number of activations kept per sample: ``D - round(D * percentile / 100)`` (numpy's
    round-half-to-even, as OpenOOD and pytorch-ood)."""
    return int(D - int(np.round(D * percentile / 100.0)))


def _partition_top(f: torch.Tensor, k: int) -> np.ndarray:
    """The rows of ``f`` (N, D) partitioned around position ``D - k`` (``np.partition``, an
    introselect: O(D) per row): entries ``[D - k:]`` of each row are its k largest, in no order,
    entry ``D - k`` the k-th largest. In ``f``'s dtype (float16/32/64; others in float64, exact
    for bfloat16 and integers up to 2^53), so the values are ``f``'s own."""
    a = f.detach().cpu()
    if a.dtype not in (torch.float16, torch.float32, torch.float64):
        a = a.to(torch.float64)
    return np.partition(a.numpy(), a.shape[1] - k, axis=1)


def _kth_largest(f: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of each row, (N, 1) in ``f``'s dtype: a selection, not a sort."""
    D = f.shape[1]
    return torch.from_numpy(_partition_top(f, k)[:, D - k : D - k + 1].copy()).to(f.dtype)


def top_k_mask(f: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of each row of ``f``, ties broken by the lower
    index: the same set as the first k of a stable descending sort, so the kept set is
    deterministic even with many exact zeros (post-ReLU features). Every entry at or above the
    k-th largest value t; in the rows where that is more than k entries (ties at t), every entry
    above t, then the first (k - #above) entries equal to t."""
    t = _kth_largest(f, k)
    keep = f >= t
    tied = torch.nonzero(keep.sum(dim=1) > k).flatten()
    if len(tied):
        fr, tr = f[tied], t[tied]
        above, eq = fr > tr, fr == tr
        need = k - above.sum(dim=1, keepdim=True)
        keep[tied] = above | (eq & (torch.cumsum(eq, dim=1) <= need))
    return keep


def top_k_sum(f: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of the ``k`` largest entries of each row, (N,) in float64 (which of equal entries are
    kept does not change it): the partitioned rows' last k entries, summed."""
    D = f.shape[1]
    return torch.from_numpy(_partition_top(f, k)[:, D - k :].sum(axis=1, dtype=np.float64))


def shape_ratio(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """``s1 / s2`` per row; 0 where ``s2 == 0`` (for non-negative features that is an all-zero
    row, whose shaped value is zero whatever the factor; the peers would give NaN)."""
    zero = s2 == 0
    return torch.where(zero, torch.zeros_like(s1), s1 / torch.where(zero, torch.ones_like(s2), s2))


def head_logits(f: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``f @ W.T`` (n, C) for ``f`` (n, D) and ``W`` (C, D) of one dtype. With few classes (2C <= n)
    computed as ``(W @ f.T).T`` (a transposed view): the same products and sums, but for float64
    MKL's GEMM is ~1.2-1.7x faster with the short side first (C = 10..100, D = 512); with many
    classes (C = 1000) the plain orientation is faster."""
    if 2 * W.shape[0] <= f.shape[0]:
        return (W @ f.T).T
    return f @ W.T


def energy_through_head(f: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``logsumexp(f W^T + b)`` (N,) in float64 (energy with T = 1, as OpenOOD and pytorch-ood),
    ``f`` of any dtype upcast to float64 in row chunks (:func:`~oaml.scores.base.float64_chunks`), W and b float64."""
    out = torch.empty(f.shape[0], dtype=torch.float64)
    for sl, x in float64_chunks(f):
        z = head_logits(x, W)
        if b is not None:
            z += b
        out[sl] = torch.logsumexp(z, dim=1)
    return out


def check_head_only(name: str, head: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate ``head=(W, b)`` without data: W (C, D) float, b (C,) or None, finite; float64 CPU."""
    if head is None:
        raise ConfigError(
            f"{name}.fit() needs head=(W, b), the last linear layer (pass head=model.fc_weights())"
        )
    if not isinstance(head, (tuple, list)) or len(head) != 2:
        raise ShapeError(f"{name}: head must be a tuple (W, b), got {type(head).__name__}")
    W, b = head
    W = torch.as_tensor(W).detach().to("cpu", torch.float64)
    if W.ndim != 2 or W.shape[0] < 1 or W.shape[1] < 1:
        raise ShapeError(f"{name}: head W must be (C, D), got shape {tuple(W.shape)}")
    check_finite(W, f"{name}: head weight W")
    if b is not None:
        b = torch.as_tensor(b).detach().to("cpu", torch.float64)
        if b.shape != (W.shape[0],):
            raise ShapeError(f"{name}: head bias b must be ({W.shape[0]},), got {tuple(b.shape)}")
        check_finite(b, f"{name}: head bias b")
    return W, b


class HeadOnlyScore(Score):
    """Base of feature-shaping scores that need the head ``(W, b)`` but no fitting data.

    ``fit(head=(W, b))`` (data optional and, if given, only checked against the head's shape)
    stores the head and the dimensions; ``score`` then checks C and D like a fitted score.
    ``fit_on = "none"``: the evaluator fits these with ``fit(None, head=head)``.
    """

    fit_on = "none"
    needs_head = True
    uses = ("features",)

    def __init__(self) -> None:
        super().__init__()
        self._fitted = False  # the head is still needed, although no data is

    def fit(self, data: FeatureSet | None = None, *, model: Any = None, loader: Any = None, head: Head | None = None):
        W, b = check_head_only(self.name, head)
        C, D = W.shape
        if data is not None:
            self._check_data(data, "fit")
            if data.num_classes != C or data.feature_dim != D:
                raise ShapeError(
                    f"{self.name}: head W is (C, D) = ({C}, {D}) but the data has "
                    f"C={data.num_classes}, D={data.feature_dim}"
                )
        self._W, self._b = W, b
        self._dims = (int(C), int(D))
        self._fit_head(W, b)
        self._fitted = True
        return self

    def score(self, data: FeatureSet | None = None, *, model: Any = None, loader: Any = None) -> np.ndarray:
        if not self._fitted:
            raise ConfigError(f"{self.name}: call fit(head=(W, b)) before score() (no data is needed)")
        return super().score(data, model=model, loader=loader)

    def _fit_head(self, W: torch.Tensor, b: torch.Tensor | None) -> None:
        pass

    def _logits(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Float64 logits (n, C) of the shaped features of one row chunk: ``x`` (n, D) in the
        features' dtype, ``f`` its float64 copy (a work buffer: may be changed in place)."""
        raise NotImplementedError

    def _score(self, data: FeatureSet) -> np.ndarray:
        # row chunks: the float64 temporaries (upcast, shaped features) stay in cache, the
        # upcast goes into one reused buffer
        X = data.features.detach()
        out = torch.empty(X.shape[0], dtype=torch.float64)
        for sl, f in float64_chunks(X):
            out[sl] = torch.logsumexp(self._logits(X[sl], f), dim=1)
        return out.numpy()


class PercentileShaping(HeadOnlyScore):
    r"""Shared code of the scores that keep the top ``k = D - round(D * percentile / 100)``
    penultimate activations (ASH-P/-B/-S, SCALE): the validated percentile and k, fixed at fit."""

    grid: ClassVar[dict] = {"percentile": PERCENTILE_GRID}

    def __init__(self, percentile: float = 90.0):
        super().__init__()
        self.percentile = check_number(
            "percentile", percentile, low=0.0, high=100.0, high_open=True, score=self.name
        )

    def _fit_head(self, W, b) -> None:
        D = int(W.shape[1])
        k = kept_count(D, self.percentile)
        if k < 1:
            raise ConfigError(
                f"{self.name}: percentile={self.percentile} keeps no activation of D={D} features "
                f"(kept = D - round(D * percentile / 100) = {k}); use a smaller percentile"
            )
        self.k_ = k


class _ASH(PercentileShaping):
    r"""Shared code of ASH-P/-B/-S (see the registered classes for each formula)."""

    variant: ClassVar[str]

    def _logits(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        k = self.k_
        keep = top_k_mask(x, k)  # in x's dtype: the same set as in float64 (the upcast is exact)
        if self.variant == "b":  # s1 / k at the kept positions, 0 elsewhere
            fill = f.sum(dim=1) / k
            z = head_logits(f.copy_(keep).mul_(fill[:, None]), self._W)
        else:
            s1 = f.sum(dim=1) if self.variant == "s" else None
            pruned = f.mul_(keep)  # f at the kept positions (times 1: exact), 0 elsewhere
            z = head_logits(pruned, self._W)
            if self.variant == "s":  # the per-row factor applied to the logits: W (c x) = c (W x)
                z *= torch.exp(shape_ratio(s1, pruned.sum(dim=1)))[:, None]
        if self._b is not None:
            z += self._b
        return z


_ASH_DOC = r"""

    Paper: Djurisic, Bozanic, Ashok & Liu, "Extremely Simple Activation Shaping for
    Out-of-Distribution Detection", ICLR 2023. Default ``percentile=90`` (OpenOOD v1.5; the
    paper used 60-95 depending on variant and dataset, pytorch-ood 0.4.0 0.65), given in percent
    in [0, 100); grid ``[65, 70, ..., 95]`` (OpenOOD's sweep). :math:`k = D -
    \mathrm{round}(D\,p/100)` activations are kept per sample (numpy's round, as both peers);
    ``fit`` checks k >= 1.

    No fit data (``fit_on="none"``), but ``fit(head=(W, b))`` is required: the shaped features
    go through the last linear layer again and the energy (T=1) of the new logits is the score
    (the FeatureSet's logits are not used). Where ASH is applied: OpenOOD v1.5 (``ASHNet``)
    shapes the **pooled penultimate feature** viewed as (B, D, 1, 1), as here; the paper and
    pytorch-ood's examples shape the feature maps before the last pooling, which a FeatureSet
    does not hold (pytorch-ood accepts the pooled features as (B, D, 1, 1) too, and then equals
    this). Ties among the kept activations are broken by the lower index (stable sort); the peers
    use ``torch.topk``, whose choice among equal values (e.g. the many exact zeros of post-ReLU
    features when fewer than k are positive) is unspecified; this matters only for ASH-B, which
    writes a non-zero value into the kept positions. ASH assumes non-negative (post-ReLU)
    features; computed in float64 (the peers: the network's dtype, float32).
    """


@SCORES.register("ash_p")
class ASHP(_ASH):
    __doc__ = r"""ASH-P: keep the top-k activations of each sample, zero the rest, energy of the head,

    .. math:: s(x) = \log \sum_c \exp\big(W\, \mathrm{top}_k(f) + b\big)_c,

    with :math:`\mathrm{top}_k(f)` equal to :math:`f` on its k largest entries and 0 elsewhere.
    Same as OpenOOD's ``ash_p`` and pytorch-ood's ``ASH(variant="ash-p")`` (negated).""" + _ASH_DOC

    name = "ash_p"
    variant = "p"


@SCORES.register("ash_b")
class ASHB(_ASH):
    __doc__ = r"""ASH-B: keep the top-k positions, set each to the sample's activation sum over k,

    .. math:: s(x) = \log \sum_c \exp\big(W\, \tfrac{\sum_j f_j}{k}\, \mathbb 1_{\mathrm{top}_k(f)} + b\big)_c,

    (the kept positions hold equal values that preserve the sum). OpenOOD v1.5's ``ash``
    postprocessor is this variant (``ASHNet.forward_threshold`` calls ``ash_b``); pytorch-ood's
    ``ASH(variant="ash-b")`` (negated).""" + _ASH_DOC

    name = "ash_b"
    variant = "b"


@SCORES.register("ash_s")
class ASHS(_ASH):
    __doc__ = r"""ASH-S: prune to the top-k activations, then scale by the exponential of the sum ratio,

    .. math:: s(x) = \log \sum_c \exp\big(W\, e^{s_1/s_2}\, \mathrm{top}_k(f) + b\big)_c,
              \quad s_1 = \textstyle\sum_j f_j,\; s_2 = \sum_j \mathrm{top}_k(f)_j,

    (rows with :math:`s_2 = 0`, all-zero for non-negative features, get factor 1 instead of
    NaN). Same as OpenOOD's ``ash_s`` and pytorch-ood's ``ASH(variant="ash-s")``, pytorch-ood's
    default variant (negated).""" + _ASH_DOC

    name = "ash_s"
    variant = "s"
