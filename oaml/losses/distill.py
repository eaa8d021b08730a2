"""Knowledge-distillation terms of the OAML loss (paper section 4.2, SPEC section 1 step 4).

Logit distillation (weight ``a1 = 4`` in the method)::

    KL_logit = tau^2 * (1/B) sum_b KL( softmax(z_T[b] / tau) || softmax(z_S[b] / tau) )

``direction="forward"`` (default) is the teacher-to-student KL above, which is what the authors'
code computes (``nn.KLDivLoss(reduction="batchmean")(log_softmax(z_S), softmax(z_T))``, tau = 1).
Paper eq. (3) writes the reverse, KL(p_S || p_T); ``direction="reverse"`` gives that one. The
teacher's logits are treated as constants (detached): the teacher is frozen.

Feature distillation through the "domain transfer" network DT (weight ``a2 = 8``)::

    KL_feat = (1/B) sum_b KL( softmax(DT(f_T)[b]) || softmax(f_S[b]) )      (softmax over channels)

DT (:class:`TransferMLP`) maps the teacher width to the student width and is trained together
with the student (its parameters belong in the student's optimiser). As in the authors' code the
target ``DT(f_T)`` is *not* detached, so DT co-adapts with the student. The authors' DT is one
block BatchNorm -> Linear -> ReLU -> BatchNorm; the paper speaks of "a stack of MLP layers", so the
depth is a setting here (default 1 = the authors'). ``direction="reverse"`` again swaps the KL
arguments (the paper's writing, KL(softmax(f_S) || softmax(DT(f_T)))).

Both functions return a scalar tensor (batch mean) that is >= 0 and zero exactly when the two
distributions coincide.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ShapeError

Direction = Literal["forward", "reverse"]

__all__ = ["logit_kd", "feature_kd", "TransferMLP", "kl_between_logits"]


def _check_direction(direction: str) -> None:
    if direction not in ("forward", "reverse"):
        raise ConfigError(
            f"direction must be 'forward' (KL(teacher || student), the authors' code) or "
            f"'reverse' (KL(student || teacher), paper eq. 3); got {direction!r}"
        )


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise ShapeError(
            f"{what}: expected two (batch, channels) tensors of the same shape, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )


def kl_between_logits(target_logits: torch.Tensor, model_logits: torch.Tensor) -> torch.Tensor:
    """Batch mean of KL(softmax(target_logits) || softmax(model_logits)) over the last dimension."""
    log_p = F.log_softmax(target_logits, dim=-1)
    log_q = F.log_softmax(model_logits, dim=-1)
    # sum_k p_k (log p_k - log q_k); p_k log p_k is well defined (0 when p_k underflows to 0).
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    return kl.mean()


def logit_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tau: float = 1.0,
    direction: Direction = "forward",
) -> torch.Tensor:
    """``tau^2 * KL(softmax(z_T/tau) || softmax(z_S/tau))``, batch mean (``direction="forward"``).

    ``direction="reverse"`` gives ``tau^2 * KL(softmax(z_S/tau) || softmax(z_T/tau))`` (paper eq. 3).
    The teacher logits are detached. Defaults: tau = 1 (authors), forward direction (authors).
    """
    _check_direction(direction)
    _check_pair(student_logits, teacher_logits, "logit_kd")
    if not tau > 0:
        raise ConfigError(f"logit_kd: tau must be > 0, got {tau}")
    zs = student_logits / tau
    zt = teacher_logits.detach() / tau
    if direction == "forward":
        kl = kl_between_logits(zt, zs)
    else:
        kl = kl_between_logits(zs, zt)
    return (tau * tau) * kl


def feature_kd(
    student_feat: torch.Tensor,
    transferred_teacher_feat: torch.Tensor,
    direction: Direction = "forward",
) -> torch.Tensor:
    """``KL(softmax(DT(f_T)) || softmax(f_S))`` over feature channels, batch mean.

    ``transferred_teacher_feat`` is ``DT(f_T)`` and is not detached (DT learns through this term,
    as in the authors' code). ``direction="reverse"`` gives ``KL(softmax(f_S) || softmax(DT(f_T)))``.
    """
    _check_direction(direction)
    _check_pair(student_feat, transferred_teacher_feat, "feature_kd")
    if direction == "forward":
        return kl_between_logits(transferred_teacher_feat, student_feat)
    return kl_between_logits(student_feat, transferred_teacher_feat)


class TransferMLP(nn.Module):
    """The "domain transfer" network DT: teacher feature width -> student feature width.

    ``depth`` blocks of ``BatchNorm1d -> Linear -> ReLU -> BatchNorm1d``. Block widths:
    ``in_dim -> hidden -> ... -> hidden -> out_dim`` (``hidden`` defaults to ``out_dim``).
    ``depth=1`` is exactly the authors' ``DT(in_dim, out_dim)``: BN(in) -> Linear(in, out) -> ReLU
    -> BN(out). BatchNorm uses batch statistics in train mode, so it needs batches of >= 2 rows.
    DT's parameters are trained by the student's optimiser (they get gradients from ``feature_kd``).
    """

    def __init__(self, in_dim: int, out_dim: int, depth: int = 1, hidden: int | None = None):
        super().__init__()
        if in_dim < 1 or out_dim < 1:
            raise ConfigError(f"TransferMLP: in_dim and out_dim must be >= 1, got {in_dim}, {out_dim}")
        if depth < 1:
            raise ConfigError(f"TransferMLP: depth must be >= 1, got {depth}")
        hidden = out_dim if hidden is None else hidden
        if hidden < 1:
            raise ConfigError(f"TransferMLP: hidden must be >= 1, got {hidden}")
        self.in_dim, self.out_dim, self.depth, self.hidden = in_dim, out_dim, depth, hidden
        widths = [in_dim] + [hidden] * (depth - 1) + [out_dim]
        blocks = []
        for a, b in zip(widths[:-1], widths[1:]):
            blocks.append(nn.Sequential(nn.BatchNorm1d(a), nn.Linear(a, b), nn.ReLU(), nn.BatchNorm1d(b)))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, teacher_feat: torch.Tensor) -> torch.Tensor:
        if teacher_feat.dim() != 2 or teacher_feat.shape[1] != self.in_dim:
            raise ShapeError(
                f"TransferMLP expects (batch, {self.in_dim}) teacher features, got {tuple(teacher_feat.shape)}"
            )
        return self.blocks(teacher_feat)
