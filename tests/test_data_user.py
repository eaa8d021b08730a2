"""Conversions and the user's own data: arrays, image folders, OpenOOD image lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _data_helpers import make_image_folder, write_png
from oaml.data import ArrayDataset, FolderDataset, ImageListDataset, convert_images, default_root, parse_image_list
from oaml.data.base import ConvertedDataset, seeded_split
from oaml.errors import ConfigError, DataError, ShapeError


# ---------------------------------------------------------------------------------------------- root
def test_default_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("OAML_DATA", str(tmp_path / "x"))
    assert default_root() == tmp_path / "x"
    monkeypatch.delenv("OAML_DATA")
    assert str(default_root()).endswith(".cache/oaml/data")


# ---------------------------------------------------------------------------------------------- convert
def test_grey_to_rgb_and_back():
    g = torch.randint(0, 256, (2, 1, 5, 6), dtype=torch.uint8)
    rgb = convert_images(g, channels=3)
    assert rgb.shape == (2, 3, 5, 6) and rgb.dtype == torch.uint8
    assert torch.equal(rgb[:, 0], g[:, 0]) and torch.equal(rgb[:, 2], g[:, 0])
    assert torch.equal(convert_images(rgb, channels=1), g)  # luma weights sum to 1


def test_rgb_to_grey_uses_luma():
    x = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    x[:, 0] = 255  # pure red
    assert int(convert_images(x, channels=1)[0, 0, 0, 0]) == round(0.299 * 255)


def test_resize_antialias_and_centre_crop():
    # a fine checkerboard averages to mid-grey with antialiasing (nearest/no-AA would alias)
    board = (torch.arange(64).view(8, 8).add(torch.arange(64).view(8, 8).T) % 2 * 255).to(torch.uint8)
    img = board.repeat(8, 8)[None, None]  # (1,1,64,64)
    small = convert_images(img, image_size=8)
    assert small.shape == (1, 1, 8, 8)
    assert (small.float() - 127.5).abs().max() < 20
    # non-square -> shorter side resized, centre crop
    wide = torch.zeros(1, 40, 80, dtype=torch.uint8)
    wide[:, :, 20:60] = 255  # centre half white
    out = convert_images(wide, image_size=20)
    assert out.shape == (1, 20, 20) and out.float().mean() > 250
    # pre_size: resize shorter side to 30 then crop 20
    out2 = convert_images(torch.zeros(3, 40, 40, dtype=torch.uint8), image_size=20, pre_size=30)
    assert out2.shape == (3, 20, 20)


def test_convert_rejects_bad_input():
    with pytest.raises(ShapeError):
        convert_images(torch.zeros(1, 2, 4, 4, dtype=torch.uint8), channels=3)
    with pytest.raises(ShapeError):
        convert_images(torch.zeros(1, 1, 4, 4), channels=3)
    with pytest.raises(ConfigError):
        convert_images(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), channels=2)


def test_seeded_split_stratified_and_deterministic():
    labels = np.repeat(np.arange(5), 20)
    rest, hold = seeded_split(labels, 10, seed=3)
    rest2, hold2 = seeded_split(labels, 10, seed=3)
    assert np.array_equal(hold, hold2) and not set(rest) & set(hold) and len(rest) + len(hold) == 100
    assert np.bincount(labels[hold]).tolist() == [2] * 5


# ---------------------------------------------------------------------------------------------- arrays
@pytest.mark.parametrize(
    "shape,expected",
    [((4, 7, 9), (1, 7, 9)), ((4, 7, 9, 3), (3, 7, 9)), ((4, 3, 7, 9), (3, 7, 9)), ((4, 7, 9, 1), (1, 7, 9))],
)
def test_array_dataset_layouts(shape, expected):
    a = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    ds = ArrayDataset(a)
    img, label = ds[1]
    assert tuple(img.shape) == expected and img.dtype == torch.uint8 and label == -1


def test_array_dataset_nhwc_values_and_float():
    a = np.random.default_rng(0).integers(0, 256, size=(2, 5, 6, 3), dtype=np.uint8)
    ds = ArrayDataset(a, labels=[1, 0])
    assert torch.equal(ds[0][0], torch.from_numpy(a[0].transpose(2, 0, 1).copy())) and ds[0][1] == 1
    f = ArrayDataset(a.astype(np.float32) / 255.0)
    assert torch.equal(f.images, ds.images)


def test_array_dataset_errors():
    with pytest.raises(ShapeError, match=r"\[0, 1\]"):
        ArrayDataset(np.full((2, 4, 4), 3.0))
    with pytest.raises(ShapeError, match="NaN"):
        ArrayDataset(np.full((2, 4, 4), np.nan))
    with pytest.raises(ShapeError, match="dtype"):
        ArrayDataset(np.zeros((2, 4, 4), dtype=np.int32))
    with pytest.raises(ShapeError, match="ambiguous"):
        ArrayDataset(np.zeros((2, 3, 5, 3), dtype=np.uint8))
    assert ArrayDataset(np.zeros((2, 3, 5, 3), dtype=np.uint8), layout="nchw").images.shape == (2, 3, 5, 3)
    with pytest.raises(ShapeError, match="channel"):
        ArrayDataset(np.zeros((2, 5, 5, 5), dtype=np.uint8))
    with pytest.raises(ShapeError, match="labels"):
        ArrayDataset(np.zeros((2, 4, 4), dtype=np.uint8), labels=[1, 2, 3])
    with pytest.raises(ShapeError):
        ArrayDataset(np.zeros((4, 4), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- folders
def test_folder_dataset_classes(tmp_path):
    root = make_image_folder(tmp_path / "f", classes=("b_dog", "a_cat"), per_class=2)
    ds = FolderDataset(root)
    assert ds.layout == "classes" and ds.classes == ["a_cat", "b_dog"] and len(ds) == 4
    img, label = ds[0]
    assert img.shape == (3, 12, 10) and img.dtype == torch.uint8 and label == 0
    assert sorted(ds.labels.tolist()) == [0, 0, 1, 1]


def test_folder_dataset_flat_and_grey(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        write_png(tmp_path / "ood" / f"{i}.png", rng.integers(0, 256, size=(9, 9), dtype=np.uint8))
    ds = FolderDataset(tmp_path / "ood")
    assert ds.layout == "flat" and len(ds) == 3 and ds[0][1] == -1 and ds[0][0].shape == (1, 9, 9)
    assert FolderDataset(tmp_path / "ood", channels=3)[0][0].shape == (3, 9, 9)


def test_folder_empty_class_is_clear_error(tmp_path):
    root = make_image_folder(tmp_path / "f", classes=("a", "b"), per_class=1)
    (root / "c_empty").mkdir()
    with pytest.raises(DataError, match="c_empty"):
        FolderDataset(root)
    with pytest.raises(DataError, match="does not exist"):
        FolderDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        FolderDataset(tmp_path / "empty", layout="flat")


def test_corrupt_image_named_and_skippable(tmp_path):
    root = make_image_folder(tmp_path / "f", classes=("a", "b"), per_class=3)
    good = (root / "a" / "0.png").read_bytes()
    (root / "a" / "1.png").write_bytes(good[: len(good) // 2])  # truncated
    (root / "b" / "2.png").write_bytes(b"not an image at all")
    ds = FolderDataset(root)
    assert len(ds) == 6
    with pytest.raises(DataError, match=r"a/1\.png.*skip_bad"):
        ds[1]
    ds2 = FolderDataset(root, skip_bad=True)
    assert len(ds2) == 4 and len(ds2.skipped) == 2
    assert {p.name for p in ds2.skipped} == {"1.png", "2.png"}
    assert all(ds2[i][0].shape == (3, 12, 10) for i in range(len(ds2)))


def test_converted_dataset_lazy(tmp_path):
    root = make_image_folder(tmp_path / "f", per_class=1)
    ds = ConvertedDataset(FolderDataset(root), image_size=8, channels=1, ood=True)
    img, label = ds[0]
    assert img.shape == (1, 8, 8) and label == -1
    assert ds.labels.tolist() == [-1, -1]
    sub = ConvertedDataset(FolderDataset(root), image_size=8).subset([1])
    assert len(sub) == 1 and sub.labels.tolist() == [1] and sub[0][0].shape == (3, 8, 8)


# ---------------------------------------------------------------------------------------------- image lists
def test_image_list_dataset(tmp_path):
    root = make_image_folder(tmp_path / "imgs", classes=("x", "y"), per_class=2)
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\nx/0.png 3\n\ny/1.png 7\ny/0.png -1\n")
    assert parse_image_list(lst) == [("x/0.png", 3), ("y/1.png", 7), ("y/0.png", -1)]
    ds = ImageListDataset(lst, tmp_path / "imgs")
    assert len(ds) == 3 and ds[1][1] == 7 and ds[0][0].shape == (3, 12, 10)
    assert ImageListDataset(lst, tmp_path / "imgs", ood=True)[1][1] == -1


def test_image_list_errors(tmp_path):
    make_image_folder(tmp_path / "imgs", classes=("x",), per_class=1)
    lst = tmp_path / "list.txt"
    lst.write_text("x/0.png 1\n")
    with pytest.raises(DataError, match="right data root"):
        ImageListDataset(lst, tmp_path / "elsewhere")
    bad = tmp_path / "bad.txt"
    bad.write_text("x/0.png notanint\n")
    with pytest.raises(DataError, match=r"bad\.txt:1"):
        parse_image_list(bad)
    with pytest.raises(DataError, match="does not exist"):
        ImageListDataset(tmp_path / "missing.txt", tmp_path)
    gone = tmp_path / "gone.txt"
    gone.write_text("x/0.png 1\nx/missing.png 1\nx/0.png 1\n")
    ds = ImageListDataset(gone, tmp_path / "imgs")
    with pytest.raises(DataError, match="missing.png"):
        ds[1]
    assert len(ImageListDataset(gone, tmp_path / "imgs", skip_bad=True)) == 2
