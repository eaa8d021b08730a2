"""Outlier terms through which OAML's outliers reach the student's decision (SPEC section 5).

The paper's MI terms never pass an outlier through the student (SPEC section 1, step 4). These
terms do, each in the one training loop:

``image_outliers`` (teacher-selected image outliers + outlier-aware distillation): images of the
set built by :mod:`oaml.outliers.images` (cross-class CutMix, jigsaw, blur, ... of ID images that
the teacher places beyond every class boundary) go through the student in the SAME forward pass
as the ID batch (``ratio`` outliers per ID image). On their logits z_o:

    L = kd * tau^2 KL(softmax(t_o / tau) || softmax(z_o / tau))      (the teacher's own logits t_o)
      + oe * CE(uniform, softmax(z_o))                               (outlier exposure)
      + energy * [relu(E(z_id) - m_in)^2 + relu(m_out - E(z_o))^2]   (energy margins)

The KD part lets the student inherit the teacher's (low) confidence off the ID manifold instead
of only its ID predictions; the teacher's logits on the set are computed once when the set is
built, so no teacher runs during training.

``feature_outliers`` (VOS-style, through the head): a map R from the L2-normalised teacher
feature to the student's penultimate feature, fitted on the ID batch with its own Adam (MSE to
the detached student feature, after each step). C-OOD (and/or D-OOD) vectors mapped by R
(detached) are scored by the student's own head with a uniform-target (OE) or energy-margin loss.

``contrastive`` (CRD-style, in the teacher's space): a head P maps the student's penultimate
feature to the teacher's feature space; with q = P(f_S(x))/|P(f_S(x))| and every other vector
L2-normalised, InfoNCE with the image's own teacher feature t(x) as the positive and, as
negatives, ``per_step`` C-OOD (and/or D-OOD) vectors plus the teacher features of the batch's
images of other classes:

    L = -log exp(q.t(x)/tau) / [exp(q.t(x)/tau) + sum_n exp(q.n/tau)]

P trains with the student. Tian et al., "Contrastive Representation Distillation", ICLR 2020
(here with the boundary outliers as extra negatives, so the student's feature is pulled to its
teacher feature and away from the outliers around the class).
"""

from __future__ import annotations

from typing import ClassVar, Dict, List, Literal, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ..errors import ConfigError
from ..losses.distill import logit_kd
from ..losses.outlier import energy_margin_loss, oe_loss
from .state import StepState
from .terms import TERMS, BuildContext, Term, TermConfig


def _outlier_loss(cfg, logits_id: torch.Tensor, logits_out: torch.Tensor) -> torch.Tensor:
    """oe * CE(uniform) + energy * energy margins, with the config's weights and margins."""
    loss = logits_out.new_zeros(())
    if cfg.oe:
        loss = loss + cfg.oe * oe_loss(logits_out)
    if cfg.energy:
        loss = loss + cfg.energy * energy_margin_loss(logits_id, logits_out, cfg.m_in, cfg.m_out)
    return loss


def _teacher_space_outliers(term: str, banks: List[str], ctx: BuildContext, missing_hint: str, dim_hint: str) -> torch.Tensor:
    """The named outlier banks' vectors (each in the teacher's feature space), L2-normalised and
    stacked; a bank the run lacks or of another width is a ConfigError naming the term."""
    vecs = []
    for key in banks:
        if key not in ctx.banks:
            raise ConfigError(f"{term} uses the {key.upper()} bank, which this run does not have{missing_hint}")
        bank = ctx.banks[key]
        if bank.dim != ctx.teacher_feature_dim:
            raise ConfigError(
                f"{term}: the {key.upper()} bank holds {bank.dim}-d vectors, the teacher's features are "
                f"{ctx.teacher_feature_dim}-d ({dim_hint}); use banks: [cood]"
            )
        vecs.append(torch.from_numpy(np.asarray(bank.to_numpy()[0], dtype=np.float32)))
    return F.normalize(torch.cat(vecs), dim=1) if vecs else torch.zeros(0, ctx.teacher_feature_dim)


class _OutlierLossConfig(TermConfig):
    oe: float = Field(0.0, ge=0)
    energy: float = Field(0.0, ge=0)
    m_in: float = -25.0
    m_out: float = -7.0

    @model_validator(mode="after")
    def _margins(self):
        if self.energy and not self.m_in < self.m_out:
            raise ValueError(f"need m_in < m_out, got m_in={self.m_in}, m_out={self.m_out}")
        return self


class ImageOutlierTermConfig(_OutlierLossConfig):
    weight: float = 1.0
    ratio: float = Field(0.5, gt=0, le=4, description="outlier images per ID image in each step")
    kd: float = Field(4.0, ge=0, description="weight of the teacher's logits distilled on the outliers")
    tau: float = Field(1.0, gt=0)
    oe: float = Field(0.5, ge=0)
    kinds: Optional[List[str]] = None  # use only these kinds of the set (None: all)

    @model_validator(mode="after")
    def _some_loss(self):
        if not (self.kd or self.oe or self.energy):
            raise ValueError("image_outliers needs at least one of kd, oe, energy > 0")
        return self


@TERMS.register("image_outliers")
class ImageOutlierTerm(Term):
    config_cls = ImageOutlierTermConfig
    requires = frozenset({"image_outliers"})

    def __init__(self, cfg: ImageOutlierTermConfig, ctx: BuildContext):
        super().__init__(cfg, ctx)
        self.set = ctx.banks["image_outliers"]
        if ctx.preprocess is None:
            raise ConfigError("image_outliers needs the student's preprocessing in the build context")
        self.preprocess = ctx.preprocess
        kinds = self.set.manifest["kinds"]
        if cfg.kinds is not None:
            bad = [k for k in cfg.kinds if k not in kinds]
            if bad:
                raise ConfigError(f"image_outliers.kinds {bad} are not in the outlier set {self.set.path} (it has {kinds})")
            keep = torch.isin(self.set.kind, torch.tensor([kinds.index(k) for k in cfg.kinds]))
            self.pool = torch.nonzero(keep).flatten()
        else:
            self.pool = torch.arange(len(self.set))
        if self.pool.numel() == 0:
            raise ConfigError(f"the image-outlier set {self.set.path} holds no image of kinds {cfg.kinds}")
        if self.set.teacher_logits.shape[1] != ctx.num_classes:
            raise ConfigError(
                f"the image-outlier set {self.set.path} holds teacher logits over {self.set.teacher_logits.shape[1]} "
                f"classes, the student has {ctx.num_classes}; rebuild the set with this benchmark's teacher"
            )
        self._t_logits = self.set.teacher_logits

    def extra_inputs(self, x: torch.Tensor, labels: torch.Tensor, aux_x: Optional[torch.Tensor],
                     generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        n = max(1, round(self.cfg.ratio * x.shape[0]))
        idx = self.pool[torch.randint(0, self.pool.numel(), (n,), generator=generator)]
        return self.preprocess(self.set.images[idx].to(x.device, non_blocking=True)), idx

    def forward(self, s: StepState) -> torch.Tensor:
        e = s.extras["image_outliers"]
        z = e["logits"]
        loss = _outlier_loss(self.cfg, s.logits, z)
        if self.cfg.kd:
            if self._t_logits.device != z.device:
                self._t_logits = self._t_logits.to(z.device)
            t = self._t_logits[e["info"].to(z.device)]
            loss = loss + self.cfg.kd * logit_kd(z, t, tau=self.cfg.tau)
        return loss


class FeatureOutlierTermConfig(_OutlierLossConfig):
    weight: float = 1.0
    banks: List[Literal["cood", "dood"]] = ["cood"]
    per_step: int = Field(128, ge=1, description="outlier vectors scored per step")
    oe: float = Field(0.5, ge=0)
    map_lr: float = Field(1e-3, gt=0)
    map_hidden: Optional[int] = Field(None, ge=1)  # None: a linear map

    @model_validator(mode="after")
    def _some_loss(self):
        if not (self.oe or self.energy):
            raise ValueError("feature_outliers needs oe > 0 or energy > 0")
        return self


@TERMS.register("feature_outliers")
class FeatureOutlierTerm(Term):
    config_cls = FeatureOutlierTermConfig
    requires = frozenset({"teacher", "cood"})

    @classmethod
    def requirements(cls, settings):
        return frozenset({"teacher", *settings.get("banks", ["cood"])})

    def __init__(self, cfg: FeatureOutlierTermConfig, ctx: BuildContext):
        super().__init__(cfg, ctx)
        if ctx.teacher_feature_dim is None:
            raise ConfigError("feature_outliers needs a teacher (teacher.checkpoint)")
        out = _teacher_space_outliers("feature_outliers", cfg.banks, ctx, "", "a Stable Diffusion D-OOD bank cannot be mapped")
        self.register_buffer("outliers", out, persistent=False)
        d_t, d_s = ctx.teacher_feature_dim, ctx.feature_dim
        self.map = (nn.Linear(d_t, d_s) if cfg.map_hidden is None
                    else nn.Sequential(nn.Linear(d_t, cfg.map_hidden), nn.ReLU(), nn.Linear(cfg.map_hidden, d_s)))
        self._opt = torch.optim.Adam(self.map.parameters(), lr=cfg.map_lr)

    def student_param_groups(self) -> list:
        return []  # R is fitted by its own optimiser, never by the student's loss

    @property
    def own_optimizer(self):  # type: ignore[override]
        return self._opt

    def forward(self, s: StepState) -> torch.Tensor:
        idx = torch.randint(0, self.outliers.shape[0], (self.cfg.per_step,), generator=s.generator)
        with torch.no_grad():
            f_out = self.map(self.outliers[idx.to(self.outliers.device)])
        logits_out = s.model.head(f_out.to(s.features.dtype))
        return _outlier_loss(self.cfg, s.logits, logits_out)

    def post_step(self, s: StepState) -> None:
        """One Adam step of R: MSE from normalised teacher features to the detached student features."""
        with torch.enable_grad():
            self._opt.zero_grad(set_to_none=True)
            pred = self.map(F.normalize(s.teacher_features.detach(), dim=1))
            F.mse_loss(pred, s.features.detach()).backward()
            self._opt.step()
        self._opt.zero_grad(set_to_none=True)


class ContrastiveTermConfig(TermConfig):
    weight: float = 0.5
    banks: List[Literal["cood", "dood"]] = ["cood"]
    per_step: int = Field(256, ge=0, description="outlier vectors used as negatives per step")
    other_classes: bool = Field(True, description="the batch's teacher features of other classes are negatives too")
    tau: float = Field(0.1, gt=0)
    hidden: Optional[int] = Field(None, ge=1)  # None: P is linear

    @model_validator(mode="after")
    def _some_negatives(self):
        if not self.per_step and not self.other_classes:
            raise ValueError("contrastive needs negatives: per_step > 0 or other_classes: true")
        return self


@TERMS.register("contrastive")
class ContrastiveTerm(Term):
    config_cls = ContrastiveTermConfig
    requires = frozenset({"teacher", "cood"})

    @classmethod
    def requirements(cls, settings):
        return frozenset({"teacher", *(settings.get("banks", ["cood"]) if settings.get("per_step", 1) else [])})

    def __init__(self, cfg: ContrastiveTermConfig, ctx: BuildContext):
        super().__init__(cfg, ctx)
        if ctx.teacher_feature_dim is None:
            raise ConfigError("contrastive needs a teacher (teacher.checkpoint)")
        out = _teacher_space_outliers("contrastive", cfg.banks if cfg.per_step else [], ctx,
                                      " (set per_step: 0 for other-class negatives only)",
                                      "a Stable Diffusion D-OOD bank is not in the teacher's space")
        self.register_buffer("outliers", out, persistent=False)
        d_t, d_s = ctx.teacher_feature_dim, ctx.feature_dim
        self.proj = (nn.Linear(d_s, d_t) if cfg.hidden is None
                     else nn.Sequential(nn.Linear(d_s, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, d_t)))

    def forward(self, s: StepState) -> torch.Tensor:
        q = F.normalize(self.proj(s.features), dim=1)
        t = F.normalize(s.teacher_features.to(q.dtype), dim=1)
        pos = (q * t).sum(dim=1, keepdim=True)
        parts = [pos]
        if self.cfg.per_step:
            idx = torch.randint(0, self.outliers.shape[0], (self.cfg.per_step,), generator=s.generator)
            parts.append(q @ self.outliers[idx.to(self.outliers.device)].to(q.dtype).T)
        if self.cfg.other_classes:
            same = s.labels[:, None] == s.labels[None, :]
            parts.append((q @ t.T).masked_fill(same, float("-inf")))
        logits = torch.cat(parts, dim=1) / self.cfg.tau
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
