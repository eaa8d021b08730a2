"""Tests of the scores added for pytorch-ood parity: entropy, webo, tscaling, lts, gmm, openmax,
rmd, pnml. Formulas against brute-force references, agreement with pytorch-ood 0.4.0 (the dev
extra), signs, validation, numerical robustness."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import scipy.special
import scipy.stats
import torch

from oaml.cli.common import SCORE_HELP
from oaml.errors import ConfigError, DataError, NonFiniteError, ShapeError
from oaml.metrics import ood_metrics
from oaml.scores import SCORES, FeatureSet, create_score
from oaml.scores.lts import lts_factor
from oaml.scores.search import search_hyperparameters

from helpers import make_problem

NEW = ["entropy", "webo", "tscaling", "lts", "gmm", "openmax", "rmd", "pnml"]
FIT_ON = {
    "entropy": "none", "webo": "none", "lts": "none", "tscaling": "val",
    "gmm": "train", "openmax": "train", "rmd": "train", "pnml": "train",
}


@pytest.fixture(scope="module")
def problem():
    return make_problem()


@pytest.fixture(scope="module")
def noisy_val(problem):
    """The val split with 30% random labels: the head no longer classifies it perfectly, so the
    NLL-optimal temperature is finite."""
    va = problem[2]
    g = torch.Generator().manual_seed(1)
    flip = torch.rand(len(va), generator=g) < 0.3
    y = torch.where(flip, torch.randint(0, va.num_classes, (len(va),), generator=g), va.labels)
    return FeatureSet(va.logits, va.features, y)


def fit(name, problem, noisy_val=None, **kw):
    head, tr, va, _, _ = problem
    s = create_score(name, **kw)
    if s.fit_on == "val":
        va = noisy_val if noisy_val is not None else va
    return s.fit(tr if s.fit_on == "train" else va, head=head)


def as64(head, fs):
    """The FeatureSet with float64 features and the head's float64 logits."""
    W, b = head
    f = fs.features.double()
    return FeatureSet(f @ W.double().T + b.double(), f, fs.labels)


def torch_head(head):
    W, b = head
    lin = torch.nn.Linear(W.shape[1], W.shape[0]).double()
    with torch.no_grad():
        lin.weight.copy_(W.double())
        lin.bias.copy_(b.double())
    return lin


# ------------------------------------------------------------------------------------ registry


def test_registry_fit_splits_and_help():
    for n in NEW:
        assert n in SCORES and n in SCORE_HELP
        assert SCORES.get(n).fit_on == FIT_ON[n]
        assert not SCORES.get(n).requires_model
    assert SCORES.get("pnml").needs_head and not any(SCORES.get(n).needs_head for n in NEW if n != "pnml")
    assert SCORES.get("rmds") is SCORES.get("rmd")
    assert SCORES.get("temperature_scaling") is SCORES.get("tscaling")


@pytest.mark.parametrize("name", NEW)
def test_sign_higher_is_id(problem, noisy_val, name):
    _, _, _, te, ood = problem
    s = fit(name, problem, noisy_val)
    a, o = s.score(te), s.score(ood)
    assert a.dtype == np.float64 and a.shape == (len(te),) and np.isfinite(a).all()
    # OpenMax flags the ID samples beyond the fitted Weibull tails as unknown too
    assert ood_metrics(a, o)["auroc"] > (0.75 if name == "openmax" else 0.9)


@pytest.mark.parametrize("name", NEW)
def test_rejects_non_finite_and_wrong_shapes(problem, noisy_val, name):
    _, _, _, te, _ = problem
    s = fit(name, problem, noisy_val)
    bad = FeatureSet(te.logits.clone(), te.features.clone())
    field = "logits" if "logits" in s.uses else "features"
    getattr(bad, field)[3, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="1 non-finite"):
        s.score(bad)
    if s.fit_on != "none":
        with pytest.raises(ShapeError, match="fitted on"):
            s.score(FeatureSet(te.logits[:, :3], te.features))
        with pytest.raises(ShapeError, match="fitted on"):
            s.score(FeatureSet(te.logits, te.features[:, :5]))
    with pytest.raises(ShapeError):
        s.score(te.features)


@pytest.mark.parametrize(
    "name, kw, param",
    [
        ("webo", {"weights": [-1.0, 0.0]}, "weights"),
        ("webo", {"weights": [1.0, float("nan")]}, "weights"),
        ("webo", {"weights": [[1.0, 2.0], [3.0, 4.0]]}, "weights"),
        ("tscaling", {"t_min": 0.0}, "t_min"),
        ("tscaling", {"t_min": 2.0, "t_max": 1.0}, "t_max"),
        ("lts", {"p": 1.5}, "p"),
        ("lts", {"p": -0.1}, "p"),
        ("gmm", {"reg": -1e-6}, "reg"),
        ("openmax", {"tailsize": 0}, "tailsize"),
        ("openmax", {"alpha": 2.5}, "alpha"),
        ("openmax", {"euclid_weight": 1.5}, "euclid_weight"),
        ("openmax", {"correct_only": 1}, "correct_only"),
        ("rmd", {"rcond": 1.0}, "rcond"),
        ("pnml", {"rcond": -1.0}, "rcond"),
    ],
)
def test_hyperparameter_validation(name, kw, param):
    with pytest.raises(ConfigError, match=param):
        create_score(name, **kw)


def test_fit_input_validation(problem):
    head, tr, _, _, _ = problem
    for name in ("tscaling", "gmm", "openmax", "rmd"):
        with pytest.raises(ShapeError, match="labels"):
            create_score(name).fit(FeatureSet(tr.logits, tr.features))
    with pytest.raises(ConfigError, match="head"):
        create_score("pnml").fit(tr)
    with pytest.raises(ConfigError, match="fit"):
        create_score("rmd").score(tr)


@pytest.mark.parametrize("name", ["entropy", "webo", "tscaling", "lts", "openmax", "pnml"])
def test_large_logits_do_not_overflow(problem, noisy_val, name):
    (W, b), tr, _, te, ood = problem
    big = (W * 1e4, b * 1e4)
    scale = lambda fs: FeatureSet(fs.features @ big[0].T + big[1], fs.features, fs.labels)  # noqa: E731
    s = create_score(name, **({"t_max": 1e6} if name == "tscaling" else {}))
    s.fit(scale(noisy_val if s.fit_on == "val" else tr), head=big)
    assert scale(te).logits.abs().max() > 1e4
    a, o = s.score(scale(te)), s.score(scale(ood))
    assert np.isfinite(a).all() and np.isfinite(o).all()
    if name == "tscaling":  # the optimal T scales with the logits
        t_small = create_score("tscaling").fit(noisy_val).temperature_
        assert s.temperature_ == pytest.approx(1e4 * t_small, rel=1e-6)


# ------------------------------------------------------------------------------ entropy, webo


def test_entropy_known_values_and_pytorch_ood(problem):
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0], [0.0, 1e4]])
    got = create_score("entropy").score(FeatureSet(logits, torch.ones(3, 2)))
    np.testing.assert_allclose(got, [0.25 * math.log(0.25) + 0.75 * math.log(0.75), -math.log(2.0), 0.0], atol=1e-15)
    po = pytest.importorskip("pytorch_ood.detector")
    _, _, _, te, ood = problem
    for fs in (te, ood):
        z = fs.logits.double()
        ref = -torch.sum(torch.softmax(z, 1) * torch.log_softmax(z, 1), 1).numpy()
        ours = create_score("entropy").score(fs)
        np.testing.assert_allclose(-ours, ref, rtol=1e-12, atol=1e-14)
        # pytorch-ood clips p to [1e-7, 1]: each class below 1e-7 adds at most 1e-7 * log(1e7)
        bound = fs.num_classes * 1e-7 * math.log(1e7)
        np.testing.assert_allclose(-ours, po.Entropy(None).predict_logits(z).numpy(), atol=bound)


def test_webo_formula_defaults_and_pytorch_ood(problem):
    _, _, _, te, _ = problem
    z = te.logits.double()
    w = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5])
    ours = create_score("webo", weights=w).score(te)
    np.testing.assert_allclose(ours, torch.log((w.double().relu() * z.exp()).sum(1)).numpy(), rtol=1e-12)
    po = pytest.importorskip("pytorch_ood.detector")
    np.testing.assert_allclose(ours, -po.WeightedEBO(None, w.double()[None, :]).predict_logits(z).numpy(), rtol=1e-12)
    # as a list and as (1, C); default weights = EBO
    np.testing.assert_allclose(create_score("webo", weights=[w.tolist()]).score(te), ours, rtol=1e-15)
    np.testing.assert_allclose(create_score("webo").score(te), create_score("ebo").score(te), rtol=1e-15)
    assert create_score("webo", weights=w).hyperparameters()["weights"] == (0.5, -1.0, 2.0, 0.0, 1.5)
    with pytest.raises(ShapeError, match="3 class weights"):
        create_score("webo", weights=[1.0, 1.0, 1.0]).score(te)


# --------------------------------------------------------------------------------- tscaling


def test_tscaling_is_the_exact_nll_optimum(noisy_val):
    z, y = noisy_val.logits.double(), noisy_val.labels
    nll = lambda logt: torch.nn.functional.cross_entropy(z / math.exp(logt), y).item()  # noqa: E731
    ref = scipy.optimize.minimize_scalar(nll, bounds=(-5, 5), method="bounded", options={"xatol": 1e-10})
    s = create_score("tscaling").fit(noisy_val)
    assert s.temperature_ == pytest.approx(math.exp(ref.x), rel=1e-6)
    assert s.nll_ <= ref.fun + 1e-12 and s.nll_ <= s.nll_t1_
    assert s.nll_ == pytest.approx(nll(math.log(s.temperature_)), rel=1e-12)
    np.testing.assert_allclose(s.score(noisy_val), torch.softmax(z / s.temperature_, 1).max(1).values.numpy(), rtol=1e-12)
    # temperature invariance: logits times a, optimal T times a, same scores
    s2 = create_score("tscaling").fit(FeatureSet(3.0 * z, noisy_val.features, y))
    assert s2.temperature_ == pytest.approx(3.0 * s.temperature_, rel=1e-9)


def test_tscaling_agrees_with_pytorch_ood(noisy_val, problem):
    po = pytest.importorskip("pytorch_ood.detector")
    _, _, _, te, _ = problem
    z, y = noisy_val.logits.double(), noisy_val.labels
    s = create_score("tscaling").fit(noisy_val)
    theirs = po.TemperatureScaling(None).fit_logits(z, y)
    t_theirs = float(theirs.t.detach())
    nll = lambda t: torch.nn.functional.cross_entropy(z / t, y).item()  # noqa: E731
    # their 50 L-BFGS steps with lr 0.01 stop short of the optimum; ours is at least as good
    assert s.nll_ <= nll(t_theirs) + 1e-12
    assert abs(s.temperature_ - 1.0) >= abs(t_theirs - 1.0) - 1e-6  # same direction, further
    assert (s.temperature_ - 1.0) * (t_theirs - 1.0) > 0
    # at the same temperature the scores are the same (negated)
    with torch.no_grad():
        theirs.t.fill_(s.temperature_)
    np.testing.assert_allclose(s.score(te), -theirs.predict_logits(te.logits.double()).detach().numpy(), rtol=1e-6)


def test_tscaling_bounds_warn(problem):
    _, _, va, _, _ = problem  # perfectly classified: the NLL falls all the way to T -> 0
    with pytest.warns(RuntimeWarning, match="t_min"):
        s = create_score("tscaling", t_min=0.5).fit(va)
    assert s.temperature_ == 0.5
    # a head no better than chance: the optimum is T -> infinity
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 4, generator=g)
    y = (z.argmax(1) + 1) % 4
    with pytest.warns(RuntimeWarning, match="t_max"):
        s = create_score("tscaling", t_max=50.0).fit(FeatureSet(z, torch.zeros(200, 1), y))
    assert s.temperature_ == 50.0


# -------------------------------------------------------------------------------------- LTS


def test_lts_factor_known_values():
    f = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -5.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 10, [-1.0] * 10])
    # D = 10, p = 0.25: k = 10 - round(7.5) = 10 - 8 = 2 (half to even); sum 10 / top-2 sum 7
    s = lts_factor(f, 0.25)
    np.testing.assert_allclose(s.numpy(), [(10 / 7) ** 2, 1.0, 1.0], rtol=1e-15)
    assert lts_factor(f, 0.0)[0] == pytest.approx((10 / 4) ** 2)  # k = max(1, 0) = 1
    assert lts_factor(f, 1.0)[0] == 1.0  # k = D


def test_lts_matches_pytorch_ood_and_reduces_to_ebo(problem):
    head, _, _, te, ood = problem
    for fs in (te, ood):
        fs64 = as64(head, fs)
        s = create_score("lts", p=0.1).score(fs64)
        S = lts_factor(fs64.features, 0.1)
        np.testing.assert_allclose(s, torch.logsumexp(fs64.logits * S[:, None], 1).numpy(), rtol=1e-13)
        po = pytest.importorskip("pytorch_ood.detector")
        for p in (0.05, 0.1, 0.5):
            theirs = po.LTS(None, head=torch_head(head), p=p).predict_features(fs64.features).numpy()
            np.testing.assert_allclose(create_score("lts", p=p).score(fs64), -theirs, rtol=1e-12)
    np.testing.assert_allclose(create_score("lts", p=1.0).score(te), create_score("ebo").score(te), rtol=1e-12)


# -------------------------------------------------------------------------------------- GMM


def brute_gmm(train, test, reg):
    X, y = train.features.double().numpy(), train.labels.numpy()
    Z = test.features.double().numpy()
    comps = []
    for c in np.unique(y):
        Xc = X[y == c]
        mu = Xc.mean(0)
        cov = (Xc - mu).T @ (Xc - mu) / len(Xc) + reg * np.eye(X.shape[1])
        comps.append(np.log(len(Xc) / len(X)) + scipy.stats.multivariate_normal(mu, cov).logpdf(Z))
    return scipy.special.logsumexp(np.stack(comps, 1), axis=1)


def test_gmm_matches_scipy_and_pytorch_ood(problem):
    _, tr, _, te, ood = problem
    for reg in (1e-6, 0.1):
        s = create_score("gmm", reg=reg).fit(tr)
        for fs in (te, ood):
            np.testing.assert_allclose(s.score(fs), brute_gmm(tr, fs, reg), rtol=1e-10)
    po = pytest.importorskip("pytorch_ood.detector")
    theirs = po.GMM(None).fit_features(tr.features.double(), tr.labels)
    s = create_score("gmm").fit(tr)
    for fs in (te, ood):
        np.testing.assert_allclose(s.score(fs), -theirs.predict_features(fs.features.double()).numpy(), rtol=1e-10)


def test_gmm_missing_class_chunking_and_singular_covariance(monkeypatch):
    import oaml.scores.gmm

    monkeypatch.setattr(oaml.scores.gmm, "_ROWS", 7)  # scoring blocks of 7 rows, a shorter last one
    g = torch.Generator().manual_seed(4)
    C, D = 4, 6
    y = torch.tensor([0, 2, 3] * 40)  # class 1 has no sample
    f = torch.relu(torch.randn(len(y), D, generator=g) + 2 * torch.nn.functional.one_hot(y, D)[:, :D].float())
    tr = FeatureSet(torch.zeros(len(y), C), f, y)
    te = FeatureSet(torch.zeros(50, C), torch.relu(torch.randn(50, D, generator=g)))
    s = create_score("gmm").fit(tr)
    assert s.classes_.tolist() == [0, 2, 3]
    np.testing.assert_allclose(s.score(te), brute_gmm(tr, te, 1e-6), rtol=1e-10)
    f2 = f.clone()
    f2[:, 4:] = 0.0  # dead units: singular covariance, not positive definite without reg
    with pytest.raises(DataError, match="increase reg"):
        create_score("gmm", reg=0.0).fit(FeatureSet(tr.logits, f2, y))
    assert np.isfinite(create_score("gmm").fit(FeatureSet(tr.logits, f2, y)).score(te)).all()


# ---------------------------------------------------------------------------------- OpenMax


def pytorch_ood_unknown_prob(po, fit_logits, fit_labels, logits, **kw):
    om = po.OpenMax(None, **kw).fit_logits(fit_logits.double(), fit_labels)
    return om.predict_logits(logits.double()).numpy()


@pytest.mark.parametrize(
    "kw", [{}, {"tailsize": 20, "alpha": 3, "euclid_weight": 0.5}, {"tailsize": 40, "alpha": 2, "euclid_weight": 0.0}]
)
def test_openmax_agrees_with_pytorch_ood(problem, kw):
    po = pytest.importorskip("pytorch_ood.detector")
    _, tr, _, te, ood = problem
    s = create_score("openmax", **kw).fit(tr)
    correct = tr.logits.argmax(1) == tr.labels
    for fs in (te, ood):
        assert set(fs.logits.argmax(1).tolist()) == set(range(5))  # else pytorch-ood's batch bug bites
        pu = pytorch_ood_unknown_prob(po, tr.logits[correct], tr.labels[correct], fs.logits, **kw)
        got = s.score(fs)
        np.testing.assert_allclose(scipy.special.expit(-got), pu, rtol=1e-9, atol=1e-12)
    # correct_only=False fits on every labelled sample, as pytorch-ood's own fit
    flipped = FeatureSet(tr.logits, tr.features, torch.where(torch.arange(len(tr)) % 7 == 0, (tr.labels + 1) % 5, tr.labels))
    s2 = create_score("openmax", correct_only=False, **kw).fit(flipped)
    pu2 = pytorch_ood_unknown_prob(po, flipped.logits, flipped.labels, te.logits, **kw)
    np.testing.assert_allclose(scipy.special.expit(-s2.score(te)), pu2, rtol=1e-9, atol=1e-12)
    assert not np.allclose(s2.score(te), create_score("openmax", **kw).fit(flipped).score(te))


def test_openmax_is_batch_independent_unlike_pytorch_ood(problem):
    _, tr, _, te, _ = problem
    s = create_score("openmax").fit(tr)
    full = s.score(te)
    pred = te.logits.argmax(1)
    one_class = torch.nonzero(pred == 0).flatten()
    sub = FeatureSet(te.logits[one_class], te.features[one_class])
    np.testing.assert_allclose(s.score(sub), full[one_class.numpy()], rtol=1e-14)
    po = pytest.importorskip("pytorch_ood.detector")
    correct = tr.logits.argmax(1) == tr.labels
    om = po.OpenMax(None).fit_logits(tr.logits.double()[correct], tr.labels[correct])
    batch = om.predict_logits(sub.logits.double()).numpy()
    alone = om.predict_logits(te.logits.double()).numpy()[one_class.numpy()]
    assert not np.allclose(batch, alone)  # pytorch-ood: distance 0 to MAVs of classes nobody predicts


def test_openmax_refit_state_and_log_odds(problem):
    """No state survives a refit (pytorch-ood PR #160); the score is log((1 - P_u) / P_u)."""
    _, tr, _, te, _ = problem
    s = create_score("openmax", alpha=50)
    s.fit(tr)
    assert s.alpha_ == 5 and s.alpha == 50
    first = s.score(te)
    shifted = FeatureSet(tr.logits + 3.0, tr.features, tr.labels)
    s.fit(shifted)
    np.testing.assert_allclose(s.centers_, create_score("openmax", alpha=50).fit(shifted).centers_, rtol=1e-15)
    s.fit(tr)
    np.testing.assert_allclose(s.score(te), first, rtol=1e-15)
    # log-odds by hand for one sample, from the fitted Weibull parameters
    x = te.logits[0].double().numpy()
    top = np.argsort(x)[::-1][:5]
    w = np.array([
        scipy.stats.exponweib.cdf(np.linalg.norm(x - s.centers_[c]) + 10000 - s.min_val_[c], a=1, c=s.shape_[c], loc=0, scale=s.scale_[c])
        for c in top
    ])
    omega = 1 - w * (6 - np.arange(1, 6)) / 5
    revised = x.copy()
    revised[top] = x[top] * omega
    v0 = np.sum(x[top] * (1 - omega))
    assert first[0] == pytest.approx(scipy.special.logsumexp(revised) - v0, rel=1e-10, abs=1e-10)


def test_openmax_class_without_fit_sample(problem):
    _, tr, _, te, _ = problem
    keep = tr.labels != 2
    sub = FeatureSet(tr.logits[keep], tr.features[keep], tr.labels[keep])
    with pytest.warns(RuntimeWarning, match=r"no Weibull model.*\[2\]"):
        s = create_score("openmax").fit(sub)
    assert s.has_model_.tolist() == [True, True, False, True, True]
    out = s.score(te)
    assert np.isfinite(out).all()
    pred2 = (te.logits.argmax(1) == 2).numpy()
    assert out[pred2].max() < np.median(out[~pred2])  # w = 1 for the top class: unknown
    with pytest.raises(DataError, match="no train sample"):
        bad = FeatureSet(tr.logits, tr.features, (tr.logits.argmax(1) + 1) % 5)
        create_score("openmax").fit(bad)


def test_openmax_search_refits(problem):
    _, tr, va, _, ood = problem
    res = search_hyperparameters(
        "openmax", {"tailsize": [5, 50], "alpha": [1, 3]}, id_val=va, ood_val=FeatureSet(ood.logits[:150], ood.features[:150]), fit_data=tr
    )
    assert len(res.trials) == 4
    assert res.best_score.alpha_ == min(res.best_params["alpha"], 5)
    direct = create_score("openmax", **res.best_params).fit(tr)
    np.testing.assert_allclose(res.best_score.shape_, direct.shape_, rtol=1e-15)


# -------------------------------------------------------------------------------------- RMD


def brute_rmd(train, test):
    X, y = train.features.double().numpy(), train.labels.numpy()
    classes = np.unique(y)
    mu = np.stack([X[y == c].mean(0) for c in classes])
    Xc = X - mu[np.searchsorted(classes, y)]
    P = scipy.linalg.pinvh(Xc.T @ Xc / len(X))
    mu0 = X.mean(0)
    P0 = scipy.linalg.pinvh((X - mu0).T @ (X - mu0) / len(X))
    Z = test.features.double().numpy()
    d = np.stack([np.einsum("nd,de,ne->n", Z - m, P, Z - m) for m in mu], axis=1)
    d0 = np.einsum("nd,de,ne->n", Z - mu0, P0, Z - mu0)
    return np.max(d0[:, None] - d, axis=1)  # OpenOOD's conf = max_c (d_0 - d_c)


def test_rmd_matches_openood_formula_and_rank_deficiency():
    g = torch.Generator().manual_seed(3)
    C, D, n = 4, 30, 80
    y = torch.arange(n) % C
    f = torch.relu(torch.randn(n, D, generator=g) + y[:, None].float())
    f[:, 20:] = 0.0  # dead units: singular covariances
    tr = FeatureSet(torch.zeros(n, C), f, y)
    te = FeatureSet(torch.zeros(25, C), torch.relu(torch.randn(25, D, generator=g)))
    np.testing.assert_allclose(create_score("rmd").fit(tr).score(te), brute_rmd(tr, te), rtol=1e-7, atol=1e-7)


def test_rmd_agrees_with_pytorch_ood(problem):
    po = pytest.importorskip("pytorch_ood.detector")
    _, tr, _, te, ood = problem
    s = create_score("rmd").fit(tr)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # its buffers are created in the default dtype
    try:
        theirs = po.RMD(None).fit_features(tr.features.double(), tr.labels)
        for fs in (te, ood):
            t = theirs.predict_features(fs.features.double()).numpy()
            # its covariances are not divided by N: distances N times smaller (+ the 1e-6 ridge)
            np.testing.assert_allclose(s.score(fs), -len(tr) * t, rtol=1e-6, atol=1e-5)
    finally:
        torch.set_default_dtype(old)
    np.testing.assert_allclose(s.score(te), brute_rmd(tr, te), rtol=1e-8, atol=1e-8)


def test_rmd_affine_invariance(problem):
    _, tr, _, te, _ = problem
    g = torch.Generator().manual_seed(5)
    A = torch.randn(tr.feature_dim, tr.feature_dim, generator=g).double() + 3 * torch.eye(tr.feature_dim).double()
    t = lambda fs: FeatureSet(fs.logits, fs.features.double() @ A + 2.0, fs.labels)  # noqa: E731
    np.testing.assert_allclose(create_score("rmd").fit(t(tr)).score(t(te)), create_score("rmd").fit(tr).score(te), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------- pNML


def brute_pnml_regret(train, test, head):
    W, b = (t.double().numpy() for t in head)
    X = train.features.double().numpy()
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    P = np.linalg.pinv(X.T @ X, hermitian=True)
    U = test.features.double().numpy()
    U = U / np.linalg.norm(U, axis=1, keepdims=True)
    p = scipy.special.softmax(U @ W.T + b, axis=1)
    proj = np.einsum("nd,de,ne->n", U, P, U)
    g = (proj / (1 + proj))[:, None]
    nf = np.sum(p / (p + (1 - p) * p**g), axis=1)  # official code's calc_regrets
    return np.log(nf) / np.log(p.shape[1])


def test_pnml_matches_official_formula_and_pytorch_ood(problem):
    head, tr, _, te, ood = problem
    s = create_score("pnml").fit(tr, head=head)
    for fs in (te, ood):
        np.testing.assert_allclose(s.score(fs), -brute_pnml_regret(tr, fs, head), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(s.regret(fs), brute_pnml_regret(tr, fs, head), rtol=1e-9, atol=1e-12)
    r = s.regret(ood)
    assert (r >= 0).all() and (r <= 1).all()
    po = pytest.importorskip("pytorch_ood.detector")
    theirs = po.PNML(None, head=torch_head(head).float()).fit_features(tr.features, tr.labels)
    for fs in (te, ood):  # pytorch-ood works in float32
        np.testing.assert_allclose(s.score(fs), -theirs.predict_features(fs.features).numpy(), atol=2e-6)


def test_pnml_ignores_ood_rows_scale_and_logits(problem):
    head, tr, _, te, ood = problem
    s = create_score("pnml").fit(tr, head=head)
    mixed = FeatureSet(torch.cat([tr.logits, ood.logits]), torch.cat([tr.features, ood.features]), torch.cat([tr.labels, ood.labels]))
    np.testing.assert_allclose(create_score("pnml").fit(mixed, head=head).score(te), s.score(te), rtol=1e-12)
    # normalised features: invariant to per-sample feature scale; the FeatureSet logits are unused
    scaled = FeatureSet(torch.zeros_like(te.logits), te.features.double() * (torch.rand(len(te), 1).double() * 10 + 0.1))
    np.testing.assert_allclose(s.score(scaled), s.score(te), rtol=1e-9)
    with pytest.raises(DataError, match="labelled OOD"):
        create_score("pnml").fit(ood, head=head)


def test_pnml_confident_logits_are_stable(problem):
    (W, b), tr, _, te, _ = problem
    s = create_score("pnml").fit(tr, head=(W * 1e3, b * 1e3))
    out = s.score(te)
    assert np.isfinite(out).all() and (out <= 0).all() and (out >= -1).all()
    # saturated softmax: the regret is log(1 + sum of terms ~ p^(1-g)) / log C, tiny but defined
    assert (out > -1e-6).mean() > 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.score(FeatureSet(te.logits[:3], torch.zeros(3, te.feature_dim)))  # zero feature: regret 0
