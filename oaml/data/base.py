"""Core of the data layer: the data root, the dataset registry, in-memory datasets, conversions.

Conventions (every dataset in oaml follows them):

* a dataset yields ``(image, label)``; ``image`` is a ``uint8`` torch tensor ``(C, H, W)`` with
  ``C`` in {1, 3}; ``label`` is an ``int`` (``-1`` for OOD sets);
* no model-side preprocessing (float conversion, normalisation, teacher resize) happens here;
* :func:`convert_images` only changes the *format* (size and channel count) so that OOD sets
  match the ID set's format.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError, ShapeError
from ..registry import Registry

log = logging.getLogger(__name__)

#: name -> :class:`DatasetSpec`. Look up with ``DATASETS.get(name)``.
DATASETS: Registry["DatasetSpec"] = Registry("dataset")


def default_root() -> Path:
    """The data root: ``$OAML_DATA`` if set, else ``~/.cache/oaml/data``."""
    env = os.environ.get("OAML_DATA")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/oaml/data").expanduser()


def resolve_root(root: str | os.PathLike | None) -> Path:
    """``root`` as a Path; ``None`` means :func:`default_root`."""
    return default_root() if root is None else Path(root).expanduser()


def prepare_command(name: str, extra: str = "") -> str:
    return f"oaml data prepare {name}{(' ' + extra) if extra else ''}"


def missing_error(name: str, looked: Sequence[str | Path], fix: str, detail: str = "") -> DataError:
    """The one shape of 'data not found' message: which dataset, where we looked, what fixes it."""
    where = "; ".join(str(p) for p in looked) or "(nowhere)"
    msg = f"dataset {name!r} is not available: looked in {where}."
    if detail:
        msg += f" {detail}"
    msg += f" Fix: {fix}"
    return DataError(msg)


# ----------------------------------------------------------------------------------------------
# Image format helpers
# ----------------------------------------------------------------------------------------------

_LUMA = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32)  # ITU-R 601, as PIL "L"


def _size2(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        if image_size <= 0:
            raise ConfigError(f"image_size must be positive, got {image_size}")
        return (image_size, image_size)
    hw = tuple(int(v) for v in image_size)
    if len(hw) != 2 or min(hw) <= 0:
        raise ConfigError(f"image_size must be an int or (height, width), got {image_size!r}")
    return hw  # type: ignore[return-value]


def convert_images(
    images: torch.Tensor,
    image_size: int | Sequence[int] | None = None,
    channels: int | None = None,
    pre_size: int | None = None,
) -> torch.Tensor:
    """Convert a uint8 batch ``(N, C, H, W)`` (or one image ``(C, H, W)``) to a size/channel count.

    Channels: grey -> RGB repeats the plane; RGB -> grey uses ITU-R 601 luma (as PIL ``"L"``).
    Size: if the aspect ratio already matches, a plain antialiased resize; otherwise the shorter
    side is resized (to ``pre_size`` if given, else to the target's shorter side) and the centre
    is cropped, as OpenOOD's Resize + CenterCrop. A square ``pre_size`` larger than the target
    (e.g. 256 -> 224 for ImageNet) also goes through resize + centre crop.
    """
    single = images.dim() == 3
    x = images.unsqueeze(0) if single else images
    if x.dim() != 4 or x.dtype != torch.uint8:
        raise ShapeError(f"convert_images wants uint8 (N, C, H, W) or (C, H, W), got {x.dtype} {tuple(images.shape)}")
    if x.shape[1] not in (1, 3):
        raise ShapeError(f"images must have 1 or 3 channels, got {x.shape[1]}")
    if channels is not None and channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels}")
    hw = _size2(image_size)
    out = x
    if channels is not None and channels != x.shape[1]:
        if channels == 3:
            out = x.expand(-1, 3, -1, -1).contiguous()
        else:
            grey = torch.einsum("nchw,c->nhw", x.float(), _LUMA).round_().clamp_(0, 255)
            out = grey.to(torch.uint8).unsqueeze(1)
    if hw is not None and (tuple(out.shape[-2:]) != hw or pre_size is not None):
        out = _resize_crop(out, hw, pre_size)
    return out[0] if single else out


def _resize_uint8(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == hw:
        return x
    y = F.interpolate(x.float(), size=hw, mode="bilinear", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def _resize_crop(x: torch.Tensor, hw: tuple[int, int], pre_size: int | None) -> torch.Tensor:
    h, w = x.shape[-2:]
    th, tw = hw
    if pre_size is None and h * tw == w * th:
        return _resize_uint8(x, hw)
    scale = max(th / h, tw / w)  # smallest scale at which the image covers the target
    if pre_size is not None:
        scale = max(scale, pre_size / min(h, w))
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    y = _resize_uint8(x, (nh, nw))
    top, left = (nh - th) // 2, (nw - tw) // 2
    return y[..., top : top + th, left : left + tw].contiguous()


def to_chw_uint8(array: np.ndarray, what: str = "image") -> torch.Tensor:
    """HxW or HxWxC uint8 numpy image -> uint8 tensor (C, H, W) with C in {1, 3} (alpha dropped)."""
    a = np.asarray(array)
    if a.dtype != np.uint8:
        raise ShapeError(f"{what}: expected uint8 pixels, got {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ShapeError(f"{what}: expected H x W or H x W x C, got shape {a.shape}")
    if a.shape[2] == 4:
        a = a[:, :, :3]
    elif a.shape[2] == 2:
        a = a[:, :, :1]
    if a.shape[2] not in (1, 3):
        raise ShapeError(f"{what}: expected 1, 3 or 4 channels, got {a.shape[2]}")
    return torch.from_numpy(np.array(a.transpose(2, 0, 1), order="C", copy=True))


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


class TensorImageDataset(Dataset):
    """All images in one uint8 tensor ``(N, C, H, W)`` plus int64 labels: the fast offline path.

    ``images`` and ``labels`` are public so that callers can batch without a DataLoader.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None, name: str = "", info: dict | None = None):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise ShapeError(f"{name or 'dataset'}: images must be a uint8 tensor (N, C, H, W)")
        if images.shape[1] not in (1, 3):
            raise ShapeError(f"{name or 'dataset'}: images must have 1 or 3 channels, got {images.shape[1]}")
        n = images.shape[0]
        if labels is None:
            labels = torch.full((n,), -1, dtype=torch.int64)
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (n,):
            raise ShapeError(f"{name or 'dataset'}: {n} images but labels of shape {tuple(labels.shape)}")
        self.images = images
        self.labels = labels
        self.name = name
        self.info = dict(info or {})

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: np.ndarray | torch.Tensor, name: str | None = None) -> "TensorImageDataset":
        idx = torch.as_tensor(np.asarray(index), dtype=torch.int64)
        return TensorImageDataset(self.images[idx], self.labels[idx], name or self.name, self.info)

    def converted(self, image_size=None, channels=None, pre_size=None, chunk: int = 4096) -> "TensorImageDataset":
        if image_size is None and channels is None:
            return self
        parts = [convert_images(self.images[i : i + chunk], image_size, channels, pre_size) for i in range(0, len(self), chunk)]
        images = torch.cat(parts) if parts else self.images
        return TensorImageDataset(images, self.labels, self.name, self.info)

    def as_ood(self) -> "TensorImageDataset":
        return TensorImageDataset(self.images, torch.full_like(self.labels, -1), self.name, {**self.info, "ood": True})


class ConvertedDataset(Dataset):
    """Lazy per-item conversion (size, channels, optional OOD relabel) of a file-backed dataset."""

    def __init__(self, base: Dataset, image_size=None, channels=None, pre_size=None, ood: bool = False):
        self.base = base
        self.image_size, self.channels, self.pre_size, self.ood = image_size, channels, pre_size, ood
        self.name = getattr(base, "name", "")

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.base[i]
        img = convert_images(img, self.image_size, self.channels, self.pre_size)
        return img, (-1 if self.ood else int(label))

    @property
    def labels(self) -> torch.Tensor:
        """The labels without decoding any image (needs a base with ``labels``, as file datasets have)."""
        base = getattr(self.base, "labels", None)
        if base is None:
            raise AttributeError(f"{type(self.base).__name__} has no labels attribute")
        base = torch.as_tensor(base, dtype=torch.int64)
        return torch.full_like(base, -1) if self.ood else base

    def subset(self, index, name: str | None = None) -> "ConvertedDataset":
        """The same conversion over ``base.subset(index)``."""
        if not hasattr(self.base, "subset"):
            raise AttributeError(f"{type(self.base).__name__} has no subset()")
        return ConvertedDataset(self.base.subset(index, name), self.image_size, self.channels, self.pre_size, self.ood)


def seeded_split(labels: np.ndarray, n_holdout: int, seed: int, stratified: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (rest, holdout); the holdout is stratified by label when asked.

    Deterministic for a given seed and label vector; both outputs are sorted.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not 0 < n_holdout < n:
        raise ConfigError(f"cannot hold out {n_holdout} of {n} samples")
    rng = np.random.default_rng(seed)
    if stratified and (labels >= 0).all():
        classes, counts = np.unique(labels, return_counts=True)
        # per-class quota proportional to class size (largest remainder), at least 0
        quota = counts * n_holdout / n
        base = np.floor(quota).astype(int)
        rem = n_holdout - base.sum()
        order = np.argsort(-(quota - base), kind="stable")
        base[order[:rem]] += 1
        hold = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, base)]
        holdout = np.sort(np.concatenate(hold))
    else:
        holdout = np.sort(rng.permutation(n)[:n_holdout])
    mask = np.ones(n, dtype=bool)
    mask[holdout] = False
    return np.flatnonzero(mask), holdout


def stratified_subset(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """All indices, or a seeded class-stratified subset of ``limit`` (sorted, deterministic).

    The one selection behind every ``train_limit``: the teacher fine-tune and the students pick
    the same images for the same (labels, limit, seed).
    """
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n)
    if limit <= 0:
        raise ConfigError(f"a subset limit must be positive, got {limit}")
    return seeded_split(labels, limit, seed)[1]


# ----------------------------------------------------------------------------------------------
# Dataset specs
# ----------------------------------------------------------------------------------------------


@dataclass
class DatasetSpec:
    """How to find, prepare, verify and load one named dataset.

    Subclasses implement :meth:`available`, :meth:`prepare` and :meth:`_load`.
    """

    name: str
    description: str
    splits: tuple[str, ...]
    num_classes: int | None  # None: an OOD-only set (labels are -1)
    source: str  # where the data comes from, in words (package, folder layout, generator)
    substitute_for: str | None = None  # e.g. "Textures (DTD)" where an offline set stands in
    group: str = "offline"  # offline | paper | user
    native_channels: int | None = None
    native_size: tuple[int, int] | None = None
    split_notes: dict[str, str] = field(default_factory=dict)

    # -- interface -------------------------------------------------------------------------
    def available(self, root: str | os.PathLike | None = None) -> bool:
        raise NotImplementedError

    def prepare(self, root: str | os.PathLike | None = None, download: bool = False, source: str | None = None) -> dict:
        """Make the dataset available under ``root`` and verify it; returns a summary dict."""
        raise NotImplementedError

    def where(self, root: str | os.PathLike | None = None) -> list[str]:
        """The places this dataset is looked for (for messages and ``oaml data list``)."""
        return []

    def load(self, split: str, root: str | os.PathLike | None = None, **kwargs: Any) -> Dataset:
        self.check_split(split)
        return self._load(split, resolve_root(root), **kwargs)

    def _load(self, split: str, root: Path, **kwargs: Any) -> Dataset:
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------
    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ConfigError(f"dataset {self.name!r} has no split {split!r}; its splits are {', '.join(self.splits)}")

    @property
    def is_ood_only(self) -> bool:
        return self.num_classes is None

    def generates_at_size(self) -> bool:
        """True for generated sets (noise) that are drawn directly at the requested size."""
        return False


def register_dataset(spec: DatasetSpec, *aliases: str) -> DatasetSpec:
    DATASETS.register(spec.name, *aliases)(spec)
    return spec


def get_dataset_spec(name: str) -> DatasetSpec:
    from . import _ensure_registered

    _ensure_registered()
    return DATASETS.get(name)


def build_dataset(
    name: str,
    split: str,
    root: str | os.PathLike | None = None,
    image_size: int | Sequence[int] | None = None,
    channels: int | None = None,
    skip_bad: bool = False,
    *,
    as_ood: bool = False,
    pre_size: int | None = None,
) -> Dataset:
    """Load split ``split`` of registered dataset ``name``, converted to a format if asked.

    ``image_size``/``channels``/``pre_size`` convert every image (see :func:`convert_images`);
    ``skip_bad`` drops unreadable image files (folder and image-list sets) and reports how many;
    ``as_ood`` relabels every sample -1 (how a labelled set such as MNIST is used as OOD).
    In-memory sets are converted at once; file-backed sets lazily, per item.
    """
    spec = get_dataset_spec(name)
    kwargs: dict[str, Any] = {}
    if spec.generates_at_size():
        kwargs = {"image_size": image_size, "channels": channels}
    elif spec.group != "offline":
        kwargs = {"skip_bad": skip_bad}
    ds = spec.load(split, root, **kwargs)
    if isinstance(ds, TensorImageDataset):
        ds = ds.converted(image_size, channels, pre_size)
        return ds.as_ood() if as_ood else ds
    if image_size is None and channels is None and not as_ood:
        return ds
    return ConvertedDataset(ds, image_size, channels, pre_size, ood=as_ood)


def dataset_table(root: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One row per registered dataset: name, splits, classes, availability, source, substitute."""
    from . import _ensure_registered

    _ensure_registered()
    rows = []
    seen: set[int] = set()
    for key in DATASETS.names():
        spec = DATASETS.get(key)
        if id(spec) in seen:
            continue
        seen.add(id(spec))
        try:
            ok = spec.available(root)
        except Exception as exc:  # availability must never crash a listing
            log.debug("availability check of %s failed: %s", spec.name, exc)
            ok = False
        rows.append(
            {
                "name": spec.name,
                "group": spec.group,
                "splits": list(spec.splits),
                "num_classes": spec.num_classes,
                "available": ok,
                "source": spec.source,
                "substitute_for": spec.substitute_for,
                "description": spec.description,
                "split_notes": dict(spec.split_notes),
                "where": spec.where(root),
            }
        )
    return rows


def load_manifest_checked(folder: Path, name: str, fix: str, required: Sequence[str]) -> dict:
    """Read ``folder/manifest.json`` and check the listed files exist; DataError otherwise."""
    from ..utils.io import read_json

    manifest = folder / "manifest.json"
    if not manifest.exists():
        raise missing_error(name, [folder], fix, detail="No manifest.json (the dataset was never prepared there).")
    try:
        meta = read_json(manifest)
    except ValueError as exc:
        raise DataError(f"dataset {name!r}: {manifest} is corrupt ({exc}). Fix: {fix}") from None
    for f in required:
        if not (folder / f).exists():
            raise DataError(f"dataset {name!r}: {folder / f} is missing although {manifest} exists. Fix: {fix}")
    return meta


Loader = Callable[..., Dataset]
