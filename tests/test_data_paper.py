"""The paper's datasets from a data root: torchvision formats, ImageNet folders, OpenOOD lists."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd

from _data_helpers import make_image_folder, write_idx
from oaml.data import build_dataset, get_dataset_spec
from oaml.data import paper
from oaml.errors import DataError


def _md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes()).hexdigest()


def make_tiny_cifar10(root: Path, monkeypatch, n_per_batch: int = 20, n_test: int = 40, seed: int = 0) -> dict:
    """CIFAR-10 python pickles in torchvision's layout; torchvision's md5 table is pointed at them."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out = {}
    train_list, test_list = [], []
    for name, n in [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = (np.arange(n) % 10).tolist()
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data, "labels": labels}, fh)
        out[name] = (data, labels)
        (test_list if name == "test_batch" else train_list).append([name, _md5(folder / name)])
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    monkeypatch.setattr(tvd.CIFAR10, "train_list", train_list)
    monkeypatch.setattr(tvd.CIFAR10, "test_list", test_list)
    monkeypatch.setattr(tvd.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names", "md5": _md5(folder / "batches.meta")})
    return out


def test_cifar10_torchvision_layout(tmp_path, monkeypatch):
    made = make_tiny_cifar10(tmp_path, monkeypatch)
    monkeypatch.setattr(get_dataset_spec("cifar10"), "holdout_from_test", 10)
    assert get_dataset_spec("cifar10").available(tmp_path)
    train = build_dataset("cifar10", "train", tmp_path)
    assert len(train) == 100 and train.images.shape[1:] == (3, 32, 32) and train.images.dtype == torch.uint8
    first = made["data_batch_1"][0][0].reshape(3, 32, 32)
    assert torch.equal(train.images[0], torch.from_numpy(first))
    val, test, full = (build_dataset("cifar10", s, tmp_path) for s in ("val", "test", "test-full"))
    assert (len(val), len(test), len(full)) == (10, 30, 40)
    assert val.labels.bincount().tolist() == [1] * 10  # stratified hold-out of the test set
    v = {bytes(x.numpy()) for x in val.images}
    assert not v & {bytes(x.numpy()) for x in test.images}
    grey = build_dataset("cifar10", "test-full", tmp_path, image_size=28, channels=1, as_ood=True)
    assert grey.images.shape == (40, 1, 28, 28) and grey.labels.unique().tolist() == [-1]
    summary = get_dataset_spec("cifar10").prepare(tmp_path)
    assert summary["counts"] == {"train": 100, "test": 40}


def test_cifar10_missing_and_corrupt(tmp_path, monkeypatch):
    with pytest.raises(DataError) as exc:
        build_dataset("cifar10", "train", tmp_path)
    msg = str(exc.value)
    assert "'cifar10'" in msg and str(tmp_path / "cifar-10-batches-py") in msg and "oaml data prepare cifar10 --download" in msg
    make_tiny_cifar10(tmp_path, monkeypatch)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"corrupted")
    with pytest.raises(DataError, match=r"'cifar10'.*corrupted.*--download"):
        build_dataset("cifar10", "test", tmp_path)


def test_mnist_full_torchvision_layout(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    for pre, n in (("train", 12), ("t10k", 7)):
        write_idx(raw / f"{pre}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz=False)
        write_idx(raw / f"{pre}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8), gz=False)
    ds = build_dataset("mnist-full", "test", tmp_path, image_size=32, channels=3, as_ood=True)
    assert ds.images.shape == (7, 3, 32, 32) and ds.labels.unique().tolist() == [-1]
    assert len(build_dataset("mnist-full", "train", tmp_path)) == 12


def test_imagenet_folder_splits(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "imagenet" / "train", classes=("n01", "n02", "n03"), per_class=2, size=(20, 30))
    make_image_folder(tmp_path / "imagenet" / "val", classes=("n01", "n02", "n03"), per_class=4, size=(30, 20))
    monkeypatch.setattr(paper, "IMAGENET_VAL_PER_CLASS", 1)
    train = build_dataset("imagenet", "train", tmp_path)
    val = build_dataset("imagenet", "val", tmp_path, image_size=16, pre_size=18)
    test = build_dataset("imagenet", "test", tmp_path)
    assert len(train) == 6 and len(val) == 3 and len(test) == 9
    img, label = val[0]
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8 and label in (0, 1, 2)
    assert not {p for p, _ in val.base.samples} & {p for p, _ in test.samples}
    with pytest.raises(DataError, match=r"'imagenet'.*imagenet/train.*ImageFolder|'imagenet'.*imagenet/train"):
        build_dataset("imagenet", "train", tmp_path / "elsewhere")


def test_openood_image_list(tmp_path):
    base = tmp_path / "openood"
    make_image_folder(base / "images_largescale" / "ninco", classes=("a", "b"), per_class=2, size=(40, 50))
    lst = base / "benchmark_imglist" / "imagenet" / "test_ninco.txt"
    lst.parent.mkdir(parents=True)
    lst.write_text("ninco/a/0.png 0\nninco/a/1.png 0\nninco/b/0.png 1\nninco/b/1.png 1\n")
    spec = get_dataset_spec("ninco")
    assert spec.available(tmp_path)
    ds = build_dataset("ninco", "imagenet/test", tmp_path, image_size=24, channels=3)
    assert len(ds) == 4
    img, label = ds[2]
    assert img.shape == (3, 24, 24) and label == -1
    assert spec.prepare(tmp_path)["counts"] == {"imagenet/test": 4}
    (base / "images_largescale" / "ninco" / "b" / "1.png").unlink()
    with pytest.raises(DataError, match="does not exist"):
        build_dataset("ninco", "imagenet/test", tmp_path)
    with pytest.raises(DataError) as exc:
        build_dataset("ssb-hard", "imagenet/test", tmp_path)
    assert "'ssb-hard'" in str(exc.value) and "test_ssb_hard.txt" in str(exc.value) and "oaml data prepare ssb-hard" in str(exc.value)


def test_cifar10_prepare_from_archive(tmp_path, monkeypatch):
    import tarfile

    src = tmp_path / "src"
    make_tiny_cifar10(src, monkeypatch)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    root = tmp_path / "root"
    with pytest.raises(DataError, match="md5"):  # the real archive's md5 is checked
        get_dataset_spec("cifar10").prepare(root, source=str(archive))
    monkeypatch.setattr(tvd.CIFAR10, "tgz_md5", _md5(archive))
    summary = get_dataset_spec("cifar10").prepare(root, source=str(archive))
    assert summary["counts"] == {"train": 100, "test": 40}
    assert get_dataset_spec("cifar10").available(root)


def test_mnist_full_prepare_from_folder(tmp_path):
    rng = np.random.default_rng(0)
    for pre, n in (("train", 5), ("t10k", 4)):
        write_idx(tmp_path / "src" / f"{pre}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / "src" / f"{pre}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8))
    summary = get_dataset_spec("mnist-full").prepare(tmp_path / "root", source=str(tmp_path / "src"))
    assert summary["counts"] == {"train": 5, "test": 4}
    with pytest.raises(DataError, match="--from is not supported"):
        get_dataset_spec("imagenet").prepare(tmp_path / "root", source=str(tmp_path))
