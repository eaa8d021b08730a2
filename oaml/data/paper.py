"""The paper's datasets, read from a data root (none of them can be downloaded on offline machines).

* torchvision formats directly under the root (a torchvision data folder works as is):
  ``cifar10`` (``<root>/cifar-10-batches-py``), ``cifar100`` (``<root>/cifar-100-python``),
  ``mnist-full`` (``<root>/MNIST/raw``), ``svhn`` (``<root>/{train,test}_32x32.mat``).
  ``oaml data prepare NAME --download`` uses torchvision's ``download=True`` (needs network);
  without ``--download`` nothing is fetched.
* ImageNet-1k as ImageFolder folders: ``<root>/imagenet/{train,val}/<wnid>/*.JPEG``.
* OpenOOD v1.5 image lists under ``<root>/openood``: ``benchmark_imglist/<benchmark>/*.txt``
  with ``relative/path label`` lines, images under ``images_classic/`` or ``images_largescale/``
  (the layout OpenOOD's download script produces). Splits are named ``<benchmark>/<role>``,
  e.g. ``textures`` has ``cifar10/test`` and ``imagenet/test``, because OpenOOD keeps one list per
  benchmark.

ID validation splits are seeded, stratified hold-outs of the TEST set, as OpenOOD does for CIFAR:
CIFAR-10/100 ``val`` = 1,000 test images, ``test`` = the other 9,000 (``test-full`` = all 10,000,
used when CIFAR is an OOD set). ImageNet ``val`` = 5 images per class of ILSVRC-2012 val (5,000),
``test`` = the other 45,000. These are our seeded splits, not OpenOOD's exact list files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from .base import DatasetSpec, TensorImageDataset, missing_error, prepare_command, register_dataset, resolve_root, seeded_split
from .offline import SPLIT_SEED
from .user import FolderDataset, ImageListDataset

log = logging.getLogger(__name__)

CIFAR_VAL_SIZE = 1000
IMAGENET_VAL_PER_CLASS = 5


# ==============================================================================================
# torchvision formats
# ==============================================================================================


@dataclass
class TorchvisionSpec(DatasetSpec):
    tv_class: str = ""
    files: tuple[str, ...] = ()  # paths relative to the root that must exist
    holdout_from_test: int = 0  # > 0: val = seeded stratified hold-out of test
    archive_hint: str = ""

    def where(self, root=None) -> list[str]:
        r = resolve_root(root)
        return [str(r / f) for f in self.files]

    def available(self, root=None) -> bool:
        r = resolve_root(root)
        return all((r / f).exists() for f in self.files)

    def _fix(self) -> str:
        return (f"`{prepare_command(self.name, '--download')}` where a network exists, or {self.archive_hint} "
                "under the data root (--root / $OAML_DATA)")

    def _tv(self, root: Path, part: str, download: bool = False):
        import torchvision.datasets as tvd

        cls = getattr(tvd, self.tv_class)
        try:
            if self.tv_class == "SVHN":
                return cls(str(root), split=part, download=download)
            return cls(str(root), train=(part == "train"), download=download)
        except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
            raise missing_error(self.name, self.where(root), self._fix(), detail=f"torchvision says: {exc}.") from None
        except ImportError as exc:
            raise DataError(f"dataset {self.name!r} needs {exc.name}: pip install {exc.name}") from None
        except OSError as exc:
            raise DataError(f"dataset {self.name!r}: cannot download/read under {root} ({exc}). Fix: {self._fix()}") from None

    def _import_from(self, source: Path, root: Path) -> None:
        """Bring a local copy into the root: the CIFAR .tar.gz (md5-checked, extracted), the SVHN
        .mat files (a file or a folder holding them) or a folder of MNIST IDX files (.gz or not)."""
        import gzip

        import torchvision.datasets as tvd
        from torchvision.datasets.utils import check_integrity, extract_archive

        from ..utils.io import atomic_path

        cls = getattr(tvd, self.tv_class)
        if self.tv_class in ("CIFAR10", "CIFAR100"):
            if not source.is_file():
                raise DataError(f"dataset {self.name!r}: --from must be the archive {cls.filename}, got {source}")
            if not check_integrity(str(source), cls.tgz_md5):
                raise DataError(f"dataset {self.name!r}: {source} does not have the md5 of {cls.filename} ({cls.tgz_md5}); "
                                "the archive is corrupt or another file")
            extract_archive(str(source), str(root))
        elif self.tv_class == "SVHN":
            files = [source] if source.is_file() else [source / v[1] for v in cls.split_list.values() if (source / v[1]).exists()]
            if not files:
                raise DataError(f"dataset {self.name!r}: no train_32x32.mat / test_32x32.mat at {source}")
            md5 = {v[1]: v[2] for v in cls.split_list.values()}
            for f in files:
                if f.name not in md5 or not check_integrity(str(f), md5[f.name]):
                    raise DataError(f"dataset {self.name!r}: {f} is not an intact SVHN .mat file (md5 mismatch)")
                with atomic_path(root / f.name) as tmp:
                    tmp.write_bytes(f.read_bytes())
        else:  # MNIST: a folder with the four IDX files
            raw = root / "MNIST" / "raw"
            for rel in self.files:
                base = Path(rel).name
                cands = [source / base, source / f"{base}.gz"]
                src = next((c for c in cands if c.is_file()), None)
                if src is None:
                    raise DataError(f"dataset {self.name!r}: {source} lacks {base}[.gz]")
                data = gzip.open(src).read() if src.suffix == ".gz" else src.read_bytes()
                with atomic_path(raw / base) as tmp:
                    tmp.write_bytes(data)

    def prepare(self, root=None, download=False, source=None) -> dict:
        r = resolve_root(root)
        if source:
            self._import_from(Path(source).expanduser(), r)
        if not download and not self.available(r):
            raise missing_error(self.name, self.where(r), self._fix())
        counts = {}
        for part in ("train", "test"):
            ds = self._tv(r, part, download=download)  # verifies md5 (CIFAR, SVHN) / existence (MNIST)
            counts[part] = len(ds)
        return {"dataset": self.name, "root": str(r), "counts": counts, "verified": "torchvision integrity check"}

    def _arrays(self, root: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
        if not self.available(root):
            raise missing_error(self.name, self.where(root), self._fix())
        ds = self._tv(root, part)
        if self.tv_class == "SVHN":
            return np.asarray(ds.data), np.asarray(ds.labels, dtype=np.int64)  # already (N, 3, 32, 32)
        data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
        data = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(data), np.asarray(ds.targets, dtype=np.int64)

    def _load(self, split: str, root: Path, **kwargs: Any) -> TensorImageDataset:
        part = "train" if split == "train" else "test"
        images, labels = self._arrays(root, part)
        if self.holdout_from_test and split in ("val", "test"):
            rest, hold = seeded_split(labels, self.holdout_from_test, SPLIT_SEED)
            idx = hold if split == "val" else rest
            images, labels = images[idx], labels[idx]
        return TensorImageDataset(torch.from_numpy(images), torch.from_numpy(labels), f"{self.name}:{split}")


_CIFAR_NOTES = {
    "train": "50,000: the train set",
    "val": f"{CIFAR_VAL_SIZE:,}: stratified seeded hold-out of the TEST set (as OpenOOD)",
    "test": f"{10000 - CIFAR_VAL_SIZE:,}: the rest of the test set",
    "test-full": "10,000: the whole test set (when used as an OOD set)",
}
register_dataset(TorchvisionSpec(
    name="cifar10", description="CIFAR-10 (torchvision format), 32x32 RGB, 10 classes",
    splits=("train", "val", "test", "test-full"), num_classes=10, group="paper",
    source="torchvision CIFAR10 under the data root", native_channels=3, native_size=(32, 32),
    tv_class="CIFAR10", holdout_from_test=CIFAR_VAL_SIZE, split_notes=_CIFAR_NOTES,
    files=("cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/test_batch", "cifar-10-batches-py/batches.meta"),
    archive_hint="extract cifar-10-python.tar.gz (giving cifar-10-batches-py/)",
))
register_dataset(TorchvisionSpec(
    name="cifar100", description="CIFAR-100 (torchvision format), 32x32 RGB, 100 classes",
    splits=("train", "val", "test", "test-full"), num_classes=100, group="paper",
    source="torchvision CIFAR100 under the data root", native_channels=3, native_size=(32, 32),
    tv_class="CIFAR100", holdout_from_test=CIFAR_VAL_SIZE, split_notes=_CIFAR_NOTES,
    files=("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"),
    archive_hint="extract cifar-100-python.tar.gz (giving cifar-100-python/)",
))
register_dataset(TorchvisionSpec(
    name="mnist-full", description="MNIST (torchvision format), 60k train + 10k test, 28x28 grey",
    splits=("train", "test"), num_classes=10, group="paper",
    source="torchvision MNIST under the data root", native_channels=1, native_size=(28, 28),
    tv_class="MNIST", split_notes={"train": "60,000", "test": "10,000 (the paper's far-OOD set for CIFAR)"},
    files=tuple(f"MNIST/raw/{f}" for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
    archive_hint="put the four uncompressed MNIST IDX files in MNIST/raw/",
), "mnist-torchvision")
register_dataset(TorchvisionSpec(
    name="svhn", description="SVHN (torchvision format), 32x32 RGB digits",
    splits=("train", "test"), num_classes=10, group="paper",
    source="torchvision SVHN under the data root (needs scipy)", native_channels=3, native_size=(32, 32),
    tv_class="SVHN", split_notes={"train": "73,257", "test": "26,032 (the paper's far-OOD set)"},
    files=("train_32x32.mat", "test_32x32.mat"),
    archive_hint="put train_32x32.mat and test_32x32.mat",
))


# ==============================================================================================
# ImageNet-1k as ImageFolder
# ==============================================================================================


@dataclass
class ImageNetFolderSpec(DatasetSpec):
    def folder(self, root=None) -> Path:
        return resolve_root(root) / "imagenet"

    def where(self, root=None) -> list[str]:
        return [str(self.folder(root) / "train"), str(self.folder(root) / "val")]

    def available(self, root=None) -> bool:
        f = self.folder(root)
        return (f / "train").is_dir() and (f / "val").is_dir()

    def _fix(self) -> str:
        return ("ImageNet cannot be downloaded automatically: put ILSVRC-2012 train and val as class folders "
                "(<wnid>/*.JPEG; val sorted into class folders, e.g. with the usual valprep.sh) at "
                f"<root>/imagenet/train and <root>/imagenet/val, then run `{prepare_command(self.name)}`")

    def _folder(self, root: Path, part: str, skip_bad: bool) -> FolderDataset:
        if not self.available(root):
            raise missing_error(self.name, self.where(root), self._fix())
        return FolderDataset(self.folder(root) / part, layout="classes", channels=3, skip_bad=skip_bad, name=f"{self.name}:{part}")

    def prepare(self, root=None, download=False, source=None) -> dict:
        if source:
            raise DataError(f"dataset {self.name!r}: --from is not supported; point --root at the folder that holds "
                            "imagenet/train and imagenet/val (or symlink it to <root>/imagenet)")
        if download:
            raise DataError(f"dataset {self.name!r} cannot be downloaded. Fix: " + self._fix())
        r = resolve_root(root)
        out = {}
        for part in ("train", "val"):
            ds = self._folder(r, part, skip_bad=False)
            if len(ds.classes) != 1000:
                raise DataError(f"dataset {self.name!r}: {self.folder(r) / part} has {len(ds.classes)} class folders, expected 1000")
            out[part] = len(ds)
        return {"dataset": self.name, "counts": out, "classes": 1000}

    def _load(self, split: str, root: Path, skip_bad: bool = False, **kwargs: Any):
        if split == "train":
            return self._folder(root, "train", skip_bad)
        val = self._folder(root, "val", skip_bad)
        labels = val.labels.numpy()
        n_hold = IMAGENET_VAL_PER_CLASS * len(val.classes)
        rest, hold = seeded_split(labels, n_hold, SPLIT_SEED)
        return val.subset(hold if split == "val" else rest, f"{self.name}:{split}")


register_dataset(ImageNetFolderSpec(
    name="imagenet", description="ImageNet-1k (ILSVRC-2012) as ImageFolder class folders",
    splits=("train", "val", "test"), num_classes=1000, group="paper",
    source="ImageFolder at <root>/imagenet/{train,val}", native_channels=3,
    split_notes={"train": "ILSVRC-2012 train", "val": f"{IMAGENET_VAL_PER_CLASS}/class seeded hold-out of ILSVRC val",
                 "test": "the rest of ILSVRC val"},
), "imagenet1k")


# ==============================================================================================
# OpenOOD v1.5 image lists
# ==============================================================================================

OPENOOD_FIX = (
    "download OpenOOD v1.5's benchmark_imglist and images_classic / images_largescale (OpenOOD's "
    "scripts/download/download.py, Google-Drive hosted; not possible offline) and put them under "
    "<root>/openood/, then run `oaml data prepare {name}`"
)


@dataclass
class OpenOODListSpec(DatasetSpec):
    #: split -> (list file relative to benchmark_imglist/, image folder under openood/)
    lists: dict[str, tuple[str, str]] = field(default_factory=dict)

    def base(self, root=None) -> Path:
        return resolve_root(root) / "openood"

    def paths(self, split: str, root=None) -> tuple[Path, Path]:
        lst, images = self.lists[split]
        b = self.base(root)
        return b / "benchmark_imglist" / lst, b / images

    def where(self, root=None) -> list[str]:
        return [str(self.paths(s, root)[0]) for s in self.splits]

    def split_available(self, split: str, root=None) -> bool:
        lst, images = self.paths(split, root)
        return lst.is_file() and images.is_dir()

    def available(self, root=None) -> bool:
        return all(self.split_available(s, root) for s in self.splits)

    def _load(self, split: str, root: Path, skip_bad: bool = False, **kwargs: Any):
        lst, images = self.paths(split, root)
        if not self.split_available(split, root):
            raise missing_error(self.name, [lst, images], OPENOOD_FIX.format(name=self.name))
        return ImageListDataset(lst, images, channels=3, skip_bad=skip_bad, ood=self.num_classes is None,
                                name=f"{self.name}:{split}")

    def prepare(self, root=None, download=False, source=None) -> dict:
        if source:
            raise DataError(f"dataset {self.name!r}: --from is not supported; put OpenOOD's folders under <root>/openood "
                            "(a symlink works) and pass --root")
        r = resolve_root(root)
        if download:
            raise DataError(f"dataset {self.name!r}: automatic download is not supported. Fix: " + OPENOOD_FIX.format(name=self.name))
        counts, missing = {}, []
        for split in self.splits:
            if not self.split_available(split, r):
                missing.append(split)
                continue
            ds = self._load(split, r)
            absent = [p for p, _ in ds.samples if not p.exists()]
            if absent:
                raise DataError(f"dataset {self.name!r} split {split}: {len(absent)} listed image(s) missing, e.g. {absent[0]}. Fix: "
                                + OPENOOD_FIX.format(name=self.name))
            counts[split] = len(ds)
        if not counts:
            raise missing_error(self.name, self.where(r), OPENOOD_FIX.format(name=self.name))
        return {"dataset": self.name, "counts": counts, "missing_splits": missing}


def _openood(name, desc, lists, num_classes=None, aliases=(), substitute=None):
    register_dataset(OpenOODListSpec(
        name=name, description=desc, splits=tuple(lists), num_classes=num_classes, group="paper",
        source="OpenOOD v1.5 image lists under <root>/openood", native_channels=3, lists=lists,
        substitute_for=substitute, split_notes={s: f"benchmark_imglist/{v[0]}" for s, v in lists.items()},
    ), *aliases)


C, L = "images_classic", "images_largescale"
_openood("tin", "TinyImageNet (OpenOOD v1.5 overlap-cleaned lists): near-OOD and OOD-val for CIFAR", {
    "cifar10/test": ("cifar10/test_tin.txt", C), "cifar10/val": ("cifar10/val_tin.txt", C),
    "cifar100/test": ("cifar100/test_tin.txt", C), "cifar100/val": ("cifar100/val_tin.txt", C)}, aliases=("tinyimagenet",))
_openood("tin597", "TinyImageNet-597 (OpenOOD v1.5): the outlier-exposure pool for CIFAR", {
    "cifar10/train": ("cifar10/train_tin597.txt", C), "cifar100/train": ("cifar100/train_tin597.txt", C)})
_openood("dtd-textures", "Textures / DTD (OpenOOD v1.5 lists)", {
    "cifar10/test": ("cifar10/test_texture.txt", C), "cifar100/test": ("cifar100/test_texture.txt", C),
    "imagenet/test": ("imagenet/test_textures.txt", C)}, aliases=("texture-openood",))
_openood("places365", "Places365 (OpenOOD v1.5 lists)", {
    "cifar10/test": ("cifar10/test_places365.txt", C), "cifar100/test": ("cifar100/test_places365.txt", C)})
_openood("ssb-hard", "SSB-hard (OpenOOD v1.5), near-OOD for ImageNet-1k", {"imagenet/test": ("imagenet/test_ssb_hard.txt", L)})
_openood("ninco", "NINCO (OpenOOD v1.5), near-OOD for ImageNet-1k", {"imagenet/test": ("imagenet/test_ninco.txt", L)})
_openood("inaturalist", "iNaturalist (OpenOOD v1.5), far-OOD for ImageNet-1k", {"imagenet/test": ("imagenet/test_inaturalist.txt", L)})
_openood("openimage-o", "OpenImage-O (OpenOOD v1.5), far-OOD and OOD-val for ImageNet-1k", {
    "imagenet/test": ("imagenet/test_openimage_o.txt", L), "imagenet/val": ("imagenet/val_openimage_o.txt", L)})
