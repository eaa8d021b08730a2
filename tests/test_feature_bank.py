"""ID feature bank: shards, meta, per-class selection, resume after an interruption, teacher
identity checks, logits alongside, and the teacher-output cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from oaml.errors import BankError
from oaml.models.teachers import TeacherConfig, load_teacher
from oaml.outliers.bank import Bank
from oaml.outliers.features import (
    TeacherOutputCache,
    bank_indices,
    extract_feature_bank,
    open_feature_bank,
    select_indices,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _teacher(size=32, seed=0):
    torch.manual_seed(seed)
    cfg = TeacherConfig(name="timm:test_efficientnet", pretrained=False, num_classes=3, preprocess={"size": size})
    return load_teacher(cfg)


@pytest.fixture(scope="module")
def teacher():
    return _teacher()


def _images(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 16, 16), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


class ItemDataset(Dataset):
    """A map-style dataset without tensors (goes through the DataLoader path); can crash at an index."""

    def __init__(self, x, y, crash_at=None):
        self.x, self.y, self.crash_at, self.calls = x, y, crash_at, 0
        self.targets = y.tolist()  # labels without loading images, as torchvision datasets

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if self.crash_at is not None and i == self.crash_at:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        return self.x[i], int(self.y[i])


def test_bank_shards_meta_and_content(tmp_path, teacher):
    x, y = _images()
    ds = torch.utils.data.TensorDataset(x, y)
    bank = extract_feature_bank(teacher, ds, tmp_path / "bank", batch_size=7, shard_size=8, dataset_name="toy", split="train", progress=False)
    assert bank.kind == "id_features" and len(bank) == 50 and bank.dim == teacher.feature_dim
    assert len(bank.manifest["shards"]) == 7  # 6 full shards of 8 + 2
    assert np.all(np.diff(bank.labels) >= 0)  # grouped by class
    meta = bank.meta
    assert meta["teacher"] == json.loads(json.dumps(teacher.identity()))
    assert meta["dataset"] == "toy" and meta["split"] == "train" and meta["dataset_size"] == 50
    assert bank.manifest["class_counts"] == {str(c): int((y == c).sum()) for c in range(3)}
    idx = bank_indices(bank)
    assert np.array_equal(np.sort(idx), np.arange(50)) and np.array_equal(bank.labels, y.numpy()[idx])
    _, feats = teacher.outputs(x[torch.from_numpy(idx)])
    np.testing.assert_allclose(bank.to_numpy()[0], feats.numpy(), atol=1e-5)
    # a finished bank is opened again, not rebuilt
    again = extract_feature_bank(teacher, ds, tmp_path / "bank", shard_size=8, dataset_name="toy", split="train", progress=False)
    assert again.manifest["shards"] == bank.manifest["shards"]


def test_per_class_limit_is_deterministic(tmp_path, teacher):
    x, y = _images(60, seed=1)
    ds = torch.utils.data.TensorDataset(x, y)
    bank = extract_feature_bank(teacher, ds, tmp_path / "b", per_class_limit=5, progress=False)
    assert len(bank) == 15 and bank.manifest["class_counts"] == {"0": 5, "1": 5, "2": 5}
    assert bank.meta["selected_per_class"] == {"0": 5, "1": 5, "2": 5}
    labels = y.numpy()
    assert np.array_equal(select_indices(labels, 5, "class", 0), bank_indices(bank))
    assert not np.array_equal(select_indices(labels, 5, "class", 0), select_indices(labels, 5, "class", 1))


def test_resume_after_interruption_gives_identical_bank(tmp_path, teacher):
    x, y = _images(50, seed=2)
    full = extract_feature_bank(teacher, ItemDataset(x, y), tmp_path / "full", batch_size=4, shard_size=8, with_logits=True, progress=False)

    out = tmp_path / "resumed"
    # class order puts dataset index `crash` somewhere in the middle of the bank
    crash = int(select_indices(y.numpy(), None, "class", 0)[30])
    with pytest.raises(KeyboardInterrupt):
        extract_feature_bank(teacher, ItemDataset(x, y, crash_at=crash), out, batch_size=4, shard_size=8, with_logits=True, progress=False)
    partial = Bank.open(out, allow_incomplete=True)
    assert not partial.manifest["complete"] and 0 < len(partial) < 50 and len(partial) % 8 == 0
    with pytest.raises(BankError, match="incomplete"):
        Bank.open(out)

    ds = ItemDataset(x, y)
    resumed = extract_feature_bank(teacher, ds, out, batch_size=4, shard_size=8, with_logits=True, progress=False)
    assert ds.calls == 50 - len(partial)  # rows on disk were not recomputed
    a, la = full.to_numpy()
    b, lb = resumed.to_numpy()
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.array_equal(la, lb)
    np.testing.assert_allclose(Bank.open(out / "logits").to_numpy()[0], Bank.open(tmp_path / "full" / "logits").to_numpy()[0], atol=1e-5)


def test_other_settings_refused_then_overwritten(tmp_path, teacher):
    x, y = _images(30, seed=3)
    ds = torch.utils.data.TensorDataset(x, y)
    extract_feature_bank(teacher, ds, tmp_path / "b", progress=False)
    with pytest.raises(BankError, match="other settings"):
        extract_feature_bank(teacher, ds, tmp_path / "b", per_class_limit=2, progress=False)
    bank = extract_feature_bank(teacher, ds, tmp_path / "b", per_class_limit=2, overwrite=True, progress=False)
    assert len(bank) == 6


def test_teacher_identity_mismatch_detected(tmp_path, teacher):
    x, y = _images(20, seed=4)
    ds = torch.utils.data.TensorDataset(x, y)
    extract_feature_bank(teacher, ds, tmp_path / "b", progress=False)
    open_feature_bank(tmp_path / "b", teacher=teacher)  # same teacher: fine
    other_size = _teacher(size=48)  # same weights recipe, other preprocessing
    with pytest.raises(BankError, match="teacher"):
        open_feature_bank(tmp_path / "b", teacher=other_size)
    bank = Bank.open(tmp_path / "b")
    bank.require(teacher=json.loads(json.dumps(teacher.identity())))
    with pytest.raises(BankError):
        bank.require(teacher=other_size.identity())
    with pytest.raises(BankError, match="split"):
        open_feature_bank(tmp_path / "b", teacher=teacher, split="test")


def test_checkpoint_identity_differs_from_pretrained(tmp_path, teacher):
    from oaml.models.teachers import save_teacher_checkpoint

    ckpt = save_teacher_checkpoint(teacher, tmp_path / "t.pt", val_accuracy=0.5)
    loaded = load_teacher(checkpoint=ckpt)
    assert loaded.identity()["checkpoint_sha256"] is not None
    assert loaded.identity() != teacher.identity()
    x, y = _images(10, seed=5)
    extract_feature_bank(teacher, torch.utils.data.TensorDataset(x, y), tmp_path / "b", progress=False)
    with pytest.raises(BankError):
        open_feature_bank(tmp_path / "b", teacher=loaded)


def test_teacher_output_cache_lookup(tmp_path, teacher):
    x, y = _images(40, seed=6)
    ds = torch.utils.data.TensorDataset(x, y)
    cache = TeacherOutputCache.build(teacher, ds, tmp_path / "cache", shard_size=16, progress=False)
    cache.require(teacher)
    idx = torch.tensor([39, 0, 17, 17, 5])
    logits, feats = cache.lookup(idx)
    lt, ft = teacher.outputs(x[idx])
    assert torch.allclose(logits, lt, atol=1e-5) and torch.allclose(feats, ft, atol=1e-5)
    mem = TeacherOutputCache(tmp_path / "cache", in_memory=True)
    assert torch.equal(mem.lookup(idx)[1], feats)
    with pytest.raises(IndexError):
        cache.lookup([40])
    with pytest.raises(BankError):
        cache.require(_teacher(size=48))


def test_cli_finetune_then_bank_features(tmp_path, capsys):
    """`oaml teacher finetune` then `oaml bank features` on the bundled 8x8 digits (1,797 images)."""
    from oaml.cli.main import main

    out = tmp_path / "teacher"
    rc = main(["teacher", "finetune", "--teacher", "timm:test_efficientnet", "--dataset", "sklearn-digits",
               "--train-split", "test", "--val-split", "val", "--out", str(out), "--image-size", "32",
               "--epochs", "2", "--train-limit", "200", "--no-progress", "--threads", "1", "--device", "cpu"])
    # a random-init timm test model needs local weights: the command must say so, not fall back
    assert rc == 1 and "--teacher-weights" in capsys.readouterr().err

    from safetensors.torch import save_file
    import timm

    save_file(timm.create_model("test_efficientnet").state_dict(), str(tmp_path / "w.safetensors"))
    rc = main(["teacher", "finetune", "--teacher", "timm:test_efficientnet", "--teacher-weights", str(tmp_path / "w.safetensors"),
               "--dataset", "sklearn-digits", "--train-split", "test", "--val-split", "val", "--out", str(out),
               "--image-size", "32", "--epochs", "2", "--train-limit", "200", "--no-progress", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["finetune"]["n_train"] == 200 and len(summary["history"]) == 2
    rc = main(["bank", "features", "--teacher-checkpoint", str(out / "teacher.pt"), "--dataset", "sklearn-digits",
               "--split", "val", "--out", str(tmp_path / "bank"), "--per-class", "4", "--no-progress", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    teacher = load_teacher(checkpoint=out / "teacher.pt")
    bank = open_feature_bank(tmp_path / "bank", teacher=teacher, dataset="sklearn-digits", split="val")
    assert len(bank) == 40 and bank.meta["per_class_limit"] == 4
    assert main(["bank", "info", str(tmp_path / "bank")]) == 0
