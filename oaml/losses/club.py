"""CLUB mutual-information upper bound for the OAML MI terms (weights ``b = 0.1`` for C-OOD and
``g = 0.2`` for D-OOD; paper eq. 1, SPEC section 1 step 4).

CLUB (Cheng et al., "CLUB: A Contrastive Log-ratio Upper Bound of Mutual Information", ICML 2020)
with a variational q(y | x) = N(mu(x), diag(exp(logvar(x)))), both heads small MLPs::

    I_hat(x; y) = mean_i log q(y_i | x_i)  -  mean_i mean_j log q(y_j | x_i)
                  \\____ positive pairs ___/    \\______ all pairs (j = i included) ___/

x = the student's ID feature f_S (B x D_x), y = the outlier paired with each ID sample (C-OOD or
D-OOD, B x D_y; optionally average-pooled to ``y_pool_dim``). The student *minimises* the bound,
pushing its ID features to carry no information about their paired outliers. The value is in nats
and is a direction-free number (lower = less dependence); it can be slightly negative when q is
imperfect.

Negative term in O(B * D) memory (never B x B x D)::

    mean_j log q(y_j | x_i) = -1/2 sum_d [ (mean_j (y_jd - mu_id)^2) / var_id + logvar_id + log 2 pi ]
    mean_j (y_jd - mu_id)^2 = (mean_j y_jd^2 - 2 mu_id mean_j y_jd + mu_id^2)
                            = Var_j(y_jd) + (mean_j y_jd - mu_id)^2        (the form used; it avoids
                                                                            cancellation)

The ``logvar`` and ``log 2 pi`` parts are identical in both terms and cancel in I_hat, so the bound
is the same with or without the Gaussian normaliser (the authors dropped it); the likelihood used
to *fit* q keeps it.

Modes
-----
``fitted`` (default, the method done right): q(y | x) models the outlier given the student feature.
    q is fitted by maximum likelihood on the positive pairs with its own Adam optimiser on detached
    inputs (:meth:`CLUB.estimator_step`, call it every training step before the student's
    backward). :meth:`CLUB.bound` evaluates I_hat with q's parameters held fixed: gradients reach
    the student only through x; q's parameters and y receive none. q's parameters must NOT be given
    to the student's optimiser (:meth:`CLUB.student_parameters` returns none).

``reference`` (the authors' code, for reproduction and ablation only): q models q(f_S | outlier),
    i.e. the roles are swapped (q takes the pooled outlier as input and predicts the student
    feature), q is never fitted by likelihood, and the bound is minimised *jointly* with the
    student: q's parameters receive the bound's gradient and are updated by the student's
    optimiser (:meth:`CLUB.student_parameters` returns them). The authors paired ID sample i with a
    random outlier i (``pairing="random"``). Why its expectation is zero: the outliers are drawn
    independently of the ID batch, so the matching i <-> pi(i) is a uniformly random permutation;
    for every i, E_pi[log q(x_i | y_pi(i))] = mean_j log q(x_i | y_j), which is exactly the negative
    term (it averages over all j, j = i included). Hence E[I_hat] = 0 for any q, and the expected
    gradient w.r.t. f_S and q's parameters is zero too: the term only adds zero-mean noise. The
    authors also bounded logvar to [-1, 1] with a Tanh; ``logvar_bounds`` defaults to that in
    this mode. Their ``DEEP_CLUB`` used a 16384 -> 8192 -> 4096 -> 256 -> D mean network (~170M
    parameters); here both q heads are one-hidden-layer MLPs and the D-OOD vector can be pooled.
    Authors' ``CLUB(x_dim, y_dim, h)`` has hidden width h/2, i.e. ``hidden = h // 2`` here.

Defaults: hidden 512, fitted mode, Adam lr 1e-3, 1 estimator step per call, logvar bounds
(-10, 10) in fitted mode.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..errors import BankError, ConfigError, ShapeError
from ..utils.distributed import average_gradients

Mode = Literal["fitted", "reference"]
Pairing = Literal["class", "random"]

__all__ = [
    "CLUB",
    "GaussianHead",
    "OutlierPairer",
    "pair_outliers",
    "club_negative_term",
    "gaussian_log_likelihood",
    "pool_outliers",
]

_LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_likelihood(mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row log N(y_i; mu_i, diag(exp(logvar_i))), summed over dimensions: shape (B,)."""
    return -0.5 * (((y - mu) ** 2) * torch.exp(-logvar) + logvar + _LOG_2PI).sum(dim=-1)


def club_negative_term(mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``mean_j log q(y_j | x_i)`` for every i, shape (B,), in O(B * D) memory.

    Uses mean_j (y_jd - mu_id)^2 = Var_j(y_jd) + (mean_j y_jd - mu_id)^2 (population variance).
    """
    if mu.shape != logvar.shape or mu.dim() != 2 or y.dim() != 2 or y.shape[1] != mu.shape[1]:
        raise ShapeError(
            f"club_negative_term: mu, logvar (B, D) and y (N, D) expected, got "
            f"{tuple(mu.shape)}, {tuple(logvar.shape)}, {tuple(y.shape)}"
        )
    y_mean = y.mean(dim=0, keepdim=True)  # (1, D)
    y_var = ((y - y_mean) ** 2).mean(dim=0, keepdim=True)  # (1, D)
    sq = y_var + (y_mean - mu) ** 2  # (B, D) = mean_j (y_jd - mu_id)^2
    return -0.5 * (sq * torch.exp(-logvar) + logvar + _LOG_2PI).sum(dim=-1)


def pool_outliers(y: torch.Tensor, pool_dim: int | None) -> torch.Tensor:
    """Flatten outliers to (N, D) and, if ``pool_dim`` is set, average-pool D down to ``pool_dim``.

    Pooling is ``F.adaptive_avg_pool1d`` on the flattened vector: contiguous windows of about
    D / pool_dim entries are averaged (for a flattened 4x64x64 SD latent and pool_dim 512 that is
    windows of 32 neighbouring entries within one channel). Pooling to a larger size is an error.
    """
    y = y.reshape(y.shape[0], -1)
    if pool_dim is None:
        return y
    if pool_dim > y.shape[1]:
        raise ConfigError(f"y_pool_dim={pool_dim} is larger than the outlier dimension {y.shape[1]}")
    if pool_dim == y.shape[1]:
        return y
    return F.adaptive_avg_pool1d(y.unsqueeze(1), pool_dim).squeeze(1)


class GaussianHead(nn.Module):
    """q(t | c) = N(mu(c), diag(exp(logvar(c)))): two MLPs ``in -> hidden -> ReLU -> out``.

    logvar = mid + half * tanh(raw) maps onto (lo, hi) = ``logvar_bounds``; with (-1, 1) this is
    exactly the authors' Tanh-bounded head.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int, logvar_bounds: tuple[float, float]):
        super().__init__()
        lo, hi = float(logvar_bounds[0]), float(logvar_bounds[1])
        if not lo < hi:
            raise ConfigError(f"logvar_bounds must be (low, high) with low < high, got {logvar_bounds}")
        self.lv_mid, self.lv_half = (lo + hi) / 2.0, (hi - lo) / 2.0
        self.mu = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
        self.logvar = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu(c), self.lv_mid + self.lv_half * torch.tanh(self.logvar(c))


class CLUB(nn.Module):
    """CLUB upper bound on I(x; y), x = student ID feature, y = paired outlier. See module doc.

    Args:
        x_dim: student feature width.
        y_dim: flattened outlier width (before pooling).
        hidden: hidden width of the mu and logvar MLPs.
        mode: ``"fitted"`` (default) or ``"reference"`` (authors' behaviour).
        y_pool_dim: if set, outliers are average-pooled to this width first (:func:`pool_outliers`).
        lr: Adam learning rate of q's own optimiser (fitted mode).
        steps: likelihood updates per :meth:`estimator_step` call (fitted mode).
        logvar_bounds: range of q's log-variance; default (-10, 10) fitted, (-1, 1) reference.

    Per training step, fitted mode::

        ll = club.estimator_step(f_S, y)      # q's own Adam, detached inputs
        mi = club.bound(f_S, y)               # grad flows to f_S only
        loss = ... + b * mi

    reference mode: ``mi = club.bound(f_S, y)`` only, and ``club.student_parameters()`` must be in
    the student's optimiser.
    """

    def __init__(
        self,
        x_dim: int,
        y_dim: int,
        hidden: int = 512,
        mode: Mode = "fitted",
        y_pool_dim: int | None = None,
        lr: float = 1e-3,
        steps: int = 1,
        logvar_bounds: tuple[float, float] | None = None,
    ):
        super().__init__()
        if mode not in ("fitted", "reference"):
            raise ConfigError(f"CLUB mode must be 'fitted' or 'reference', got {mode!r}")
        if x_dim < 1 or y_dim < 1 or hidden < 1:
            raise ConfigError(f"CLUB: x_dim, y_dim, hidden must be >= 1, got {x_dim}, {y_dim}, {hidden}")
        if y_pool_dim is not None and not 1 <= y_pool_dim <= y_dim:
            raise ConfigError(f"CLUB: y_pool_dim must be in [1, y_dim={y_dim}], got {y_pool_dim}")
        if steps < 1:
            raise ConfigError(f"CLUB: steps must be >= 1, got {steps}")
        if not lr > 0:
            raise ConfigError(f"CLUB: lr must be > 0, got {lr}")
        self.mode = mode
        self.x_dim, self.y_dim, self.y_pool_dim = x_dim, y_dim, y_pool_dim
        self.lr, self.steps = lr, steps
        y_eff = y_dim if y_pool_dim is None else y_pool_dim
        if logvar_bounds is None:
            logvar_bounds = (-10.0, 10.0) if mode == "fitted" else (-1.0, 1.0)
        if mode == "fitted":
            self.q = GaussianHead(x_dim, y_eff, hidden, logvar_bounds)  # q(y | x)
        else:
            self.q = GaussianHead(y_eff, x_dim, hidden, logvar_bounds)  # authors: q(f_S | outlier)
        self._optimizer: torch.optim.Optimizer | None = None
        self.register_buffer("estimator_updates", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ helpers
    def _prepare(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 2 or x.shape[1] != self.x_dim:
            raise ShapeError(f"CLUB: x must be (batch, {self.x_dim}), got {tuple(x.shape)}")
        y = y.reshape(y.shape[0], -1)
        if y.shape[1] != self.y_dim:
            raise ShapeError(f"CLUB: y must flatten to (batch, {self.y_dim}), got {tuple(y.shape)}")
        if y.shape[0] != x.shape[0]:
            raise ShapeError(
                f"CLUB pairs x_i with y_i: got {x.shape[0]} features and {y.shape[0]} outliers"
            )
        if x.shape[0] < 2:
            raise ShapeError("CLUB needs a batch of at least 2 pairs")
        # Outliers are data, never trained through this term.
        y = pool_outliers(y.detach().to(dtype=x.dtype), self.y_pool_dim)
        return x, y

    def student_parameters(self) -> list[nn.Parameter]:
        """Parameters the *student's* optimiser must update: none in fitted mode, q's in reference."""
        return [] if self.mode == "fitted" else list(self.q.parameters())

    def estimator_parameters(self) -> list[nn.Parameter]:
        """Parameters fitted by q's own optimiser (fitted mode); none in reference mode."""
        return list(self.q.parameters()) if self.mode == "fitted" else []

    @property
    def estimator_optimizer(self) -> torch.optim.Optimizer:
        """q's own Adam (fitted mode). Created on first use, on whatever device q then lives."""
        if self.mode != "fitted":
            raise ConfigError("CLUB in 'reference' mode has no estimator optimiser (q is trained jointly)")
        if self._optimizer is None:
            self._optimizer = torch.optim.Adam(self.q.parameters(), lr=self.lr)
        return self._optimizer

    # ------------------------------------------------------------------ API
    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean over pairs of log q(target_i | cond_i) (summed over dims), with gradient to q.

        fitted: log q(y_i | x_i); reference: log q(x_i | y_i).
        """
        x, y = self._prepare(x, y)
        cond, target = (x, y) if self.mode == "fitted" else (y, x)
        mu, logvar = self.q(cond)
        return gaussian_log_likelihood(mu, logvar, target).mean()

    def estimator_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Fit q by maximum likelihood on the positive pairs: ``steps`` Adam updates.

        Inputs are detached (no gradient reaches the student or the outliers), and q's ``.grad``
        are cleared afterwards. Returns the mean
        log-likelihood (nats per pair) measured at the last step, before that step's update.
        Fitted mode only.
        """
        if self.mode != "fitted":
            raise ConfigError(
                "CLUB.estimator_step is for mode='fitted'; in 'reference' mode q is never fitted by "
                "likelihood (it is trained jointly with the student through the bound)"
            )
        return float(self.fit_step(x, y))

    def fit_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """:meth:`estimator_step` returning the log-likelihood as a 0-d tensor (no device sync)."""
        if self.mode != "fitted":
            raise ConfigError("CLUB.fit_step is for mode='fitted'")
        opt = self.estimator_optimizer
        x = x.detach()
        y = y.detach()
        ll_value = torch.tensor(float("nan"))
        with torch.enable_grad():
            for _ in range(self.steps):
                opt.zero_grad(set_to_none=True)
                ll = self.log_likelihood(x, y)
                (-ll).backward()
                average_gradients(self.estimator_parameters())  # under torchrun: one q for all processes
                opt.step()
                ll_value = ll.detach()
        opt.zero_grad(set_to_none=True)  # leave no likelihood gradient behind on q's parameters
        self.estimator_updates += self.steps
        return ll_value

    def bound(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """I_hat(x; y) (scalar, nats). fitted: q frozen, grad only via x. reference: grad to x and q."""
        x, y = self._prepare(x, y)
        if self.mode == "fitted":
            frozen = {k: v.detach() for k, v in self.q.named_parameters()}
            frozen.update(dict(self.q.named_buffers()))
            mu, logvar = functional_call(self.q, frozen, (x,))
            target = y
        else:
            mu, logvar = self.q(y)
            target = x
        positive = gaussian_log_likelihood(mu, logvar, target)  # (B,)
        negative = club_negative_term(mu, logvar, target)  # (B,)
        return (positive - negative).mean()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.bound(x, y)


# ---------------------------------------------------------------------- pairing
class OutlierPairer:
    """Draws, for each ID sample, the index of an outlier in a bank (pairing for the MI terms).

    ``bank_labels`` (N,) holds the class whose boundary each outlier was sampled from. The sort
    of the bank labels is done once here, so a draw costs O(B).

    ``mode="class"``: for sample i an outlier drawn uniformly among those of class ``labels[i]``;
    a class with no outlier in the bank raises :class:`~oaml.errors.BankError`.
    ``mode="random"``: uniform over the whole bank (the authors' pairing).
    """

    def __init__(self, bank_labels: torch.Tensor, num_classes: int | None = None):
        bank_labels = torch.as_tensor(bank_labels)
        if bank_labels.dim() != 1 or bank_labels.numel() == 0:
            raise BankError(f"bank_labels must be a non-empty 1-d tensor, got shape {tuple(bank_labels.shape)}")
        if bank_labels.dtype.is_floating_point or bank_labels.dtype == torch.bool:
            raise BankError(f"bank_labels must be integer class ids, got {bank_labels.dtype}")
        bank_labels = bank_labels.long()
        if int(bank_labels.min()) < 0:
            raise BankError("bank_labels contains negative class ids")
        n_cls = int(bank_labels.max()) + 1
        if num_classes is not None:
            if n_cls > num_classes:
                raise BankError(f"bank_labels holds class {n_cls - 1} but num_classes={num_classes}")
            n_cls = num_classes
        self.num_classes = n_cls
        self.size = bank_labels.numel()
        self.device = bank_labels.device
        self.order = torch.argsort(bank_labels, stable=True)
        self.counts = torch.bincount(bank_labels, minlength=n_cls)
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def __call__(
        self,
        labels: torch.Tensor,
        mode: Pairing = "class",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        if mode not in ("class", "random"):
            raise ConfigError(f"pairing mode must be 'class' or 'random', got {mode!r}")
        labels = torch.as_tensor(labels)
        out_device = labels.device
        labels = labels.to(self.device).long().reshape(-1)
        b = labels.numel()
        if mode == "random":
            idx = torch.randint(0, self.size, (b,), generator=generator, device=self.device)
            return idx.to(out_device)
        if b and int(labels.min()) < 0:
            raise BankError(f"labels must be >= 0, got {int(labels.min())}")
        inside = labels < self.num_classes
        cnt = torch.where(inside, self.counts[labels.clamp(max=self.num_classes - 1)], torch.zeros_like(labels))
        if b and bool((cnt == 0).any()):
            missing = sorted({int(c) for c in labels[cnt == 0].tolist()})
            raise BankError(
                f"pairing='class': the outlier bank has no outliers of class(es) {missing}; "
                "regenerate the bank for every class or use pairing='random'"
            )
        u = torch.rand(b, generator=generator, device=self.device)
        within = torch.clamp((u * cnt).long(), max=cnt - 1) if b else cnt
        idx = self.order[self.starts[labels] + within]
        return idx.to(out_device)


def pair_outliers(
    labels: torch.Tensor,
    bank_labels: torch.Tensor,
    mode: Pairing = "class",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices into an outlier bank, one per ID sample (see :class:`OutlierPairer`).

    Convenience wrapper that sorts ``bank_labels`` on every call; a training loop should build
    one :class:`OutlierPairer` and call it each step.
    """
    return OutlierPairer(bank_labels)(labels, mode=mode, generator=generator)
