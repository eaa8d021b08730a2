import json

import numpy as np
import pytest

from oaml.errors import BankError, ShapeError
from oaml.outliers.bank import Bank, BankWriter, write_bank


def _data(n=103, d=7, c=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, c, n)


def test_roundtrip_and_gather_order(tmp_path):
    v, lab = _data()
    bank = write_bank(tmp_path / "b", v, lab, kind="id_features", meta={"teacher": "t"}, shard_size=10)
    assert len(bank) == 103 and bank.dim == 7 and len(bank.manifest["shards"]) == 11
    idx = np.array([55, 3, 99, 3, 0])
    np.testing.assert_array_equal(bank.gather(idx), v[idx])
    np.testing.assert_array_equal(bank.labels, lab)
    np.testing.assert_array_equal(bank.class_vectors(2), v[lab == 2])
    counts = bank.manifest["class_counts"]
    assert sum(counts.values()) == 103 and counts["2"] == int((lab == 2).sum())
    bank.verify()


def test_incomplete_bank_is_refused_and_resumes(tmp_path):
    v, lab = _data()
    w = BankWriter(tmp_path / "b", "id_features", 7, {"teacher": "t"}, shard_size=10)
    w.add(v[:35], lab[:35])  # 3 whole shards on disk, 5 rows buffered and lost on "kill"
    del w
    with pytest.raises(BankError, match="incomplete.*--resume"):
        Bank.open(tmp_path / "b")
    w = BankWriter(tmp_path / "b", "id_features", 7, {"teacher": "t"}, shard_size=10)
    assert w.written == 30
    w.add(v[30:], lab[30:])
    bank = w.close()
    np.testing.assert_array_equal(bank.gather(np.arange(103)), v)


def test_other_settings_are_not_mixed(tmp_path):
    v, lab = _data()
    write_bank(tmp_path / "b", v, lab, kind="cood", meta={"teacher": "a"})
    with pytest.raises(BankError, match="other settings"):
        BankWriter(tmp_path / "b", "cood", 7, {"teacher": "b"})
    bank = Bank.open(tmp_path / "b")
    with pytest.raises(BankError, match="teacher='a'"):
        bank.require(teacher="b")
    write_bank(tmp_path / "b", v[:5], lab[:5], kind="cood", meta={"teacher": "b"}, overwrite=True)
    assert len(Bank.open(tmp_path / "b")) == 5


def test_bad_input(tmp_path):
    w = BankWriter(tmp_path / "b", "x", 3)
    with pytest.raises(ShapeError):
        w.add(np.zeros((2, 4)), [0, 1])
    with pytest.raises(BankError, match="non-finite"):
        w.add(np.full((1, 3), np.nan), [0])
    with pytest.raises(BankError, match="missing manifest"):
        Bank.open(tmp_path / "nothing")


def test_corrupt_shard_detected(tmp_path):
    v, lab = _data()
    bank = write_bank(tmp_path / "b", v, lab, kind="x", shard_size=50)
    f = tmp_path / "b" / bank.manifest["shards"][0]["file"]
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BankError, match="corrupt"):
        Bank.open(tmp_path / "b", verify=True)
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["complete"]
