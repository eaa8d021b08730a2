"""Outlier-exposure style losses for the baselines that share OAML's training loop.

Every function returns a scalar (batch mean) to be *minimised*; the method weights (OE 0.5, energy
0.1, VOS 0.1, ...) belong to the method's config, not here. Energies follow Liu et al.:
E(x) = -T * logsumexp(z / T) (lower = more in-distribution), while OOD *scores* elsewhere in oaml
are higher = more ID.

- :func:`oe_loss` (Hendrycks et al., "Deep Anomaly Detection with Outlier Exposure", ICLR 2019)::

      L_OE = mean_i [ -(1/C) sum_k log softmax(z_i)_k ] = mean_i [ logsumexp(z_i) - mean_k z_ik ]

  the cross-entropy from the uniform distribution to the prediction on outliers. Note
  CE(U, p) = KL(U || p) + log C, so its minimum is log C, reached by uniform predictions.

- :func:`energy_margin_loss` (Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS
  2020, their code defaults m_in = -25, m_out = -7, T = 1)::

      L = mean_in relu(E_in - m_in)^2 + mean_out relu(m_out - E_out)^2

- :class:`LogitNormLoss` (Wei et al., "Mitigating Neural Network Overconfidence with Logit
  Normalization", ICML 2022, tau = 0.04)::

      L = CE( z / (tau * (||z||_2 + 1e-7)), y )

- :func:`vos_uncertainty_loss` (Du et al., "VOS: Learning What You Don't Know by Virtual Outlier
  Synthesis", ICLR 2022), exactly as their code: a learnable per-class weighted energy
  s(z) = log sum_k relu(w_k) exp(z_k) (``weight_energy``, w ~ U(0, 1) at init), then a logistic
  regression ``nn.Linear(1, 2)`` on the scalar s with cross-entropy, label 1 for ID logits and
  label 0 for the virtual outliers' logits (the classifier head applied to the sampled features)::

      L = CE( LR([s(z_in); s(z_out)]), [1,...,1; 0,...,0] )      (mean over all rows)

- :func:`mixoe_loss` (Zhang et al., "Mixture Outlier Exposure", WACV 2023): the model sees
  lam * x_in + (1 - lam) * x_out (mixup, or cutmix with area lam) and is trained with the soft
  target t = lam * onehot(y) + (1 - lam) * uniform::

      L = mean_i [ -sum_k t_ik log softmax(z_i)_k ]

- :class:`ClassFeatureQueue`: per-class FIFO of penultimate features (VOS and NPOS), with
  :meth:`ClassFeatureQueue.sample_virtual_outliers` = VOS synthesis: class means + one shared
  covariance (biased estimate + 1e-4 I), ``num`` Gaussian samples per class, keep the ``select``
  least likely ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError, ShapeError

__all__ = [
    "energy",
    "oe_loss",
    "energy_margin_loss",
    "LogitNormLoss",
    "weighted_energy",
    "vos_uncertainty_loss",
    "VOSUncertaintyLoss",
    "mixoe_targets",
    "mixoe_loss",
    "ClassFeatureQueue",
]


def _check_logits(z: torch.Tensor, what: str) -> None:
    if z.dim() != 2 or z.shape[1] < 2:
        raise ShapeError(f"{what}: expected (batch, classes>=2) logits, got {tuple(z.shape)}")


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Free energy E = -T * logsumexp(z / T), per row (lower = more in-distribution)."""
    return -temperature * torch.logsumexp(logits / temperature, dim=-1)


def oe_loss(logits_out: torch.Tensor) -> torch.Tensor:
    """Cross-entropy from the uniform distribution on outlier logits (Hendrycks et al.)."""
    _check_logits(logits_out, "oe_loss")
    return (torch.logsumexp(logits_out, dim=1) - logits_out.mean(dim=1)).mean()


def energy_margin_loss(
    logits_in: torch.Tensor,
    logits_out: torch.Tensor,
    m_in: float = -25.0,
    m_out: float = -7.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Squared-hinge energy margins (Liu et al.): ID energies below m_in, outliers above m_out."""
    _check_logits(logits_in, "energy_margin_loss (ID)")
    _check_logits(logits_out, "energy_margin_loss (outliers)")
    if not m_in < m_out:
        raise ConfigError(f"energy_margin_loss: need m_in < m_out, got m_in={m_in}, m_out={m_out}")
    e_in = energy(logits_in, temperature)
    e_out = energy(logits_out, temperature)
    return F.relu(e_in - m_in).pow(2).mean() + F.relu(m_out - e_out).pow(2).mean()


class LogitNormLoss(nn.Module):
    """Cross-entropy on L2-normalised logits divided by ``tau`` (Wei et al., default 0.04)."""

    def __init__(self, tau: float = 0.04, eps: float = 1e-7):
        super().__init__()
        if not tau > 0:
            raise ConfigError(f"LogitNormLoss: tau must be > 0, got {tau}")
        self.tau, self.eps = tau, eps

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _check_logits(logits, "LogitNormLoss")
        norms = torch.linalg.vector_norm(logits, ord=2, dim=-1, keepdim=True) + self.eps
        return F.cross_entropy(logits / norms / self.tau, targets)


def weighted_energy(logits: torch.Tensor, weight_energy: torch.Tensor) -> torch.Tensor:
    """VOS's s(z) = log sum_k relu(w_k) exp(z_k), computed stably; ``weight_energy`` has C entries.

    (The negative of a per-class weighted free energy; higher = more ID.)
    """
    _check_logits(logits, "weighted_energy")
    w = weight_energy.reshape(-1)
    if w.numel() != logits.shape[1]:
        raise ShapeError(f"weight_energy has {w.numel()} entries for {logits.shape[1]} classes")
    m = logits.max(dim=1, keepdim=True).values.detach()
    return m.squeeze(1) + torch.log((F.relu(w) * torch.exp(logits - m)).sum(dim=1))


def vos_uncertainty_loss(
    logits_in: torch.Tensor,
    logits_out: torch.Tensor,
    weight_energy: torch.Tensor,
    logistic_regression: nn.Module,
) -> torch.Tensor:
    """VOS uncertainty loss (see module doc). ``logistic_regression`` maps (N, 1) -> (N, 2)."""
    s_in = weighted_energy(logits_in, weight_energy)
    s_out = weighted_energy(logits_out, weight_energy)
    s = torch.cat([s_in, s_out]).unsqueeze(1)
    target = torch.cat(
        [
            torch.ones(s_in.shape[0], dtype=torch.long, device=s.device),
            torch.zeros(s_out.shape[0], dtype=torch.long, device=s.device),
        ]
    )
    return F.cross_entropy(logistic_regression(s), target)


class VOSUncertaintyLoss(nn.Module):
    """Holds VOS's learnable parts: ``weight_energy`` (C,), init U(0, 1), and ``logistic_regression``
    = ``nn.Linear(1, 2)``. Both are trained by the student's optimiser."""

    def __init__(self, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"VOSUncertaintyLoss: num_classes must be >= 2, got {num_classes}")
        self.weight_energy = nn.Parameter(torch.rand(num_classes))
        self.logistic_regression = nn.Linear(1, 2)

    def forward(self, logits_in: torch.Tensor, logits_out: torch.Tensor) -> torch.Tensor:
        return vos_uncertainty_loss(logits_in, logits_out, self.weight_energy, self.logistic_regression)


def mixoe_targets(labels: torch.Tensor, num_classes: int, lam: float | torch.Tensor) -> torch.Tensor:
    """Soft targets lam * onehot(y) + (1 - lam) / C; ``lam`` a scalar or one value per sample."""
    onehot = F.one_hot(labels.long(), num_classes).to(torch.float32)
    lam_t = torch.as_tensor(lam, dtype=onehot.dtype, device=onehot.device)
    if lam_t.dim() == 1:
        if lam_t.shape[0] != labels.shape[0]:
            raise ShapeError(f"mixoe: {lam_t.shape[0]} mixing coefficients for {labels.shape[0]} samples")
        lam_t = lam_t.unsqueeze(1)
    elif lam_t.dim() != 0:
        raise ShapeError(f"mixoe: lam must be a scalar or (batch,), got shape {tuple(lam_t.shape)}")
    if bool(((lam_t < 0) | (lam_t > 1)).any()):
        raise ConfigError("mixoe: mixing coefficients must lie in [0, 1]")
    return lam_t * onehot + (1.0 - lam_t) / num_classes


def mixoe_loss(logits_mixed: torch.Tensor, labels: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """Soft-target cross-entropy of the mixed inputs' logits against :func:`mixoe_targets`."""
    _check_logits(logits_mixed, "mixoe_loss")
    if labels.shape[0] != logits_mixed.shape[0]:
        raise ShapeError(f"mixoe_loss: {labels.shape[0]} labels for {logits_mixed.shape[0]} rows")
    t = mixoe_targets(labels, logits_mixed.shape[1], lam).to(logits_mixed.dtype)
    return -(t * F.log_softmax(logits_mixed, dim=1)).sum(dim=1).mean()


class ClassFeatureQueue(nn.Module):
    """Per-class ring buffer of features: ``data`` (C, size, D), ``count`` (C,), ``ptr`` (C,).

    :meth:`push` writes a whole batch with index arithmetic (no per-sample Python loop); the result
    is the same as pushing the samples one by one in batch order (the newest ``size`` per class
    survive). Features are stored detached. Buffers move with ``.to()`` and are checkpointed.
    """

    def __init__(self, num_classes: int, dim: int, size: int):
        super().__init__()
        if num_classes < 1 or dim < 1 or size < 1:
            raise ConfigError(f"ClassFeatureQueue: bad sizes num_classes={num_classes}, dim={dim}, size={size}")
        self.num_classes, self.dim, self.size = num_classes, dim, size
        self.register_buffer("data", torch.zeros(num_classes, size, dim))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))

    @property
    def is_full(self) -> bool:
        return bool((self.count == self.size).all())

    @torch.no_grad()
    def push(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ShapeError(f"ClassFeatureQueue.push: features must be (N, {self.dim}), got {tuple(features.shape)}")
        labels = labels.to(self.data.device).long().reshape(-1)
        if labels.shape[0] != features.shape[0]:
            raise ShapeError(f"ClassFeatureQueue.push: {labels.shape[0]} labels for {features.shape[0]} features")
        if labels.numel() == 0:
            return
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise ShapeError(f"ClassFeatureQueue.push: labels must lie in [0, {self.num_classes})")
        feats = features.detach().to(self.data.device, self.data.dtype)
        order = torch.argsort(labels, stable=True)
        sl, sf = labels[order], feats[order]
        n_c = torch.bincount(labels, minlength=self.num_classes)
        start = torch.cumsum(n_c, 0) - n_c
        rank = torch.arange(sl.shape[0], device=sl.device) - start[sl]  # order within its class
        keep = rank >= (n_c[sl] - self.size)  # only the newest `size` of a class survive
        sl, sf, rank = sl[keep], sf[keep], rank[keep]
        pos = (self.ptr[sl] + rank) % self.size  # distinct slots within each class
        self.data[sl, pos] = sf
        self.ptr.copy_((self.ptr + n_c) % self.size)
        self.count.copy_(torch.clamp(self.count + n_c, max=self.size))

    def features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored features (M, D) with their class labels (M,) (used by NPOS)."""
        mask = torch.arange(self.size, device=self.data.device).unsqueeze(0) < self.count.unsqueeze(1)
        labels = torch.arange(self.num_classes, device=self.data.device).unsqueeze(1).expand_as(mask)
        return self.data[mask], labels[mask]

    @torch.no_grad()
    def fit_gaussian(self, jitter: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
        """Class means (C, D) and the shared covariance (D, D) = mean of centred outer products
        over all stored features (biased, as VOS) + ``jitter`` * I. Every class needs >= 1 entry."""
        if bool((self.count == 0).any()):
            empty = torch.nonzero(self.count == 0).flatten().tolist()
            raise DataError(f"ClassFeatureQueue: no features stored yet for class(es) {empty}")
        mask = (torch.arange(self.size, device=self.data.device).unsqueeze(0) < self.count.unsqueeze(1))
        maskf = mask.unsqueeze(2).to(torch.float64)
        data = self.data.to(torch.float64)
        means = (data * maskf).sum(1) / self.count.unsqueeze(1).to(torch.float64)
        centred = (data - means.unsqueeze(1)) * maskf
        flat = centred.reshape(-1, self.dim)
        cov = flat.T @ flat / float(self.count.sum())
        cov = cov + jitter * torch.eye(self.dim, dtype=torch.float64, device=cov.device)
        return means.to(self.data.dtype), cov.to(self.data.dtype)

    @torch.no_grad()
    def sample_virtual_outliers(
        self,
        num: int = 10000,
        select: int = 1,
        generator: torch.Generator | None = None,
        allow_partial: bool = False,
        jitter: float = 1e-4,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """VOS synthesis: per class, ``num`` draws from N(mu_c, Sigma), keep the ``select`` with the
        lowest likelihood. Returns (C * select, D) outliers and their (C * select,) class labels.

        With Sigma = L L^T, a draw is mu_c + L e, e ~ N(0, I), and its log-density is
        const - ||e||^2 / 2, so "lowest likelihood" = largest ||e||: identical to VOS's
        ``MultivariateNormal.rsample`` + ``log_prob`` + top-k, without building the density.
        VOS samples only once every class queue is full; ``allow_partial=True`` lifts that.
        VOS defaults: num = 10000, select = 1.
        """
        if not 1 <= select <= num:
            raise ConfigError(f"sample_virtual_outliers: need 1 <= select <= num, got select={select}, num={num}")
        if not allow_partial and not self.is_full:
            raise DataError(
                f"ClassFeatureQueue is not full yet (counts min {int(self.count.min())} of {self.size}); "
                "VOS samples only from full queues (pass allow_partial=True to override)"
            )
        means, cov = self.fit_gaussian(jitter)
        chol = torch.linalg.cholesky(cov.to(torch.float64)).to(means.dtype)
        c, d = self.num_classes, self.dim
        per_chunk = max(1, (1 << 24) // max(1, num * d))  # bound memory of the draws
        picked = []
        for c0 in range(0, c, per_chunk):
            c1 = min(c, c0 + per_chunk)
            eps = torch.randn(c1 - c0, num, d, generator=generator, device=means.device, dtype=means.dtype)
            sq = (eps * eps).sum(-1)  # (chunk, num)
            top = torch.topk(sq, select, dim=1).indices  # least likely
            picked.append(torch.gather(eps, 1, top.unsqueeze(-1).expand(-1, -1, d)))
        eps_sel = torch.cat(picked, 0)  # (C, select, D)
        samples = means.unsqueeze(1) + eps_sel @ chol.T
        labels = torch.arange(c, device=means.device).repeat_interleave(select)
        return samples.reshape(c * select, d), labels

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, size={self.size}"

