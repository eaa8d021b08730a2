"""Data layer: one registry to name and load every dataset, offline benchmark sets, the paper's
datasets from a data root, the user's own folders / image lists / arrays, and named benchmarks.

    from oaml.data import build_dataset, get_benchmark
    ds = build_dataset("fashion-mnist", "train")                       # uint8 (1, 28, 28), labels
    ood = build_dataset("photos", "test", image_size=28, channels=1)   # converted to the ID format
    bench = get_benchmark("fmnist")

Images are uint8 tensors (C, H, W), C in {1, 3}; labels are ints, -1 for OOD sets. The data root
is ``$OAML_DATA`` or ``~/.cache/oaml/data``; every function takes ``root=None`` meaning that.
"""

from __future__ import annotations

from .base import (
    DATASETS,
    ConvertedDataset,
    DatasetSpec,
    TensorImageDataset,
    build_dataset,
    convert_images,
    dataset_table,
    default_root,
    get_dataset_spec,
    resolve_root,
    seeded_split,
)
from .user import ArrayDataset, FolderDataset, ImageListDataset, decode_image, parse_image_list
from . import offline as _offline  # noqa: F401  (registers the offline datasets)
from . import paper as _paper  # noqa: F401  (registers the paper's datasets)
from .benchmarks import BENCHMARKS, Benchmark, OODSetRef, get_benchmark


def _ensure_registered() -> None:
    """Registration happens on import of this package; kept for modules that import ``base`` only."""


__all__ = [
    "DATASETS", "BENCHMARKS", "DatasetSpec", "TensorImageDataset", "ConvertedDataset", "ArrayDataset",
    "FolderDataset", "ImageListDataset", "Benchmark", "OODSetRef", "build_dataset", "convert_images",
    "dataset_table", "default_root", "resolve_root", "get_benchmark", "get_dataset_spec", "decode_image",
    "parse_image_list", "seeded_split",
]
