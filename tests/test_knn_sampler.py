"""k-NN boundary sampler (C-OOD): exactness against brute force, backends, seeds, resume, errors."""

import builtins
import logging

import numpy as np
import pytest
import torch

from oaml.cli.main import main as cli_main
from oaml.errors import BankError, ConfigError
from oaml.outliers import knn
from oaml.outliers.bank import Bank, write_bank
from oaml.outliers.knn import KNNSamplerConfig, class_seed, sample_class_outliers, sample_outliers

faiss = pytest.importorskip("faiss")


def _class(n=80, d=16, n_far=6, seed=0):
    """A tight cluster around a direction plus ``n_far`` points far from it (the true boundary)."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=d)
    mu /= np.linalg.norm(mu)
    core = mu + 0.15 * rng.normal(size=(n - n_far, d))
    far = mu + 0.9 * rng.normal(size=(n_far, d))
    z = np.concatenate([far, core]).astype(np.float32)  # the far points are rows 0..n_far-1
    return torch.from_numpy(z)


def _unit64(z):
    z = np.asarray(z, np.float64)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def _brute_dk(queries, Z, K, exclude_self=False):
    """Exact Euclidean distance of each query to its K-th nearest row of Z (float64 numpy)."""
    d2 = ((queries[:, None, :] - Z[None, :, :]) ** 2).sum(-1)
    if exclude_self:
        np.fill_diagonal(d2, np.inf)
    return np.sqrt(np.sort(d2, axis=1)[:, K - 1])


def _cfg(**kw):
    base = dict(K=10, S=5, N=64, m=3, R=2, sigma=0.3, backend="torch", device="cpu")
    base.update(kw)
    return KNNSamplerConfig(**base)


def _regenerate_candidates(Z, info, cfg):
    """Candidates by the documented draw order: repeat r, boundary point i -> randn((N, D)) call r*S+i."""
    Zn = torch.nn.functional.normalize(Z.float(), dim=1)
    g = torch.Generator().manual_seed(cfg.seed)
    out = []
    for r in range(cfg.R):
        blocks = []
        for i in range(cfg.S):
            eps = torch.randn((cfg.N, Z.shape[1]), generator=g)
            v = Zn[info.boundary_index[i]] + cfg.sigma * eps
            blocks.append(v / v.norm(dim=1, keepdim=True))
        out.append(torch.stack(blocks))
    return torch.stack(out)  # (R, S, N, D)


# ----------------------------------------------------------------------------------------------
def test_boundary_points_are_the_largest_kth_neighbour_distances():
    Z = _class()
    cfg = _cfg()
    info = sample_class_outliers(Z, cfg, return_info=True)
    Zn = _unit64(Z.numpy())
    dk = _brute_dk(Zn, Zn, cfg.K, exclude_self=True)
    expected = np.argsort(-dk, kind="stable")[: cfg.S]
    np.testing.assert_array_equal(info.boundary_index.numpy(), expected)
    np.testing.assert_allclose(info.boundary_dk.numpy(), dk[expected], rtol=1e-6)
    # known geometry: the planted far points (rows 0..5) hold the 5 largest d_K
    assert set(info.boundary_index.tolist()) <= set(range(6))
    # the K-th neighbour excludes the point itself: with the point counted (the authors' way) it differs
    dk_incl = _brute_dk(Zn, Zn, cfg.K)
    assert not np.allclose(dk_incl[expected], info.boundary_dk.numpy())


def test_kept_candidates_are_the_farthest_of_their_block_and_beyond_the_boundary():
    Z = _class(seed=1)
    cfg = _cfg(seed=3)
    info = sample_class_outliers(Z, cfg, return_info=True)
    assert info.vectors.shape == (cfg.R * cfg.S * cfg.m, Z.shape[1])
    cand = _regenerate_candidates(Z, info, cfg)
    Zn = _unit64(Z.numpy())
    vec = info.vectors.reshape(cfg.R, cfg.S, cfg.m, -1)
    for r in range(cfg.R):
        for i in range(cfg.S):
            dk = _brute_dk(cand[r, i].double().numpy(), Zn, cfg.K)  # candidates: all n points count
            top = np.argsort(-dk, kind="stable")[: cfg.m]
            np.testing.assert_array_equal(info.kept_index[r, i].numpy(), top)
            np.testing.assert_allclose(info.kept_dk[r, i].numpy(), dk[top], rtol=1e-6)
            np.testing.assert_allclose(vec[r, i].numpy(), cand[r, i, top].numpy(), atol=1e-6)
            # kept candidates lie farther from the class than the boundary point they came from
            assert (info.kept_dk[r, i] > info.boundary_dk[i]).all()
            # and beat every candidate that was not kept
            assert dk[top].min() >= np.delete(dk, top).max()
    assert torch.allclose(info.vectors.norm(dim=1), torch.ones(len(info.vectors)), atol=1e-5)


@pytest.mark.parametrize("reference_bugs", [False, True])
def test_torch_and_faiss_backends_give_identical_results(reference_bugs):
    rng = np.random.default_rng(5)
    Z = torch.from_numpy((rng.normal(size=(400, 48)) + 0.4 * rng.normal(size=48)).astype(np.float32))
    cfg = _cfg(K=40, S=12, N=300, m=2, R=2, sigma=0.12, reference_bugs=reference_bugs)
    a = sample_class_outliers(Z, cfg, return_info=True)
    b = sample_class_outliers(Z, cfg.model_copy(update={"backend": "faiss"}), return_info=True)
    # a chunk that splits the candidates differently changes nothing either
    c = sample_class_outliers(Z, cfg.model_copy(update={"chunk_size": 700}), return_info=True)
    for other in (b, c):
        assert torch.equal(a.boundary_index, other.boundary_index)
        assert torch.equal(a.centers, other.centers)
        assert torch.equal(a.kept_index, other.kept_index)
        assert torch.equal(a.vectors, other.vectors)
        assert torch.equal(a.kept_dk, other.kept_dk)


def test_ivf_probing_every_list_equals_exact_search():
    Z = _class(n=200, seed=2)
    cfg = _cfg(backend="faiss")
    exact = sample_class_outliers(Z, cfg)
    ivf = sample_class_outliers(Z, cfg.model_copy(update={"faiss_index": "ivf", "ivf_nlist": 4, "ivf_nprobe": 4}))
    assert torch.equal(exact, ivf)


def test_seeded_reproducibility():
    Z = _class(seed=4)
    a = sample_class_outliers(Z, _cfg(seed=11))
    b = sample_class_outliers(Z, _cfg(seed=11))
    c = sample_class_outliers(Z, _cfg(seed=12))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    g = torch.Generator().manual_seed(11)
    assert torch.equal(sample_class_outliers(Z, _cfg(seed=0), generator=g), a)


def test_reference_bugs_mode_reproduces_the_scrambled_selection_and_shared_noise():
    Z = _class(seed=6)
    cfg = _cfg(reference_bugs=True, seed=2, R=1)
    ref = sample_class_outliers(Z, cfg, return_info=True)
    good = sample_class_outliers(Z, cfg.model_copy(update={"reference_bugs": False}), return_info=True)
    assert not torch.allclose(ref.vectors, good.vectors)
    # replay the authors' loop: permuted pool, ONE noise draw, flat d_K viewed as (N, S), top-m on dim 0
    Zn = torch.nn.functional.normalize(Z, dim=1)
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(cfg.S, generator=g)
    Zn64 = _unit64(Z.numpy())
    dk_incl = _brute_dk(Zn64, Zn64, cfg.K)  # the point counts as its own neighbour
    pool = np.argsort(-dk_incl, kind="stable")[: cfg.S]
    centers = torch.from_numpy(pool)[perm]
    np.testing.assert_array_equal(ref.centers[0].numpy(), centers.numpy())
    eps = torch.randn((cfg.N, Z.shape[1]), generator=g)
    cand = Zn[centers][:, None, :] + cfg.sigma * eps[None]  # shared noise for all blocks
    cand = cand / cand.norm(dim=-1, keepdim=True)  # (S, N, D), flat position = block*N + row
    flat = _brute_dk(cand.reshape(-1, Z.shape[1]).double().numpy(), Zn64, cfg.K)
    scr = flat.reshape(cfg.N, cfg.S)  # torch .view(length, -1)
    rows = np.argsort(-scr, axis=0, kind="stable")[: cfg.m].T  # (S, m): top-m per column
    np.testing.assert_array_equal(ref.kept_index[0].numpy(), rows)
    expected = torch.stack([cand[j, torch.from_numpy(rows[j])] for j in range(cfg.S)]).reshape(-1, Z.shape[1])
    torch.testing.assert_close(ref.vectors, expected, atol=1e-6, rtol=0)
    # the returned points are not the farthest of their block: the correct sampler's are farther
    ref_dk = _brute_dk(ref.vectors.double().numpy(), Zn64, cfg.K)
    assert good.kept_dk.mean().item() > ref_dk.mean()


def test_rescale_norm():
    Z = _class(n=80)
    v = sample_class_outliers(Z, _cfg(rescale_norm=2.5))
    torch.testing.assert_close(v.norm(dim=1), torch.full((len(v),), 2.5), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
def _id_bank(path, classes=4, n=40, d=12, seed=0, meta=None):
    rng = np.random.default_rng(seed)
    v = np.concatenate([rng.normal(size=(n, d)) + 3 * rng.normal(size=d) for _ in range(classes)]).astype(np.float32)
    lab = np.repeat(np.arange(classes), n)
    order = rng.permutation(len(v))  # classes interleaved across shards
    return write_bank(path, v[order], lab[order], kind="id_features",
                      meta=meta or {"teacher": "tiny-teacher", "dataset": "synthetic"}, shard_size=37)


def test_bank_sampling_meta_and_per_class_independence(tmp_path):
    src = _id_bank(tmp_path / "id")
    cfg = _cfg(K=8, S=4, N=32, m=2, R=2, features_per_class=30, seed=7)
    bank = sample_outliers(src, tmp_path / "cood", cfg, progress=False)
    assert bank.kind == "cood" and len(bank) == 4 * cfg.per_class and bank.dim == 12
    assert bank.meta["teacher"] == "tiny-teacher" and bank.meta["dataset"] == "synthetic"
    assert bank.meta["source_meta"]["teacher"] == "tiny-teacher"
    assert bank.meta["config"]["K"] == 8 and bank.meta["seed"] == 7
    bank.require(teacher="tiny-teacher")
    vecs, labels = bank.to_numpy()
    np.testing.assert_array_equal(labels, np.repeat(np.arange(4), cfg.per_class))
    # class 2 alone, with its derived seeds, gives exactly the bank's class-2 block
    Z = src.class_vectors(2, limit=30, seed=class_seed(7, 2, 1))
    g = torch.Generator().manual_seed(class_seed(7, 2, 0))
    np.testing.assert_array_equal(vecs[labels == 2], sample_class_outliers(torch.from_numpy(Z), cfg, g).numpy())
    # a second run with the same settings finds the bank complete
    assert len(sample_outliers(src, tmp_path / "cood", cfg, progress=False)) == len(bank)


def test_interrupted_run_resumes_to_the_same_bank(tmp_path, monkeypatch):
    src = _id_bank(tmp_path / "id", classes=5)
    cfg = _cfg(K=8, S=4, N=32, m=2, R=2)
    full = sample_outliers(src, tmp_path / "full", cfg, progress=False)
    real = knn.sample_class_outliers
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(knn, "sample_class_outliers", dying)
    per = cfg.per_class
    with pytest.raises(KeyboardInterrupt):  # shards of 1.5 classes: a half class is on disk
        sample_outliers(src, tmp_path / "cut", cfg, progress=False, shard_size=per * 3 // 2)
    with pytest.raises(BankError, match="incomplete"):
        Bank.open(tmp_path / "cut")
    part = Bank.open(tmp_path / "cut", allow_incomplete=True)
    assert 0 < len(part) < 5 * per and len(part) % per != 0
    monkeypatch.setattr(knn, "sample_class_outliers", real)
    resumed = sample_outliers(src, tmp_path / "cut", cfg, progress=False, shard_size=per)
    a, la = full.to_numpy()
    b, lb = resumed.to_numpy()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    # other settings in the same folder are refused, not mixed
    with pytest.raises(BankError, match="other settings"):
        sample_outliers(src, tmp_path / "cut", cfg.model_copy(update={"seed": 1}), progress=False)


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"sigma": 0}, "sigma"),
        ({"sigma": -0.1}, "sigma"),
        ({"m": 10, "N": 5}, "m=10 .* N=5"),
        ({"K": 0}, "K"),
        ({"R": 0}, "R"),
        ({"features_per_class": 1}, "features_per_class"),
        ({"backend": "torch", "faiss_index": "ivf"}, "ivf"),
        ({"backend": "annoy"}, "backend"),
        ({"KK": 3}, "unknown key 'KK'"),
    ],
)
def test_bad_settings_fail_with_clear_messages(kw, match):
    with pytest.raises(ConfigError, match=match):
        KNNSamplerConfig(**kw)


def test_bad_classes_fail_and_k_is_clamped(caplog):
    with pytest.raises(ConfigError, match="empty"):
        sample_class_outliers(torch.zeros(0, 8), _cfg())
    with pytest.raises(ConfigError, match="single vector"):
        sample_class_outliers(torch.ones(1, 8), _cfg(S=1))
    with pytest.raises(ConfigError, match="S=5 boundary points .* 4 vectors"):
        sample_class_outliers(torch.randn(4, 8), _cfg())
    with pytest.raises(ConfigError, match="m=3 .* N=2"):  # model_copy skips validation; the sampler re-checks
        sample_class_outliers(torch.randn(20, 8), _cfg().model_copy(update={"N": 2}))
    with caplog.at_level(logging.INFO, logger="oaml.outliers.knn"):
        info = sample_class_outliers(torch.randn(12, 8), _cfg(K=300), return_info=True)
    assert info.K == 11 and "K=300 clamped to n-1=11" in caplog.text


def test_missing_faiss_is_an_error_not_a_fallback(monkeypatch):
    real_import = builtins.__import__

    def no_faiss(name, *a, **k):
        if name == "faiss" or name.startswith("faiss."):
            raise ImportError("no faiss")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(ConfigError, match="faiss package"):
        sample_class_outliers(_class(), _cfg(backend="faiss"))
    sample_class_outliers(_class(), _cfg(backend="auto", R=1))  # auto, exact: torch, no faiss needed


def test_cli_sample(tmp_path, capsys):
    _id_bank(tmp_path / "id", classes=3)
    (tmp_path / "s.yaml").write_text("K: 8\nS: 4\nN: 32\nsigma: 0.2\n")
    rc = cli_main(["sample", "--bank", str(tmp_path / "id"), "--out", str(tmp_path / "cood"), "--config",
                   str(tmp_path / "s.yaml"), "--R", "2", "--m", "3", "--backend", "faiss", "--no-progress"])
    assert rc == 0
    bank = Bank.open(tmp_path / "cood")
    assert len(bank) == 3 * 2 * 4 * 3 and bank.meta["config"]["m"] == 3 and bank.meta["config"]["sigma"] == 0.2
    assert "72 vectors" in capsys.readouterr().out
    rc = cli_main(["sample", "--bank", str(tmp_path / "id"), "--out", str(tmp_path / "bad"), "--S", "41"])
    assert rc == 1 and "S=41" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # checked before anything is written
