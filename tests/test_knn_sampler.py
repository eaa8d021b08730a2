"""k-NN boundary sampler (C-OOD): exactness against brute force, backends, seeds, resume, errors, and equality of
the optimised sampler with the implementation it replaced (kept here as the reference)."""

import builtins
import itertools
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


# ----------------------------------------------------------------------------------------------
# the optimised sampler (pruned top-k, per-boundary-point tasks on worker threads) against the
# implementation it replaced
# ----------------------------------------------------------------------------------------------
def _ref_kth_sim(Zt, Q, k):
    n = Zt.shape[1]
    out = torch.empty(Q.shape[0])
    step = max(1, (1 << 22) // max(n, k))
    for a in range(0, Q.shape[0], step):
        sims = Q[a:a + step] @ Zt
        if k <= n - k + 1:
            out[a:a + step] = torch.topk(sims, k, dim=1, largest=True, sorted=False).values.amin(dim=1)
        else:
            out[a:a + step] = torch.topk(sims, n - k + 1, dim=1, largest=False, sorted=False).values.amax(dim=1)
    return out


def _ref_exact_kth_d2(Q, Z64, z2, k, exclude=None):
    Q64 = Q.detach().to("cpu", torch.float64)
    L = Q64.shape[0]
    out = torch.empty(L, dtype=torch.float64)
    blk = 64
    Qp = torch.zeros(-(-L // blk) * blk, Q64.shape[1], dtype=torch.float64)
    Qp[:L] = Q64
    ZT = Z64.T.contiguous()
    for a in range(0, L, blk):
        q = Qp[a:a + blk]
        d2 = (q * q).sum(1, keepdim=True) + z2[None, :] - 2.0 * (q @ ZT)
        d2.clamp_(min=0.0)
        rows = min(blk, L - a)
        d2 = d2[:rows]
        if exclude is not None:
            d2[torch.arange(rows), exclude[a:a + rows]] = np.inf
        out[a:a + rows] = torch.kthvalue(d2, k, dim=1).values
    return out


def _ref_select_top(approx, k, tol, exact_fn):
    approx = approx.detach().float().cpu()
    thr = torch.topk(approx, k, dim=1).values[:, -1:]
    rows, cols = torch.nonzero(approx >= thr - tol, as_tuple=True)
    exact = exact_fn(rows, cols)
    full = torch.full(approx.shape, -np.inf, dtype=torch.float64)
    full[rows, cols] = exact
    vals, order = torch.sort(full, dim=1, descending=True, stable=True)
    return order[:, :k].contiguous(), vals[:, :k].contiguous()


def _reference_sample(Z, cfg):
    """sample_class_outliers of commit e62ab6e (before the optimisation), correct mode, torch backend, CPU:
    its code and helpers copied verbatim (less validation and the unused branches)."""
    Z = Z.detach().to("cpu", torch.float32)
    Z = Z / Z.norm(dim=1, keepdim=True)
    n, D = Z.shape
    K = min(cfg.K, n - 1)
    S, N, m, R, sigma = cfg.S, cfg.N, cfg.m, cfg.R, cfg.noise_std(D)
    generator = torch.Generator().manual_seed(cfg.seed)
    Zt = Z.t().contiguous()
    Z64 = Z.to(torch.float64)
    z2 = (Z64 * Z64).sum(1)
    tol = 2.0 * (2.0 * D * 2.0**-24 + 1e-6) + 1e-6
    rows_per_chunk = cfg.chunk_size or max(1, int(cfg.chunk_mb * (1 << 20) // (4 * D + 64)))
    kq = min(K + 1, n)
    approx = torch.empty(n)
    for a in range(0, n, rows_per_chunk):
        approx[a:a + rows_per_chunk] = (2.0 - 2.0 * _ref_kth_sim(Zt, Z[a:a + rows_per_chunk], kq)).float()
    bidx, bd2 = _ref_select_top(approx[None, :], S, tol,
                                lambda _r, cols: _ref_exact_kth_d2(Z[cols], Z64, z2, K, exclude=cols))
    boundary_index = bidx[0]
    Bpts = Z[boundary_index]
    out = torch.empty(R, S, m, D)
    kept_index = torch.empty(R, S, m, dtype=torch.long)
    kept_d2 = torch.empty(R, S, m, dtype=torch.float64)
    bpc = max(1, rows_per_chunk // N)
    buf = torch.empty(min(bpc, S), N, D)
    for r in range(R):
        for a in range(0, S, bpc):
            g = min(bpc, S - a)
            eps = buf[:g]
            for j in range(g):
                torch.randn((N, D), generator=generator, out=eps[j])
            cand = eps.mul_(sigma)
            cand += Bpts[a:a + g][:, None, :]
            cand /= torch.linalg.vector_norm(cand, dim=-1, keepdim=True)
            approx = (2.0 - 2.0 * _ref_kth_sim(Zt, cand.reshape(g * N, D), K)).float().reshape(g, N)
            sel, d2 = _ref_select_top(approx, m, tol, lambda rows, cols: _ref_exact_kth_d2(cand[rows, cols], Z64, z2, K))
            kept_index[r, a:a + g] = sel
            kept_d2[r, a:a + g] = d2
            out[r, a:a + g] = cand[torch.arange(g)[:, None].expand(g, m), sel]
    return out.reshape(R * S * m, D), boundary_index, bd2[0], kept_index, kept_d2


def _spy_searches(monkeypatch):
    made = []
    real = knn._make_search

    def spy(*a, **k):
        made.append(real(*a, **k))
        return made[-1]  # (search, device)

    monkeypatch.setattr(knn, "_make_search", spy)
    return made


def _set_screen(monkeypatch, screen):
    """False: float32 search; True: the bfloat16 screen; "columns": its column-chunked form for every class size."""
    monkeypatch.setattr(knn, "BF16_SCREEN", bool(screen))
    if screen == "columns":
        monkeypatch.setattr(knn, "_COLUMN_SCREEN_MIN", 8)


@pytest.mark.parametrize("screen", [False, True, "columns"], ids=["fp32", "bf16-screen", "bf16-columns"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "n, d, kw",
    [
        (400, 48, dict(K=40, S=12, N=600, m=2, R=2, sigma=0.12)),  # pruning at work (most rows never ranked)
        (300, 64, dict(K=120, S=20, N=257, m=3, R=2, sigma=0.2, chunk_size=700)),  # K > n/2: the other top-k side
        (150, 32, dict(K=300, S=10, N=90, m=5, R=3, sigma=0.3)),  # K clamped to n-1
        (200, 32, dict(K=10, S=200, N=40, m=2, R=1, sigma=0.3)),  # every point a boundary point
        (240, 40, dict(K=30, S=8, N=500, m=2, R=2, sigma=1e-4)),  # near-identical candidates: ties within tol
        (120, 32, dict(K=20, S=6, N=300, m=2, R=2, sigma=0.25, sigma_reference_dim=768, chunk_size=50)),
    ],
)
def test_optimised_sampler_equals_the_previous_implementation(monkeypatch, screen, threads, n, d, kw):
    _set_screen(monkeypatch, screen)
    rng = np.random.default_rng(n + d)
    Z = torch.from_numpy((rng.normal(size=(n, d)) + 0.5 * rng.normal(size=d)).astype(np.float32))
    if kw["sigma"] < 1e-3:  # duplicated rows: tied d_K among the class points too
        Z[n // 2:] = Z[: n - n // 2]
    cfg = _cfg(seed=9, **kw)
    made = _spy_searches(monkeypatch)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)  # the same BLAS threads for both
    try:
        vectors, bidx, bd2, kidx, kd2 = _reference_sample(Z, cfg)
        info = sample_class_outliers(Z, cfg, return_info=True)
        assert torch.get_num_threads() == threads  # the worker pool restores the thread count
    finally:
        torch.set_num_threads(old)
    assert torch.equal(info.boundary_index, bidx)
    assert torch.equal(info.boundary_dk, bd2.sqrt())
    assert torch.equal(info.kept_index, kidx.reshape(info.kept_index.shape))
    assert torch.equal(info.kept_dk, kd2.sqrt())
    assert torch.equal(info.vectors, vectors)
    if kw["N"] >= 500 and kw["sigma"] > 1e-3:  # the fast path pruned: few candidates went through the top-k
        total = cfg.R * cfg.S * cfg.N + n
        assert made[0][0].ranked < 0.5 * total, (made[0][0].ranked, total)
    assert (made[0][0].screened > 0) == bool(screen)  # the bfloat16 screen ran exactly when asked for
    assert (len(knn._column_plan(n, 5, ordered=False)) > 1) == (screen == "columns")


@pytest.mark.parametrize("screen", [False, True, "columns"], ids=["fp32", "bf16-screen", "bf16-columns"])
def test_pruned_search_matches_the_full_ranking_where_it_matters(monkeypatch, screen):
    _set_screen(monkeypatch, screen)
    rng = np.random.default_rng(3)
    Z = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(300, 32)).astype(np.float32)), dim=1)
    s = knn._TorchSearch(Z, torch.device("cpu"))
    assert (s.Z_bf is not None) == bool(screen)
    Q = torch.nn.functional.normalize(Z[0] + 0.3 * torch.randn(2000, 32, generator=torch.Generator().manual_seed(1)), dim=1)
    tol = knn._tolerance(32)
    # the class's columns as they come, nearest-first to the queries' centre (the sampler's order), in any order
    orders = [None, torch.argsort(Z @ Z[0], descending=True), torch.randperm(300, generator=torch.Generator().manual_seed(2))]
    for (k, keep, rows), order in itertools.product([(25, 2, 1024), (200, 3, 256), (299, 1, 300), (1, 4, 77)], orders):
        got = s.top_kth_d2(Q, k, keep, tol, rows, order=order)
        full = 2.0 - 2.0 * s.kth_sim(Q, k)
        thr = torch.topk(full, keep).values[-1]
        kept = got > -np.inf
        # every row the selection could shortlist is ranked (1e-5: the float32 GEMM blocks differ), with its
        # full-ranking value up to that blocking
        assert kept[full >= thr - tol + 1e-5].all()
        torch.testing.assert_close(got[kept], full[kept], atol=1e-5, rtol=0)
        assert kept.sum() < len(Q) / 2  # and most rows were pruned
        assert torch.equal(torch.topk(got, keep).indices.sort().values, torch.topk(full, keep).indices.sort().values)


def test_bf16_rounding_up_and_the_error_bound():
    # _bf16_up: the smallest bfloat16 >= x, for both signs, exact values and values between two bfloat16 numbers
    for x in [0.0, 1.0, -1.0, 0.7, -0.7, 0.123456, -0.98765, 1e-30, 3.0 + 2.0**-7, 2.0**-8 * 0.999]:
        b = knn._bf16_up(x)
        assert b.dtype == torch.bfloat16 and float(b) >= x
        below = torch.tensor(float(b), dtype=torch.float32).view(torch.int32) - (1 << 16) if float(b) > 0 else \
            torch.tensor(float(b), dtype=torch.float32).view(torch.int32) + (1 << 16)
        assert float(below.view(torch.float32)) < x or float(b) == x or float(b) == 0.0
    # the bound holds on adversarial inputs: unit vectors whose entries round badly to bfloat16, aligned pairs
    # (|s| near 1: the largest output rounding) and random pairs, at the paper's D=768 and a small D
    g = torch.Generator().manual_seed(0)
    for D in (768, 32):
        A = torch.randn(400, D, generator=g)
        A += (2.0**-9) * A.sign() * A.abs()  # mantissas near a bfloat16 rounding midpoint
        A = torch.nn.functional.normalize(A, dim=1)
        B = torch.cat([A[:100], torch.nn.functional.normalize(A[100:200] + 0.05 * torch.randn(100, D, generator=g), dim=1),
                       torch.nn.functional.normalize(torch.randn(200, D, generator=g), dim=1)])
        exact = A.double() @ B.double().T
        bf = (A.bfloat16() @ B.T.contiguous().bfloat16()).double()
        assert float((bf - exact).abs().max()) <= knn._bf16_bound(D) - 2 * D * 2.0**-24
        assert knn._bf16_bound(D) < 0.02


def test_a_bf16_gemm_outside_its_bound_switches_the_screen_off(monkeypatch, caplog):
    monkeypatch.setattr(knn, "BF16_SCREEN", True)
    rng = np.random.default_rng(4)
    Z = torch.from_numpy(rng.normal(size=(300, 32)).astype(np.float32))
    cfg = _cfg(K=30, S=8, N=400, m=2, R=1, sigma=0.2, seed=3)
    want = sample_class_outliers(Z, cfg)
    made = _spy_searches(monkeypatch)
    real = knn._bf16_bound
    monkeypatch.setattr(knn, "_bf16_bound", lambda D: real(D) * 1e-6)  # as if the GEMM were worse than assumed
    with caplog.at_level("WARNING", logger="oaml.outliers.knn"):
        got = sample_class_outliers(Z, cfg)
    assert torch.equal(got, want)
    assert made[0][0].Z_bf is None and "bfloat16 screen is off" in caplog.text


def test_a_failing_task_stops_the_workers_and_restores_the_thread_count(monkeypatch):
    calls = {"n": 0}
    real = knn._candidates

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(knn, "_candidates", failing)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            sample_class_outliers(_class(n=120, d=16), _cfg(S=6, N=200, R=3))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)
