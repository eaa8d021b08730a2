"""The user's own data: image folders, OpenOOD-style image lists, numpy arrays.

* :class:`FolderDataset` - an ImageFolder layout (one sub-folder per class, sorted names give the
  class indices, as torchvision) or a flat folder of OOD images (label -1).
* :class:`ImageListDataset` - OpenOOD v1.5 image lists: ``relative/path label`` per line,
  paths relative to a data root.
* :class:`ArrayDataset` - a numpy array (N,H,W), (N,H,W,C) or (N,C,H,W), uint8 or float in [0, 1].

Unreadable (corrupt, truncated) files raise :class:`~oaml.errors.DataError` naming the file; with
``skip_bad=True`` every file is decoded once up front, the bad ones are dropped and their number
is reported (``dataset.skipped`` holds their paths).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError, ShapeError
from .base import TensorImageDataset, to_chw_uint8

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def is_image_file(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def decode_image(path: str | Path, channels: int | None = None) -> torch.Tensor:
    """Decode an image file fully into uint8 (C, H, W); DataError naming the file if it fails.

    Without ``channels`` grey images give C=1 and colour (also palette, RGBA, CMYK) images C=3.
    Truncated files are errors (PIL's ``LOAD_TRUNCATED_IMAGES`` is not used).
    """
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                mode = im.mode
                if channels == 1 or (channels is None and mode in _GREY_MODES):
                    if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                        a = np.asarray(im, dtype=np.float64)
                        hi = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
                        arr = np.clip(np.round(a * (255.0 / hi)), 0, 255).astype(np.uint8)
                    else:
                        arr = np.asarray(im.convert("L"))
                else:
                    arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"image file {path} does not exist") from None
    except Exception as exc:  # PIL raises many types for broken files
        raise DataError(
            f"cannot read image file {path}: {type(exc).__name__}: {exc}. "
            "Replace or delete it, or pass skip_bad=True (CLI: --skip-bad) to drop unreadable files."
        ) from None
    return to_chw_uint8(arr, what=str(path))


class _FileImageDataset(Dataset):
    """Shared behaviour of file-backed datasets: a list of (path, label), lazy decoding."""

    name: str

    def __init__(self, samples: list[tuple[Path, int]], channels: int | None, skip_bad: bool, name: str):
        self.name = name
        self.channels = channels
        self.skipped: list[Path] = []
        if skip_bad:
            samples = self._drop_bad(samples)
        self.samples = samples
        self.labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)

    def _drop_bad(self, samples: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
        from ..utils.progress import progress_bar

        good = []
        for path, label in progress_bar(samples, desc=f"checking {self.name}", unit="img", disable=len(samples) < 2000, leave=False):
            try:
                decode_image(path, self.channels)
            except DataError as exc:
                self.skipped.append(Path(path))
                log.debug("skipping %s", exc)
                continue
            good.append((path, label))
        if self.skipped:
            log.warning("%s: skipped %d unreadable image file(s), e.g. %s", self.name, len(self.skipped), self.skipped[0])
        if not good:
            raise DataError(f"{self.name}: all {len(samples)} image files are unreadable (e.g. {samples[0][0]})")
        return good

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return decode_image(path, self.channels), label

    def subset(self, index, name: str | None = None) -> "_FileImageDataset":
        """A copy holding only the samples at ``index`` (same decoding settings)."""
        import copy

        out = copy.copy(self)
        idx = [int(i) for i in np.asarray(index)]
        out.samples = [self.samples[i] for i in idx]
        out.labels = self.labels[torch.as_tensor(idx, dtype=torch.int64)] if idx else self.labels[:0]
        out.name = name or self.name
        return out

    def to_tensor_dataset(self) -> TensorImageDataset:
        """Decode everything into memory (images must share one size: convert first otherwise)."""
        imgs = [self[i][0] for i in range(len(self))]
        shapes = {tuple(im.shape) for im in imgs}
        if len(shapes) > 1:
            raise ShapeError(f"{self.name}: images differ in shape ({sorted(shapes)[:3]} ...); give image_size/channels")
        return TensorImageDataset(torch.stack(imgs), self.labels.clone(), self.name)


class FolderDataset(_FileImageDataset):
    """A folder of images.

    ``layout="classes"``: ImageFolder (``path/<class>/<image>``; classes sorted by name -> 0..K-1;
    images found recursively under each class folder). ``layout="flat"``: every image under
    ``path`` (recursively), label -1 (an OOD set). ``layout="auto"``: ``classes`` if ``path``
    has sub-folders and no images directly in it, ``flat`` otherwise.
    ``classes``: an explicit class list (ImageFolder order otherwise); a listed class with no
    images is an error, as is an empty folder.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        layout: str = "auto",
        channels: int | None = None,
        skip_bad: bool = False,
        classes: Sequence[str] | None = None,
        name: str | None = None,
    ):
        root = Path(path).expanduser()
        name = name or f"folder:{root}"
        if not root.is_dir():
            raise DataError(f"{name}: folder {root} does not exist or is not a folder")
        if layout not in ("auto", "classes", "flat"):
            raise ConfigError(f"layout must be auto, classes or flat, got {layout!r}")
        top_images = sorted(p for p in root.iterdir() if p.is_file() and is_image_file(p))
        subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if layout == "auto":
            layout = "classes" if subdirs and not top_images else "flat"
        self.layout = layout
        if layout == "flat":
            files = sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p) and not _hidden(p, root))
            if not files:
                raise DataError(f"{name}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in {root}")
            samples = [(p, -1) for p in files]
            self.classes: list[str] = []
        else:
            if top_images:
                raise DataError(
                    f"{name}: {root} has image files next to class folders (e.g. {top_images[0].name}); "
                    "an ImageFolder layout keeps every image inside a class folder (or use layout='flat')"
                )
            class_names = list(classes) if classes is not None else [d.name for d in subdirs]
            if not class_names:
                raise DataError(f"{name}: {root} has no class folders")
            samples = []
            empty = []
            for k, cname in enumerate(class_names):
                cdir = root / cname
                files = sorted(p for p in cdir.rglob("*") if p.is_file() and is_image_file(p)) if cdir.is_dir() else []
                if not files:
                    empty.append(cname)
                samples.extend((p, k) for p in files)
            if empty:
                raise DataError(
                    f"{name}: class folder(s) with no images under {root}: {', '.join(empty[:10])}"
                    f"{' ...' if len(empty) > 10 else ''}. Every class needs at least one image; remove the "
                    "empty folders or add images"
                )
            self.classes = class_names
        self.root = root
        super().__init__(samples, channels, skip_bad, name)

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) or None


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(root).parts)


def parse_image_list(list_file: str | os.PathLike) -> list[tuple[str, int]]:
    """Parse an OpenOOD image list: ``relative/path label`` per line (blank lines and '#' skipped).

    The label is the last whitespace-separated field, so paths may contain spaces.
    """
    list_file = Path(list_file)
    out = []
    with open(list_file) as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2:
                raise DataError(f"{list_file}:{n}: expected 'relative/path label', got {line!r}")
            try:
                label = int(parts[1])
            except ValueError:
                raise DataError(f"{list_file}:{n}: label {parts[1]!r} is not an integer") from None
            out.append((parts[0], label))
    if not out:
        raise DataError(f"image list {list_file} has no entries")
    return out


class ImageListDataset(_FileImageDataset):
    """OpenOOD v1.5 image list: each line ``relative/path label``, paths relative to ``data_root``.

    ``ood=True`` relabels every sample -1 (OpenOOD's OOD lists carry -1 or the source's labels).
    Construction checks that the list exists and that its first and last files exist under
    ``data_root`` (a wrong data root is caught at once); other missing files raise on access, or
    are dropped with ``skip_bad=True``.
    """

    def __init__(
        self,
        list_file: str | os.PathLike,
        data_root: str | os.PathLike,
        channels: int | None = None,
        skip_bad: bool = False,
        ood: bool = False,
        name: str | None = None,
    ):
        list_file, data_root = Path(list_file).expanduser(), Path(data_root).expanduser()
        name = name or f"list:{list_file.name}"
        if not list_file.is_file():
            raise DataError(f"{name}: image list {list_file} does not exist")
        entries = parse_image_list(list_file)
        for rel, _ in (entries[0], entries[-1]):
            if not (data_root / rel).exists():
                raise DataError(
                    f"{name}: {data_root / rel} (listed in {list_file}) does not exist; is {data_root} the right data root?"
                )
        self.list_file, self.data_root = list_file, data_root
        samples = [(data_root / rel, -1 if ood else lab) for rel, lab in entries]
        super().__init__(samples, channels, skip_bad, name)


class ArrayDataset(TensorImageDataset):
    """A numpy array (or tensor) of images: (N,H,W), (N,H,W,C) or (N,C,H,W), C in {1,3}.

    ``uint8`` is taken as is; floats must be finite and in [0, 1] (scaled by 255 and rounded).
    ``layout`` ("auto", "nhwc", "nchw") resolves 4-d arrays whose dims 1 and 3 could both be the
    channel axis. ``labels`` default to -1 (an OOD set).
    """

    def __init__(self, array, labels=None, layout: str = "auto", name: str = "array"):
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        a = np.asarray(array)
        if a.dtype == object or a.ndim not in (3, 4):
            raise ShapeError(f"{name}: expected an array (N,H,W), (N,H,W,C) or (N,C,H,W); got shape {a.shape}, dtype {a.dtype}")
        if a.shape[0] == 0:
            raise ShapeError(f"{name}: the array holds no images")
        if layout not in ("auto", "nhwc", "nchw"):
            raise ConfigError(f"layout must be auto, nhwc or nchw, got {layout!r}")
        if a.ndim == 3:
            a = a[:, None]
        else:
            if layout == "auto":
                c_first, c_last = a.shape[1] in (1, 3), a.shape[3] in (1, 3)
                if c_first and c_last:
                    raise ShapeError(f"{name}: shape {a.shape} is ambiguous (channels first or last?); pass layout='nchw' or 'nhwc'")
                if not (c_first or c_last):
                    raise ShapeError(f"{name}: shape {a.shape} has no channel axis of size 1 or 3 at position 1 or 3")
                layout = "nchw" if c_first else "nhwc"
            if layout == "nhwc":
                a = a.transpose(0, 3, 1, 2)
            if a.shape[1] not in (1, 3):
                raise ShapeError(f"{name}: {a.shape[1]} channels; expected 1 or 3")
        if a.dtype == np.uint8:
            u8 = np.ascontiguousarray(a)
        elif np.issubdtype(a.dtype, np.floating):
            if not np.isfinite(a).all():
                raise ShapeError(f"{name}: float images contain NaN or infinity")
            lo, hi = float(a.min()), float(a.max())
            if lo < 0.0 or hi > 1.0:
                raise ShapeError(
                    f"{name}: float images must lie in [0, 1], found [{lo:.4g}, {hi:.4g}]; "
                    "scale them (x/255 for 0-255 data) or pass uint8"
                )
            u8 = np.round(a * 255.0).astype(np.uint8)
        else:
            raise ShapeError(f"{name}: dtype {a.dtype} not supported; pass uint8 (0-255) or float in [0, 1]")
        n = u8.shape[0]
        if labels is not None:
            lab = np.asarray(labels)
            if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer):
                raise ShapeError(f"{name}: labels must be {n} integers, got shape {lab.shape}, dtype {lab.dtype}")
            labels = torch.from_numpy(lab.astype(np.int64))
        super().__init__(torch.from_numpy(u8), labels, name)
