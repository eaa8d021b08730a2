import json

import numpy as np
import pytest
import torch

from oaml.errors import BankError, ShapeError
from oaml.outliers.bank import Bank, write_bank
from oaml.outliers.generators import GENERATORS, Generator, batch_seed, generate_bank, rank_batches, select_rows


pytestmark = pytest.mark.usefixtures("one_thread")


class NoisyProjection(Generator):
    """Deterministic in (vectors, seed): a fixed projection plus seeded noise."""

    name = "noisy_projection"

    def __init__(self, d_out=5, fail_after=None):
        self.w = torch.randn(3, d_out, generator=torch.Generator().manual_seed(123))
        self.fail_after = fail_after
        self.calls = 0

    def output_dim(self, input_dim):
        if input_dim != 3:
            raise ShapeError("needs 3-d input")
        return self.w.shape[1]

    def settings(self):
        return {"d_out": int(self.w.shape[1])}

    def generate(self, cood_vectors, labels, seed):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        g = torch.Generator().manual_seed(seed)
        return cood_vectors @ self.w + torch.randn(cood_vectors.shape[0], self.w.shape[1], generator=g)


@pytest.fixture()
def cood(tmp_path):
    rng = np.random.default_rng(0)
    v = rng.normal(size=(103, 3)).astype(np.float32)
    lab = rng.integers(0, 4, 103)
    return write_bank(tmp_path / "cood", v, lab, kind="cood", meta={"teacher": "t1", "dataset": "d"}), v, lab


def test_registry_has_both_generators():
    assert {"feature_diffusion", "stable_diffusion"} <= set(GENERATORS.names())


def test_rank_batches_partition():
    for n in (0, 1, 7, 10, 64):
        for w in (1, 2, 3, 8):
            parts = [rank_batches(n, r, w) for r in range(w)]
            flat = [b for p in parts for b in p]
            assert flat == list(range(n))
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1


def test_batch_seed_and_select_rows():
    assert batch_seed(0, 1) == batch_seed(0, 1) and batch_seed(0, 1) != batch_seed(0, 2) != batch_seed(1, 2)
    assert 0 <= batch_seed(2**40, 10**6) < 2**63
    np.testing.assert_array_equal(select_rows(5, None, 0), np.arange(5))
    sub = select_rows(100, 10, 0)
    assert len(np.unique(sub)) == 10 and np.all(np.diff(sub) > 0)
    np.testing.assert_array_equal(sub, select_rows(100, 10, 0))
    assert not np.array_equal(sub, select_rows(100, 10, 1))
    many = select_rows(4, 10, 0)
    assert len(many) == 10 and set(many.tolist()) == {0, 1, 2, 3}


def test_bank_written_with_labels_and_provenance(cood, tmp_path):
    bank, v, lab = cood
    out = generate_bank(NoisyProjection(), bank, tmp_path / "dood", batch_size=8, batches_per_shard=2, seed=5,
                        progress=False)
    assert out.kind == "dood" and len(out) == 103 and out.dim == 5
    np.testing.assert_array_equal(out.labels, lab)
    assert out.meta["generator"] == "noisy_projection" and out.meta["seed"] == 5
    assert out.meta["source"]["path"] == str(bank.path) and out.meta["source"]["meta"]["teacher"] == "t1"
    out.require(teacher="t1", dataset="d")
    vecs, _ = out.to_numpy()
    # batch 2 is rows 16..23 with the seed of batch 2
    g = torch.Generator().manual_seed(batch_seed(5, 2))
    exp = torch.from_numpy(v[16:24]) @ NoisyProjection().w + torch.randn(8, 5, generator=g)
    np.testing.assert_allclose(vecs[16:24], exp.numpy(), rtol=1e-6)
    # complete + same settings: returned as is; other settings refused without overwrite
    again = generate_bank(NoisyProjection(), bank, tmp_path / "dood", batch_size=8, batches_per_shard=2, seed=5,
                          progress=False)
    assert again.manifest["shards"] == out.manifest["shards"]
    with pytest.raises(BankError):
        generate_bank(NoisyProjection(), bank, tmp_path / "dood", batch_size=8, seed=6, progress=False)
    other = generate_bank(NoisyProjection(), bank, tmp_path / "dood", batch_size=8, seed=6, progress=False,
                          overwrite=True)
    assert other.meta["seed"] == 6


def test_resume_after_kill_is_identical(cood, tmp_path):
    bank, _, _ = cood
    full = generate_bank(NoisyProjection(), bank, tmp_path / "full", batch_size=8, batches_per_shard=2, seed=1,
                         progress=False)
    with pytest.raises(KeyboardInterrupt):
        generate_bank(NoisyProjection(fail_after=7), bank, tmp_path / "part", batch_size=8, batches_per_shard=2,
                      seed=1, progress=False)
    man = json.loads((tmp_path / "part" / "manifest.json").read_text())
    assert not man["complete"] and man["count"] == 48  # 3 whole shards of 2 batches of 8
    with pytest.raises(BankError):
        Bank.open(tmp_path / "part")
    gen = NoisyProjection()
    resumed = generate_bank(gen, bank, tmp_path / "part", batch_size=8, batches_per_shard=2, seed=1, progress=False)
    assert gen.calls == 13 - 6  # only the missing batches were generated
    np.testing.assert_array_equal(resumed.to_numpy()[0], full.to_numpy()[0])
    np.testing.assert_array_equal(resumed.labels, full.labels)


def test_rank_split_and_merge_equals_single_process(cood, tmp_path):
    bank, _, _ = cood
    single = generate_bank(NoisyProjection(), bank, tmp_path / "single", batch_size=8, batches_per_shard=2, seed=3,
                           progress=False, num_samples=150)
    out = tmp_path / "multi"
    parts = []
    for r in (2, 1):  # non-zero ranks write their parts
        parts.append(generate_bank(NoisyProjection(), bank, out, batch_size=8, batches_per_shard=2, seed=3,
                                   progress=False, num_samples=150, rank=r, world_size=3))
    assert [len(p) for p in parts] == [46, 48]  # 19 batches -> 7, 6, 6; the last batch has 6 rows
    assert not (out / "manifest.json").exists()
    merged = generate_bank(NoisyProjection(), bank, out, batch_size=8, batches_per_shard=2, seed=3, progress=False,
                           num_samples=150, rank=0, world_size=3, poll_seconds=0.01)
    assert len(merged) == 150 and not (tmp_path / "multi.parts").exists()
    np.testing.assert_array_equal(merged.to_numpy()[0], single.to_numpy()[0])
    np.testing.assert_array_equal(merged.labels, single.labels)
    assert merged.meta == single.meta


def test_wrong_width_is_refused(tmp_path):
    b = write_bank(tmp_path / "c", np.zeros((4, 7), np.float32), [0, 0, 1, 1], kind="cood")
    with pytest.raises(ShapeError):
        generate_bank(NoisyProjection(), b, tmp_path / "d", progress=False)


def test_rank_and_world_size_come_from_torchrun_env(cood, tmp_path, monkeypatch):
    bank, _, _ = cood
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    part = generate_bank(NoisyProjection(), bank, tmp_path / "d", batch_size=8, seed=0, progress=False)
    assert part.path == tmp_path / "d.parts" / "rank-1-of-2" and part.meta["part"] == {"rank": 1, "world_size": 2}
    assert len(part) == 103 - 7 * 8  # 13 batches -> ranks get 7 and 6
