"""OAML as loss terms of the one training loop: the paper's loss (``oaml-paper``), its
ablations, and the library's ``oaml``.

The paper's loss (``oaml-paper``)::

    L = CE(z_S, y) + a1 KL_logit + a2 KL_feat + b MI(f_S, C-OOD) + g MI(f_S, D-OOD)

with the paper's weights a1=4, a2=8, b=0.1, g=0.2 (appendix, all datasets). Terms:

- ``kd_logit``: tau^2 KL(softmax(z_T/tau) || softmax(z_S/tau)) (teacher-to-student, as the
  authors' code; ``direction: reverse`` gives paper eq. 3's order).
- ``kd_feat``: KL(softmax(DT(f_T)) || softmax(f_S)); DT (the transfer MLP, ``depth`` blocks of
  BN-Linear-ReLU-BN) trains with the student.
- ``mi_cood`` / ``mi_dood``: the CLUB upper bound between the student's ID feature and an
  outlier of the C-OOD / D-OOD bank. ``mode: fitted`` (default): q(y|x) is fitted by maximum
  likelihood with its own Adam on detached pairs and the student minimises the bound with q held
  fixed; with ``fit_on: previous`` (default) q's step comes after the student's, on the pairs
  just scored, so every bound is computed by a q that has not seen its pairs. ``mode:
  reference``: the authors' behaviour (q(f_S | outlier), never fitted, minimised jointly with the
  student: zero in expectation), for reproduction and ablation only. ``pairing: random``
  (default, as the authors) pairs uniformly; ``class`` (ablation, ``oaml-paper-class``) pairs
  sample i with an outlier of its own class's boundary.

What the paper's loss does and does not do: no MI term passes an outlier through the student,
and MI measures dependence, not distance; with random pairing the true MI is 0 whatever the
student does, and with class pairing minimising it strips class information from the feature
(I(f_S; y) <= I(label; y) <= log C). Only the distillation terms change the student usefully.
The OAML methods warm up DT and the CLUB nets for ``warmup_steps`` batches with the student
frozen before the first step (short schedules otherwise start them far from their fit).

``oaml`` (the library's method, SPEC section 5) keeps the pipeline (teacher, boundary criterion,
KD) and lets outliers reach the student: :mod:`oaml.training.oaml_outliers`.
"""

from __future__ import annotations

from typing import ClassVar, Dict, Literal, Optional

import numpy as np
import torch
from pydantic import Field

from ..errors import ConfigError
from ..losses.club import CLUB, OutlierPairer
from ..losses.distill import TransferMLP, feature_kd, logit_kd
from ..utils.device import to_device_async
from . import oaml_outliers  # noqa: F401  (registers image_outliers, feature_outliers)
from .methods import Method, register_method
from .state import StepState
from .terms import TERMS, BuildContext, Term, TermConfig


class LogitKDConfig(TermConfig):
    weight: float = 4.0
    tau: float = Field(1.0, gt=0)
    direction: Literal["forward", "reverse"] = "forward"


@TERMS.register("kd_logit")
class LogitKDTerm(Term):
    config_cls = LogitKDConfig
    requires = frozenset({"teacher"})

    def forward(self, s: StepState) -> torch.Tensor:
        return logit_kd(s.logits, s.teacher_logits, tau=self.cfg.tau, direction=self.cfg.direction)


class FeatureKDConfig(TermConfig):
    weight: float = 8.0
    depth: int = Field(1, ge=1)
    hidden: Optional[int] = Field(None, ge=1)
    lr: Optional[float] = Field(None, gt=0)  # DT's own lr in the student's optimiser (None: base lr)
    direction: Literal["forward", "reverse"] = "forward"


@TERMS.register("kd_feat")
class FeatureKDTerm(Term):
    config_cls = FeatureKDConfig
    requires = frozenset({"teacher"})

    def __init__(self, cfg: FeatureKDConfig, ctx: BuildContext):
        super().__init__(cfg, ctx)
        if ctx.teacher_feature_dim is None:
            raise ConfigError("kd_feat needs a teacher (teacher.checkpoint)")
        self.dt = TransferMLP(ctx.teacher_feature_dim, ctx.feature_dim, depth=cfg.depth, hidden=cfg.hidden)

    def student_param_groups(self) -> list:
        group = {"params": list(self.dt.parameters())}
        if self.cfg.lr is not None:
            group["lr"] = self.cfg.lr
            group["initial_lr"] = self.cfg.lr
        return [group]

    def forward(self, s: StepState) -> torch.Tensor:
        return feature_kd(s.features, self.dt(s.teacher_features), direction=self.cfg.direction)


class MIConfig(TermConfig):
    weight: float = 0.1
    mode: Literal["fitted", "reference"] = "fitted"
    pairing: Literal["class", "random"] = "random"  # class: an ablation (it strips class information; SPEC 1.4)
    fit_on: Literal["previous", "current"] = "previous"  # q's likelihood step: after the student's (on the pairs just
    # scored, so each bound uses a q that has not seen its pairs) or before it, on the pairs it then scores
    hidden: int = Field(512, ge=1)
    lr: float = Field(1e-3, gt=0)  # fitted: q's Adam; reference: q's lr inside the student's SGD
    steps: int = Field(1, ge=1)
    y_pool_dim: Optional[int] = Field(None, ge=1)
    logvar_bounds: Optional[tuple[float, float]] = None
    in_memory_limit_mb: float = Field(1024, ge=0)  # banks up to this size are held in memory


class _MITerm(Term):
    config_cls = MIConfig
    bank_key: ClassVar[str] = ""

    def __init__(self, cfg: MIConfig, ctx: BuildContext):
        super().__init__(cfg, ctx)
        bank = ctx.banks[self.bank_key]
        self.bank = bank
        labels = torch.as_tensor(np.asarray(bank.labels), dtype=torch.long)
        self.pairer = OutlierPairer(labels, num_classes=max(ctx.num_classes, int(labels.max()) + 1))
        size_mb = len(bank) * bank.dim * 4 / 2**20
        self._vectors = torch.from_numpy(bank.to_numpy()[0]) if size_mb <= cfg.in_memory_limit_mb else None
        self.club = CLUB(
            ctx.feature_dim, bank.dim, hidden=cfg.hidden, mode=cfg.mode, y_pool_dim=cfg.y_pool_dim,
            lr=cfg.lr, steps=cfg.steps, logvar_bounds=cfg.logvar_bounds,
        )
        self._y: Optional[torch.Tensor] = None
        self._pairs: Optional[torch.Tensor] = None
        self._last_ll: Optional[torch.Tensor] = None

    @property
    def own_optimizer(self):  # type: ignore[override]
        return self.club.estimator_optimizer if self.cfg.mode == "fitted" else None

    def student_param_groups(self) -> list:
        params = self.club.student_parameters()
        return [{"params": params, "lr": self.cfg.lr, "initial_lr": self.cfg.lr}] if params else []

    def _outliers(self, s: StepState) -> torch.Tensor:
        labels = s.labels_cpu if s.labels_cpu is not None else s.labels.cpu()
        idx = self.pairer(labels, mode=self.cfg.pairing, generator=s.generator)
        if self._vectors is None:
            return torch.from_numpy(self.bank.gather(idx.numpy())).to(s.features.device)
        if self._vectors.device != s.features.device:  # an in-memory bank moves to the GPU once
            self._vectors = self._vectors.to(s.features.device)
        return self._vectors[to_device_async(idx, self._vectors.device)]

    def pre_step(self, s: StepState) -> Dict[str, float]:
        self._y = self._outliers(s)
        if self.cfg.mode != "fitted":
            return {}
        if self.cfg.fit_on == "current":
            return {f"{self.bank_key}_club_loglik": self.club.fit_step(s.features, self._y)}
        ll, self._last_ll = self._last_ll, None  # from the previous step's fit (none before the first)
        return {f"{self.bank_key}_club_loglik": ll} if ll is not None else {}

    def forward(self, s: StepState) -> torch.Tensor:
        y = self._y if self._y is not None else self._outliers(s)
        self._y, self._pairs = None, y
        return self.club.bound(s.features, y)

    def post_step(self, s: StepState) -> None:
        """``fit_on: previous``: q takes its likelihood step on this step's detached pairs AFTER the
        student's update, so the bound of every step is computed with a q that never saw its pairs."""
        y, self._pairs = self._pairs, None
        if self.cfg.mode == "fitted" and self.cfg.fit_on == "previous":
            if y is None:  # warm-up: forward was not called for this term
                y = self._y if self._y is not None else self._outliers(s)
                self._y = None
            self._last_ll = self.club.fit_step(s.features, y)


@TERMS.register("mi_cood")
class MICOODTerm(_MITerm):
    """CLUB MI(f_S, C-OOD): k-NN boundary outliers in the teacher's feature space."""

    requires = frozenset({"cood"})
    bank_key = "cood"


class MIDOODConfig(MIConfig):
    weight: float = 0.2


@TERMS.register("mi_dood")
class MIDOODTerm(_MITerm):
    """CLUB MI(f_S, D-OOD): diffusion outliers generated from C-OOD."""

    config_cls = MIDOODConfig
    requires = frozenset({"dood"})
    bank_key = "dood"


_KD = {"ce": {}, "kd_logit": {}, "kd_feat": {}}
_PAPER = "Gao et al., OAML: Outlier Aware Metric Learning for OOD Detection Enhancement (arXiv 2406.16525)"
_WARMUP = 100  # batches fitting DT and the CLUB nets with the student frozen

register_method(Method(
    "oaml",
    {"ce": {}, "kd_logit": {}, "image_outliers": {"kd": 0.0, "ratio": 0.25}},
    "OAML as this library recommends it: CE + logit KD on ID images + teacher-selected image outliers (made from ID "
    "images, kept beyond every class boundary in the teacher's space; one per four ID images) trained with outlier "
    "exposure in the student's one forward pass (chosen on OOD-val over distilling the teacher's logits on them too, "
    "and over half as many outliers as ID images: docs/method.md)",
    _PAPER, needs_teacher=True,
))
register_method(Method("oaml-paper", {**_KD, "mi_cood": {}, "mi_dood": {}},
                       "the paper's loss: CE + logit/feature KD + CLUB MI to C-OOD and D-OOD (random pairing, q fitted on "
                       "the previous step's pairs, warm-up)", _PAPER, needs_teacher=True, warmup_steps=_WARMUP))
register_method(Method("oaml-paper-class", {**_KD, "mi_cood": {"pairing": "class"}, "mi_dood": {"pairing": "class"}},
                       "ablation: the paper's loss with class pairing of outliers (strips class information)", _PAPER,
                       needs_teacher=True, warmup_steps=_WARMUP))
register_method(Method("oaml-kd", dict(_KD), "OAML ablation: CE + KD only", _PAPER, needs_teacher=True, warmup_steps=_WARMUP))
register_method(Method("oaml-kd-cood", {**_KD, "mi_cood": {}}, "OAML ablation: CE + KD + MI(C-OOD)", _PAPER,
                       needs_teacher=True, warmup_steps=_WARMUP))
register_method(
    Method(
        "oaml-reference",
        {**_KD, "mi_cood": {"mode": "reference", "pairing": "random"}, "mi_dood": {"mode": "reference", "pairing": "random"}},
        "OAML with the authors' MI terms (q(f_S|outlier), random pairing, minimised jointly): reproduction only",
        _PAPER,
        needs_teacher=True,
    )
)
