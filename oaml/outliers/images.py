"""Teacher-selected image outliers: candidate images built from ID images, kept when the teacher
places them beyond every class boundary (SPEC section 5; the image-space counterpart of C-OOD).

The paper's C-OOD/D-OOD vectors live in the teacher's feature space and never pass through the
student. These outliers are IMAGES, so the student can be trained on them (OE / energy margin)
and can be taught the teacher's own outputs on them (outlier-aware distillation):

1. Candidates from the ID training images (uint8, the benchmark's format), seeded:
   ``cutmix`` (a square patch of an image of ANOTHER class pasted into the image),
   ``jigsaw`` (the image cut into a g x g grid of tiles, tiles permuted), ``blur`` (a box blur
   that removes the object's detail), ``noise`` (the image blended with uniform pixel noise).
   ASCOOD (arXiv 2411.10794) and MixOE build outliers from ID images the same way, without
   external data.
2. The teacher embeds every candidate (its own preprocessing) and gives its logits.
3. Selection with the C-OOD criterion (:class:`oaml.outliers.knn.ClassBoundary`, the same K and S
   as the sampler): per class c, the candidate's K-th neighbour distance to the class's ID
   features in the ID bank, divided by the class boundary's radius. ``ratio = min_c`` of it; a
   candidate is kept when ``ratio > threshold`` (1.0: farther from EVERY class than that
   class's own boundary points are).

The set is written as one ``outliers.npz`` (images, teacher logits, kind, ratio) with a
``manifest.json`` carrying the settings, the teacher's identity and the counts per kind.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from ..config import StrictModel
from ..errors import BankError, ConfigError
from ..utils.io import atomic_path, read_json, write_json
from .knn import ClassBoundary, KNNSamplerConfig

log = logging.getLogger(__name__)

KINDS = ("cutmix", "jigsaw", "blur", "noise")
FORMAT = "oaml-image-outliers-1"


class ImageOutlierConfig(StrictModel):
    kinds: List[Literal["cutmix", "jigsaw", "blur", "noise"]] = ["cutmix", "jigsaw", "blur"]
    candidates: int = Field(10000, ge=1, description="candidate images made (split evenly over kinds)")
    patch: float = Field(0.57, gt=0, lt=1, description="cutmix: side of the pasted square, as a fraction of the image side")
    grid: int = Field(4, ge=2, description="jigsaw: tiles per side")
    blur: float = Field(0.25, gt=0, lt=1, description="blur: box kernel side as a fraction of the image side (odd, >= 3 px)")
    noise: float = Field(0.6, gt=0, le=1, description="noise: weight of the uniform noise in the blend")
    select: bool = Field(True, description="keep only candidates the teacher places beyond every class boundary")
    threshold: float = Field(1.0, gt=0, description="keep when min over classes of d_K / class radius exceeds this")
    K: int = Field(300, ge=1, description="K of the d_K criterion (the sampler's K; clamped to n_c - 1)")
    S: int = Field(50, ge=1, description="boundary points per class defining its radius (the sampler's S)")
    batch_size: int = Field(512, ge=1)
    seed: int = Field(0, ge=0)


# --------------------------------------------------------------------------------------------
# candidates (uint8 in, uint8 out)
# --------------------------------------------------------------------------------------------
def _cutmix(x: torch.Tensor, y: torch.Tensor, frac: float, g: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    out = x.clone()
    p = max(1, min(h, w, round(frac * min(h, w))))
    donors = torch.randint(0, n, (n,), generator=g)
    for _ in range(8):  # redraw donors of the same class (cross-class mixes only, where possible)
        same = y[donors] == y
        if not bool(same.any()):
            break
        donors[same] = torch.randint(0, n, (int(same.sum()),), generator=g)
    top = torch.randint(0, h - p + 1, (n,), generator=g)
    left = torch.randint(0, w - p + 1, (n,), generator=g)
    stop = torch.randint(0, h - p + 1, (n,), generator=g)
    sleft = torch.randint(0, w - p + 1, (n,), generator=g)
    for i in range(n):
        d = int(donors[i])
        out[i, :, top[i]:top[i] + p, left[i]:left[i] + p] = x[d, :, stop[i]:stop[i] + p, sleft[i]:sleft[i] + p]
    return out


def _jigsaw(x: torch.Tensor, grid: int, g: torch.Generator) -> torch.Tensor:
    n, c, h, w = x.shape
    th, tw = h // grid, w // grid
    core = x[:, :, : th * grid, : tw * grid]
    tiles = core.reshape(n, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, c, th, tw)
    perm = torch.argsort(torch.rand(n, grid * grid, generator=g), dim=1)
    tiles = tiles[torch.arange(n)[:, None], perm]
    out = x.clone()
    out[:, :, : th * grid, : tw * grid] = tiles.reshape(n, grid, grid, c, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, th * grid, tw * grid)
    return out


def _blur(x: torch.Tensor, frac: float) -> torch.Tensor:
    k = max(3, round(frac * min(x.shape[-2:])) | 1)
    y = F.avg_pool2d(x.float(), k, stride=1, padding=k // 2, count_include_pad=False)
    return y.round().clamp(0, 255).to(torch.uint8)


def _noise(x: torch.Tensor, weight: float, g: torch.Generator) -> torch.Tensor:
    u = torch.rand(x.shape, generator=g) * 255.0
    return ((1 - weight) * x.float() + weight * u).round().clamp(0, 255).to(torch.uint8)


def make_candidates(images: torch.Tensor, labels: torch.Tensor, kind: str, cfg: ImageOutlierConfig,
                    generator: torch.Generator) -> torch.Tensor:
    """Candidates of one ``kind`` from uint8 images ``(n, C, H, W)`` with their labels."""
    if kind == "cutmix":
        return _cutmix(images, labels, cfg.patch, generator)
    if kind == "jigsaw":
        return _jigsaw(images, cfg.grid, generator)
    if kind == "blur":
        return _blur(images, cfg.blur)
    if kind == "noise":
        return _noise(images, cfg.noise, generator)
    raise ConfigError(f"unknown image-outlier kind {kind!r}; use one of {KINDS}")


# --------------------------------------------------------------------------------------------
# selection by the teacher and the whole set
# --------------------------------------------------------------------------------------------
def boundary_ratio(features: torch.Tensor, boundaries: Dict[int, ClassBoundary]) -> torch.Tensor:
    """min over classes of d_K(feature, class) / class radius, per row (> 1: beyond every boundary)."""
    ratios = torch.stack([b.kth_distance(features) / b.radius for b in boundaries.values()], dim=1)
    return ratios.min(dim=1).values


def class_boundaries(id_bank: Any, cfg: ImageOutlierConfig) -> Dict[int, ClassBoundary]:
    from .bank import Bank

    bank = id_bank if isinstance(id_bank, Bank) else Bank.open(id_bank)
    knn = KNNSamplerConfig(K=cfg.K, S=cfg.S, N=1, m=1, backend="torch", device="cpu")
    return {int(c): ClassBoundary(torch.from_numpy(np.asarray(bank.class_vectors(int(c)))), knn, label=f"class {c}")
            for c in bank.classes}


def build_image_outliers(teacher: Any, train_set: Any, id_bank: Any, out_dir: str | Path, cfg: ImageOutlierConfig,
                         progress: bool = True) -> Path:
    """Make, embed and select candidates; write ``out_dir/outliers.npz`` and its manifest."""
    from ..utils.progress import progress_bar

    out = Path(out_dir)
    images_all = getattr(train_set, "images", None)
    labels_all = getattr(train_set, "labels", None)
    if images_all is None or labels_all is None:
        raise ConfigError("image outliers are built from an in-memory image dataset (TensorImageDataset)")
    g = torch.Generator().manual_seed(cfg.seed)
    per_kind = math.ceil(cfg.candidates / len(cfg.kinds))
    boundaries = class_boundaries(id_bank, cfg) if cfg.select else {}
    parts: Dict[str, List[torch.Tensor]] = {k: [] for k in ("images", "logits", "kind", "ratio")}
    bar = progress_bar(total=per_kind * len(cfg.kinds), desc="image outliers", disable=not progress, mininterval=2.0, leave=False)
    for k_id, kind in enumerate(cfg.kinds):
        src = torch.randint(0, len(images_all), (per_kind,), generator=g)
        for a in range(0, per_kind, cfg.batch_size):
            idx = src[a:a + cfg.batch_size]
            cand = make_candidates(images_all[idx], labels_all[idx], kind, cfg, g)
            logits, feats = teacher.outputs(cand)
            ratio = boundary_ratio(feats.float().cpu(), boundaries) if cfg.select else torch.full((len(idx),), math.inf)
            parts["images"].append(cand)
            parts["logits"].append(logits.float().cpu())
            parts["kind"].append(torch.full((len(idx),), k_id, dtype=torch.int8))
            parts["ratio"].append(ratio)
            bar.update(len(idx))
    bar.close()
    cat = {k: torch.cat(v) for k, v in parts.items()}
    keep = cat["ratio"] > cfg.threshold
    made = {kind: int((cat["kind"] == i).sum()) for i, kind in enumerate(cfg.kinds)}
    kept = {kind: int(((cat["kind"] == i) & keep).sum()) for i, kind in enumerate(cfg.kinds)}
    if not bool(keep.any()):
        raise ConfigError(
            f"no candidate image passed the teacher's boundary test (threshold {cfg.threshold}; median ratio "
            f"{float(cat['ratio'].median()):.3f}); lower image_outliers.threshold or use other kinds"
        )
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "outliers.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, images=cat["images"][keep].numpy(), teacher_logits=cat["logits"][keep].numpy(),
                     kind=cat["kind"][keep].numpy(), ratio=cat["ratio"][keep].numpy())
    log.info("image outliers: kept %s of %s candidates (ratio > %g)", kept, made, cfg.threshold)
    write_json(out / "manifest.json", {
        "format": FORMAT, "complete": True, "settings": cfg.model_dump(mode="json"), "kinds": list(cfg.kinds),
        "made": made, "kept": kept, "count": int(keep.sum()),
        "radius": {str(c): b.radius for c, b in boundaries.items()},
        "ratio_quantiles": {str(q): float(cat["ratio"].quantile(q)) for q in (0.1, 0.5, 0.9)} if cfg.select else None,
        "teacher": teacher.identity(), "source": {"dataset": getattr(train_set, "name", ""), "count": len(train_set)},
    })
    return out


class ImageOutlierSet:
    """Read side: uint8 images, the teacher's logits on them, their kind and boundary ratio."""

    kind = "image_outliers"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        m = self.path / "manifest.json"
        if not m.is_file() or not read_json(m).get("complete"):
            raise BankError(f"no complete image-outlier set at {self.path}; build it first (oaml run / oaml bench build it)")
        self.manifest = read_json(m)
        with np.load(self.path / "outliers.npz") as z:
            self.images = torch.from_numpy(z["images"])
            self.teacher_logits = torch.from_numpy(z["teacher_logits"])
            self.kind = torch.from_numpy(z["kind"]).long()
            self.ratio = torch.from_numpy(z["ratio"])

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def meta(self) -> Dict[str, Any]:
        return self.manifest

