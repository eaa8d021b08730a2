"""C-OOD: k-NN boundary sampling of outlier embeddings (SPEC section 1, step 2; paper section 4.1).

For every class ``c``, on the L2-normalised ID features ``Z_c`` (n x D):

1. ``d_K(z)``: distance from ``z`` to its K-th nearest neighbour in ``Z_c``, ``z`` itself excluded.
2. Boundary points: the ``S`` points of ``Z_c`` with the largest ``d_K``.
3. For each boundary point ``b``: ``N`` candidates ``v = normalise(b + sigma * eps)``,
   ``eps ~ N(0, I)``, with FRESH noise for every boundary point.
4. Score each candidate by its ``d_K`` against ``Z_c`` (the candidate is not in ``Z_c``, so its
   K-th neighbour is taken over all ``n`` points) and keep, per boundary point, the ``m``
   candidates with the LARGEST ``d_K``.
5. Repeat ``R`` times: the class contributes ``R * S * m`` vectors, labelled with ``c``.

Exactness and backends
----------------------
Distances are computed in two passes. A fast float32 pass (``torch``: chunked matmul + top-k,
using ``||a - b||^2 = 2 - 2 a.b`` on unit vectors; ``faiss``: ``IndexFlatIP``, or ``IndexIVFFlat``)
ranks all points; then every point whose float32 score is within a rigorous float32 error bound
of the selection threshold is rescored in float64 on the CPU (exact squared distances
``|q|^2 + |z|^2 - 2 q.z``), and the final choice is made on those float64 scores, ties going to the
lower index. The selection is therefore exact, does not depend on the backend, the device, the
chunk size or BLAS summation order, and the ``torch`` and exact ``faiss`` backends return
bit-identical vectors on the same device. ``faiss_index="ivf"`` is approximate: points the IVF
search ranks too low are never rescored, so it may miss some of the true farthest candidates
(use it for very large classes only; raise ``ivf_nprobe`` to trade speed for recall).

Fast path (``torch`` backend on the CPU): the fast pass skips the top-k of every point that
provably cannot reach the float64 shortlist (:meth:`_TorchSearch.top_kth_d2`: a count of the
similarities above a cut, one pass over a cache-sized GEMM block; at the paper's settings about 5%
of the candidates are ranked; on a CPU with native bfloat16 GEMMs the count is decided on a bfloat16 GEMM,
about 4x the float32 rate, wherever its rigorous error bound makes the answer certain, and only the
other rows get the float32 GEMM: :meth:`_TorchSearch._top_kth_d2_bf16`; the class's vectors are
screened in chunks, nearest first to the candidates' boundary point (to the class mean for the
boundary step), so that most candidates are decided on the first ~2K of them), and the (repeat,
boundary point) blocks run on
``torch.get_num_threads()`` worker threads of one intra-op thread each, the noise still drawn in
the documented order (:func:`_farthest_candidates`). The output is the chunked search's, bit for
bit, with the bfloat16 screen or without it (tests/test_knn_sampler.py keeps the pre-optimisation
code as the reference). What remains is the GEMM (benchmarks/knn_sampling.py reports the ratio to
the float32 roofline) and the serial noise draws (torch's CPU generator: 5.3 ms per boundary point
at N=1500, D=768 on one core, about 40% of a task's CPU time at n=500 with the screen; with several
workers it runs while the other workers compute).

Randomness
----------
All noise comes from one ``torch.Generator`` per class (on the CPU by default, so results do not
depend on the device). Draw order, part of the contract: for repeat ``r`` and boundary point
``i`` (boundary points ordered by decreasing ``d_K``, ties by lower row) the noise block is the
``(r * S + i)``-th call ``torch.randn((N, D), generator=g)``. :func:`sample_outliers` seeds the
generator of class ``c`` from ``(seed, c)`` only, so classes are independent of each other and of
the order in which they are processed, and a resumed run equals an uninterrupted one.

``reference_bugs=True`` (ablation / reproduction ONLY, never the default) reproduces the
authors' release (DreamOOD/NPOS ``KNN.py``): per repeat a random permutation of the boundary
pool, ONE noise draw shared by all boundary points, the boundary ``d_K`` taken with the point
itself counted as its own first neighbour, and the scrambled selection (``view(N, S)`` of the
block-ordered distance vector, top-``m`` along dim 0, point ``j * N + row`` returned), which
keeps effectively random candidates instead of the farthest ones.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import numpy as np
import torch
from pydantic import Field, ValidationError

from .. import __version__
from ..config import StrictModel, format_validation_error
from ..errors import BankError, ConfigError, DataError, ShapeError
from ..utils.device import resolve_device
from ..utils.io import check_writable
from .bank import Bank, BankWriter

log = logging.getLogger(__name__)

#: Vectors per bank shard when ``sample_outliers(shard_size=None)``: whole classes, about this many rows.
SHARD_TARGET_ROWS = 32768
#: Rows per float64 rescoring block (fixed, see _exact_kth_d2).
_RESCORE_ROWS = 64
#: float32 unit round-off; used to bound the error of the fast pass.
_U32 = 2.0**-24


class KNNSamplerConfig(StrictModel):
    """Settings of the k-NN boundary sampler. Defaults are the paper's / authors' (CIFAR-10: R=10)."""

    K: int = Field(300, ge=1, description="K of the K-th nearest neighbour distance; clamped to n_c - 1")
    S: int = Field(50, ge=1, description="boundary points per class (largest d_K)")
    N: int = Field(1500, ge=1, description="Gaussian candidates per boundary point")
    sigma: float = Field(0.07, gt=0, allow_inf_nan=False, description="std of the noise per dimension")
    sigma_reference_dim: Optional[int] = Field(
        None, ge=1,
        description="scale the noise to the feature width: std = sigma * sqrt(sigma_reference_dim / D), so that "
                    "candidates keep the cosine to their boundary point they have at that width (768: the paper's "
                    "ViT-B/16, where sigma=0.07 was set); None = sigma as given",
    )
    m: int = Field(2, ge=1, description="candidates kept per boundary point (largest d_K)")
    R: int = Field(10, ge=1, description="repeats; a class yields R*S*m vectors (authors: 10 C-10, 100 C-100, 25 IN-1k)")
    features_per_class: Optional[int] = Field(
        500, ge=2, description="seeded random subset of each class's ID features (None = all); authors: 500"
    )
    backend: Literal["torch", "faiss", "auto"] = Field(
        "auto", description="auto = torch for exact (flat) search, faiss for ivf; the choice is logged"
    )
    faiss_index: Literal["flat", "ivf"] = Field("flat", description="flat = exact; ivf = approximate (faiss only)")
    ivf_nlist: Optional[int] = Field(None, ge=1, description="IVF lists (None = min(4*sqrt(n), n/39), at least 1)")
    ivf_nprobe: int = Field(8, ge=1, description="IVF lists probed per query")
    chunk_size: Optional[int] = Field(
        None, ge=1, description="query rows per search block (None = from chunk_mb); rounded to whole boundary points "
                                "(torch backend on the CPU: one boundary point's candidates per worker, and this caps "
                                "the rows of a similarity block); the output does not depend on it"
    )
    chunk_mb: float = Field(128.0, gt=0, description="working-memory budget of one search block, MiB")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    noise_device: Literal["cpu", "compute"] = Field(
        "cpu", description="cpu = device-independent results (default); compute = faster on GPU, device-dependent"
    )
    seed: int = Field(0, ge=0)
    rescale_norm: Optional[float] = Field(
        None, gt=0, allow_inf_nan=False,
        description="multiply the unit output vectors by this norm (e.g. the token-embedding norm for Stable Diffusion)",
    )
    reference_bugs: bool = Field(
        False,
        description="ABLATION/REPRODUCTION ONLY: the authors' scrambled selection, shared noise and self-counting d_K",
    )

    def __init__(self, **data: Any):
        source = data.pop("__source__", "k-NN sampler settings")
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, type(self), source)) from None
        self.check(source)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "config") -> "KNNSamplerConfig":
        data = dict(data or {})
        bad = [k for k in data if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"invalid {source}: keys must be names, got {bad!r}")
        return cls(**data, __source__=source)

    def check(self, source: str = "k-NN sampler settings") -> None:
        """Cross-field checks (also run by the samplers, since ``model_copy(update=...)`` skips validation)."""
        problems = []
        if self.m > self.N:
            problems.append(f"m={self.m} candidates cannot be kept out of N={self.N}; use m <= N")
        if self.faiss_index == "ivf" and self.backend == "torch":
            problems.append("faiss_index='ivf' needs backend 'faiss' or 'auto' (the torch backend is exact only)")
        for key in ("K", "S", "N", "m", "R", "ivf_nprobe"):
            if int(getattr(self, key)) < 1:
                problems.append(f"{key} must be at least 1, got {getattr(self, key)}")
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            problems.append(f"sigma must be a positive number, got {self.sigma}")
        if self.features_per_class is not None and self.features_per_class < 2:
            problems.append(f"features_per_class must be at least 2 (or None = all), got {self.features_per_class}")
        if problems:
            raise ConfigError(f"invalid {source} ({type(self).__name__}):\n  " + "\n  ".join(problems))

    def noise_std(self, D: int) -> float:
        """The per-dimension noise std used for D-dimensional features."""
        if self.sigma_reference_dim is None:
            return self.sigma
        return self.sigma * math.sqrt(self.sigma_reference_dim / D)

    @property
    def per_class(self) -> int:
        """Vectors produced per class: R * S * m."""
        return self.R * self.S * self.m

    def result_settings(self) -> dict[str, Any]:
        """The settings that determine the output (recorded in the bank; must match to resume)."""
        keys = ["K", "S", "N", "sigma", "sigma_reference_dim", "m", "R", "features_per_class", "seed", "rescale_norm", "reference_bugs",
                "noise_device"]
        out = {k: getattr(self, k) for k in keys}
        if self.faiss_index == "ivf":
            out["search"] = {"index": "ivf", "nlist": self.ivf_nlist, "nprobe": self.ivf_nprobe}
        else:
            out["search"] = "exact"
        return out


@dataclass
class ClassSample:
    """Output of :func:`sample_class_outliers` with ``return_info=True``.

    Distances are Euclidean (not squared), exact float64 values on the normalised vectors.
    """

    vectors: torch.Tensor  # (R*S*m, D) float32, CPU; order: repeat, boundary slot, kept (farthest first)
    K: int  # effective K after clamping
    boundary_index: torch.Tensor  # (S,) rows of Z, by decreasing d_K (ties: lower row first)
    boundary_dk: torch.Tensor  # (S,) float64 d_K of those rows (itself excluded; included in reference mode)
    centers: torch.Tensor  # (R, S) row of Z each output block came from (= boundary_index unless reference_bugs)
    kept_index: torch.Tensor  # (R, S, m) candidate index (0..N-1) within its block's N candidates
    kept_dk: torch.Tensor  # (R, S, m) float64 d_K of the kept candidates (in reference mode: of the scored one)


# --------------------------------------------------------------------------------------------
# search backends: K-th largest inner product of query rows against the class matrix
# --------------------------------------------------------------------------------------------
def _bf16_gemm_native() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX-512 BF16 or AMX: about 4x the float32 GEMM rate
    on this project's machine), so that the bfloat16 screen of :meth:`_TorchSearch.top_kth_d2` pays. Without it
    torch's bfloat16 matmul is emulated and slower than float32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                    and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))
    except (AttributeError, RuntimeError):  # a torch without these probes, or one that cannot answer: no screen
        return False


#: The bfloat16 screen of the torch search on the CPU: "auto" (on where the CPU has native bfloat16 GEMMs), True, False.
BF16_SCREEN: bool | str = "auto"
#: Classes of at least this many vectors are screened a quarter of their columns at a time (see _column_plan).
_COLUMN_SCREEN_MIN = 2048
#: ... in this many column chunks
_COLUMN_CHUNKS = 4


def _column_plan(n: int, k: int, ordered: bool) -> list[tuple[int, int]]:
    """Column ranges of the bfloat16 screen of a class of ``n`` vectors for the k-th similarity.

    ``ordered``: the columns come nearest-first for the query rows (see :meth:`_TorchSearch.top_kth_d2`); the first
    chunk holds about 2k of them (a multiple of 128), the next as many, then chunks of twice that. Else a quarter of
    a class of ``_COLUMN_SCREEN_MIN`` vectors or more at a time, or the whole class in one chunk.
    """
    if ordered:
        w = min(n, -(-2 * k // 128) * 128)
        bounds = [0, w] + ([min(n, 2 * w)] if w < n else [])
        while bounds[-1] < n:
            bounds.append(min(n, bounds[-1] + 2 * w))
    else:
        w = -(-n // (_COLUMN_CHUNKS if n >= _COLUMN_SCREEN_MIN else 1))
        bounds = list(range(0, n, w)) + [n]
    return list(zip(bounds[:-1], bounds[1:]))


def _bf16_bound(D: int) -> float:
    """Bound on |bfloat16-GEMM similarity - float32 fast-pass similarity| of two (near-)unit vectors of dimension D.

    Inputs rounded to bfloat16 (unit round-off u = 2^-8): each product is off by at most (2u + u^2) of its size,
    and the sum of |products| is at most |a||b| (Cauchy-Schwarz); the float32 accumulation adds D * 2^-24 |a||b|;
    the bfloat16 output rounds once more (u |s|, |s| <= |a||b|); the float32 fast pass itself is within
    D * 2^-24 |a||b| of the exact value. Norms of float32 unit vectors are within 1e-5 of 1.
    """
    u = 2.0**-8
    return (2 * u + u * u + u + 2 * D * _U32) * (1.0 + 1e-5) ** 2 + 1e-6


def _bf16_up(x: float) -> torch.Tensor:
    """The smallest bfloat16 number >= x, as a 0-d bfloat16 tensor (a comparison against it is then exact)."""
    b = np.array([x], dtype=np.float32)
    if float(b[0]) < x:
        b = np.nextafter(b, np.float32(np.inf))
    bits = b.view(np.uint32)[0]
    if bits & 0xFFFF:
        # bfloat16 = the top 16 bits of a float32: truncation rounds a positive number down, a negative one up
        bits = (bits & 0xFFFF0000) + (0x10000 if b[0] > 0 else 0)
    v = np.array([bits], dtype=np.uint32).view(np.float32)
    return torch.tensor(float(v[0]), dtype=torch.bfloat16)


class _TorchSearch:
    name = "torch"

    def __init__(self, Z: torch.Tensor, device: torch.device):
        self.device = device
        self.Zt = Z.to(device).t().contiguous()
        self.n = Z.shape[0]
        self.ranked = 0  # rows whose k-th similarity was found by top-k in top_kth_d2 (the rest were pruned)
        self.screened = 0  # rows that went through the bfloat16 screen of top_kth_d2
        self._lock = threading.Lock()
        screen = _bf16_gemm_native() if BF16_SCREEN == "auto" else bool(BF16_SCREEN)
        # the class in bfloat16, one vector per row: the screen's column chunks are row slices (or row gathers)
        self.Z_bf = Z.to(device, torch.bfloat16).contiguous() if screen and device.type == "cpu" else None
        self._tls = threading.local()
        self.bf16_bound = _bf16_bound(Z.shape[1])

    def _kth_of(self, sims: torch.Tensor, k: int) -> torch.Tensor:
        """The k-th largest value of each row of a (rows, n) block, via the cheaper side of the top-k."""
        if k <= self.n - k + 1:
            return torch.topk(sims, k, dim=1, largest=True, sorted=False).values.amin(dim=1)
        return torch.topk(sims, self.n - k + 1, dim=1, largest=False, sorted=False).values.amax(dim=1)

    def top_kth_d2(self, Q: torch.Tensor, k: int, keep: int, tol: float, block_rows: int,
                   buf: Optional[torch.Tensor] = None, order: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fast-pass squared d_K of the rows of ``Q`` (M, D) for ``_select_top(., keep, tol)``: (M,) float32.

        Equals ``2 - 2 * kth_sim(Q, k)`` on every row that the selection could shortlist; every
        other row is pruned and set to ``-inf``. Pruning is exact, not a heuristic: the first
        ``p`` rows (the probe) are ranked fully, so ``thr``, the keep-th largest d^2 found so far,
        is a lower bound of the row's final keep-th largest; a row with at least ``k``
        similarities above ``cut`` (below) has d^2 < thr - tol, so it is neither kept nor
        shortlisted, and the keep-th largest value is unchanged. Counting similarities above a
        number is a single pass over the (rows, n) GEMM block; only the surviving rows (a few
        percent at the paper's settings) go through the much dearer top-k. ``thr`` is raised after
        every block. GEMM blocks of ``block_rows`` rows stay in cache (``buf``: reusable buffers,
        (2, block_rows, n) float32: similarities and the 0/1 mask, whose float sum is the fastest count).
        ``order`` (optional): the class's rows, likeliest-nearest to the queries first (e.g. by similarity to
        the point the queries were drawn around); the bfloat16 screen then counts the nearest columns first, where
        a close row reaches ``k`` soonest. Any permutation gives the same result.
        """
        M = Q.shape[0]
        if self.Z_bf is not None and M > _probe_rows(M, keep):
            return self._top_kth_d2_bf16(Q, k, keep, tol, block_rows, order)
        out = torch.full((M,), -math.inf, device=self.device)
        if buf is None or buf.shape[1] < min(block_rows, M):
            buf = torch.empty(2, min(block_rows, M), self.n, device=self.device)
        sbuf, mbuf = buf[0], buf[1]
        p = _probe_rows(M, keep)
        ranked, cut, a = 0, None, 0
        while a < M:
            # the probe in blocks, then blocks that grow with the rows seen (the cut rises fastest early):
            # after A rows a block of B rows leaves about B * keep / A survivors
            b = min(M, a + block_rows, p if a < p else a + max(3 * a, 64))
            if 0 < M - b < block_rows // 4 and M - a <= block_rows:
                b = M  # no small tail block
            sims = torch.mm(Q[a:b], self.Zt, out=sbuf[:b - a])
            if a < p:  # the probe: ranked in full
                out[a:b] = 2.0 - 2.0 * self._kth_of(sims, k)
                ranked += b - a
                a = b
                if a == p and p < M:
                    cut = _prune_cut(out[:p], keep, tol)
                continue
            live = self._rank_unpruned(sims, torch.arange(a, b), cut, k, out, mbuf[:b - a])
            ranked += live
            if live and b < M:
                cut = _prune_cut(out[:b], keep, tol)
            a = b
        self._count(ranked)
        return out

    def _rank_unpruned(self, sims: torch.Tensor, rows: torch.Tensor, cut: float, k: int, out: torch.Tensor,
                       mask: Optional[torch.Tensor] = None) -> int:
        """The float32 pruning test of :meth:`top_kth_d2` on a block: of the query ``rows`` (float32 similarities
        ``sims`` to the whole class), those with fewer than ``k`` similarities above ``cut`` get
        ``out[row] = 2 - 2 * (k-th similarity)``; returns how many. ``mask``: a reusable float buffer of
        ``sims``' shape (the float sum of a 0/1 mask is the fastest count, exact up to 2^24 columns)."""
        if mask is not None and self.n <= 1 << 24:
            cnt = torch.gt(sims, cut, out=mask).sum(1)
        else:
            cnt = torch.gt(sims, cut).sum(1)
        live = (cnt < k).nonzero().squeeze(1)
        if live.numel():
            out[rows[live]] = 2.0 - 2.0 * self._kth_of(sims.index_select(0, live), k)
        return live.numel()

    def _top_kth_d2_bf16(self, Q: torch.Tensor, k: int, keep: int, tol: float, block_rows: int,
                         order: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`top_kth_d2` with a bfloat16 screen: the same values on every row that could be shortlisted.

        The pruning test of top_kth_d2 (at least ``k`` float32 similarities above ``cut``) is decided on a
        bfloat16 GEMM (about 4x the float32 rate) where it is certain: a row with ``k`` bfloat16 similarities
        above ``cut + E`` (E = :func:`_bf16_bound`, a rigorous bound on the bfloat16 error) has ``k`` float32
        similarities above ``cut``. The class's columns are screened a chunk at a time (:func:`_column_plan`;
        with ``order``, in that order): a row's count only grows with the columns seen, so a row that reaches
        ``k`` on part of the class is pruned without the rest. Unordered, at n = 5,000, K = 300 about 80% of the
        candidates are decided on half the class; with the columns ordered by their similarity to the
        candidates' centre, about 90% are decided on the first 640 columns and 97% on 1,280 (a third of the
        unordered screen's GEMM).

        The first chunk of every row is computed at once. The rows with the smallest sum of its similarities
        (likeliest farthest) are ranked first, in full and in float32, which sets a high cut at once; on them
        the bound is checked (float32 and bfloat16 similarities of the whole class): were it ever exceeded, the
        screen is switched off for this search (logged) and the float32 search runs instead. Then every row is
        counted against the cut, the later chunks only for the rows still undecided, and the rows never pruned
        are ranked in float32 (with the float32 pruning test).
        """
        M, D = Q.shape
        out = torch.full((M,), -math.inf)
        Qb = Q.to(torch.bfloat16)
        E = self.bf16_bound
        plan = _column_plan(self.n, k, order is not None)
        w = plan[0][1]
        buf = self._column_buffers(M, w, max(b - a for a, b in plan), D, later=len(plan) > 1, gather=order is not None)

        def view(flat: torch.Tensor, r: int, c: int) -> torch.Tensor:
            return flat[: r * c].view(r, c)

        def columns(a: int, b: int) -> torch.Tensor:
            """(b - a, D): the class vectors of chunk [a, b) (in ``order``, when given)."""
            if order is None:
                return self.Z_bf[a:b]
            return torch.index_select(self.Z_bf, 0, order[a:b], out=view(buf["cols"], b - a, D))

        sb = torch.mm(Qb, columns(0, w).t(), out=view(buf["sb0"], M, w))  # (M, first chunk)
        first = torch.topk(sb.sum(1, dtype=torch.float32), _probe_rows(M, keep), largest=False, sorted=False).indices
        sims = torch.mm(Q.index_select(0, first), self.Zt)
        out[first] = 2.0 - 2.0 * self._kth_of(sims, k)
        err = float((torch.mm(Qb.index_select(0, first), self.Z_bf.t()).float() - sims).abs().max())
        if not err <= E:
            log.warning("k-NN sampler: bfloat16 GEMM error %.3g above its bound %.3g on this machine; "
                        "the bfloat16 screen is off, the float32 search runs", err, E)
            self.Z_bf = None
            return self.top_kth_d2(Q, k, keep, tol, block_rows)
        cut = _prune_cut(out, keep, tol)
        thr = _bf16_up(cut + E)
        cnt = torch.gt(sb, thr, out=view(buf["mask"], M, w)).sum(1)
        cnt[first] = float(k)  # ranked already
        alive = (cnt < k).nonzero().squeeze(1)
        for a, b in plan[1:]:
            r, wc = alive.numel(), b - a
            if not r:
                break
            # rows padded to a multiple of 128 (the padding rows' results are ignored): oneDNN caches a GEMM
            # primitive, with its own copy of the packed class matrix, per distinct shape, so unpadded row
            # counts grew the process by ~50 MB per class at n = 5,000 (its cache holds 1,024 of them)
            rp = min(M, -(-r // 128) * 128)
            q = view(buf["q"], rp, D)
            torch.index_select(Qb, 0, alive, out=q[:r])
            sbj = torch.mm(q, columns(a, b).t(), out=view(buf["sb"], rp, wc))[:r]
            c = cnt[alive] + torch.gt(sbj, thr, out=view(buf["mask"], r, wc)).sum(1)
            cnt[alive] = c
            alive = alive[c < k]
        ranked = first.numel()
        if alive.numel():  # the float32 pass and its pruning test
            ranked += self._rank_unpruned(torch.mm(Q.index_select(0, alive), self.Zt), alive, cut, k, out)
        self._count(ranked, screened=M)
        return out

    def _column_buffers(self, rows: int, first: int, widest: int, D: int, later: bool, gather: bool) -> dict:
        """This thread's flat buffers for :meth:`_screen_by_columns`, each grown when a call needs more."""
        tl = self._tls
        if not hasattr(tl, "bufs"):
            tl.bufs = {}
        need = {"sb0": (rows * first, torch.bfloat16), "mask": (rows * widest, torch.float32)}
        if later:  # the later chunks' undecided rows
            need.update(sb=(rows * widest, torch.bfloat16), q=(rows * D, torch.bfloat16))  # q: zeros in padding rows
        if gather:
            need["cols"] = (widest * D, torch.bfloat16)
        for name, (size, dtype) in need.items():
            if name not in tl.bufs or tl.bufs[name].numel() < size:
                tl.bufs[name] = torch.zeros(size, dtype=dtype)
        return tl.bufs

    def _count(self, rows: int, screened: int = 0) -> None:
        with self._lock:
            self.ranked += rows
            self.screened += screened

    def kth_sim(self, Q: torch.Tensor, k: int) -> torch.Tensor:
        out = torch.empty(Q.shape[0], device=self.device)
        # Blocks of rows keep the (rows, n) similarities and the top-k buffers small.
        step = max(1, (1 << 22) // max(self.n, k))
        for a in range(0, Q.shape[0], step):
            sims = Q[a:a + step].to(self.device) @ self.Zt
            # the k-th largest value, via the cheaper side of the top-k
            if k <= self.n - k + 1:
                out[a:a + step] = torch.topk(sims, k, dim=1, largest=True, sorted=False).values.amin(dim=1)
            else:
                out[a:a + step] = torch.topk(sims, self.n - k + 1, dim=1, largest=False, sorted=False).values.amax(dim=1)
        return out


def _import_faiss():
    try:
        import faiss  # type: ignore
    except ImportError:
        raise ConfigError(
            "backend 'faiss' needs the faiss package, which is not installed: pip install 'oaml[faiss]' "
            "(faiss-cpu; faiss-gpu for GPU indexes), or use backend 'torch'"
        ) from None
    return faiss


def _faiss_gpus(faiss) -> int:
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


class _FaissSearch:
    name = "faiss"

    def __init__(self, Z: torch.Tensor, cfg: KNNSamplerConfig, device: torch.device):
        faiss = _import_faiss()
        self.n, D = Z.shape
        self.kind = cfg.faiss_index
        Zn = np.ascontiguousarray(Z.detach().cpu().numpy(), dtype=np.float32)
        if cfg.faiss_index == "flat":
            index = faiss.IndexFlatIP(D)
        else:
            nlist = cfg.ivf_nlist or max(1, min(int(round(4 * math.sqrt(self.n))), self.n // 39))
            if nlist > self.n:
                raise ConfigError(f"ivf_nlist={nlist} exceeds the class size {self.n}; use a smaller ivf_nlist")
            quantizer = faiss.IndexFlatIP(D)
            index = faiss.IndexIVFFlat(quantizer, D, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = 1234  # deterministic k-means
            index.train(Zn)
            index.nprobe = min(cfg.ivf_nprobe, nlist)
            self._quantizer = quantizer  # keep alive
        index.add(Zn)
        self.gpu = device.type == "cuda"
        if self.gpu:
            res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(res, device.index or 0, index)
            self._res = res
        self.index = index

    def kth_sim(self, Q: torch.Tensor, k: int) -> torch.Tensor:
        if self.gpu and k > 2048:
            raise ConfigError(f"faiss GPU indexes return at most 2048 neighbours; K={k} is too large (use backend torch)")
        q = np.ascontiguousarray(Q.detach().cpu().numpy(), dtype=np.float32)
        out = np.empty(len(q), np.float32)
        step = max(1, (1 << 22) // k)  # bounds faiss's (rows, k) result buffers
        for a in range(0, len(q), step):
            sims, ids = self.index.search(q[a:a + step], k)
            if (ids[:, k - 1] < 0).any():
                bad = int((ids[:, k - 1] < 0).sum())
                raise ConfigError(
                    f"the faiss {self.kind} search found fewer than K={k} neighbours for {bad} of {len(ids)} queries "
                    f"(nprobe={getattr(self.index, 'nprobe', '-')} of {getattr(self.index, 'nlist', '-')} lists); "
                    "raise ivf_nprobe or use faiss_index 'flat'"
                )
            out[a:a + step] = sims[:, k - 1]
        return torch.from_numpy(out)


_LOGGED: set = set()


def _resolve(cfg: KNNSamplerConfig) -> tuple[str, torch.device, str]:
    """(backend, compute device, why) for ``cfg``; raises ConfigError for impossible requests."""
    backend, why = cfg.backend, "asked for"
    if backend == "auto":
        if cfg.faiss_index == "ivf":
            backend, why = "faiss", "auto: faiss_index='ivf' needs faiss"
        else:
            backend, why = "torch", "auto: exact search, where the torch backend measured fastest (benchmarks/knn_sampling.py)"
    if backend == "torch":
        return backend, resolve_device(cfg.device), why
    faiss = _import_faiss()
    if cfg.device == "auto":
        gpu = _faiss_gpus(faiss) > 0 and torch.cuda.is_available()
        return backend, torch.device("cuda", 0) if gpu else torch.device("cpu"), why
    device = resolve_device(cfg.device)
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"the faiss backend runs on cpu or cuda, not {cfg.device!r}")
    if device.type == "cuda" and _faiss_gpus(faiss) == 0:
        raise ConfigError(
            f"device {cfg.device!r} was asked for the faiss backend, but this faiss has no GPU support; "
            "install faiss-gpu, or use device 'cpu', or backend 'torch'"
        )
    return backend, device, why


def _make_search(Z: torch.Tensor, cfg: KNNSamplerConfig):
    backend, device, why = _resolve(cfg)
    key = (backend, str(device), cfg.faiss_index, why)
    if key not in _LOGGED:  # once per process and choice
        _LOGGED.add(key)
        log.info("k-NN sampler: backend %s (%s), index %s, device %s", backend, why,
                 cfg.faiss_index if backend == "faiss" else "exact matmul", device)
    if backend == "torch":
        return _TorchSearch(Z, device), device
    return _FaissSearch(Z, cfg, device), device


@contextlib.contextmanager
def _full_fp32() -> Iterator[None]:
    """No TF32/bf16 shortcuts in float32 matmuls: the error bound of the fast pass relies on it."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


# --------------------------------------------------------------------------------------------
# exact (float64) rescoring and shortlist selection
# --------------------------------------------------------------------------------------------
def _exact_kth_d2(Q: torch.Tensor, Z64: torch.Tensor, z2: torch.Tensor, k: int,
                  exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Float64 squared distance from each row of ``Q`` to its k-th nearest row of ``Z64`` (CPU).

    ``exclude[i]`` (a row of ``Z64``) is left out of row i's neighbours (the point itself).
    """
    Q64 = Q.detach().to("cpu", torch.float64)
    L = Q64.shape[0]
    out = torch.empty(L, dtype=torch.float64)
    # Fixed 64-row blocks (zero-padded): BLAS results then do not depend on how many rows were
    # shortlisted or where a row sits, so every backend gets bit-identical scores.
    blk = _RESCORE_ROWS
    Qp = torch.zeros(-(-L // blk) * blk, Q64.shape[1], dtype=torch.float64)
    Qp[:L] = Q64
    ZT = Z64.T.contiguous()
    for a in range(0, L, blk):
        q = Qp[a:a + blk]
        d2 = (q * q).sum(1, keepdim=True) + z2[None, :] - 2.0 * (q @ ZT)
        d2.clamp_(min=0.0)
        rows = min(blk, L - a)
        d2 = d2[:rows]
        if exclude is not None:
            d2[torch.arange(rows), exclude[a:a + rows]] = math.inf
        out[a:a + rows] = torch.kthvalue(d2, k, dim=1).values
    return out


def _shortlist(approx: torch.Tensor, k: int, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the entries of ``approx`` (G, M) within ``tol`` of their row's k-th largest (see _select_top)."""
    approx = approx.detach().float().cpu()
    thr = torch.topk(approx, k, dim=1).values[:, -1:]
    return torch.nonzero(approx >= thr - tol, as_tuple=True)


def _pick_top(shape: tuple[int, int], rows: torch.Tensor, cols: torch.Tensor, exact: torch.Tensor,
              k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest exact scores per row among the shortlisted entries; ties to the lower column (see _select_top)."""
    full = torch.full(shape, -math.inf, dtype=torch.float64)
    full[rows, cols] = exact
    vals, order = torch.sort(full, dim=1, descending=True, stable=True)
    return order[:, :k].contiguous(), vals[:, :k].contiguous()


def _select_top(approx: torch.Tensor, k: int, tol: float,
                exact_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``approx`` (G, M; larger = farther) the ``k`` entries with the largest EXACT score.

    Only entries whose approximate score is within ``tol`` of the row's k-th best approximate
    score are rescored by ``exact_fn(rows, cols) -> float64``; with ``tol`` at least twice the
    approximation error this is the exact top-k. Ties go to the lower column. Returns
    ``(cols (G, k) long, exact (G, k) float64)``, each row by decreasing exact score.
    """
    approx = approx.detach().float().cpu()
    rows, cols = _shortlist(approx, k, tol)
    return _pick_top(tuple(approx.shape), rows, cols, exact_fn(rows, cols), k)


#: Margin (in similarity) added to the pruning cut of _TorchSearch.top_kth_d2; it covers the float32 roundings of
#: ``2 - 2 s`` (<= 2.4e-7 on d^2 in [0, 4]) and of ``thr - tol`` in _select_top, with a wide margin.
_PRUNE_SLACK = 1e-5
#: Similarity block of the torch search, bytes: (rows, n) float32 blocks of 256..1024 rows of about this size keep
#: the GEMM output in cache for the count and top-k passes (measured best on the 2-core AMD EPYC: 105 GFLOP/s per
#: core at 256-1024 rows vs 88 at 4096).
_SIM_BLOCK_BYTES = 2 << 20


def _probe_rows(M: int, keep: int) -> int:
    """Rows ranked in full before pruning starts: 8 * keep, at least 16 (then see top_kth_d2)."""
    return min(M, max(16, 8 * keep))


def _prune_cut(d2: torch.Tensor, keep: int, tol: float) -> float:
    """A similarity ``c`` such that any row whose k-th similarity is above ``c`` has fast-pass d^2 below
    (the keep-th largest of ``d2``) - tol - 4.8e-7, i.e. cannot pass _select_top's shortlist.

    Returned as a Python float that is exactly a float32 (no rounding when torch compares float32 with it).
    """
    thr = float(torch.topk(d2, keep).values[-1])
    cut = (2.0 - (thr - tol)) / 2.0 + _PRUNE_SLACK
    c32 = np.float32(cut)
    if float(c32) < cut:
        c32 = np.nextafter(c32, np.float32(np.inf))
    return float(c32)


def _block_rows(n: int, cap: int) -> int:
    """Rows of one similarity block against a class of ``n`` vectors (at most ``cap``, the chunk size)."""
    return max(1, min(cap, max(256, min(1024, _SIM_BLOCK_BYTES // (4 * n)))))


def _tolerance(D: int) -> float:
    # |float32 dot - exact| <= D*u*|a||b| (recursive summation; blocked BLAS does better), on unit
    # vectors; squared distance 2 - 2s doubles it; the norms of float32 unit vectors add ~1e-7.
    # Both the threshold and the candidate may be off by that much: twice the bound, plus slack.
    return 2.0 * (2.0 * D * _U32 + 1e-6) + 1e-6


def _chunk_rows(cfg: KNNSamplerConfig, n: int, D: int, k: int) -> int:
    if cfg.chunk_size is not None:
        return cfg.chunk_size
    per_row = 4 * D + 64  # the candidate block; search buffers are bounded separately (about 2^22 values)
    return max(1, int(cfg.chunk_mb * (1 << 20) // per_row))


# --------------------------------------------------------------------------------------------
# one class
# --------------------------------------------------------------------------------------------
def _normalise_class(Z: torch.Tensor) -> torch.Tensor:
    if not isinstance(Z, torch.Tensor):
        Z = torch.as_tensor(np.asarray(Z))
    if Z.ndim != 2:
        raise ShapeError(f"class features must be a 2-D (n, D) tensor, got shape {tuple(Z.shape)}")
    Z = Z.detach().to("cpu", torch.float32)
    if not torch.isfinite(Z).all():
        raise DataError(f"class features hold {int((~torch.isfinite(Z)).sum())} non-finite values")
    norms = Z.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        raise DataError(f"{int((norms == 0).sum())} class feature vectors are all zeros and cannot be L2-normalised")
    return Z / norms


def _check_class(n: int, cfg: KNNSamplerConfig, label: str, log_clamp: bool = True) -> int:
    """Effective K for a class of ``n`` vectors; ConfigError when the class cannot be sampled."""
    if n == 0:
        raise ConfigError(f"{label} is empty: there is nothing to sample around")
    if n < 2:
        raise ConfigError(f"{label} has a single vector: the K-th neighbour distance needs at least 2 (K clamps to n-1 >= 1)")
    if cfg.S > n:
        raise ConfigError(f"S={cfg.S} boundary points cannot be chosen among the {n} vectors of {label}; use S <= {n}")
    K = cfg.K
    if K > n - 1:
        K = n - 1
        if log_clamp:
            log.info("K=%d clamped to n-1=%d for %s (%d vectors)", cfg.K, K, label, n)
    return K


def _candidates(B: torch.Tensor, eps: torch.Tensor, sigma: float, inplace: bool = False) -> torch.Tensor:
    """normalise(b + sigma * eps): B (G, D), eps (G, N, D) (or expanded, shared) -> (G, N, D).

    One code path for every caller, so a candidate is bit-identical wherever it is (re)made.
    ``inplace=True`` overwrites ``eps`` (which must not be an expanded view).
    """
    v = eps.mul_(sigma) if inplace else eps * sigma
    v += B[:, None, :]
    v /= torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    return v


class _Turnstile:
    """Lets task ``t`` draw its noise only after tasks ``0..t-1`` have drawn theirs: the documented draw order,
    whichever worker thread runs the task."""

    def __init__(self) -> None:
        self.next = 0
        self.failed = False
        self.cv = threading.Condition()

    @contextlib.contextmanager
    def turn(self, t: int) -> Iterator[None]:
        with self.cv:
            self.cv.wait_for(lambda: self.next == t or self.failed)
            if self.failed:
                raise RuntimeError("k-NN sampler: an earlier task failed")
        try:
            yield
        except BaseException:
            self.abort()
            raise
        with self.cv:
            self.next += 1
            self.cv.notify_all()

    def abort(self) -> None:
        with self.cv:
            self.failed = True
            self.cv.notify_all()


@functools.lru_cache(maxsize=None)
def _openmp_backend() -> bool:
    """Whether ATen parallelises with OpenMP, whose thread count is per calling thread (the worker threads of
    _farthest_candidates rely on it; torch's native backend has one shared pool, set once)."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


#: Shortlisted candidates gathered before one float64 rescoring call (whole 64-row blocks mostly).
_RESCORE_BATCH = 4 * _RESCORE_ROWS


def _farthest_candidates(search: _TorchSearch, generator: torch.Generator, Bpts: torch.Tensor, Z64: torch.Tensor,
                         z2: torch.Tensor, K: int, N: int, m: int, R: int, sigma: float, tol: float, block_rows: int,
                         out: torch.Tensor, kept_index: torch.Tensor, kept_d2: torch.Tensor) -> None:
    """Steps 3-5, correct mode, torch backend on the CPU: fills ``out`` (R, S, m, D), ``kept_index`` and
    ``kept_d2`` (R, S, m) exactly as the chunked loop of :func:`sample_class_outliers` does.

    One task per (repeat r, boundary point i), t = r * S + i: draw the noise (call t of the
    generator, in order: see :class:`_Turnstile`), make the N candidates (:func:`_candidates`, the
    same elementwise ops and per-row norm, so the same bits), fast-pass d_K with pruning
    (:meth:`_TorchSearch.top_kth_d2`) and shortlist them (:func:`_shortlist`, per row as in
    ``_select_top``); the shortlisted candidates of consecutive tasks are rescored together in
    float64 (:func:`_exact_kth_d2`, whose value per row does not depend on the batch) and the m
    farthest kept (:func:`_pick_top`). The tasks run on ``torch.get_num_threads()`` worker threads
    of one intra-op thread each (the process-wide torch thread count is 1 meanwhile, then
    restored), so the serial noise draws of one worker overlap the GEMMs of the others; one
    thread: in this thread, in order. Working memory: per worker N x D candidates and two
    block_rows x n similarity blocks (the chunked loop held chunk_mb of candidates).
    """
    S, D = Bpts.shape
    tasks = R * S
    n = Z64.shape[0]
    threads = torch.get_num_threads()
    workers = max(1, min(threads, tasks)) if _openmp_backend() else 1
    local = threading.local()
    turnstile = _Turnstile()
    # per boundary point, the class nearest-first to it (the candidates lie around it): the bfloat16 screen's order
    orders = torch.argsort(torch.mm(Bpts, search.Zt), dim=1, descending=True) if search.Z_bf is not None else None

    def task(t: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not hasattr(local, "cand"):  # per-thread buffers
            local.cand = torch.empty(N, D)
            local.buf = torch.empty(2, min(block_rows, N), n)
        cand = local.cand
        with turnstile.turn(t):  # fresh noise per boundary point, fixed draw order
            torch.randn((N, D), generator=generator, out=cand)
        i = t % S
        _candidates(Bpts[i:i + 1], cand[None], sigma, inplace=True)
        # (full float32 GEMMs: the caller holds _full_fp32, a process-wide setting, for the whole call)
        approx = search.top_kth_d2(cand, K, m, tol, block_rows, local.buf, order=None if orders is None else orders[i])
        _, cols = _shortlist(approx[None], m, tol)
        return cols, cand[cols]  # a copy: the buffers are reused

    pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def rescore() -> None:
        if not pending:
            return
        exact = _exact_kth_d2(torch.cat([v for _, _, v in pending]), Z64, z2, K)
        o = 0
        for t, cols, v in pending:
            L = cols.numel()
            sel, d2 = _pick_top((1, N), torch.zeros(L, dtype=torch.long), cols, exact[o:o + L], m)
            o += L
            r, i = divmod(t, S)
            kept_index[r, i] = sel[0]
            kept_d2[r, i] = d2[0]
            out[r, i] = v[torch.searchsorted(cols, sel[0])]  # cols ascend (nonzero order)
        pending.clear()

    def collect(t: int, cols: torch.Tensor, v: torch.Tensor) -> None:
        pending.append((t, cols, v))
        if sum(c.numel() for _, c, _ in pending) >= _RESCORE_BATCH:
            rescore()

    if workers == 1:
        for t in range(tasks):
            collect(t, *task(t))
        rescore()
        return
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,))
    try:
        futures: collections.deque = collections.deque()
        for t in range(tasks):
            futures.append((t, pool.submit(task, t)))
            while len(futures) > 2 * workers:  # a bounded queue: results are consumed in task order
                t0, f = futures.popleft()
                collect(t0, *f.result())
        while futures:
            t0, f = futures.popleft()
            collect(t0, *f.result())
        rescore()
    except BaseException:
        turnstile.abort()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def sample_class_outliers(Z: torch.Tensor, cfg: KNNSamplerConfig | None = None,
                          generator: torch.Generator | None = None, return_info: bool = False,
                          label: str = "the class", _log_clamp: bool = True):
    """C-OOD vectors for one class: ``(R*S*m, D)`` float32 on the CPU (see the module docstring).

    ``Z``: the class's ID features (normalised here). ``generator``: the noise source (default:
    a CPU generator seeded with ``cfg.seed``). With ``return_info=True`` returns a
    :class:`ClassSample` holding the boundary points, kept candidate indices and exact distances.
    Output vectors are unit vectors, times ``cfg.rescale_norm`` when set.
    """
    cfg = cfg or KNNSamplerConfig()
    cfg.check()
    Z = _normalise_class(Z)
    n, D = Z.shape
    K = _check_class(n, cfg, label, log_clamp=_log_clamp)
    S, N, m, R, sigma = cfg.S, cfg.N, cfg.m, cfg.R, cfg.noise_std(D)
    ref = cfg.reference_bugs
    search, compute = _make_search(Z, cfg)
    noise_dev = torch.device("cpu") if cfg.noise_device == "cpu" else compute
    if generator is None:
        generator = torch.Generator(device=noise_dev).manual_seed(cfg.seed)
    elif torch.device(generator.device).type != noise_dev.type:
        raise ConfigError(
            f"the generator lives on {generator.device} but noise_device={cfg.noise_device!r} draws noise on "
            f"{noise_dev}; pass a generator on {noise_dev}"
        )
    Z64 = Z.to(torch.float64)
    z2 = (Z64 * Z64).sum(1)
    tol = _tolerance(D)
    rows_per_chunk = _chunk_rows(cfg, n, D, K)
    Zc = Z.to(compute)

    with _full_fp32():
        # 1-2. boundary points: d_K with the point itself excluded (reference: included).
        kq = K if ref else min(K + 1, n)
        # the fast path (pruned search, worker threads): torch backend on the CPU; else the chunked search
        fast = search.name == "torch" and compute.type == "cpu"
        if fast:  # rows that cannot be among the S farthest are pruned (set to -inf)
            # the bfloat16 screen counts the columns nearest the class mean first (the class's core, where most
            # rows find their K neighbours: at n = 5,000 it screens ~20% faster than in storage order)
            order = None if search.Z_bf is None else torch.argsort(Zc @ Zc.mean(0), descending=True)
            approx = search.top_kth_d2(Zc, kq, S, tol, _block_rows(n, rows_per_chunk), order=order).float().cpu()
        else:
            approx = torch.empty(n)
            for a in range(0, n, rows_per_chunk):
                approx[a:a + rows_per_chunk] = (2.0 - 2.0 * search.kth_sim(Zc[a:a + rows_per_chunk], kq)).float().cpu()

        def exact_boundary(_rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
            return _exact_kth_d2(Z[cols], Z64, z2, K, exclude=None if ref else cols)

        bidx, bd2 = _select_top(approx[None, :], S, tol, exact_boundary)
        boundary_index, boundary_d2 = bidx[0], bd2[0]
        Bpts = Zc[boundary_index]  # (S, D)

        out = torch.empty(R, S, m, D, dtype=torch.float32)
        centers = torch.empty(R, S, dtype=torch.long)
        kept_index = torch.empty(R, S, m, dtype=torch.long)
        kept_d2 = torch.empty(R, S, m, dtype=torch.float64)
        if fast and not ref:
            centers[:] = boundary_index
            _farthest_candidates(search, generator, Bpts, Z64, z2, K, N, m, R, sigma, tol,
                                 _block_rows(n, rows_per_chunk), out, kept_index, kept_d2)
        else:
            bpc = max(1, rows_per_chunk // N)  # boundary points per chunk
            buf = None if ref else torch.empty(min(bpc, S), N, D, device=noise_dev)
            for r in range(R):
                if not ref:
                    centers[r] = boundary_index
                    for a in range(0, S, bpc):
                        g = min(bpc, S - a)
                        eps = buf[:g]
                        for j in range(g):  # fresh noise per boundary point, fixed draw order
                            torch.randn((N, D), generator=generator, out=eps[j])
                        cand = _candidates(Bpts[a:a + g], eps.to(compute), sigma, inplace=True)  # (g, N, D)
                        flat = cand.reshape(g * N, D)
                        approx = (2.0 - 2.0 * search.kth_sim(flat, K)).float().cpu().reshape(g, N)

                        def exact_cand(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
                            return _exact_kth_d2(cand[rows.to(compute), cols.to(compute)], Z64, z2, K)

                        sel, d2 = _select_top(approx, m, tol, exact_cand)
                        kept_index[r, a:a + g] = sel
                        kept_d2[r, a:a + g] = d2
                        gi = torch.arange(g)[:, None].expand(g, m).to(compute)
                        out[r, a:a + g] = cand[gi, sel.to(compute)].float().cpu()
                else:
                    # The authors' loop: permuted pool, one shared noise draw, scrambled selection.
                    perm = torch.randperm(S, generator=generator, device=noise_dev).cpu()
                    order = boundary_index[perm]
                    centers[r] = order
                    eps = torch.randn((N, D), generator=generator, device=noise_dev).to(compute)
                    Bo = Zc[order]
                    flat_scores = torch.empty(S, N)
                    for a in range(0, S, bpc):
                        g = min(bpc, S - a)
                        cand = _candidates(Bo[a:a + g], eps[None].expand(g, N, D), sigma)
                        sims = search.kth_sim(cand.reshape(g * N, D), K)
                        flat_scores[a:a + g] = (2.0 - 2.0 * sims).float().cpu().reshape(g, N)
                    # flat position p = block*N + row; view(N, S): column j holds positions t*S + j.
                    scr = flat_scores.reshape(-1).view(N, S).t()  # (S, N): [j, t] = flat[t*S + j]

                    def exact_scr(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
                        pos = cols * S + rows
                        blk, rr = pos // N, pos % N
                        v = _candidates(Bo[blk.to(compute)], eps[rr.to(compute)][:, None, :], sigma)[:, 0]
                        return _exact_kth_d2(v, Z64, z2, K)

                    sel, d2 = _select_top(scr, m, tol, exact_scr)  # sel[j] = rows chosen in column j
                    kept_index[r] = sel
                    kept_d2[r] = d2
                    blocks = torch.arange(S)[:, None].expand(S, m)
                    # the authors return point j*N + row: block j's candidate `row`, not the one scored
                    v = _candidates(Bo[blocks.reshape(-1).to(compute)], eps[sel.reshape(-1).to(compute)][:, None, :],
                                    sigma)
                    out[r] = v[:, 0].float().cpu().reshape(S, m, D)

    vectors = out.reshape(R * S * m, D)
    if cfg.rescale_norm is not None:
        vectors = vectors * cfg.rescale_norm
    if not return_info:
        return vectors
    return ClassSample(
        vectors=vectors, K=K, boundary_index=boundary_index, boundary_dk=boundary_d2.sqrt(),
        centers=centers, kept_index=kept_index, kept_dk=kept_d2.sqrt(),
    )


# --------------------------------------------------------------------------------------------
# the C-OOD criterion as a test for any query
# --------------------------------------------------------------------------------------------
class ClassBoundary:
    """The boundary criterion of the sampler, usable on any vectors (e.g. teacher features of
    candidate outlier IMAGES, :mod:`oaml.outliers.images`).

    On the L2-normalised class features ``Z``: ``radius`` is the class boundary's d_K, the smallest
    K-th neighbour distance among the class's ``S`` boundary points (its S largest in-class d_K,
    the point itself excluded), i.e. the d_K beyond which the sampler's boundary begins.
    :meth:`kth_distance` gives the d_K of query rows against ``Z``; a query with
    ``kth_distance > radius`` lies farther from the class than its boundary points do. Distances
    come from the float32 search (no float64 rescoring): fine for a threshold, not for a
    bit-exact ranking.
    """

    def __init__(self, Z: torch.Tensor, cfg: KNNSamplerConfig | None = None, label: str = "the class"):
        cfg = cfg or KNNSamplerConfig()
        Z = _normalise_class(Z)
        self.K = _check_class(Z.shape[0], cfg, label, log_clamp=False)
        self.search, self.device = _make_search(Z, cfg)
        with _full_fp32():
            own = self._d(Z, min(self.K + 1, Z.shape[0]))  # K-th neighbour with the point itself excluded
        self.radius = float(torch.topk(own, cfg.S).values[-1])

    def _d(self, Q: torch.Tensor, k: int) -> torch.Tensor:
        return (2.0 - 2.0 * self.search.kth_sim(Q.to(self.device), k)).clamp_min(0).sqrt().float().cpu()

    def kth_distance(self, Q: torch.Tensor) -> torch.Tensor:
        """(n,) Euclidean d_K of the (normalised) rows of ``Q`` against the class."""
        with _full_fp32():
            return self._d(_normalise_class(Q), self.K)


# --------------------------------------------------------------------------------------------
# whole bank
# --------------------------------------------------------------------------------------------
def class_seed(seed: int, c: int, stream: int = 0) -> int:
    """Seed of class ``c``'s generator (stream 0: noise; 1: feature subset), from ``(seed, c)`` only."""
    entropy = [int(seed), abs(int(c)), int(c < 0), int(stream)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def _source_fingerprint(bank: Bank) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([bank.kind, bank.dim, len(bank)]).encode())
    for s in bank.manifest["shards"]:
        h.update(str(s.get("sha256")).encode())
    return h.hexdigest()


def sample_outliers(id_bank: Bank | str | Path, out_path: str | Path, cfg: KNNSamplerConfig | None = None,
                    progress: bool = True, resume: bool = True, overwrite: bool = False,
                    shard_size: int | None = None) -> Bank:
    """Sample C-OOD vectors for every class of ``id_bank`` and write them as a ``kind="cood"`` bank.

    Classes are processed one at a time, reading only that class from the (memory-mapped) ID
    bank, so memory does not grow with the number of classes. Class ``c`` uses generators seeded
    from ``(cfg.seed, c)``; an interrupted run (whole shards are on disk) resumes with
    ``resume=True`` and produces exactly the bank an uninterrupted run would.
    ``shard_size``: rows per shard (None: whole classes, about 32k rows per shard).
    """
    cfg = cfg or KNNSamplerConfig()
    cfg.check()
    src = id_bank if isinstance(id_bank, Bank) else Bank.open(id_bank)
    if src.kind in ("cood", "dood"):
        raise BankError(f"{src.path} is a {src.kind!r} bank; k-NN sampling needs an ID feature bank")
    classes = [int(c) for c in src.classes]
    if not classes:
        raise ConfigError(f"ID bank {src.path} holds no vectors")
    per = cfg.per_class
    # Every class is checked before anything is written.
    counts = np.bincount(np.searchsorted(classes, src.labels), minlength=len(classes))
    used = [int(n) if cfg.features_per_class is None else min(int(n), cfg.features_per_class) for n in counts]
    clamped = [c for c, n in zip(classes, used) if _check_class(n, cfg, f"class {c}", log_clamp=False) < cfg.K]
    if clamped:
        log.info("K=%d clamped to n_c-1 for %d of %d classes (smallest class: %d vectors used)", cfg.K,
                 len(clamped), len(classes), min(used))
    if shard_size is None:
        shard_size = per * max(1, SHARD_TARGET_ROWS // per)
    out_path = Path(out_path)
    src_meta = src.meta
    meta = {
        "sampler": "knn-boundary",
        "config": cfg.result_settings(),
        "seed": cfg.seed,
        "per_class": per,
        "classes": classes,
        "source_bank": str(Path(src.path).resolve()),
        "source_kind": src.kind,
        "source_count": len(src),
        "source_fingerprint": _source_fingerprint(src),
        "source_meta": src_meta,
        "teacher": src_meta.get("teacher"),
        "dataset": src_meta.get("dataset"),
    }
    if resume and not overwrite and (out_path / "manifest.json").is_file():
        try:
            done = Bank.open(out_path)
        except BankError:
            done = None
        if done is not None and done.kind == "cood" and done.dim == src.dim and \
                done.meta == json.loads(json.dumps(meta, default=str)):
            log.info("C-OOD bank %s is already complete with these settings; nothing to do", out_path)
            return done
    check_writable(out_path, need_bytes=len(classes) * per * (4 * src.dim + 8))  # before any sampling
    writer = BankWriter(out_path, "cood", src.dim, meta, shard_size=shard_size, resume=resume, overwrite=overwrite)
    done_classes, skip = divmod(writer.written, per)
    if writer.written:
        log.info("resuming %s: %d rows on disk (%d whole classes)", out_path, writer.written, done_classes)
    backend, device, why = _resolve(cfg)
    log.info("k-NN sampler: %d classes, backend %s (%s), device %s, K=%d S=%d N=%d sigma=%g (noise std %.4g at "
             "D=%d) m=%d R=%d -> %d vectors per class%s", len(classes), backend, why, device, cfg.K, cfg.S, cfg.N,
             cfg.sigma, cfg.noise_std(src.dim), src.dim, cfg.m, cfg.R, per, "; REFERENCE-BUGS MODE (ablation/reproduction only)" if cfg.reference_bugs else "")
    from ..utils.progress import progress_bar

    bar = progress_bar(total=len(classes), initial=done_classes, disable=not progress, desc="C-OOD", unit="class")
    for j, c in enumerate(classes):
        if j < done_classes:
            continue
        Z = src.class_vectors(c, limit=cfg.features_per_class, seed=class_seed(cfg.seed, c, 1))
        g_dev = "cpu" if cfg.noise_device == "cpu" else device
        gen = torch.Generator(device=g_dev).manual_seed(class_seed(cfg.seed, c, 0))
        v = sample_class_outliers(torch.from_numpy(Z), cfg, gen, label=f"class {c}", _log_clamp=False)
        labels = np.full(v.shape[0], c, dtype=np.int64)
        if j == done_classes and skip:
            v, labels = v[skip:], labels[skip:]
        writer.add(v, labels)
        bar.update(1)
    bar.close()
    return writer.close()
