"""The OAML objective: configuration, weighted sum with finiteness checks, and a ready criterion.

Paper eq. (2), SPEC section 1 step 4 (weights from the paper's appendix, all datasets)::

    L = ce * CE(z_S, y) + a1 * KL_logit + a2 * KL_feat + b * MI(f_S, C-OOD) + g * MI(f_S, D-OOD)
      ce = 1,             a1 = 4,          a2 = 8,         b = 0.1,            g = 0.2

Term names used everywhere (logs, :class:`LossCombiner`): ``ce``, ``kd_logit``, ``kd_feat``,
``mi_cood``, ``mi_dood``. KL_logit: :func:`~oaml.losses.distill.logit_kd` (tau, direction);
KL_feat: :func:`~oaml.losses.distill.feature_kd` after :class:`~oaml.losses.distill.TransferMLP`;
MI: :class:`~oaml.losses.club.CLUB` (``mi_mode`` fitted or reference). A weight of 0 switches a
term off: it is then not computed at all (and its modules are not built).

:class:`LossCombiner` adds weighted terms and returns ``(total, {name: float, ..., "total": float})``;
it raises :class:`~oaml.errors.NonFiniteError` naming the term when a computed term is NaN/inf.

:class:`OAMLCriterion` owns DT and the two CLUB estimators and computes everything from the
student/teacher outputs and already-paired outliers (pair with
:class:`~oaml.losses.club.OutlierPairer`, ``pairing`` in the config).
"""

from __future__ import annotations

from typing import Callable, Literal, Mapping, Union

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ..config import StrictModel
from ..errors import ConfigError, NonFiniteError, ShapeError
from .club import CLUB
from .distill import TransferMLP, feature_kd, logit_kd

__all__ = ["TERM_NAMES", "OAMLLossConfig", "LossCombiner", "OAMLCriterion"]

TERM_NAMES = ("ce", "kd_logit", "kd_feat", "mi_cood", "mi_dood")

Term = Union[torch.Tensor, Callable[[], torch.Tensor]]


class OAMLLossConfig(StrictModel):
    """Settings of the OAML loss. Defaults = the paper / the method done right (fitted CLUB)."""

    ce: float = Field(1.0, ge=0, description="weight of the ID cross-entropy")
    a1: float = Field(4.0, ge=0, description="weight of logit KD (KL_logit)")
    a2: float = Field(8.0, ge=0, description="weight of feature KD (KL_feat)")
    b: float = Field(0.1, ge=0, description="weight of MI(f_S, C-OOD)")
    g: float = Field(0.2, ge=0, description="weight of MI(f_S, D-OOD)")
    tau: float = Field(1.0, gt=0, description="logit-KD temperature (authors: 1)")
    kd_direction: Literal["forward", "reverse"] = Field(
        "forward", description="forward = KL(teacher || student) (authors' code); reverse = paper eq. 3"
    )
    mi_mode: Literal["fitted", "reference"] = Field(
        "fitted", description="fitted = q fitted by likelihood, own Adam; reference = authors' joint minimisation"
    )
    pairing: Literal["class", "random"] = Field(
        "class", description="ID sample i paired with an outlier of its own class, or uniformly (authors)"
    )
    club_hidden: int = Field(512, ge=1, description="hidden width of CLUB's mu / logvar MLPs")
    club_logvar_bounds: tuple[float, float] | None = Field(
        None, description="range of q's log-variance; None = (-10, 10) fitted, (-1, 1) reference"
    )
    estimator_lr: float = Field(1e-3, gt=0, description="Adam lr of CLUB's own optimiser (fitted)")
    estimator_steps: int = Field(1, ge=1, description="likelihood updates per training step (fitted)")
    reference_club_lr: float = Field(
        1e-3, gt=0,
        description="lr of the CLUB param group in the student's optimiser (reference mode; authors' "
        "CIFAR paper runs 1e-3, released file 1e-4)",
    )
    dt_depth: int = Field(1, ge=1, description="blocks in the domain-transfer MLP (authors: 1)")
    dt_hidden: int | None = Field(None, ge=1, description="DT hidden width for depth > 1 (None = student width)")
    dt_lr: float | None = Field(
        None, gt=0, description="lr of DT's param group in the student's optimiser (None = the base lr; authors 0.01)"
    )
    y_pool_dim_cood: int | None = Field(None, ge=1, description="average-pool C-OOD vectors to this width")
    y_pool_dim_dood: int | None = Field(None, ge=1, description="average-pool D-OOD vectors to this width")

    @model_validator(mode="after")
    def _check(self) -> "OAMLLossConfig":
        if self.club_logvar_bounds is not None and not self.club_logvar_bounds[0] < self.club_logvar_bounds[1]:
            raise ValueError(f"club_logvar_bounds must be (low, high) with low < high, got {self.club_logvar_bounds}")
        return self

    def weights(self) -> dict[str, float]:
        return {"ce": self.ce, "kd_logit": self.a1, "kd_feat": self.a2, "mi_cood": self.b, "mi_dood": self.g}


class LossCombiner:
    """Weighted sum of named scalar terms with per-term finiteness checks.

    ``terms`` maps a name to a scalar tensor or to a zero-argument callable returning one. A term
    whose weight is 0 is skipped: its callable is never called and it is absent from the logs. A
    term with a non-zero weight that is missing, or a name with no weight, is a
    :class:`~oaml.errors.ConfigError`. Returns ``(total, logs)`` with ``logs[name]`` = the term's
    unweighted float value and ``logs["total"]``.
    """

    def __init__(self, weights: Mapping[str, float]):
        for k, w in weights.items():
            if not (isinstance(w, (int, float)) and w >= 0 and w == w and w != float("inf")):
                raise ConfigError(f"loss weight {k!r} must be a finite number >= 0, got {w!r}")
        self.weights = dict(weights)

    def active(self, name: str) -> bool:
        if name not in self.weights:
            raise ConfigError(f"unknown loss term {name!r}; known: {', '.join(self.weights)}")
        return self.weights[name] != 0

    def __call__(self, terms: Mapping[str, Term]) -> tuple[torch.Tensor, dict[str, float]]:
        unknown = [k for k in terms if k not in self.weights]
        if unknown:
            raise ConfigError(f"unknown loss term(s) {unknown}; known: {', '.join(self.weights)}")
        missing = [k for k, w in self.weights.items() if w != 0 and k not in terms]
        if missing:
            raise ConfigError(f"loss term(s) {missing} have non-zero weight but were not provided")
        names: list[str] = []
        values: list[torch.Tensor] = []
        for name, w in self.weights.items():
            if w == 0:
                continue
            t = terms[name]
            v = t() if callable(t) and not isinstance(t, torch.Tensor) else t
            if not isinstance(v, torch.Tensor) or v.numel() != 1:
                raise ShapeError(f"loss term {name!r} must be a scalar tensor, got {type(v).__name__} "
                                 f"{tuple(v.shape) if isinstance(v, torch.Tensor) else ''}")
            names.append(name)
            values.append(v.reshape(()))
        if not values:
            raise ConfigError("every loss weight is 0: nothing to optimise")
        floats = torch.stack([v.detach().to(torch.float64) for v in values]).cpu().tolist()  # one sync
        logs: dict[str, float] = {}
        for name, f in zip(names, floats):
            if f != f or f in (float("inf"), float("-inf")):
                raise NonFiniteError(f"loss term {name!r} is not finite ({f}); total not formed")
            logs[name] = f
        total = sum(self.weights[n] * v for n, v in zip(names, values))
        logs["total"] = float(sum(self.weights[n] * f for n, f in zip(names, floats)))
        return total, logs  # type: ignore[return-value]


class OAMLCriterion(nn.Module):
    """The whole OAML loss with its trainable parts (DT, CLUB for C-OOD, CLUB for D-OOD).

    Modules are built only for terms with non-zero weight: ``dt`` if a2 > 0, ``club_cood`` if
    b > 0 (needs ``cood_dim``), ``club_dood`` if g > 0 (needs ``dood_dim``).

    Per training step::

        # f_S, z_S = student(x); f_T, z_T = teacher(x_teacher) under no_grad
        # y_c = cood_bank[pairer_c(labels, cfg.pairing)], y_d = dood_bank[pairer_d(...)]
        if crit.needs_estimator_fit:             # fitted mode, b > 0 or g > 0
            crit.fit_estimators(f_S, y_c, y_d)   # CLUB's own Adam, on detached inputs
        loss, logs = crit(z_S, labels, f_S, z_T, f_T, y_c, y_d)
        loss.backward(); student_opt.step()

    The student's optimiser must hold ``crit.student_param_groups()`` (DT, plus CLUB's q in
    reference mode) besides the student's own parameters. In fitted mode CLUB's q is updated only
    by ``fit_estimators`` (its optimiser: ``crit.club_cood.estimator_optimizer``).
    """

    def __init__(
        self,
        config: OAMLLossConfig,
        student_dim: int,
        teacher_dim: int | None = None,
        cood_dim: int | None = None,
        dood_dim: int | None = None,
    ):
        super().__init__()
        self.config = config
        self.combiner = LossCombiner(config.weights())
        self.dt: TransferMLP | None = None
        self.club_cood: CLUB | None = None
        self.club_dood: CLUB | None = None
        if config.a2 > 0:
            if teacher_dim is None:
                raise ConfigError("a2 > 0 (feature KD) needs teacher_dim")
            self.dt = TransferMLP(teacher_dim, student_dim, depth=config.dt_depth, hidden=config.dt_hidden)
        for name, weight, dim, pool in (
            ("cood", config.b, cood_dim, config.y_pool_dim_cood),
            ("dood", config.g, dood_dim, config.y_pool_dim_dood),
        ):
            if weight > 0:
                if dim is None:
                    raise ConfigError(f"the MI term on {name.upper()} has non-zero weight but {name}_dim was not given")
                club = CLUB(
                    student_dim, dim, hidden=config.club_hidden, mode=config.mi_mode, y_pool_dim=pool,
                    lr=config.estimator_lr, steps=config.estimator_steps, logvar_bounds=config.club_logvar_bounds,
                )
                setattr(self, f"club_{name}", club)

    def _clubs(self) -> list[tuple[str, CLUB]]:
        return [(n, c) for n, c in (("mi_cood", self.club_cood), ("mi_dood", self.club_dood)) if c is not None]

    @property
    def needs_estimator_fit(self) -> bool:
        return self.config.mi_mode == "fitted" and bool(self._clubs())

    def student_param_groups(self) -> list[dict]:
        """Param groups to add to the student's optimiser (lr omitted = the optimiser's base lr)."""
        groups: list[dict] = []
        if self.dt is not None:
            g: dict = {"params": list(self.dt.parameters()), "name": "dt"}
            if self.config.dt_lr is not None:
                g["lr"] = self.config.dt_lr
            groups.append(g)
        if self.config.mi_mode == "reference":
            for name, club in self._clubs():
                groups.append({"params": club.student_parameters(), "name": f"club_{name}",
                               "lr": self.config.reference_club_lr})
        return groups

    def fit_estimators(
        self,
        student_feat: torch.Tensor,
        y_cood: torch.Tensor | None = None,
        y_dood: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Fitted mode: likelihood step(s) of each active CLUB; returns ``{"<term>_loglik": value}``."""
        if self.config.mi_mode != "fitted":
            raise ConfigError("fit_estimators is for mi_mode='fitted'; reference mode trains q jointly")
        out: dict[str, float] = {}
        for (name, club), y in zip(self._clubs(), self._ys(y_cood, y_dood)):
            ll = club.estimator_step(student_feat, y)
            if ll != ll or ll in (float("inf"), float("-inf")):
                raise NonFiniteError(f"CLUB estimator log-likelihood for {name!r} is not finite ({ll})")
            out[f"{name}_loglik"] = ll
        return out

    def _ys(self, y_cood, y_dood) -> list[torch.Tensor]:
        ys = []
        for name, club in self._clubs():
            y = y_cood if name == "mi_cood" else y_dood
            if y is None:
                raise ConfigError(f"term {name!r} is active but its paired outliers were not given")
            ys.append(y)
        return ys

    def forward(
        self,
        student_logits: torch.Tensor,
        labels: torch.Tensor,
        student_feat: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        teacher_feat: torch.Tensor | None = None,
        y_cood: torch.Tensor | None = None,
        y_dood: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config

        def need(t, what: str, term: str) -> torch.Tensor:
            if t is None:
                raise ConfigError(f"term {term!r} is active (non-zero weight) but {what} was not given")
            return t

        if self.training and self.needs_estimator_fit:
            for name, club in self._clubs():
                if int(club.estimator_updates) == 0:
                    raise ConfigError(
                        f"mi_mode='fitted' but the CLUB of {name!r} was never fitted: call "
                        "fit_estimators(f_S, y_cood, y_dood) before the loss in every training step"
                    )

        terms: dict[str, Callable[[], torch.Tensor]] = {
            "ce": lambda: F.cross_entropy(student_logits, labels),
            "kd_logit": lambda: logit_kd(
                student_logits, need(teacher_logits, "teacher_logits", "kd_logit"), cfg.tau, cfg.kd_direction
            ),
            "kd_feat": lambda: feature_kd(
                need(student_feat, "student_feat", "kd_feat"),
                self.dt(need(teacher_feat, "teacher_feat", "kd_feat")),  # type: ignore[misc]
                cfg.kd_direction,
            ),
            "mi_cood": lambda: self.club_cood.bound(  # type: ignore[union-attr]
                need(student_feat, "student_feat", "mi_cood"), need(y_cood, "y_cood", "mi_cood")
            ),
            "mi_dood": lambda: self.club_dood.bound(  # type: ignore[union-attr]
                need(student_feat, "student_feat", "mi_dood"), need(y_dood, "y_dood", "mi_dood")
            ),
        }
        return self.combiner(terms)
