"""Training baselines the paper compares OAML with, as loss terms of the one training loop.

Every method below is a set of terms (:mod:`oaml.training.methods`); none has its own trainer.
Auxiliary outlier images (OE, energy-OE, MixOE, MCD) come from the benchmark's
outlier-exposure pool, which is disjoint from every OOD test and validation set, and go through
the student in the SAME forward pass as the ID batch (OpenOOD's OE used two passes, #138).
Every random draw uses the step's seeded generator, so runs are deterministic and resumable.

Methods (``method.name``), their terms and defaults
---------------------------------------------------
``oe`` (Hendrycks, Mazeika & Dietterich, "Deep Anomaly Detection with Outlier Exposure", ICLR
2019): ``ce`` + ``oe`` (weight 0.5): cross-entropy from the uniform distribution to the student's
prediction on auxiliary outliers, :func:`oaml.losses.outlier.oe_loss`.

``energy-oe`` (Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS
2020): ``ce`` + ``energy_oe`` (weight 0.1, m_in -25, m_out -7, T 1): squared-hinge energy margins
on ID and auxiliary outliers, :func:`oaml.losses.outlier.energy_margin_loss`. The paper
fine-tunes a trained classifier (10 epochs, lr 0.001; ``student.init_checkpoint``); from scratch
the margin term (about 0.1 x 23^2 at initialisation) swamps CE.

``mixoe`` (Zhang, Inkawhich, Linderman, Chen & Li, "Mixture Outlier Exposure", WACV 2023): ``ce``
+ ``mixoe`` (weight 1.0, mix_op cutmix, lam ~ Beta(0.1, 1.0): OpenOOD's defaults). ID images are
mixed with outlier images (cutmix pastes an outlier patch into the ID image, lam = the ID area
left; mixup blends) and the mixtures get the soft target lam onehot(y) + (1 - lam) uniform. The
mixtures are built by the term's :meth:`~oaml.training.terms.Term.extra_inputs` hook and go
through the student in the same forward pass as the ID batch; the raw outliers are not fed on
their own (``forward_aux = False``), as in the paper.

``logitnorm`` (Wei, Xie, Cheng, Feng, An & Li, "Mitigating Neural Network Overconfidence with
Logit Normalization", ICML 2022): ``logitnorm`` alone (it replaces CE; tau 0.04):
CE(z / (tau ||z||), y), :class:`oaml.losses.outlier.LogitNormLoss`.

``vos`` (Du, Wang, Cai & Li, "VOS: Learning What You Don't Know by Virtual Outlier Synthesis",
ICLR 2022): ``ce`` + ``vos`` (weight 0.1, queue 1000 per class, 10000 draws per class, keep the 1
least likely, start epoch 40: the authors' CIFAR defaults). Class-conditional Gaussians with a
shared covariance on the penultimate features of a per-class FIFO queue
(:class:`oaml.losses.outlier.ClassFeatureQueue`, pushed with index arithmetic, not OpenOOD's
per-sample Python loop); virtual outliers go through the student's own head; the uncertainty
loss is the learnable weighted energy + logistic regression of
:class:`oaml.losses.outlier.VOSUncertaintyLoss`. Before ``start_epoch`` or while a class queue
is not full the term is 0 (logged ``vos_active`` = 0). OpenOOD's VOS trainer builds a NEW random
``weight_energy`` inside every ``log_sum_exp`` call and detaches its output through a Python list,
so its uncertainty loss trains only the logistic regression; ours trains the student.

``npos`` (Tao, Du, Zhu & Li, "Non-parametric Outlier Synthesis", ICLR 2023): ``npos`` +
``ce_probe``. The NPOS term is the paper's objective: CIDER-style compactness (weight 1) and
dispersion (weight 0.5) losses on a projection head (Linear-ReLU-Linear to 128-d, unit sphere,
EMA class prototypes, proto_m 0.95, temperature 0.1), plus the open-set loss (weight 0.1): an
MLP phi (penultimate -> 128 -> 1) separates the L2-normalised ID penultimate features (label 1)
from outliers synthesised by non-parametric boundary sampling (label 0, BCE). The outliers come
from our k-NN boundary sampler's algorithm (:mod:`oaml.outliers.knn`; :func:`npos_boundary_outliers`
is its batched float32 form, equal to :func:`oaml.outliers.knn.sample_class_outliers` with R=1
in a test, since the exact per-class version costs seconds per step on a CPU) run on the
per-class queue of the student's own normalised penultimate features (queue 1000, start epoch
40, K 300, 2 boundary points, 600 candidates each with sigma 0.1, keep 200 per boundary point:
OpenOOD's NPOS settings). NPOS trains no softmax classifier; ``ce_probe`` trains the student's fc
as a linear probe on DETACHED features (it does not touch the representation), so the loop's
validation accuracy, model selection and logit scores (EBO, GEN) exist. NPOS's own score is KNN
on the features (``--scores knn``). Differences from the NPOS/OpenOOD code: one augmented view
per image (they use two crops); noise is added on the unit sphere as the paper writes it (their
code adds it to un-normalised features); the 2 boundary points are the 2 with the largest k-NN
distance (their code picks 2 at random among the top 200); prototypes are initialised from
each class's first batch rather than a full pass over the data; and their selection scramble
(see :mod:`oaml.outliers.knn`) is not reproduced.

``mcd`` (Yu & Aizawa, "Unsupervised Out-of-Distribution Detection by Maximum Classifier
Discrepancy", ICCV 2019, in OpenOOD's outlier-exposure form the paper's tables use): ``ce`` +
``mcd`` (weight 1, margin 1.2, fine-tuning from ``start_epoch`` 90 of 100). The term owns a
second classifier head on the student's penultimate features; both heads learn the ID labels
(CE), and from ``start_epoch`` on the auxiliary outliers' entropy discrepancy
d = mean(H(p1) - H(p2)) is pushed above the margin: relu(margin - d). Entropies are per sample
over classes (OpenOOD's ``entropy`` takes the softmax over the BATCH dimension, a bug). The
auxiliary images go through the forward pass from epoch 0 (the loop feeds them whenever a term
requires them), so before ``start_epoch`` BatchNorm sees ID + outliers while only CE is trained.

``udg`` (Yang, Wang, Feng, Yan, Zheng, Zhang & Liu, "Semantically Coherent Out-of-Distribution
Detection", ICCV 2021): in :mod:`oaml.training.udg` (per-epoch k-means of ID + outlier-pool
features through the terms' ``on_epoch_start`` hook, a clustering head, ID filtering and OE).

Not provided: no faithful version is possible here, and an imitation is not shipped under their names
----------------------------------------------------------------------------------------------------
- DreamOOD (Du, Sun, Zhu & Li, "Dream the Impossible: Outlier Imagination with Diffusion
  Models", NeurIPS 2023) learns a text-conditioned embedding space, samples outliers there, and
  decodes them into IMAGES with Stable Diffusion that the classifier is trained on (energy
  regularisation). Our generators (:mod:`oaml.outliers.generators`) produce vectors in the
  TEACHER's feature space (feature diffusion) or SD latents, not student inputs; feeding them to
  the student would need a teacher-to-student mapping DreamOOD does not have, so a
  "feature-level DreamOOD" would be a different method (OAML's D-OOD term is the closest
  relative and is already provided). Pixel-space DreamOOD needs SD v1.4 weights, which the SD
  generator can load where they exist; training on its decoded images is not wired up.
- ATOL (Zheng, Wang, Fang, Liu, Liu & Han, "Out-of-distribution Detection Learning with
  Unreliable Out-of-distribution Sources", NeurIPS 2023) builds an auxiliary ID/OOD task from a
  pixel-space image GENERATOR with disjoint ID and OOD regions of its latent space and aligns
  the real and auxiliary tasks. No such image generator exists here, and a feature-level stand-in
  would not be ATOL.
"""

from __future__ import annotations

import math
from typing import Dict, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ..errors import ConfigError
from ..losses.outlier import (
    ClassFeatureQueue,
    LogitNormLoss,
    VOSUncertaintyLoss,
    energy_margin_loss,
    mixoe_loss,
    oe_loss,
)
from .methods import Method, register_method
from .state import StepState
from .terms import TERMS, BuildContext, Term, TermConfig


def _need_aux(s: StepState, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    if s.aux_logits is None or s.aux_features is None:
        raise ConfigError(f"loss term {name!r} needs auxiliary outlier images in the step, got none")
    return s.aux_logits, s.aux_features


def _device_generator(g: torch.Generator, device: torch.device) -> torch.Generator:
    """``g`` itself on the CPU; on another device a generator seeded from one draw of ``g``
    (deterministic for a given device, so resume still reproduces the run)."""
    if device.type == "cpu":
        return g
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    return torch.Generator(device=device).manual_seed(seed)


# --------------------------------------------------------------------------------------------
# OE and energy-OE
# --------------------------------------------------------------------------------------------
class OEConfig(TermConfig):
    weight: float = 0.5


@TERMS.register("oe")
class OETerm(Term):
    """Outlier Exposure: CE from the uniform distribution on the auxiliary outliers' logits."""

    config_cls = OEConfig
    requires = frozenset({"aux"})

    def forward(self, s: StepState) -> torch.Tensor:
        logits_out, _ = _need_aux(s, "oe")
        return oe_loss(logits_out)


class EnergyOEConfig(TermConfig):
    weight: float = 0.1
    m_in: float = -25.0
    m_out: float = -7.0
    temperature: float = Field(1.0, gt=0)


@TERMS.register("energy_oe")
class EnergyOETerm(Term):
    """Energy fine-tuning (Liu et al.): relu(E_in - m_in)^2 + relu(m_out - E_out)^2."""

    config_cls = EnergyOEConfig
    requires = frozenset({"aux"})

    def __init__(self, cfg: EnergyOEConfig, ctx: BuildContext):
        super().__init__(cfg, ctx)
        if not cfg.m_in < cfg.m_out:
            raise ConfigError(f"energy_oe: need m_in < m_out, got m_in={cfg.m_in}, m_out={cfg.m_out}")

    def forward(self, s: StepState) -> torch.Tensor:
        logits_out, _ = _need_aux(s, "energy_oe")
        c = self.cfg
        return energy_margin_loss(s.logits, logits_out, m_in=c.m_in, m_out=c.m_out, temperature=c.temperature)


# --------------------------------------------------------------------------------------------
# MixOE
# --------------------------------------------------------------------------------------------
def sample_beta(alpha: float, beta: float, generator: torch.Generator) -> float:
    """One Beta(alpha, beta) draw from the seeded generator (inverse CDF of a uniform draw)."""
    from scipy.special import betaincinv

    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    return float(betaincinv(alpha, beta, u))


def cutmix_box(h: int, w: int, lam: float, generator: torch.Generator) -> Tuple[int, int, int, int]:
    """The CutMix box (Yun et al.; MixOE's ``rand_bbox``): side ratio sqrt(1 - lam), centre
    uniform over the image, clipped at the border. Returns (y1, y2, x1, x2)."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy = int(torch.randint(0, h, (1,), generator=generator))
    cx = int(torch.randint(0, w, (1,), generator=generator))
    y1, y2 = min(max(cy - ch // 2, 0), h), min(max(cy + ch // 2, 0), h)
    x1, x2 = min(max(cx - cw // 2, 0), w), min(max(cx + cw // 2, 0), w)
    return y1, y2, x1, x2


def mix_images(
    x: torch.Tensor, x_out: torch.Tensor, lam: float, mix_op: str, generator: torch.Generator
) -> Tuple[torch.Tensor, float]:
    """MixOE's mixtures of ID images ``x`` with outlier images ``x_out`` (same shape).

    ``mixup``: lam x + (1 - lam) x_out. ``cutmix``: the outlier patch in a random box is pasted
    into every ID image, and lam becomes the exact ID area fraction left. Returns (mixed, lam).
    """
    if x.shape != x_out.shape:
        raise ConfigError(f"MixOE mixes images of equal shape, got {tuple(x.shape)} and {tuple(x_out.shape)}")
    if mix_op == "mixup":
        return lam * x + (1.0 - lam) * x_out, lam
    if mix_op != "cutmix":
        raise ConfigError(f"unknown mix_op {mix_op!r}; use cutmix or mixup")
    h, w = x.shape[-2:]
    y1, y2, x1, x2 = cutmix_box(h, w, lam, generator)
    mixed = x.clone()
    mixed[..., y1:y2, x1:x2] = x_out[..., y1:y2, x1:x2]
    return mixed, 1.0 - (y2 - y1) * (x2 - x1) / float(h * w)


class MixOEConfig(TermConfig):
    weight: float = 1.0
    mix_op: Literal["cutmix", "mixup"] = "cutmix"
    alpha: float = Field(0.1, gt=0)
    beta: float = Field(1.0, gt=0)


@TERMS.register("mixoe")
class MixOETerm(Term):
    """Soft-target CE on ID/outlier mixtures built before the (single) forward pass."""

    config_cls = MixOEConfig
    requires = frozenset({"aux"})
    forward_aux = False

    def extra_inputs(self, x, labels, aux_x, generator):
        if aux_x is None:
            raise ConfigError("loss term 'mixoe' needs auxiliary outlier images in the step, got none")
        n = x.shape[0]
        if aux_x.shape[0] < n:
            raise ConfigError(
                f"mixoe pairs every ID image with an outlier image: data.aux_batch_size ({aux_x.shape[0]}) "
                f"must be at least the ID batch ({n})"
            )
        lam = sample_beta(self.cfg.alpha, self.cfg.beta, generator)
        mixed, lam = mix_images(x, aux_x[:n], lam, self.cfg.mix_op, generator)
        return mixed, {"lam": lam, "labels": labels}

    def forward(self, s: StepState) -> torch.Tensor:
        extra = s.extras.get("mixoe")
        if extra is None:
            raise ConfigError("loss term 'mixoe' found no mixed images in the step (the trainer lacks extra_inputs)")
        return mixoe_loss(extra["logits"], extra["info"]["labels"], extra["info"]["lam"])


# --------------------------------------------------------------------------------------------
# LogitNorm
# --------------------------------------------------------------------------------------------
class LogitNormConfig(TermConfig):
    tau: float = Field(0.04, gt=0)


@TERMS.register("logitnorm")
class LogitNormTerm(Term):
    """CE on logits normalised to norm 1/tau (replaces ``ce``)."""

    config_cls = LogitNormConfig

    def __init__(self, cfg: LogitNormConfig, ctx: BuildContext):
        super().__init__(cfg, ctx)
        self.loss = LogitNormLoss(cfg.tau)

    def forward(self, s: StepState) -> torch.Tensor:
        return self.loss(s.logits, s.labels)


# --------------------------------------------------------------------------------------------
# VOS
# --------------------------------------------------------------------------------------------
class VOSConfig(TermConfig):
    weight: float = 0.1
    queue_size: int = Field(1000, ge=2)  # VOS sample_number
    sample_from: int = Field(10000, ge=1)  # Gaussian draws per class per step
    select: int = Field(1, ge=1)  # least likely draws kept per class
    start_epoch: int = Field(40, ge=0)
    jitter: float = Field(1e-4, ge=0)


@TERMS.register("vos")
class VOSTerm(Term):
    """VOS uncertainty loss on class-conditional Gaussian virtual outliers (penultimate space)."""

    config_cls = VOSConfig

    def __init__(self, cfg: VOSConfig, ctx: BuildContext):
        super().__init__(cfg, ctx)
        if cfg.select > cfg.sample_from:
            raise ConfigError(f"vos: select={cfg.select} exceeds sample_from={cfg.sample_from}")
        self.queue = ClassFeatureQueue(ctx.num_classes, ctx.feature_dim, cfg.queue_size)
        self.uncertainty = VOSUncertaintyLoss(ctx.num_classes)

    def active(self, epoch: int) -> bool:
        return epoch >= self.cfg.start_epoch and self.queue.is_full

    def pre_step(self, s: StepState) -> Dict[str, float]:
        self.queue.push(s.features, s.labels)  # VOS pushes the batch, then samples
        return {"vos_active": float(self.active(s.epoch))}

    def forward(self, s: StepState) -> torch.Tensor:
        if not self.active(s.epoch):
            return s.logits.new_zeros(())
        gen = _device_generator(s.generator, self.queue.data.device)
        outliers, _ = self.queue.sample_virtual_outliers(
            num=self.cfg.sample_from, select=self.cfg.select, generator=gen, jitter=self.cfg.jitter
        )
        logits_out = s.model.head(outliers.to(s.features.dtype))
        return self.uncertainty(s.logits, logits_out)


# --------------------------------------------------------------------------------------------
# NPOS
# --------------------------------------------------------------------------------------------
def npos_compactness(z: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """CIDER/NPOS compactness: mean_i -log softmax_c(z_i . mu_c / T)[y_i] on unit vectors
    (prototypes are re-normalised; the base temperature equals T as in the authors' code)."""
    mu = F.normalize(prototypes, dim=1)
    return F.cross_entropy(z @ mu.T / temperature, labels)


def npos_dispersion(prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """CIDER/NPOS dispersion: mean_i log( mean_{j != i} exp(mu_i . mu_j / T) ) (lower = spread)."""
    c = prototypes.shape[0]
    sims = prototypes @ prototypes.T / temperature
    off = ~torch.eye(c, dtype=torch.bool, device=prototypes.device)
    return (torch.logsumexp(sims.masked_fill(~off, float("-inf")), dim=1) - math.log(c - 1)).mean()


def ema_prototypes(prototypes: torch.Tensor, z: torch.Tensor, labels: torch.Tensor, m: float) -> torch.Tensor:
    """Sequential EMA of unit prototypes, in batch order: mu_y <- normalise(m mu_y + (1-m) z_i).

    Gradients flow to ``z`` (as in CIDER/NPOS, whose dispersion loss sees the updated prototypes).
    """
    out = prototypes.clone()
    for i in range(z.shape[0]):
        c = int(labels[i])
        out[c] = F.normalize(out[c] * m + z[i] * (1.0 - m), dim=0)
    return out


@torch.no_grad()
def npos_boundary_outliers(
    Q: torch.Tensor, K: int, S: int, N: int, sigma: float, m: int, generator: torch.Generator
) -> torch.Tensor:
    """k-NN boundary sampling of :mod:`oaml.outliers.knn` (one repeat), batched over classes.

    ``Q`` (C, n, D): each class's features. Per class, on the L2-normalised features: d_K = the
    distance to the K-th neighbour (itself excluded); the S points with the largest d_K are the
    boundary (in decreasing d_K); each gets N fresh candidates normalise(b + sigma eps), and the m
    candidates with the largest d_K against the class are kept (farthest first). Noise: for class
    c and boundary slot i, the (c*S + i)-th call ``randn((N, D), generator)``, so the result equals
    :func:`oaml.outliers.knn.sample_class_outliers` called class after class with the same
    generator and ``R=1`` (tested). Unlike that function, distances are ranked in float32 without
    its exact float64 re-ranking of near-ties, and all classes go through batched matmuls: it
    runs at every training step. Returns (C*S*m, D) unit vectors on ``Q``'s device.
    """
    C, n, D = Q.shape
    if not 1 <= K <= n - 1:
        raise ConfigError(f"npos: K={K} needs 1 <= K <= queue size - 1 = {n - 1}")
    if S > n or m > N:
        raise ConfigError(f"npos: need boundary <= queue size and keep <= candidates (S={S}, n={n}, m={m}, N={N})")
    Z = F.normalize(Q.float(), dim=-1)
    sims = Z @ Z.transpose(1, 2)
    sims.diagonal(dim1=1, dim2=2).fill_(-math.inf)  # itself excluded
    kth = torch.topk(sims, K, dim=2).values[..., -1]  # (C, n): K-th largest similarity = K-th nearest
    bidx = torch.topk(-kth, S, dim=1).indices  # smallest similarity = largest d_K, decreasing d_K
    B = torch.gather(Z, 1, bidx.unsqueeze(-1).expand(-1, -1, D))  # (C, S, D)
    eps = torch.stack([torch.randn((N, D), generator=generator) for _ in range(C * S)]).to(Z.device)
    v = eps.view(C, S, N, D) * sigma + B.unsqueeze(2)
    v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    cs = v.view(C, S * N, D) @ Z.transpose(1, 2)  # (C, S*N, n)
    ckth = torch.topk(cs, K, dim=2).values[..., -1].view(C, S, N)
    keep = torch.topk(-ckth, m, dim=2).indices  # (C, S, m), farthest first
    out = torch.gather(v, 2, keep.unsqueeze(-1).expand(-1, -1, -1, D))
    return out.reshape(C * S * m, D)


class NPOSConfig(TermConfig):
    weight: float = 1.0
    feat_dim: int = Field(128, ge=1)  # projection head output
    temperature: float = Field(0.1, gt=0)
    proto_m: float = Field(0.95, ge=0, lt=1)
    w_comp: float = Field(1.0, ge=0)
    w_disp: float = Field(0.5, ge=0)
    w_open: float = Field(0.1, ge=0)  # NPOS loss_weight
    queue_size: int = Field(1000, ge=2)  # NPOS sample_number
    start_epoch: int = Field(40, ge=0)  # start_epoch_KNN
    K: int = Field(300, ge=1)
    boundary: int = Field(2, ge=1)  # boundary points per class and step (pick_nums)
    candidates: int = Field(600, ge=1)  # Gaussian candidates per boundary point (sample_from)
    sigma: float = Field(0.1, gt=0)  # cov_mat
    keep: int = Field(200, ge=1)  # kept per boundary point (ID_points_num)
    phi_lr: Optional[float] = Field(None, gt=0)  # phi's own lr (None: optim.lr); NPOS: 0.1 x optim.lr

    @model_validator(mode="after")
    def _consistent(self) -> "NPOSConfig":  # checked when the config is read, before any training
        if self.keep > self.candidates:
            raise ValueError(f"keep={self.keep} exceeds candidates={self.candidates}")
        if self.boundary > self.queue_size:
            raise ValueError(f"boundary={self.boundary} exceeds queue_size={self.queue_size}")
        if self.K > self.queue_size - 1:
            raise ValueError(f"K={self.K} needs queue_size >= K + 1, got {self.queue_size}")
        return self


@TERMS.register("npos")
class NPOSTerm(Term):
    """NPOS: compactness + dispersion on the projected unit embedding, and the open-set BCE of phi
    between ID features and k-NN boundary outliers of the student's own feature queue."""

    config_cls = NPOSConfig

    def __init__(self, cfg: NPOSConfig, ctx: BuildContext):
        super().__init__(cfg, ctx)
        if ctx.num_classes < 2:
            raise ConfigError("npos needs at least 2 classes")
        d = ctx.feature_dim
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, cfg.feat_dim))
        self.phi = nn.Sequential(nn.Linear(d, cfg.feat_dim), nn.ReLU(), nn.Linear(cfg.feat_dim, 1))
        self.queue = ClassFeatureQueue(ctx.num_classes, d, cfg.queue_size)
        self.register_buffer("prototypes", torch.zeros(ctx.num_classes, cfg.feat_dim))
        self.register_buffer("proto_init", torch.zeros(ctx.num_classes, dtype=torch.bool))
        self._loss: Optional[torch.Tensor] = None

    def student_param_groups(self) -> list:
        phi = {"params": list(self.phi.parameters())}
        if self.cfg.phi_lr is not None:
            phi.update(lr=self.cfg.phi_lr, initial_lr=self.cfg.phi_lr)
        return [{"params": list(self.head.parameters())}, phi]

    @torch.no_grad()
    def _init_prototypes(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        for c in torch.unique(labels).tolist():
            if not bool(self.proto_init[c]):
                self.prototypes[c] = F.normalize(z[labels == c].mean(0), dim=0)
                self.proto_init[c] = True

    def synthesise(self, generator: torch.Generator) -> torch.Tensor:
        """Boundary outliers of every class from the (full) queue: unit vectors, (C*boundary*keep, D)."""
        c = self.cfg
        return npos_boundary_outliers(self.queue.data, c.K, c.boundary, c.candidates, c.sigma, c.keep, generator)

    def losses(self, s: StepState) -> Dict[str, torch.Tensor]:
        z = F.normalize(self.head(s.features), dim=1)
        self._init_prototypes(z.detach(), s.labels)
        protos = ema_prototypes(self.prototypes, z, s.labels, self.cfg.proto_m)
        with torch.no_grad():
            self.prototypes.copy_(protos.detach())
        disp = npos_dispersion(protos, self.cfg.temperature)
        comp = npos_compactness(z, protos.detach(), s.labels, self.cfg.temperature)
        self.queue.push(F.normalize(s.features.detach(), dim=1), s.labels)
        open_loss = s.features.new_zeros(())
        active = s.epoch >= self.cfg.start_epoch and self.queue.is_full
        if active:
            outliers = self.synthesise(s.generator).to(s.features.device, s.features.dtype)
            scores = torch.cat([self.phi(F.normalize(s.features, dim=1)), self.phi(outliers)]).view(-1)
            target = torch.cat([torch.ones(s.features.shape[0]), torch.zeros(outliers.shape[0])]).to(scores)
            open_loss = F.binary_cross_entropy_with_logits(scores, target)
        return {"comp": comp, "disp": disp, "open": open_loss, "active": torch.tensor(float(active))}

    def pre_step(self, s: StepState) -> Dict[str, float]:
        parts = self.losses(s)
        c = self.cfg
        self._loss = c.w_comp * parts["comp"] + c.w_disp * parts["disp"] + c.w_open * parts["open"]
        return {f"npos_{k}": float(v.detach()) for k, v in parts.items()}

    def forward(self, s: StepState) -> torch.Tensor:
        if self._loss is None:
            self.pre_step(s)
        loss, self._loss = self._loss, None
        return loss  # type: ignore[return-value]


@TERMS.register("ce_probe")
class LinearProbeTerm(Term):
    """CE of the student's fc on DETACHED penultimate features: trains the classifier head
    without touching the representation (for methods that learn no softmax classifier)."""

    def forward(self, s: StepState) -> torch.Tensor:
        return F.cross_entropy(s.model.head(s.features.detach()), s.labels)


# --------------------------------------------------------------------------------------------
# MCD
# --------------------------------------------------------------------------------------------
def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of softmax(logits) over classes."""
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(dim=1)


def mcd_discrepancy_loss(logits1: torch.Tensor, logits2: torch.Tensor, margin: float) -> torch.Tensor:
    """relu(margin - mean_i [H(p1_i) - H(p2_i)]) on the unlabeled (outlier) batch."""
    return F.relu(margin - (entropy(logits1) - entropy(logits2)).mean())


class MCDConfig(TermConfig):
    weight: float = 1.0  # lambda_oe
    margin: float = 1.2
    start_epoch: int = Field(90, ge=0)  # start_epoch_ft


@TERMS.register("mcd")
class MCDTerm(Term):
    """Second head (CE on ID) + entropy-discrepancy hinge on the outliers from ``start_epoch``.

    The value is CE(head2) + [epoch >= start_epoch] * relu(margin - d); ``weight`` scales both
    (keep it 1 for OpenOOD's lambda_oe = 1, where both heads' CE have weight 1)."""

    config_cls = MCDConfig
    requires = frozenset({"aux"})

    def __init__(self, cfg: MCDConfig, ctx: BuildContext):
        super().__init__(cfg, ctx)
        self.head2 = nn.Linear(ctx.feature_dim, ctx.num_classes)

    def forward(self, s: StepState) -> torch.Tensor:
        logits_out, feats_out = _need_aux(s, "mcd")
        ce2 = F.cross_entropy(self.head2(s.features), s.labels)
        if s.epoch < self.cfg.start_epoch:
            return ce2
        return ce2 + mcd_discrepancy_loss(logits_out, self.head2(feats_out), self.cfg.margin)


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------
_OE = "Hendrycks, Mazeika & Dietterich, Deep Anomaly Detection with Outlier Exposure, ICLR 2019"
_EN = "Liu, Wang, Owens & Li, Energy-based Out-of-distribution Detection, NeurIPS 2020"
_MIX = "Zhang, Inkawhich, Linderman, Chen & Li, Mixture Outlier Exposure, WACV 2023"
_LN = "Wei, Xie, Cheng, Feng, An & Li, Mitigating Neural Network Overconfidence with Logit Normalization, ICML 2022"
_VOS = "Du, Wang, Cai & Li, VOS: Learning What You Don't Know by Virtual Outlier Synthesis, ICLR 2022"
_NPOS = "Tao, Du, Zhu & Li, Non-parametric Outlier Synthesis, ICLR 2023"
_MCD = "Yu & Aizawa, Unsupervised Out-of-Distribution Detection by Maximum Classifier Discrepancy, ICCV 2019"

register_method(Method("oe", {"ce": {}, "oe": {}}, "Outlier Exposure: CE + 0.5 x CE-to-uniform on auxiliary outliers (one forward pass)", _OE))
register_method(Method("energy-oe", {"ce": {}, "energy_oe": {}}, "Energy fine-tuning: CE + 0.1 x energy margins (m_in -25, m_out -7) on ID and auxiliary outliers; fine-tunes a trained classifier (student.init_checkpoint, lr 0.001, 10 epochs in the paper)", _EN))
register_method(Method("mixoe", {"ce": {}, "mixoe": {}}, "MixOE: CE + soft-target CE on cutmix/mixup mixtures of ID and outlier images (lam ~ Beta(0.1, 1))", _MIX))
register_method(Method("logitnorm", {"logitnorm": {}}, "LogitNorm: CE on logits normalised to norm 1/tau (tau 0.04), replacing CE", _LN))
register_method(Method("vos", {"ce": {}, "vos": {}}, "VOS: CE + 0.1 x uncertainty loss on class-conditional Gaussian virtual outliers in the penultimate space", _VOS))
register_method(
    Method(
        "npos", {"npos": {}, "ce_probe": {}},
        "NPOS: compactness + dispersion on a projected unit embedding + 0.1 x open-set BCE against k-NN boundary outliers of the "
        "student's own features; fc trained as a linear probe on detached features",
        _NPOS, notes="score with knn (NPOS's own score); EBO/GEN use the linear probe",
    )
)
register_method(Method("mcd", {"ce": {}, "mcd": {}}, "MCD: two heads (CE each) + entropy-discrepancy hinge (margin 1.2) on auxiliary outliers from epoch 90", _MCD))
