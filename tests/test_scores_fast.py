"""The float32 fast paths of MDS, ViM, ReAct and KNN agree with the previous float64 code.

``ref_*`` below are copies of the math of the implementations before the float32 work (kept
here as the reference). The float32 paths must agree with them on well-conditioned data
(Spearman >= 0.99999, AUROC within 1e-4), and on ill-conditioned data the detected fallback
must switch to float64 and agree tightly; forcing float32 there shows why it is needed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

import oaml.scores.knn as knn_mod
import oaml.scores.mds as mds_mod
import oaml.scores.react as react_mod
import oaml.scores.vim as vim_mod  # noqa: F401  (registers)
from oaml.errors import ConfigError
from oaml.metrics import ood_metrics
from oaml.scores import FeatureSet, create_score

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------- the previous code's math


def ref_mds(tr: FeatureSet, te: FeatureSet, shrinkage=0.0, rcond=None) -> np.ndarray:
    X = tr.features.to(torch.float64)
    y = tr.labels.long()
    N, D = X.shape
    C = tr.num_classes
    counts = torch.bincount(y, minlength=C).to(torch.float64)
    present = counts > 0
    sums = torch.zeros(C, D, dtype=torch.float64).index_add_(0, y, X)
    means = sums / counts.clamp_min(1.0)[:, None]
    Xc = X - means[y]
    cov = (Xc.T @ Xc) / N
    if shrinkage > 0:
        cov = (1.0 - shrinkage) * cov + shrinkage * torch.trace(cov) / D * torch.eye(D, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(cov)
    rc = rcond if rcond is not None else D * float(np.finfo(np.float64).eps)
    keep = evals > rc * max(float(evals.max()), 0.0)
    L = evecs[:, keep] / evals[keep].sqrt()
    mw = means[present] @ L
    zw = te.features.to(torch.float64) @ L
    d = (zw * zw).sum(1, keepdim=True) - 2.0 * zw @ mw.T + (mw * mw).sum(1)[None, :]
    return (-d.min(dim=1).values.clamp_min(0.0)).numpy()


def ref_vim(tr: FeatureSet, te: FeatureSet, W, b, dim) -> tuple[np.ndarray, float]:
    W, b = W.double(), b.double()
    D = tr.feature_dim
    u = -(torch.linalg.pinv(W) @ b)
    X = tr.features.to(torch.float64) - u
    evals, evecs = torch.linalg.eigh(X.T @ X / X.shape[0])
    R = evecs[:, : D - dim]
    alpha = float(tr.logits.double().max(dim=1).values.mean()) / float((X @ R).norm(dim=1).mean())
    Xt = te.features.to(torch.float64) - u
    energy = torch.logsumexp(te.logits.double(), dim=1)
    return (energy - alpha * (Xt @ R).norm(dim=1)).numpy(), alpha


def ref_react(va: FeatureSet, te: FeatureSet, W, b, percentile=90.0, T=1.0) -> tuple[np.ndarray, float]:
    thr = float(np.percentile(va.features.numpy().ravel(), percentile))
    z = te.features.to(torch.float64).clamp(max=thr) @ W.double().T + b.double()
    return (T * torch.logsumexp(z / T, dim=1)).numpy(), thr


def ref_knn(tr: FeatureSet, te: FeatureSet, K: int) -> np.ndarray:
    a = torch.nn.functional.normalize(tr.features.double(), dim=1)
    q = torch.nn.functional.normalize(te.features.double(), dim=1)
    return -torch.cdist(q, a).sort(dim=1).values[:, K - 1].numpy()


# --------------------------------------------------------------------------------------- data


def make_problem(seed=0, C=10, D=128, n_train=2600, n_val=600, n_test=800):
    """Post-ReLU class clusters (like benchmarks/scores.py) large enough for the float32 paths
    (N D^2 >= 2^25); OOD = unseen clusters."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.relu(torch.randn(C, D, generator=g)) * 0.6
    W = centers / centers.norm(dim=1, keepdim=True) * 3.0
    b = 0.1 * torch.randn(C, generator=g)
    ood_centers = torch.relu(torch.randn(C, D, generator=g)) * 0.6

    def make(n, cs, labelled=True):
        y = torch.randint(0, C, (n,), generator=g)
        f = torch.relu(cs[y] + torch.randn(n, D, generator=g))
        return FeatureSet(f @ W.T + b, f, y if labelled else torch.full((n,), -1))

    tr, va = make(n_train, centers), make(n_val, centers)
    te_id, te_ood = make(n_test // 2, centers), make(n_test // 2, ood_centers, False)
    te = FeatureSet(torch.cat([te_id.logits, te_ood.logits]), torch.cat([te_id.features, te_ood.features]))
    return (W, b), tr, va, te, n_test // 2


@pytest.fixture(scope="module")
def prob():
    return make_problem()


def with_features(fs: FeatureSet, f: torch.Tensor, W=None, b=None) -> FeatureSet:
    logits = fs.logits if W is None else f @ W.T + b
    return FeatureSet(logits, f, fs.labels)


def assert_agree(ours, ref, n_id, rho_min=0.99999, rel=1e-4):
    rho = scipy.stats.spearmanr(ours, ref).statistic
    assert rho >= rho_min, rho
    a, r = ood_metrics(ours[:n_id], ours[n_id:])["auroc"], ood_metrics(ref[:n_id], ref[n_id:])["auroc"]
    assert abs(a - r) <= 1e-4, (a, r)
    err = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    assert err <= rel, err
    return rho, err


# --------------------------------------------------------------------------------- helpers


def test_linear32_and_gram32_match_float64():
    g = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(300, 96, generator=g), torch.randn(70, 96, generator=g), torch.randn(70, generator=g)
    ref = x.double() @ w.double().T + bias.double()
    for xx, ww in ((x, w), (x.T.contiguous().T, w), (torch.randn(300, 200, generator=g)[:, 10:106], w)):
        out = mds_mod.linear32(xx, ww, bias)
        exp = xx.double() @ ww.double().T + bias.double()
        assert out.dtype == torch.float32 and out.shape == (300, 70)
        assert float((out.double() - exp).abs().max()) <= 1e-5 * float(exp.abs().max())
    assert float((mds_mod.linear32(x, w, bias).double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    # gram32: class-centred Gram matrix, exactly symmetric, ~1e-7 relative; both block layouts
    for D in (40, 300):
        X = torch.relu(torch.randn(5000, D, generator=g) + 0.5)
        y = torch.randint(0, 3, (5000,), generator=g)
        means = mds_mod.row_sums64(X, y, 3) / torch.bincount(y, minlength=3).double()[:, None]
        Xc = X.double() - means[y]
        ref = Xc.T @ Xc
        got, err2, rms = mds_mod.gram32(X, means, y)
        assert torch.equal(got, got.T)
        true2 = float(torch.linalg.matrix_norm(got - ref, ord=2))
        assert 0 < true2 <= err2 <= 20 * true2  # the measured estimate bounds the error, not loosely
        assert 0.2 < rms / (float((got - ref).norm()) / D) < 5
        g64 = mds_mod.gram64(X, means, y)
        assert torch.equal(g64, g64.T)
        assert float((g64 - ref).abs().max()) <= 1e-12 * float(ref.abs().max())


def test_float32_resolves_rule():
    eps, tol = 1e-6, 1e-3
    lam = torch.tensor([1e-3 * 1.01, 0.5, 1.0], dtype=torch.float64)  # kappa just under tol / eps
    assert mds_mod.float32_resolves(lam, eps, tol, cutoff=1e-13)
    assert not mds_mod.float32_resolves(torch.tensor([1e-3 * 0.99, 0.5, 1.0], dtype=torch.float64), eps, tol, 1e-13)
    # a dropped (zero) eigenvalue with the default cutoff: kept/dropped is not resolved in float32
    assert not mds_mod.float32_resolves(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), eps, tol, 1e-13)
    # ... but is with a large cutoff (rcond) far from every eigenvalue
    assert mds_mod.float32_resolves(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), eps, tol, 0.1)
    assert not mds_mod.float32_resolves(torch.tensor([0.0, 0.1, 1.0], dtype=torch.float64), eps, tol, 0.1)


# ------------------------------------------------------------------------------------------ MDS


def test_mds_float32_agrees_with_previous_code(prob):
    _, tr, _, te, n_id = prob
    s = create_score("mds").fit(tr)
    assert s.precision_ == "float32" and s.condition_ < 100
    assert_agree(s.score(te), ref_mds(tr, te), n_id, rel=1e-5)
    s2 = create_score("mds", shrinkage=0.2).fit(tr)
    assert s2.precision_ == "float32"
    assert_agree(s2.score(te), ref_mds(tr, te, 0.2), n_id, rel=1e-5)


def test_mds_float32_with_an_empty_class(prob):
    _, tr, _, te, n_id = prob
    keep = tr.labels != 3
    tr3 = FeatureSet(tr.logits[keep], tr.features[keep], tr.labels[keep])
    s = create_score("mds").fit(tr3)
    assert s.precision_ == "float32" and list(s.classes_) == [c for c in range(10) if c != 3]
    assert_agree(s.score(te), ref_mds(tr3, te), n_id, rel=1e-5)


def test_mds_small_fits_are_float64(prob):
    _, tr, _, te, _ = prob
    small = FeatureSet(tr.logits[:300], tr.features[:300, :64], tr.labels[:300])
    te64 = FeatureSet(te.logits, te.features[:, :64])
    s = create_score("mds").fit(small)
    assert s.precision_ == "float64"  # N D^2 < 2^25
    np.testing.assert_allclose(s.score(te64), ref_mds(small, te64), rtol=1e-9, atol=1e-9)


def near_collinear(fs: FeatureSet, k: int, scale: float, seed: int) -> torch.Tensor:
    """The features with their last k units replaced by sums of two others plus noise of size
    ``scale``: k directions of variance ~scale^2 made of large coordinates."""
    g = torch.Generator().manual_seed(seed)
    f = fs.features.clone()
    f[:, -k:] = f[:, :k] + f[:, k : 2 * k] + scale * torch.randn(len(fs), k, generator=g)
    return f


@pytest.mark.parametrize("case", ["near_zero_variance", "dead_units"])
def test_mds_ill_conditioned_falls_back_and_agrees(prob, case, monkeypatch):
    _, tr, _, te, n_id = prob
    if case == "near_zero_variance":
        tr2 = with_features(tr, near_collinear(tr, 4, 1e-3, 1))
        te2 = with_features(te, near_collinear(te, 4, 1e-3, 2))
    else:  # post-ReLU rank deficiency: 8 units never fire
        f, ft = tr.features.clone(), te.features.clone()
        f[:, :8] = 0.0
        ft[:, :8] = 0.0
        tr2, te2 = with_features(tr, f), with_features(te, ft)
    s = create_score("mds").fit(tr2)
    assert s.precision_ == "float64"
    ref = ref_mds(tr2, te2)
    np.testing.assert_allclose(s.score(te2), ref, rtol=1e-9, atol=1e-9)
    if case == "near_zero_variance":
        assert s.condition_ > 1e5
        # what the check prevents: float32 forced here is far off
        monkeypatch.setattr(mds_mod, "float32_resolves", lambda *a: True)
        forced = create_score("mds").fit(tr2)
        assert forced.precision_ == "float32"
        bad = forced.score(te2)
        assert np.max(np.abs(bad - ref)) / np.max(np.abs(ref)) > 1e-2


# ------------------------------------------------------------------------------------------ ViM


def test_vim_float32_agrees_with_previous_code(prob):
    (W, b), tr, _, te, n_id = prob
    for dim in (64, 100):
        s = create_score("vim", dim=dim).fit(tr, head=(W, b))
        assert s.precision_ == "float32" and s.sensitivity_ < vim_mod.ViM.tolerance
        ref, alpha = ref_vim(tr, te, W, b, dim)
        assert s.alpha_ == pytest.approx(alpha, rel=1e-5)
        assert_agree(s.score(te), ref, n_id, rel=1e-4)
        assert s.residual_basis_.shape == (128, 128 - dim)


def test_vim_ill_conditioned_falls_back_and_agrees(prob, monkeypatch):
    (W, _), tr, _, te, n_id = prob
    b = torch.zeros(10)  # u = 0
    # the features live in a 64-dim subspace up to noise of size 1e-5: ViM's residual space
    # (dim=64) holds only that noise, tiny next to the features
    g = torch.Generator().manual_seed(4)
    Q, _ = torch.linalg.qr(torch.randn(128, 128, generator=g))
    top, rest = Q[:, :64], Q[:, 64:]

    def squash(fs):
        noise = 1e-5 * torch.randn(len(fs), 64, generator=g)
        return with_features(fs, fs.features @ top @ top.T + noise @ rest.T, W, b)

    tr2, te2 = squash(tr), squash(te)
    s = create_score("vim", dim=64).fit(tr2, head=(W, b))
    assert s.precision_ == "float64"
    ref, alpha = ref_vim(tr2, te2, W, b, 64)
    np.testing.assert_allclose(s.score(te2), ref, rtol=1e-8, atol=1e-8)
    assert s.alpha_ == pytest.approx(alpha, rel=1e-9)
    # what the check prevents: float32 cannot resolve the tiny residuals
    monkeypatch.setattr(vim_mod.ViM, "tolerance", math.inf)
    forced = create_score("vim", dim=64).fit(tr2, head=(W, b))
    assert forced.precision_ == "float32"
    assert np.max(np.abs(forced.score(te2) - ref)) / np.std(ref) > 1e-2


def test_vim_small_fits_are_float64(prob):
    (W, b), tr, _, te, _ = prob
    small = FeatureSet(tr.logits[:500], tr.features[:500], tr.labels[:500])
    s = create_score("vim", dim=16).fit(small, head=(W, b))
    assert s.precision_ == "float64"  # N D^2 < 2^25
    np.testing.assert_allclose(s.score(te), ref_vim(small, te, W, b, 16)[0], rtol=1e-9, atol=1e-9)


def test_residual_sensitivity():
    lam = torch.tensor([0.1, 0.2, 1.0, 2.0], dtype=torch.float64)
    s = vim_mod.residual_sensitivity(lam, 2, 1e-6)
    expected = 2e-6 * math.sqrt(sum(a * t / (a - t) ** 2 for a in (0.1, 0.2) for t in (1.0, 2.0))) / 0.3
    assert s == pytest.approx(expected, rel=1e-12)
    assert vim_mod.residual_sensitivity(torch.tensor([0.1, 1.0, 1.0, 2.0], dtype=torch.float64), 2, 1e-6) == math.inf


# ---------------------------------------------------------------------------------------- ReAct


def test_percentile_is_numpys_bit_for_bit():
    rng = np.random.default_rng(0)
    arrays = [
        np.maximum(rng.standard_normal(300_000) + 0.3, 0).astype(np.float32),  # post-ReLU
        np.maximum(rng.standard_normal(300_000) - 1.5, 0).astype(np.float32),  # mostly zeros
        np.round(rng.standard_normal(300_000) * 3).astype(np.float64),  # heavy ties
        rng.exponential(size=200_001).astype(np.float64) ** 3,
        rng.standard_normal(7).astype(np.float32),
    ]
    for a in arrays:
        for p in (0.0, 0.5, 33.3, 50.0, 85.0, 90.0, 99.0, 99.99, 100.0):
            ours, ref = react_mod.percentile(a, p), np.percentile(a, p)
            assert ours == ref and np.asarray(ours).dtype == np.asarray(ref).dtype, (a.dtype, a.size, p)


def test_react_float32_agrees_with_previous_code(prob):
    _, _, va, te, n_id = prob
    g = torch.Generator().manual_seed(7)
    W, b = torch.randn(40, 128, generator=g) * 0.3, torch.randn(40, generator=g)  # D C = 5120 weights
    va2, te2 = with_features(va, va.features, W, b), with_features(te, te.features, W, b)
    s = create_score("react").fit(va2, head=(W, b))
    assert s.precision_ == "float32"
    ref, thr = ref_react(va2, te2, W, b)
    assert s.threshold_ == thr
    assert_agree(s.score(te2), ref, n_id, rel=1e-5)
    s2 = create_score("react", percentile=70, temperature=2.0).fit(va2, head=(W, b))
    assert_agree(s2.score(te2), ref_react(va2, te2, W, b, 70, 2.0)[0], n_id, rel=1e-5)


def test_react_small_heads_are_float64(prob):
    (W, b), _, va, te, _ = prob
    Ws, bs = W[:3, :64], b[:3]
    va2, te2 = with_features(va, va.features[:, :64], Ws, bs), with_features(te, te.features[:, :64], Ws, bs)
    s = create_score("react").fit(va2, head=(Ws, bs))
    assert s.precision_ == "float64"
    np.testing.assert_allclose(s.score(te2), ref_react(va2, te2, Ws, bs)[0], rtol=1e-12)


# ------------------------------------------------------------------------------------------ KNN


def test_kth_largest_prefilter_is_exact():
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        K = int(torch.randint(1, 30, (1,), generator=g))
        Nb = int(torch.randint(160 * K, 2000 * K, (1,), generator=g))
        S = torch.randn(7, Nb, generator=g)
        if trial % 2:
            S = S.mul(3).round()  # ties
        s = create_score("knn", K=K)
        s._groups = min(64, Nb // (40 * K))
        col = s._kth_largest(S)
        got = S.gather(1, col[:, None]).squeeze(1)
        assert torch.equal(got, torch.topk(S, K, dim=1).values[:, -1])


def test_knn_torch_backend_matches_brute_force(prob):
    _, tr, _, te, n_id = prob
    expected = ref_knn(tr, te, 5)
    s = create_score("knn", K=5, backend="torch").fit(tr)
    assert s.backend_ == "torch" and s._groups >= 4  # the prefilter runs
    np.testing.assert_allclose(s.score(te), expected, atol=2e-6)
    for kw in ({"chunk_size": 37}, {"dtype": "float64"}, {"squared": True, "dtype": "float64"}):
        out = create_score("knn", K=5, backend="torch", **kw).fit(tr).score(te)
        np.testing.assert_allclose(out, -(expected**2) if kw.get("squared") else expected, atol=2e-6)
    # exact distances for near-duplicates (the old |q|^2 + |b|^2 - 2 q.b lost ~3e-4 here)
    dup = FeatureSet(tr.logits[:50], tr.features[:50] * 3.0)
    assert np.abs(create_score("knn", K=1, backend="torch").fit(tr).score(dup)).max() < 1e-6
    # zero rows on either side: distance 1 to any unit vector
    zt = FeatureSet(tr.logits, torch.cat([torch.zeros(3, 128), tr.features[3:]]), tr.labels)
    zq = FeatureSet(te.logits[:4], torch.cat([torch.zeros(1, 128), te.features[1:4]]))
    np.testing.assert_allclose(create_score("knn", K=5, backend="torch").fit(zt).score(zq), ref_knn(zt, zq, 5), atol=2e-6)


def test_knn_backend_choice(prob, monkeypatch):
    _, tr, _, _, _ = prob
    assert create_score("knn").backend == "auto"
    assert create_score("knn", K=3, dtype="float64").fit(tr).backend_ == "torch"
    assert create_score("knn", K=3, backend="torch").fit(tr).backend_ == "torch"
    monkeypatch.setattr(mds_mod, "onednn_available", lambda: False)
    monkeypatch.setattr(knn_mod, "faiss_available", lambda: False)
    assert create_score("knn", K=3).fit(tr).backend_ == "torch"
    monkeypatch.setattr(knn_mod, "faiss_available", lambda: True)
    s = create_score("knn", K=3)
    assert s._resolve_backend(torch.device("cpu")) == "faiss"
    assert s._resolve_backend(torch.device("meta")) == "torch"  # any non-CPU device
    with pytest.raises(ConfigError, match="backend"):
        create_score("knn", backend="annoy")
    with pytest.raises(ConfigError, match="chunk_size"):
        create_score("knn", chunk_size=0)


def test_knn_faiss_and_torch_agree(prob):
    pytest.importorskip("faiss")
    _, tr, _, te, n_id = prob
    a = create_score("knn", backend="faiss").fit(tr).score(te)
    b = create_score("knn", backend="torch").fit(tr).score(te)
    assert_agree(b, a, n_id, rel=1e-5)
    np.testing.assert_allclose(b, ref_knn(tr, te, 50), atol=2e-6)
