"""UDG (unsupervised dual grouping) as a loss term of the one training loop.

Yang, Wang, Feng, Yan, Zheng, Zhang & Liu, "Semantically Coherent Out-of-Distribution
Detection", ICCV 2021; in the form OpenOOD v1.5 ships it (``openood/trainers/udg_trainer.py``,
``configs/pipelines/train/train_udg.yml``, network ``udg_net``), which is the form the OAML
paper's appendix tables use.

The network has one encoder and two heads on its penultimate features: the classifier ``fc`` (the
student's own) and an auxiliary clustering head (``fc_aux``, owned by this term, trained with the
student and saved in its checkpoints). The unlabelled set is the benchmark's outlier-exposure
pool (``aux``; see "unlabelled set" below).

At the start of every epoch (:meth:`UDGTerm.on_epoch_start`)
    1. the student, in eval mode, embeds the whole ID training set and the whole unlabelled pool
       (un-augmented images, as OpenOOD's ``data_aux``);
    2. the features are PCA-whitened to ``pca_dim`` dimensions and L2-normalised, and k-means
       (``num_clusters`` clusters, ``kmeans_iters`` Lloyd iterations, initial centroids = random
       distinct points) groups ID and unlabelled samples together (:func:`cluster_features`);
    3. every cluster gets a weight (size)^-1/2, normalised to mean 1 (:func:`cluster_weights`);
    4. in-distribution filtering (:func:`udg_filter`): a cluster's members carry labels, the ID
       images their class and the unlabelled images their pseudo-label of the PREVIOUS epoch
       (-1 = OOD; all -1 at the start). If one label has a share > ``purity_ind_thresh`` of the
       cluster (the first such label in the order -1, 0, 1, ...), every unlabelled member gets
       it as its new pseudo-label (a pure ID cluster lends its class; a cluster that is more than
       80% unlabelled/OOD gives -1). Otherwise, if a label has a share > ``purity_ood_thresh`` and
       that label is -1, the unlabelled members get OOD weight ``oe_enhance_ratio``. Every
       unlabelled image outside a pure ID cluster is OOD (pseudo-label -1);
    5. the clustering head is re-initialised (weights N(0, 0.01^2), bias 0).

At every step, on the ID batch (labels) and the unlabelled batch (pseudo-labels, cluster ids),
both through the student in the SAME forward pass:
    loss = CE(fc; ID images and pseudo-labelled unlabelled images, one mean over both)
         + lambda_oe  * mean_OOD [ w_ood * CE(uniform, fc) ]    (:func:`udg_oe_loss`)
         + lambda_aux * mean_all [ w_cluster * CE(fc_aux, cluster id) ]   (:func:`reweighted_ce`)
The term replaces ``ce`` (the method is ``udg`` alone) because OpenOOD's classification loss is
one mean over the ID and the pseudo-labelled images. Logged: ``udg_cls``, ``udg_oe``, ``udg_aux``
(unweighted) and ``udg_pseudo_id`` (share of the unlabelled batch carrying an ID pseudo-label)
per step; per epoch ``udg_id_clusters`` (clusters whose majority label is an ID class),
``udg_pool_id`` (share of the pool pseudo-labelled ID), ``udg_pool_enhanced`` (share with OOD
weight != 1) and ``udg_pca_fallback``.

Defaults (OpenOOD ``train_udg.yml``): num_clusters 1000, pca_dim 256, purity_ind_thresh 0.8,
purity_ood_thresh 0.8, oe_enhance_ratio 2.0, lambda_oe 0.5, lambda_aux 0.1; 20 k-means
iterations (OpenOOD's faiss ``niter``). The SC-OOD release's CIFAR-100 config used 0.5 / 0.5 /
1.0 for the three filtering settings; set them under ``method.terms.udg`` to reproduce it.

Reproduced as OpenOOD does it, although it looks unintended
    - With the default thresholds (0.8 / 0.8) the OOD-enhancement branch can never fire: it is
      the ``elif`` of a test with the same threshold, so every OOD weight is 1 and
      ``oe_enhance_ratio`` only acts when ``purity_ood_thresh < purity_ind_thresh``, and then only
      on clusters whose OOD share lies between the two thresholds (a cluster that is more than
      ``purity_ind_thresh`` OOD takes the first branch and keeps weight 1).
    - ID filtering reads the unlabelled images' pseudo-labels of the previous epoch, so an image
      once pseudo-labelled ID counts as labelled ID in the next epoch's purities.
    - The clustering head is re-initialised every epoch but its SGD momentum is kept.

Deviations from OpenOOD / the paper (and why)
    - Unlabelled set: the benchmark's outlier-exposure pool, i.e. OpenOOD v1.5's setting (its
      UDG reads the same ``oe`` pool as OE: TIN-597 for CIFAR). The SC-OOD benchmark's unlabelled
      set instead mixes in images with ID semantics; holding out part of the ID training set with
      hidden labels would need the loop to withhold those images from the labelled stream, which
      it does not do, so that variant is not provided.
    - One forward pass for ID + unlabelled images (one BatchNorm batch), as every OE-style method
      of this loop; OpenOOD makes two passes.
    - The unlabelled batch is drawn uniformly with replacement by the step's seeded generator (as
      for OE here); OpenOOD walks a shuffled loader and restarts it when exhausted.
    - k-means is our torch implementation, not faiss: same initialisation rule (``num_clusters``
      distinct random points), iteration count, no subsampling (faiss ``max_points_per_centroid``
      1e7) and faiss's way of refilling an empty cluster (split a large cluster: copy its
      centroid and move the two copies apart by a relative 1/1024), but the cluster to split is
      drawn with probability proportional to (size - 1) from our generator, so partitions differ
      from faiss's for the same data. The seed comes from the run seed and the epoch (OpenOOD:
      ``np.random.randint(1234)`` from the global numpy state), so runs and resumes are exact.
    - PCA whitening uses a float64 eigendecomposition of the covariance; ``pca_dim`` is clamped
      to the feature width (a 1/4-width ResNet-18 has 128-d features). When whitening yields a
      non-finite value (a zero or negative eigenvalue) the raw features are clustered, which is
      OpenOOD's fallback whenever no feature vector is all-zero (it clusters NaNs then).
    - Cluster weights are normalised by their mean over NON-EMPTY clusters; OpenOOD averages over
      all clusters with count + 1e-10, which is the same when no cluster is empty and shrinks
      every weight by ~1e5 otherwise.
    - A batch without OOD-labelled unlabelled images has OE loss 0 (OpenOOD: the mean of an empty
      tensor, NaN).
    - OpenOOD's softmax confidences of the unlabelled images feed only the ``conf`` / ``sort``
      filtering ablations of the SC-OOD release; those ablations are not provided.
    - Under torchrun every process embeds the whole sets and rank 0's clustering is broadcast.
      As for every term-owned module of this loop, the clustering head is not wrapped by
      DistributedDataParallel, so its gradients are not averaged across processes.

Cost: every epoch one inference pass over the ID training set and the whole pool, plus k-means
on (N_train + N_pool) points (about 4 N * num_clusters * pca_dim flops per iteration: 0.2 s for
150,000 512-d features, 1000 clusters, 20 iterations on an H200; tens of seconds on a CPU).
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..errors import ConfigError
from .methods import Method, register_method
from .state import StepState
from .terms import TERMS, BuildContext, EpochContext, Term, TermConfig

log = logging.getLogger(__name__)

_SPLIT_EPS = 1.0 / 1024.0  # faiss's relative perturbation when it splits a cluster
_CHUNK = 1 << 22  # elements of a (rows x clusters) block of the distance computation


# --------------------------------------------------------------------------------------------
# clustering
# --------------------------------------------------------------------------------------------
def pca_whiten(x: torch.Tensor, dim: int) -> Optional[torch.Tensor]:
    """Centre, project onto the top ``dim`` principal axes, scale each by eigenvalue^-1/2, then
    L2-normalise every row (faiss ``PCAMatrix(d, dim, eigen_power=-0.5)`` + normalisation).
    ``dim`` is clamped to the feature width. Returns None if the result is not finite."""
    n, d = x.shape
    dim = min(dim, d)
    x64 = x.double()
    xc = x64 - x64.mean(0, keepdim=True)
    evals, evecs = torch.linalg.eigh(xc.T @ xc / n)  # ascending
    top = torch.arange(d - 1, d - 1 - dim, -1, device=x.device)
    z = (xc @ evecs[:, top]) * evals[top].pow(-0.5)
    z = z / torch.linalg.vector_norm(z, dim=1, keepdim=True)
    return z.float() if bool(torch.isfinite(z).all()) else None


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (squared L2; first one on ties), in row blocks."""
    c2 = (centroids * centroids).sum(1)
    rows = max(1, _CHUNK // max(centroids.shape[0], 1))
    out = [torch.argmin(c2[None, :] - 2.0 * (x[i : i + rows] @ centroids.T), dim=1) for i in range(0, x.shape[0], rows)]
    return torch.cat(out)


def _cluster_sums(x: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """Per-cluster sums of the rows; deterministic (index_add on the CPU, one-hot matmuls on GPUs,
    whose index_add uses float atomics)."""
    if x.device.type == "cpu":
        return torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, assign, x)
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    rows = max(1, _CHUNK // k)
    for i in range(0, x.shape[0], rows):
        sums += F.one_hot(assign[i : i + rows], k).to(x.dtype).T @ x[i : i + rows]
    return sums


def _split_empty(centroids: torch.Tensor, counts: torch.Tensor, generator: torch.Generator) -> None:
    """faiss's empty-cluster rule, in place: each empty cluster takes a copy of a cluster drawn
    with probability proportional to (size - 1); the two copies are pushed apart by a relative
    1/1024 (+ on even coordinates of the new one, - on odd ones, the opposite for the old one)
    and share the old cluster's count."""
    d = centroids.shape[1]
    sign = torch.ones(d, dtype=centroids.dtype, device=centroids.device)
    sign[1::2] = -1.0
    counts = counts.clone().double().cpu()
    for ci in torch.nonzero(counts == 0).flatten().tolist():
        p = (counts - 1).clamp(min=0)
        if float(p.sum()) <= 0:
            break  # every cluster has <= 1 member: nothing to split
        cj = int(torch.multinomial(p, 1, generator=generator))
        base = centroids[cj].clone()
        centroids[ci] = base * (1 + _SPLIT_EPS * sign)
        centroids[cj] = base * (1 - _SPLIT_EPS * sign)
        counts[ci] = float(int(counts[cj]) // 2)
        counts[cj] -= counts[ci]


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means (faiss ``Clustering`` rules, see :func:`_split_empty`): centroids start at
    ``k`` distinct random rows; each iteration assigns, recomputes the means and refills empty
    clusters; a last assignment gives the result. Returns the cluster index of every row (long,
    on ``x``'s device). Random draws come from ``generator`` (a CPU generator) only."""
    n = x.shape[0]
    if n < k:
        raise ConfigError(f"udg: k-means with num_clusters={k} needs at least {k} samples, got {n}; lower num_clusters")
    x = x.float()
    centroids = x[torch.randperm(n, generator=generator)[:k].to(x.device)].clone()
    for _ in range(iters):
        assign = _nearest(x, centroids)
        counts = torch.bincount(assign, minlength=k)
        sums = _cluster_sums(x, assign, k)
        centroids = torch.where((counts > 0)[:, None], sums / counts.clamp(min=1)[:, None].to(x.dtype), centroids)
        if bool((counts == 0).any()):
            _split_empty(centroids, counts, generator)
    return _nearest(x, centroids)


def cluster_features(
    feats: torch.Tensor, k: int, pca_dim: int, iters: int, generator: torch.Generator
) -> Tuple[torch.Tensor, bool]:
    """OpenOOD's ``KMeans.cluster``: PCA-whiten + L2-normalise, then k-means; on non-finite
    whitened features, k-means on the raw features. Returns (assignments, fell_back)."""
    z = pca_whiten(feats, pca_dim)
    if z is None:
        log.warning("udg: PCA whitening gave non-finite values (a zero eigenvalue); clustering the raw features")
        return kmeans(feats, k, iters, generator), True
    return kmeans(z, k, iters, generator), False


def cluster_weights(assign: torch.Tensor, k: int) -> torch.Tensor:
    """(size)^-1/2 per cluster, normalised to mean 1 over the non-empty clusters (0 for empty)."""
    counts = torch.bincount(assign, minlength=k).double()
    w = torch.where(counts > 0, counts.clamp(min=1).pow(-0.5), torch.zeros_like(counts))
    return (w / w[counts > 0].mean()).float()


def udg_filter(
    assign: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    num_classes: int,
    ind_thresh: float,
    ood_thresh: float,
    enhance: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """In-distribution filtering with OOD enhancement, per cluster.

    ``labels``: every clustered sample's label (ID class, or -1 for unlabelled/OOD). Label
    shares per cluster; the first label (order -1, 0, 1, ...) with share > ``ind_thresh`` becomes
    the cluster's pseudo-label; else, if the first label with share > ``ood_thresh`` is -1, the
    cluster's OOD weight is ``enhance``. Returns (pseudo-label per cluster, -1 where none;
    OOD weight per cluster, 1 where not enhanced)."""
    cols = num_classes + 1  # column 0 = label -1
    counts = torch.bincount(assign * cols + (labels + 1), minlength=k * cols).view(k, cols).double()
    share = counts / counts.sum(1, keepdim=True).clamp(min=1)
    ind = share > ind_thresh
    has_ind = ind.any(1)
    pseudo = torch.where(has_ind, ind.double().argmax(1).long() - 1, torch.full((k,), -1, dtype=torch.long, device=assign.device))
    ood = share > ood_thresh
    enhanced = ~has_ind & ood.any(1) & (ood.double().argmax(1) == 0)
    conf = torch.where(enhanced, torch.full((k,), float(enhance), dtype=torch.float32, device=assign.device),
                       torch.ones(k, dtype=torch.float32, device=assign.device))
    return pseudo, conf


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------
def udg_oe_loss(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean_i w_i * CE(uniform, softmax(z_i)) = mean_i w_i (logsumexp z_i - mean_c z_ic)
    (OpenOOD's ``rew_sce`` with uniform soft labels); 0 for an empty batch."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    per = torch.logsumexp(logits, dim=1) - logits.mean(dim=1)
    return (per * weights.to(per)).mean()


def reweighted_ce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean_i w_i * CE(z_i, t_i) (OpenOOD's ``rew_ce``)."""
    per = F.cross_entropy(logits, targets, reduction="none")
    return (per * weights.to(per)).mean()


# --------------------------------------------------------------------------------------------
# the term
# --------------------------------------------------------------------------------------------
class UDGConfig(TermConfig):
    weight: float = 1.0
    num_clusters: int = Field(1000, ge=2)
    pca_dim: int = Field(256, ge=1)
    kmeans_iters: int = Field(20, ge=1)
    purity_ind_thresh: float = Field(0.8, ge=0, le=1)
    purity_ood_thresh: float = Field(0.8, ge=0, le=1)
    oe_enhance_ratio: float = Field(2.0, ge=0)
    lambda_oe: float = Field(0.5, ge=0)
    lambda_aux: float = Field(0.1, ge=0)


@TERMS.register("udg")
class UDGTerm(Term):
    """UDG: per-epoch clustering of ID + unlabelled features, a clustering head trained on the
    cluster ids, ID filtering of the unlabelled pool and OE on the rest (see the module doc)."""

    config_cls = UDGConfig
    requires = frozenset({"aux"})

    def __init__(self, cfg: UDGConfig, ctx: BuildContext):
        super().__init__(cfg, ctx)
        if ctx.num_train is None or ctx.num_aux is None:
            raise ConfigError("udg needs the sizes of the ID training set and of the unlabelled pool (BuildContext)")
        self.num_classes = ctx.num_classes
        k = cfg.num_clusters
        self.head = nn.Linear(ctx.feature_dim, k)  # OpenOOD's fc_aux
        self.register_buffer("train_cluster", torch.zeros(ctx.num_train, dtype=torch.long))
        self.register_buffer("aux_cluster", torch.zeros(ctx.num_aux, dtype=torch.long))
        self.register_buffer("aux_pseudo", torch.full((ctx.num_aux,), -1, dtype=torch.long))
        self.register_buffer("aux_conf", torch.ones(ctx.num_aux))
        self.register_buffer("cluster_weight", torch.ones(k))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))
        self._loss: Optional[torch.Tensor] = None

    # -- per epoch ---------------------------------------------------------------------------
    @torch.no_grad()
    def on_epoch_start(self, ctx: EpochContext) -> Dict[str, float]:
        c = self.cfg
        _, f_id, y_id = ctx.extract("train")
        _, f_aux, _ = ctx.extract("aux")
        n_id = f_id.shape[0]
        if n_id != self.train_cluster.shape[0] or f_aux.shape[0] != self.aux_cluster.shape[0]:
            raise ConfigError(
                f"udg: the term was built for {self.train_cluster.shape[0]} ID and {self.aux_cluster.shape[0]} "
                f"unlabelled images, the sets now hold {n_id} and {f_aux.shape[0]}"
            )
        dev = self.aux_pseudo.device
        feats = torch.cat([f_id, f_aux]).to(dev)
        assign, fell_back = cluster_features(feats, c.num_clusters, c.pca_dim, c.kmeans_iters, ctx.generator)
        old = torch.cat([y_id.to(dev), self.aux_pseudo])  # ID: labels; unlabelled: last epoch's pseudo-labels
        pseudo_c, conf_c = udg_filter(assign, old, c.num_clusters, self.num_classes, c.purity_ind_thresh,
                                      c.purity_ood_thresh, c.oe_enhance_ratio)
        weight_c = cluster_weights(assign, c.num_clusters).to(dev)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for t in (assign, pseudo_c, conf_c, weight_c):  # every process uses rank 0's clustering
                dist.broadcast(t, 0)
        self.train_cluster.copy_(assign[:n_id])
        self.aux_cluster.copy_(assign[n_id:])
        self.aux_pseudo.copy_(pseudo_c[self.aux_cluster])
        self.aux_conf.copy_(conf_c[self.aux_cluster])
        self.cluster_weight.copy_(weight_c)
        w = torch.randn(self.head.weight.shape, generator=ctx.generator) * 0.01  # re-initialise fc_aux
        self.head.weight.copy_(w.to(self.head.weight))
        self.head.bias.zero_()
        self.ready.fill_(True)
        return {
            "udg_id_clusters": float((pseudo_c >= 0).sum()),
            "udg_pool_id": float((self.aux_pseudo >= 0).float().mean()),
            "udg_pool_enhanced": float((self.aux_conf != 1).float().mean()),
            "udg_pca_fallback": float(fell_back),
        }

    # -- per step ----------------------------------------------------------------------------
    def losses(self, s: StepState) -> Dict[str, torch.Tensor]:
        if not bool(self.ready):
            raise ConfigError("udg: no clustering yet; the trainer must call on_epoch_start before the first step")
        if s.aux_logits is None or s.aux_features is None or s.aux_indices is None or s.indices is None:
            raise ConfigError("loss term 'udg' needs the unlabelled images and the dataset indices of both batches")
        dev = self.aux_pseudo.device
        idx, aidx = s.indices.to(dev), s.aux_indices.to(dev)
        pseudo = self.aux_pseudo[aidx]
        known = pseudo >= 0
        cls = F.cross_entropy(torch.cat([s.logits, s.aux_logits[known]]), torch.cat([s.labels, pseudo[known]]))
        oe = udg_oe_loss(s.aux_logits[~known], self.aux_conf[aidx][~known])
        cid = torch.cat([self.train_cluster[idx], self.aux_cluster[aidx]])
        aux = reweighted_ce(self.head(torch.cat([s.features, s.aux_features])), cid, self.cluster_weight[cid])
        return {"cls": cls, "oe": oe, "aux": aux, "pseudo_id": known.float().mean()}

    def pre_step(self, s: StepState) -> Dict[str, float]:
        parts = self.losses(s)
        c = self.cfg
        self._loss = parts["cls"] + c.lambda_oe * parts["oe"] + c.lambda_aux * parts["aux"]
        return {f"udg_{k}": float(v.detach()) for k, v in parts.items()}

    def forward(self, s: StepState) -> torch.Tensor:
        if self._loss is None:
            self.pre_step(s)
        loss, self._loss = self._loss, None
        return loss  # type: ignore[return-value]


_UDG = ("Yang, Wang, Feng, Yan, Zheng, Zhang & Liu, Semantically Coherent Out-of-Distribution Detection, ICCV 2021 "
        "(OpenOOD v1.5 form)")

register_method(
    Method(
        "udg", {"udg": {}},
        "UDG: per-epoch k-means (PCA-whitened, 1000 clusters) of ID + outlier-pool features; CE on ID and on pool images "
        "in pure ID clusters (pseudo-labels), 0.5 x OE on the rest, 0.1 x reweighted CE of a clustering head to the cluster ids",
        _UDG,
        notes="the unlabelled set is the benchmark's outlier-exposure pool (OpenOOD v1.5); see oaml.training.udg for deviations",
    )
)
