"""Content fingerprints of datasets: what a cache of anything computed from a dataset is keyed by
(feature caches of ``oaml eval``, the teacher-output cache of training), never its name."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset


def _parts(ds: Dataset) -> Iterator[tuple]:
    """A dataset as a pre-order list of nodes: wrappers with their settings, then leaves (in-memory
    images, or image files), or ``("unknown", type)`` for a dataset of a kind not known here."""
    from ..data.base import ConvertedDataset

    if isinstance(getattr(ds, "images", None), torch.Tensor):  # TensorImageDataset, ArrayDataset, subsets of them
        yield ("tensor", ds.images, getattr(ds, "labels", None))  # type: ignore[attr-defined]
    elif isinstance(getattr(ds, "samples", None), list) and hasattr(ds, "channels"):  # folders, image lists
        yield ("files", ds.channels, ds.samples, getattr(ds, "skipped", []))  # type: ignore[attr-defined]
    elif isinstance(ds, ConvertedDataset):
        yield ("convert", ds.image_size, ds.channels, ds.pre_size, ds.ood)
        yield from _parts(ds.base)
    elif isinstance(ds, Subset):
        yield ("subset", [int(i) for i in ds.indices])
        yield from _parts(ds.dataset)
    elif isinstance(ds, ConcatDataset):
        yield ("concat", len(ds.datasets))
        for d in ds.datasets:
            yield from _parts(d)
    else:
        yield ("unknown", type(ds).__qualname__)


def dataset_fingerprint(ds: Dataset) -> Optional[str]:
    """sha256 of what ``ds`` yields: for image files their paths, labels, sizes and mtimes; for
    in-memory images the bytes of images and labels; plus every conversion and subset on the way.
    ``None`` for a dataset of an unknown kind (then nothing of it is cached)."""
    h = hashlib.sha256()
    for part in _parts(ds):
        kind = part[0]
        if kind == "unknown":
            return None
        if kind == "tensor":
            for t in part[1:]:
                a = np.ascontiguousarray(torch.as_tensor(t).detach().cpu().numpy()) if t is not None else np.empty(0)
                h.update(f"{a.dtype}{a.shape}".encode())
                h.update(a.view(np.uint8).reshape(-1))
        elif kind == "files":
            h.update(f"files channels={part[1]}\n".encode())
            for path, label in part[2]:
                try:
                    st = os.stat(path)
                    stamp = f"{st.st_size} {st.st_mtime_ns}"
                except OSError:
                    stamp = "missing"
                h.update(f"{path}\0{label}\0{stamp}\n".encode())
        else:
            h.update(json.dumps(part).encode())
    return h.hexdigest()
