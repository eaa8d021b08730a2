"""Named benchmarks: an ID dataset + near-OOD + far-OOD sets (+ OOD-val, + an outlier-exposure pool).

    bench = get_benchmark("fmnist")
    train = bench.id_train()                    # uint8 (1, 28, 28) images, labels 0..9
    for ref in bench.near + bench.far:
        ds = bench.ood_test(ref)                # converted to 28x28x1, labels -1
    bench = bench.with_extra_ood("my-set", "/path/to/images")   # group "extra": own row, not in near/far/all

Every OOD set is converted to the benchmark's ``image_size``/``channels`` (resize with antialias,
grey<->RGB), so ID and OOD batches share one format. Offline substitutes carry
``substitute_for`` in their :class:`OODSetRef`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import ConcatDataset, Dataset

from ..errors import ConfigError, DataError
from ..registry import Registry
from .base import TensorImageDataset, build_dataset, get_dataset_spec
from .offline import FMNIST_CLASSES, FMNIST_OPENSET_HELDOUT, FMNIST_OPENSET_ID
from .user import ArrayDataset, FolderDataset

BENCHMARKS: Registry["Benchmark"] = Registry("benchmark")


@dataclass(frozen=True)
class OODSetRef:
    """One OOD set of a benchmark: a registered dataset split, or the user's folder / array."""

    name: str  # display name in reports, e.g. "MNIST"
    dataset: str | None = None  # registry name
    split: str = "test"
    group: str = "far"  # near | far | val | oe | extra (the user's, outside the standard averages)
    substitute_for: str | None = None  # set for offline stand-ins ("Textures (DTD)")
    in_paper: bool = True  # False: in OpenOOD's benchmark but not in the paper's table
    path: str | None = None  # user data: a folder of images
    array: Any = field(default=None, compare=False, repr=False)  # user data: numpy array
    # the benchmark's outlier-exposure pool is cut from the same kind of source (same family of
    # images), so OE-trained methods have seen this distribution
    shares_oe_source: bool = False

    def label(self) -> str:
        return f"{self.name} (substitute for {self.substitute_for})" if self.substitute_for else self.name

    def available(self, root=None) -> bool:
        if self.array is not None:
            return True
        if self.path is not None:
            return Path(self.path).exists()
        spec = get_dataset_spec(self.dataset)  # type: ignore[arg-type]
        if hasattr(spec, "split_available"):
            return spec.split_available(self.split, root)
        return spec.available(root)


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    id_dataset: str
    num_classes: int
    image_size: int
    channels: int
    near: list[OODSetRef]
    far: list[OODSetRef]
    ood_val: list[OODSetRef]
    oe: list[OODSetRef]
    pre_size: int | None = None  # resize shorter side to this, then centre-crop image_size (ImageNet: 256)
    id_splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "val": "val", "test": "test"})
    notes: str = ""
    extra: list[OODSetRef] = field(default_factory=list)  # the user's OOD test sets (with_extra_ood)

    # -- ID ---------------------------------------------------------------------------------
    def id_split(self, split: str, root=None, skip_bad: bool = False) -> Dataset:
        if split not in self.id_splits:
            raise ConfigError(f"benchmark {self.name!r}: ID split must be one of {list(self.id_splits)}, got {split!r}")
        return build_dataset(self.id_dataset, self.id_splits[split], root, self.image_size, self.channels, skip_bad,
                             pre_size=self.pre_size)

    def id_train(self, root=None, skip_bad: bool = False) -> Dataset:
        return self.id_split("train", root, skip_bad)

    def id_val(self, root=None, skip_bad: bool = False) -> Dataset:
        return self.id_split("val", root, skip_bad)

    def id_test(self, root=None, skip_bad: bool = False) -> Dataset:
        return self.id_split("test", root, skip_bad)

    # -- OOD --------------------------------------------------------------------------------
    @property
    def ood_test_sets(self) -> list[OODSetRef]:
        return [*self.near, *self.far, *self.extra]

    def find(self, name: str) -> OODSetRef:
        refs = (*self.ood_test_sets, *self.ood_val, *self.oe)
        for ref in refs:
            if ref.name.lower() == name.lower():
                return ref
        names = [r.name for r in refs]
        raise ConfigError(f"benchmark {self.name!r} has no OOD set {name!r}; it has {', '.join(names)}")

    def build_ood(self, ref: OODSetRef | str, root=None, skip_bad: bool = False) -> Dataset:
        """Any OOD set of this benchmark in the benchmark's format, labels -1."""
        if isinstance(ref, str):
            ref = self.find(ref)
        if ref.array is not None:
            return ArrayDataset(ref.array, name=ref.name).converted(self.image_size, self.channels, self.pre_size)
        if ref.path is not None:
            from .base import ConvertedDataset

            folder = FolderDataset(ref.path, layout="flat", skip_bad=skip_bad, name=ref.name)
            return ConvertedDataset(folder, self.image_size, self.channels, self.pre_size, ood=True)
        return build_dataset(ref.dataset, ref.split, root, self.image_size, self.channels, skip_bad,  # type: ignore[arg-type]
                             as_ood=True, pre_size=self.pre_size)

    def ood_test(self, ref: OODSetRef | str, root=None, skip_bad: bool = False) -> Dataset:
        return self.build_ood(ref, root, skip_bad)

    def ood_sets(self, groups: tuple[str, ...] = ("near", "far"), root=None, only_available: bool = False,
                 paper_only: bool = False, skip_bad: bool = False) -> dict[str, Dataset]:
        """name -> dataset for the OOD sets of the given groups (near, far, val, oe)."""
        by_group = {"near": self.near, "far": self.far, "val": self.ood_val, "oe": self.oe, "extra": self.extra}
        bad = [g for g in groups if g not in by_group]
        if bad:
            raise ConfigError(f"unknown OOD group(s) {bad}; use near, far, val, oe, extra")
        out = {}
        for g in groups:
            for ref in by_group[g]:
                if paper_only and not ref.in_paper:
                    continue
                if only_available and not ref.available(root):
                    continue
                out[ref.name] = self.build_ood(ref, root, skip_bad)
        return out

    def ood_val_set(self, root=None, skip_bad: bool = False) -> Dataset:
        """All OOD-val sets concatenated (for hyperparameter search on ID-val vs OOD-val)."""
        return _concat([self.build_ood(r, root, skip_bad) for r in self.ood_val], f"{self.name}:ood-val")

    def oe_dataset(self, root=None, skip_bad: bool = False) -> Dataset:
        """The outlier-exposure pool, disjoint from every OOD test and val set, labels -1."""
        if not self.oe:
            raise ConfigError(f"benchmark {self.name!r} has no outlier-exposure pool")
        return _concat([self.build_ood(r, root, skip_bad) for r in self.oe], f"{self.name}:oe")

    # -- status / extension -----------------------------------------------------------------
    def missing(self, root=None, paper_only: bool = True) -> list[str]:
        """Datasets this benchmark needs that are not available under ``root``."""
        out = []
        spec = get_dataset_spec(self.id_dataset)
        if not spec.available(root):
            out.append(self.id_dataset)
        for ref in (*self.ood_test_sets, *self.ood_val, *self.oe):
            if paper_only and not ref.in_paper:
                continue
            if not ref.available(root):
                out.append(f"{ref.dataset or ref.path}:{ref.split}")
        return out

    def with_extra_ood(self, name: str, path_or_array: Any, group: str = "extra") -> "Benchmark":
        """A copy of this benchmark with the user's own OOD set (a folder of images or an array).

        A folder is read flat (every image under it, recursively); an array is validated as
        :class:`ArrayDataset`. ``group``: ``extra`` (default: scored in its own row and group,
        leaving the benchmark's near / far / all averages as published), or near, far (joins that
        group and its averages), val (OOD-val) or oe (outlier-exposure pool).
        """
        lists = {"extra": "extra", "near": "near", "far": "far", "val": "ood_val", "oe": "oe"}
        if group not in lists:
            raise ConfigError(f"group must be one of {', '.join(lists)}, got {group!r}")
        if name.lower() in {r.name.lower() for r in (*self.ood_test_sets, *self.ood_val, *self.oe)}:
            raise ConfigError(f"benchmark {self.name!r} already has an OOD set named {name!r}")
        if isinstance(path_or_array, (str, os.PathLike)):
            p = Path(path_or_array).expanduser()
            if not p.is_dir():
                raise DataError(f"extra OOD set {name!r}: folder {p} does not exist")
            FolderDataset(p, layout="flat", name=name)  # fail now on an empty folder
            ref = OODSetRef(name, None, "test", group, in_paper=False, path=str(p))
        else:
            ArrayDataset(path_or_array, name=name)  # validate now
            ref = OODSetRef(name, None, "test", group, in_paper=False, array=path_or_array)
        key = lists[group]
        return dataclasses.replace(self, **{key: [*getattr(self, key), ref]})

    def summary(self, root=None) -> dict:
        def refs(rs):
            return [{"name": r.label(), "dataset": r.dataset, "split": r.split, "in_paper": r.in_paper,
                     "shares_oe_source": r.shares_oe_source, "available": r.available(root)} for r in rs]

        return {"name": self.name, "id": self.id_dataset, "num_classes": self.num_classes,
                "format": [self.channels, self.image_size, self.image_size], "near": refs(self.near),
                "far": refs(self.far), "ood_val": refs(self.ood_val), "oe": refs(self.oe), "extra": refs(self.extra)}


def _concat(parts: list[Dataset], name: str) -> Dataset:
    if all(isinstance(p, TensorImageDataset) for p in parts):
        import torch

        return TensorImageDataset(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]), name)  # type: ignore[attr-defined]
    return ConcatDataset(parts)


def register_benchmark(b: Benchmark, *aliases: str) -> Benchmark:
    BENCHMARKS.register(b.name, *aliases)(b)
    return b


def get_benchmark(name: str) -> Benchmark:
    from . import _ensure_registered

    _ensure_registered()
    return BENCHMARKS.get(name)


R = OODSetRef

FMNIST = register_benchmark(Benchmark(
    name="fmnist",
    description="Offline benchmark: ID Fashion-MNIST; near MNIST-10k and sklearn digits; far texture and photo "
                "patches (substitutes for Textures and Places365) and synthetic noise",
    id_dataset="fashion-mnist", num_classes=10, image_size=28, channels=1,
    near=[R("MNIST", "mnist", "test", "near"), R("sklearn-digits", "sklearn-digits", "test", "near")],
    far=[
        R("Textures*", "textures", "test", "far", substitute_for="Textures (DTD)", shares_oe_source=True),
        R("Photos*", "photos", "test", "far", substitute_for="Places365", shares_oe_source=True),
        R("Gaussian", "gaussian-noise", "test", "far"),
        R("Uniform", "uniform-noise", "test", "far"),
        R("Blobs", "blobs", "test", "far"),
    ],
    ood_val=[  # three OE-disjoint sets and two that share the OE pool's source family
        R("MNIST-val", "mnist", "val", "val"),
        R("sklearn-digits-val", "sklearn-digits", "val", "val"),
        R("Blobs-val", "blobs", "val", "val"),
        R("Textures*-val", "textures", "val", "val", substitute_for="Textures (DTD)", shares_oe_source=True),
        R("Photos*-val", "photos", "val", "val", substitute_for="Places365", shares_oe_source=True),
    ],
    oe=[
        R("Textures*-oe", "textures", "oe", "oe", substitute_for="Textures (DTD)"),
        R("Photos*-oe", "photos", "oe", "oe", substitute_for="Places365"),
    ],
    notes="Not in the paper: the offline stand-in (SPEC section 4). ID val = 5,000 seeded hold-out of the train set. "
          "The OE pool comes from source images used by no test or val set.",
), "fashion-mnist")
register_benchmark(dataclasses.replace(
    FMNIST,
    name="fmnist-openset",
    description="Offline open-set benchmark: ID 6 Fashion-MNIST classes; near the 4 held-out classes' test images, "
                "MNIST-10k and sklearn digits; far, OOD-val and OE as fmnist",
    id_dataset="fashion-mnist-6", num_classes=len(FMNIST_OPENSET_ID),
    near=[R("FMNIST-heldout", "fashion-mnist-heldout", "test", "near"), *FMNIST.near],
    notes="Not in the paper: the same-domain semantic shift that CIFAR-10 vs CIFAR-100 tests (SPEC section 5). ID labels "
          "0..5 = " + ", ".join(f"{i}: {FMNIST_CLASSES[c]}" for i, c in enumerate(FMNIST_OPENSET_ID)) + "; held out: "
          + ", ".join(FMNIST_CLASSES[c] for c in FMNIST_OPENSET_HELDOUT) + " (each has a close ID class: Pullover~Coat, "
          "Shirt~T-shirt/Coat, Dress~T-shirt/Coat, Ankle boot~Sneaker/Sandal). ID train/val/test are fashion-mnist's, "
          "ID classes only (val = 3,000 held out of TRAIN). OOD-val (MNIST, digits, blobs, textures, photos) and the OE pool (patches) "
          "hold no Fashion-MNIST image.",
), "fmnist-6")


def _cifar(name: str, other: str, other_name: str) -> Benchmark:
    n = 10 if name == "cifar10" else 100
    return Benchmark(
        name=name,
        description=f"CIFAR-{n} as in the paper (near {other_name}; far MNIST, SVHN) plus OpenOOD v1.5's TIN, Textures, Places365",
        id_dataset=name, num_classes=n, image_size=32, channels=3,
        near=[R(other_name, other, "test-full", "near"), R("TIN", "tin", f"{name}/test", "near", in_paper=False)],
        far=[
            R("MNIST", "mnist-full", "test", "far"),
            R("SVHN", "svhn", "test", "far"),
            R("Textures", "dtd-textures", f"{name}/test", "far", in_paper=False),
            R("Places365", "places365", f"{name}/test", "far", in_paper=False),
        ],
        ood_val=[R("TIN-val", "tin", f"{name}/val", "val", in_paper=False)],
        oe=[R("TIN-597", "tin597", f"{name}/train", "oe", in_paper=False)],
        notes="ID val = 1,000 seeded hold-out of the test set (test = the other 9,000), as OpenOOD.",
    )


register_benchmark(_cifar("cifar10", "cifar100", "CIFAR-100"), "cifar-10")
register_benchmark(_cifar("cifar100", "cifar10", "CIFAR-10"), "cifar-100")
register_benchmark(Benchmark(
    name="imagenet",
    description="ImageNet-1k as in the paper / OpenOOD v1.5: near SSB-hard, NINCO; far iNaturalist, Textures, OpenImage-O",
    id_dataset="imagenet", num_classes=1000, image_size=224, channels=3, pre_size=256,
    near=[R("SSB-hard", "ssb-hard", "imagenet/test", "near"), R("NINCO", "ninco", "imagenet/test", "near")],
    far=[
        R("iNaturalist", "inaturalist", "imagenet/test", "far"),
        R("Textures", "dtd-textures", "imagenet/test", "far"),
        R("OpenImage-O", "openimage-o", "imagenet/test", "far"),
    ],
    ood_val=[R("OpenImage-O-val", "openimage-o", "imagenet/val", "val")],
    oe=[],
    notes="Images: shorter side to 256, centre crop 224. ID val = 5/class seeded hold-out of ILSVRC val.",
), "imagenet1k", "imagenet-1k")
