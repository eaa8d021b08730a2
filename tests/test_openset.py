"""The open-set benchmark ``fmnist-openset`` (6 ID classes, the 4 others' test images as near OOD)
and the one train-limit selection shared by the teacher fine-tune and the students."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch

from _data_helpers import make_fmnist_dir
from oaml.data import TensorImageDataset, get_benchmark, get_dataset_spec
from oaml.data import offline
from oaml.models.finetune import limited_indices
from oaml.training.build import limited

ID, HELDOUT = offline.FMNIST_OPENSET_ID, offline.FMNIST_OPENSET_HELDOUT


@pytest.fixture(params=["real", "tiny"])
def fmnist(request, tmp_path, monkeypatch):
    """Fashion-MNIST (the Debian files, or a tiny random stand-in) and, per part, raw image bytes
    -> the set of original labels of the images with those bytes."""
    if request.param == "real":
        if not offline.FMNIST_SYSTEM_DIR.is_dir():
            pytest.skip("Debian package dataset-fashion-mnist not installed")
        monkeypatch.setenv("OAML_FASHION_MNIST_DIR", str(offline.FMNIST_SYSTEM_DIR))
    else:
        make_fmnist_dir(tmp_path / "fm", n_train=400, n_test=100)
        monkeypatch.setenv("OAML_FASHION_MNIST_DIR", str(tmp_path / "fm"))
        monkeypatch.setattr(offline, "FMNIST_VAL_SIZE", 50)
    spec = get_dataset_spec("fashion-mnist")
    files = spec.locate()
    by_part = {}
    for part in ("train", "test"):
        images, labels = spec._raw(files, part)
        index = defaultdict(set)
        for im, y in zip(images, labels):
            index[im.tobytes()].add(int(y))
        by_part[part] = (index, np.isin(labels, HELDOUT).sum())
    return request.param, by_part


def _original_labels(ds: TensorImageDataset, index: dict) -> list[set]:
    return [index.get(im.numpy().tobytes(), set()) for im in ds.images[:, 0]]


def test_benchmark_shape():
    bench = get_benchmark("fmnist-openset")
    fm = get_benchmark("fmnist")
    assert bench.num_classes == 6 and bench.id_dataset == "fashion-mnist-6"
    assert get_dataset_spec(bench.id_dataset).num_classes == 6
    assert len(ID) == 6 and len(HELDOUT) == 4 and sorted(ID + HELDOUT) == list(range(10))
    assert [r.dataset for r in bench.near] == ["fashion-mnist-heldout", "mnist", "sklearn-digits"]
    assert bench.far == fm.far and bench.ood_val == fm.ood_val and bench.oe == fm.oe
    assert {r.name for r in bench.far if r.shares_oe_source} == {"Textures*", "Photos*"}
    # OOD-val and OE never come from Fashion-MNIST (the held-out classes stay unseen until test)
    assert not any(isinstance(get_dataset_spec(r.dataset), offline.FashionMNISTSpec) for r in (*bench.ood_val, *bench.oe))
    assert all(f"{i}: {offline.FMNIST_CLASSES[c]}" in bench.notes for i, c in enumerate(ID))


def test_id_splits_hold_only_id_classes(fmnist):
    kind, by_part = fmnist
    bench = get_benchmark("fmnist-openset")
    sizes = {}
    for split, part in (("train", "train"), ("val", "train"), ("test", "test")):
        ds = bench.id_split(split)
        sizes[split] = len(ds)
        labels = ds.labels.numpy()
        assert labels.min() >= 0 and labels.max() <= 5
        originals = _original_labels(ds, by_part[part][0])
        # every image is a Fashion-MNIST image of an ID class, and its label is that class's new index
        assert all(len(o) == 1 for o in originals)
        orig = np.array([next(iter(o)) for o in originals])
        assert not np.isin(orig, HELDOUT).any()
        assert np.array_equal(np.asarray(ID)[labels], orig)
    train_bytes = {im.numpy().tobytes() for im in bench.id_train().images}
    assert not any(im.numpy().tobytes() in train_bytes for im in bench.id_val().images)
    if kind == "real":
        assert sizes == {"train": 33000, "val": 3000, "test": 6000}
        assert torch.bincount(bench.id_val().labels).tolist() == [500] * 6


def test_heldout_set_is_exactly_the_heldout_test_images(fmnist):
    kind, by_part = fmnist
    index, n_heldout = by_part["test"]
    bench = get_benchmark("fmnist-openset")
    ds = bench.ood_test("FMNIST-heldout")
    assert (ds.labels == -1).all() and ds.images.shape[1:] == (1, 28, 28)
    originals = _original_labels(ds, index)
    assert all(len(o) == 1 and next(iter(o)) in HELDOUT for o in originals)
    assert len({im.numpy().tobytes() for im in ds.images}) == len(ds) == n_heldout
    if kind == "real":
        assert len(ds) == 4000


@pytest.mark.parametrize("fmnist", ["real"], indirect=True)
def test_ood_val_holds_no_fashion_mnist_image(fmnist):
    _, by_part = fmnist
    bench = get_benchmark("fmnist-openset")
    if bench.missing():
        pytest.skip("needs the prepared offline data (oaml data prepare offline)")
    ood_val = bench.ood_val_set()
    assert len(ood_val) > 0 and (ood_val.labels == -1).all()
    known = by_part["train"][0].keys() | by_part["test"][0].keys()
    assert not any(im.numpy().tobytes() in known for im in ood_val.images[:, 0])


def test_training_inputs_see_only_the_six_classes(fmnist):
    """Teacher fine-tune, feature bank and students all take bench.id_train() (pipeline.py)."""
    kind, by_part = fmnist
    bench = get_benchmark("fmnist-openset")
    train = bench.id_train()
    sub = limited(train, 100 if kind == "real" else 60, 0)
    assert len(sub) < len(train)
    assert set(sub.labels.tolist()) == set(range(6))
    assert np.array_equal(sub.labels.numpy(), train.labels.numpy()[limited_indices(train.labels.numpy(), len(sub), 0)])
    orig = [next(iter(o)) for o in _original_labels(sub, by_part["train"][0])]
    assert set(orig) == set(ID)


@pytest.mark.parametrize("limit,seed", [(100, 0), (37, 5), (999, 1)])
def test_teacher_and_student_pick_the_same_subset(limit, seed):
    labels = np.random.default_rng(seed).integers(0, 7, 1000)
    index = np.arange(1000)
    images = torch.from_numpy(np.stack([index // 256, index % 256], 1).astype(np.uint8)).view(1000, 1, 1, 2)
    student = limited(TensorImageDataset(images, torch.from_numpy(labels)), limit, seed)
    picked = student.images[:, 0, 0, 0].long() * 256 + student.images[:, 0, 0, 1].long()
    teacher = limited_indices(labels, limit, seed)
    assert teacher.size == limit and np.array_equal(picked.numpy(), teacher)
    assert np.array_equal(student.labels.numpy(), labels[teacher])
    assert abs(np.bincount(labels[teacher], minlength=7) - np.bincount(labels, minlength=7) * limit / 1000).max() < 1
