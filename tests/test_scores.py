"""Tests of the post-hoc scores: formulas, signs, invariances, robustness, validation, search."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from torch import nn

from oaml.errors import ConfigError, NonFiniteError, ShapeError
from oaml.metrics import ood_metrics
from oaml.models.adapter import Classifier
from oaml.scores import SCORES, FeatureSet, create_score
from oaml.scores.gram import gram_features
from oaml.scores.search import search_hyperparameters

from helpers import make_problem

FEATURE_SCORES = ["msp", "mls", "ebo", "gen", "gradnorm", "mds", "klm", "react", "vim", "knn"]
SMALL = {"vim": {"dim": 8}, "knn": {"K": 5}}


# ------------------------------------------------------------------------------ synthetic data


@pytest.fixture(scope="module")
def problem():
    return make_problem()


def fitted(name, problem, **kw):
    head, tr, va, _, _ = problem
    s = create_score(name, **{**SMALL.get(name, {}), **kw})
    return s.fit(tr if s.fit_on == "train" else va, head=head)


# ------------------------------------------------------------------------------------ registry


def test_registry_and_fit_splits():
    for n in FEATURE_SCORES + ["odin", "gram"]:
        assert n in SCORES
    splits = {n: SCORES.get(n).fit_on for n in FEATURE_SCORES + ["odin", "gram"]}
    assert splits == {
        "msp": "none", "mls": "none", "ebo": "none", "gen": "none", "gradnorm": "none", "odin": "none",
        "mds": "train", "vim": "train", "knn": "train", "gram": "train", "react": "val", "klm": "val",
    }
    assert SCORES.get("odin").requires_model and SCORES.get("gram").requires_model
    with pytest.raises(ConfigError, match="unknown score"):
        create_score("mahalanobiss")
    with pytest.raises(ConfigError, match="no parameter"):
        create_score("knn", k=5)


@pytest.mark.parametrize("name", FEATURE_SCORES)
def test_sign_higher_is_id(problem, name):
    _, _, _, te, ood = problem
    s = fitted(name, problem)
    a, o = s.score(te), s.score(ood)
    assert a.dtype == np.float64 and a.shape == (len(te),)
    assert ood_metrics(a, o)["auroc"] > 0.9


@pytest.mark.parametrize("name", FEATURE_SCORES)
def test_rejects_non_finite_and_wrong_shapes(problem, name):
    _, _, _, te, _ = problem
    s = fitted(name, problem)
    bad = FeatureSet(te.logits.clone(), te.features.clone())
    bad.features[3, 2] = float("nan")
    bad.logits[5, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="1 non-finite"):
        s.score(bad)
    if s.fit_on != "none":  # a fitted score knows C and D
        with pytest.raises(ShapeError, match="fitted on"):
            s.score(FeatureSet(te.logits[:, :3], te.features))
        with pytest.raises(ShapeError, match="fitted on"):
            s.score(FeatureSet(te.logits, te.features[:, :5]))
    with pytest.raises(ShapeError):
        s.score(te.features)  # a tensor is not a FeatureSet


def test_featureset_shape_checks():
    with pytest.raises(ShapeError):
        FeatureSet(torch.zeros(3, 2), torch.zeros(4, 5))
    with pytest.raises(ShapeError):
        FeatureSet(torch.zeros(3, 2), torch.zeros(3, 5), torch.zeros(3))  # float labels
    with pytest.raises(ShapeError):
        FeatureSet(torch.zeros(3), torch.zeros(3, 5))


def test_fit_required_before_score(problem):
    _, _, _, te, _ = problem
    with pytest.raises(ConfigError, match="fit"):
        create_score("mds").score(te)


@pytest.mark.parametrize(
    "name, kw, param",
    [
        ("msp", {"temperature": 0}, "temperature"),
        ("ebo", {"temperature": -1.0}, "temperature"),
        ("gen", {"gamma": 0.0}, "gamma"),
        ("gen", {"M": 0}, "M"),
        ("gen", {"M": 2.5}, "M"),
        ("odin", {"temperature": float("nan")}, "temperature"),
        ("odin", {"noise": -0.1}, "noise"),
        ("mds", {"shrinkage": 1.5}, "shrinkage"),
        ("react", {"percentile": 101}, "percentile"),
        ("vim", {"dim": 0}, "dim"),
        ("knn", {"K": 0}, "K"),
        ("knn", {"backend": "annoy"}, "backend"),
        ("knn", {"bank_fraction": 0.0}, "bank_fraction"),
        ("klm", {"match": "max"}, "match"),
        ("gram", {"powers": 0}, "powers"),
        ("gram", {"holdout": 1.0}, "holdout"),
        ("gradnorm", {"temperature": True}, "temperature"),
    ],
)
def test_hyperparameter_validation(name, kw, param):
    with pytest.raises(ConfigError, match=param):
        create_score(name, **kw)


def test_data_dependent_validation(problem):
    head, tr, _, _, _ = problem
    with pytest.raises(ConfigError, match=r"dim=24 must be < the feature dimension D=24"):
        create_score("vim", dim=24).fit(tr, head=head)
    with pytest.raises(ConfigError, match="exceeds the bank size"):
        create_score("knn", K=len(tr) + 1).fit(tr)
    with pytest.raises(ConfigError, match="head"):
        create_score("react").fit(tr)
    with pytest.raises(ShapeError, match="head W"):
        create_score("vim", dim=4).fit(tr, head=(head[0][:, :5], head[1]))
    with pytest.raises(ShapeError, match="labels"):
        create_score("mds").fit(FeatureSet(tr.logits, tr.features))


# ---------------------------------------------------------------------------- known formulas


def test_logit_scores_known_values():
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    fs = FeatureSet(logits, torch.ones(2, 3))
    np.testing.assert_allclose(create_score("msp").score(fs), [0.75, 0.5])
    np.testing.assert_allclose(create_score("mls").score(fs), [math.log(3.0), 1.0])
    np.testing.assert_allclose(create_score("ebo").score(fs), [math.log(4.0), 1.0 + math.log(2.0)])
    np.testing.assert_allclose(create_score("ebo", temperature=2.0).score(fs), 2 * np.log(np.exp(logits.numpy() / 2).sum(1)))
    g = lambda p: p**0.1 * (1 - p) ** 0.1  # noqa: E731
    np.testing.assert_allclose(create_score("gen").score(fs), [-(g(0.25) + g(0.75)), -2 * g(0.5)])
    # M=1 keeps only the largest probability
    np.testing.assert_allclose(create_score("gen", M=1).score(fs), [-g(0.75), -g(0.5)])


def test_msp_ebo_shift_invariance(problem):
    _, _, _, te, _ = problem
    shifted = FeatureSet(te.logits.double() + 123.0, te.features)
    np.testing.assert_allclose(create_score("msp").score(shifted), create_score("msp").score(te), rtol=1e-12)
    np.testing.assert_allclose(create_score("ebo").score(shifted) - 123.0, create_score("ebo").score(te), atol=1e-9)


@pytest.mark.parametrize("name", ["msp", "mls", "ebo", "gen", "gradnorm", "klm", "react", "vim"])
def test_large_logits_do_not_overflow(problem, name):
    (W, b), tr, va, te, _ = problem
    big = (W * 1e4, b * 1e4)
    scale = lambda fs: FeatureSet(fs.features @ big[0].T + big[1], fs.features, fs.labels)  # noqa: E731
    s = create_score(name, **SMALL.get(name, {}))
    s.fit(scale(tr if s.fit_on == "train" else va), head=big)
    out = s.score(scale(te))
    assert np.isfinite(out).all()
    big_te = scale(te)
    assert big_te.logits.abs().max().item() > 1e4
    if name == "ebo":  # max logit <= energy <= max logit + log C, no overflow to inf
        mls = big_te.logits.double().max(1).values.numpy()
        assert (out >= mls - 1e-9).all() and (out <= mls + math.log(te.num_classes) + 1e-9).all()
    if name == "msp":
        np.testing.assert_allclose(out, torch.softmax(big_te.logits.double(), 1).max(1).values.numpy())


def test_gradnorm_matches_autograd():
    g = torch.Generator().manual_seed(1)
    C, D = 7, 11
    fc = nn.Linear(D, C).double()
    f = torch.relu(torch.randn(20, D, generator=g)).double()
    logits = fc(f).detach()
    for T in (1.0, 2.5):
        expected = []
        for i in range(len(f)):
            fc.zero_grad()
            logp = torch.log_softmax(fc(f[i : i + 1]) / T, dim=1)
            kl_uniform = (-(1.0 / C) * logp).sum() - math.log(C)  # KL(u || softmax)
            kl_uniform.backward()
            expected.append(fc.weight.grad.abs().sum().item())
        got = create_score("gradnorm", temperature=T).score(FeatureSet(logits, f))
        np.testing.assert_allclose(got, expected, rtol=1e-10)
    # OpenOOD's loss sum_c -log p_c gives exactly C times the value (T = 1)
    fc.zero_grad()
    (-torch.log_softmax(fc(f[:1]), dim=1)).sum().backward()
    openood = fc.weight.grad.abs().sum().item()
    assert openood == pytest.approx(C * create_score("gradnorm").score(FeatureSet(logits[:1], f[:1]))[0], rel=1e-10)


def brute_mds(train, test, shrinkage=0.0):
    X, y = train.features.double().numpy(), train.labels.numpy()
    classes = np.unique(y)
    mu = np.stack([X[y == c].mean(0) for c in classes])
    Xc = X - mu[np.searchsorted(classes, y)]
    cov = Xc.T @ Xc / len(X)
    if shrinkage:
        cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    P = scipy.linalg.pinvh(cov)
    Z = test.features.double().numpy()
    d = np.stack([np.einsum("nd,de,ne->n", Z - m, P, Z - m) for m in mu], axis=1)
    return -d.min(1)


def test_mds_matches_brute_force_and_handles_rank_deficiency():
    g = torch.Generator().manual_seed(3)
    C, D, n = 4, 30, 40  # n - C = 36 > D but half the units are dead -> rank <= 15
    y = torch.arange(n) % C
    f = torch.relu(torch.randn(n, D, generator=g) + y[:, None].double().float())
    f[:, 15:] = 0.0  # dead post-ReLU units: singular covariance
    tr = FeatureSet(torch.zeros(n, C), f, y)
    te = FeatureSet(torch.zeros(25, C), torch.relu(torch.randn(25, D, generator=g)))
    s = create_score("mds").fit(tr)
    assert s.rank_ <= 15
    np.testing.assert_allclose(s.score(te), brute_mds(tr, te), rtol=1e-7, atol=1e-8)
    s2 = create_score("mds", shrinkage=0.3).fit(tr)
    np.testing.assert_allclose(s2.score(te), brute_mds(tr, te, 0.3), rtol=1e-7, atol=1e-8)
    assert not np.allclose(s2.score(te), s.score(te))


def test_mds_affine_invariance(problem):
    _, tr, _, te, _ = problem
    g = torch.Generator().manual_seed(5)
    A = torch.randn(tr.feature_dim, tr.feature_dim, generator=g) + 3 * torch.eye(tr.feature_dim)
    t = lambda fs: FeatureSet(fs.logits, fs.features.double() @ A.double() + 2.0, fs.labels)  # noqa: E731
    a = create_score("mds").fit(tr).score(te)
    b = create_score("mds").fit(t(tr)).score(t(te))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_klm_matches_scipy_entropy(problem):
    _, _, va, te, _ = problem
    s = fitted("klm", problem)
    p_val = torch.softmax(va.logits.double(), 1).numpy()
    pred = p_val.argmax(1)
    p = torch.softmax(te.logits.double(), 1).numpy()[:40]
    templates = [p_val[pred == c].mean(0) for c in range(va.num_classes) if (pred == c).any()]
    expected = [-min(scipy.stats.entropy(pi, q) for q in templates) for pi in p]
    np.testing.assert_allclose(s.score(FeatureSet(te.logits[:40], te.features[:40])), expected, rtol=1e-9, atol=1e-12)
    # pytorch-ood's variant: templates by label, KL to the predicted class only
    s2 = create_score("klm", group_by="label", match="predicted").fit(va)
    q_lab = np.stack([p_val[va.labels.numpy() == c].mean(0) for c in range(va.num_classes)])
    exp2 = [-scipy.stats.entropy(pi, q_lab[pi.argmax()]) for pi in p]
    np.testing.assert_allclose(s2.score(FeatureSet(te.logits[:40], te.features[:40])), exp2, rtol=1e-9, atol=1e-12)


def test_react_threshold_and_limit(problem):
    head, _, va, te, _ = problem
    s = create_score("react", percentile=85).fit(va, head=head)
    assert s.threshold_ == pytest.approx(np.percentile(va.features.numpy().ravel(), 85))
    clipped = te.features.double().clamp(max=s.threshold_)
    expected = torch.logsumexp(clipped @ head[0].double().T + head[1].double(), 1).numpy()
    np.testing.assert_allclose(s.score(te), expected, rtol=1e-12)
    # percentile 100 clips nothing: ReAct == energy of the head's logits
    full = create_score("react", percentile=100).fit(va, head=head)
    np.testing.assert_allclose(full.score(te), create_score("ebo").score(te), rtol=1e-5)


def test_vim_matches_numpy_reference(problem):
    (W, b), tr, _, te, _ = problem
    dim = 8
    s = create_score("vim", dim=dim).fit(tr, head=(W, b))
    Wn, bn = W.double().numpy(), b.double().numpy()
    u = -np.linalg.pinv(Wn) @ bn
    Xtr = tr.features.double().numpy() - u
    ev, evec = np.linalg.eigh(Xtr.T @ Xtr / len(Xtr))
    NS = evec[:, np.argsort(ev)[::-1][dim:]]
    alpha = tr.logits.double().numpy().max(1).mean() / np.linalg.norm(Xtr @ NS, axis=1).mean()
    Xte = te.features.double().numpy() - u
    expected = scipy.special.logsumexp(te.logits.double().numpy(), axis=1) - alpha * np.linalg.norm(Xte @ NS, axis=1)
    np.testing.assert_allclose(s.score(te), expected, rtol=1e-6, atol=1e-6)
    assert s.alpha_ == pytest.approx(alpha, rel=1e-8)


def brute_knn(tr, te, K):
    a = torch.nn.functional.normalize(tr.features.double(), dim=1)
    q = torch.nn.functional.normalize(te.features.double(), dim=1)
    return -torch.cdist(q, a).sort(dim=1).values[:, K - 1].numpy()


def test_knn_exact_and_options(problem):
    _, tr, _, te, _ = problem
    expected = brute_knn(tr, te, 5)
    s = create_score("knn", K=5, chunk_size=37).fit(tr)
    np.testing.assert_allclose(s.score(te), expected, atol=2e-4)
    s64 = create_score("knn", K=5, dtype="float64").fit(tr)
    np.testing.assert_allclose(s64.score(te), expected, atol=1e-7)
    sq = create_score("knn", K=5, squared=True, dtype="float64").fit(tr)
    np.testing.assert_allclose(sq.score(te), -(expected**2), atol=1e-7)
    # invariant to positive rescaling of each feature vector
    scaled = FeatureSet(te.logits, te.features * (torch.rand(len(te), 1) * 10 + 0.1))
    np.testing.assert_allclose(s64.score(scaled), expected, atol=1e-6)


def test_knn_bank_fraction(problem):
    _, tr, _, te, _ = problem
    s = create_score("knn", K=3, bank_fraction=0.25, seed=3, dtype="float64").fit(tr)
    assert len(s.bank_index_) == round(0.25 * len(tr))
    sub = FeatureSet(tr.logits[s.bank_index_], tr.features[s.bank_index_], tr.labels[s.bank_index_])
    np.testing.assert_allclose(s.score(te), brute_knn(sub, te, 3), atol=1e-7)
    with pytest.raises(ConfigError, match="exceeds the bank size"):
        create_score("knn", K=200, bank_fraction=0.25).fit(tr)


def test_knn_faiss_backend_matches_torch(problem):
    pytest.importorskip("faiss")
    _, tr, _, te, _ = problem
    a = create_score("knn", K=5, backend="faiss").fit(tr).score(te)
    np.testing.assert_allclose(a, brute_knn(tr, te, 5), atol=2e-4)


# ------------------------------------------------------------------------------ model scores


class TinyCNN(Classifier):
    def __init__(self, C=3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, C)
        self.feature_dim, self.num_classes = 6, C

    def feature_maps(self, x):
        a = torch.relu(self.conv1(x))
        return [a, torch.relu(self.conv2(a))]

    def features(self, x):
        return self.feature_maps(x)[-1].mean(dim=(2, 3))

    def head(self, f):
        return self.fc(f)

    def fc_weights(self):
        return self.fc.weight, self.fc.bias


def image_data(seed, n, ood=False, C=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    if ood:
        x = 3.0 * torch.randn(n, 1, 8, 8, generator=g) + 2.0
    else:
        x[torch.arange(n), 0, 2 * y, :] += 1.5  # a class-specific bright row
    return x, y


def batches(x, y, bs=32):
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, len(x), bs)]


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    m = TinyCNN()
    x, y = image_data(0, 300)
    opt = torch.optim.Adam(m.parameters(), lr=0.03)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    m.eval()
    return m


def test_odin_matches_manual_and_restores_model(cnn):
    x, y = image_data(1, 40)
    T, eps, std = 1000.0, 0.0014, 0.5
    xr = x.clone().requires_grad_(True)
    logits = cnn(xr)
    loss = nn.functional.cross_entropy(logits / T, logits.argmax(1).detach())
    (grad,) = torch.autograd.grad(loss, xr)
    xt = x - eps * torch.where(grad >= 0, 1.0, -1.0) / std
    expected = torch.softmax(cnn(xt).double() / T, 1).max(1).values.detach().numpy()
    cnn.train()
    s = create_score("odin", std=std).fit()
    got = s.score(model=cnn, loader=batches(x, y, 16))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert cnn.training and all(p.requires_grad for p in cnn.parameters())
    cnn.eval()
    # noise 0 is tempered MSP; the perturbation raises the tempered confidence of most inputs
    plain = create_score("odin", noise=0.0).score(model=cnn, loader=batches(x, y))
    with torch.no_grad():
        np.testing.assert_allclose(plain, torch.softmax(cnn(x).double() / T, 1).max(1).values.numpy(), rtol=1e-6)
    pert = create_score("odin", noise=0.01).score(model=cnn, loader=batches(x, y))
    assert (pert > plain).mean() > 0.9
    with pytest.raises(ConfigError, match="model"):
        create_score("odin").score(model=cnn)


@pytest.mark.parametrize("chunk_bytes", [1 << 21, 8 * 4 * 25 * 2])  # one chunk; chunks of 2 samples, a shorter last
def test_gram_row_sum_identity(monkeypatch, chunk_bytes):
    import oaml.scores.gram

    monkeypatch.setattr(oaml.scores.gram, "_GRAM_CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(2)
    m = torch.relu(torch.randn(3, 4, 5, 5, generator=g))
    (out,) = gram_features([m], 3)
    F = m.double().flatten(2)
    for p in (1, 2, 3):
        G = F.pow(p) @ F.pow(p).transpose(1, 2)
        rs = G.sum(dim=2)
        np.testing.assert_allclose(out[:, p - 1], (rs.sign() * rs.abs().pow(1 / p)).numpy(), rtol=1e-10)


def test_gram_streaming_bounds_sign_and_errors(cnn):
    x, y = image_data(0, 300)
    train = batches(x, y, 50)
    s = create_score("gram", powers=3, holdout=0.2, seed=7).fit(model=cnn, loader=train)
    # brute force: same seeded hold-out mask, bounds over the rest grouped by prediction
    gen = torch.Generator().manual_seed(7)
    hold = torch.cat([torch.rand(len(b[0]), generator=gen) < 0.2 for b in train])
    with torch.no_grad():
        pred = cnn(x).argmax(1)
        feats = gram_features(cnn.feature_maps(x), 3)
    for layer, (lo, hi) in enumerate(zip(s.mins_, s.maxs_)):
        for c in range(3):
            sel = (~hold) & (pred == c)
            np.testing.assert_allclose(lo[c], feats[layer][sel].min(0).values, rtol=1e-12)
            np.testing.assert_allclose(hi[c], feats[layer][sel].max(0).values, rtol=1e-12)
    xi, yi = image_data(5, 100)
    xo, yo = image_data(6, 100, ood=True)
    a = s.score(model=cnn, loader=batches(xi, yi))
    o = s.score(model=cnn, loader=batches(xo, yo))
    assert ood_metrics(a, o)["auroc"] > 0.9
    with pytest.raises(ConfigError, match="no fit sample"):
        create_score("gram", group_by="label").fit(model=cnn, loader=[(x[:2], torch.tensor([0, 0]))])
    with pytest.raises(NonFiniteError):
        s.score(model=cnn, loader=[(torch.full((2, 1, 8, 8), float("nan")), yi[:2])])


# ----------------------------------------------------------------------------------- search


def test_search_refits_dependent_state(problem):
    head, tr, va, _, ood = problem
    ood_val = FeatureSet(ood.logits[:150], ood.features[:150])
    res = search_hyperparameters("vim", {"dim": [2, 8, 20]}, id_val=va, ood_val=ood_val, fit_data=tr, head=head)
    assert [t["params"]["dim"] for t in res.trials] == [2, 8, 20]
    assert len({round(t["metrics"]["auroc"], 12) for t in res.trials} | {round(t["metrics"]["fpr95"], 12) for t in res.trials}) > 1
    assert res.best_score.residual_basis_.shape[1] == 24 - res.best_params["dim"]
    assert res.best_value == max(t["value"] for t in res.trials)
    r2 = search_hyperparameters(
        "react", {"percentile": [10, 90, 99]}, id_val=va, ood_val=[ood_val, ood_val], fit_data=va, head=head, metric="fpr95"
    )
    thresholds = {}
    for p in (10, 90, 99):
        thresholds[p] = create_score("react", percentile=p).fit(va, head=head).threshold_
    assert r2.best_score.threshold_ == thresholds[r2.best_params["percentile"]]
    assert r2.best_value == min(t["value"] for t in r2.trials)
    scores_by_p = [create_score("react", percentile=p).fit(va, head=head).score(va) for p in (10, 99)]
    assert not np.allclose(*scores_by_p)
    with pytest.raises(ConfigError, match="metric"):
        search_hyperparameters("vim", {"dim": [2]}, id_val=va, ood_val=ood_val, fit_data=tr, head=head, metric="acc")
    with pytest.raises(ConfigError, match="grid"):
        search_hyperparameters("vim", {"dim": []}, id_val=va, ood_val=ood_val, fit_data=tr, head=head)


def test_search_model_score(cnn):
    xi, yi = image_data(8, 64)
    xo, yo = image_data(9, 64, ood=True)
    res = search_hyperparameters(
        "odin", {"temperature": [1.0, 1000.0]}, id_val=batches(xi, yi), ood_val=batches(xo, yo), model=cnn
    )
    assert len(res.trials) == 2 and res.best_params["temperature"] in (1.0, 1000.0)


def test_vim_default_dim_follows_the_feature_width():
    g = torch.Generator().manual_seed(0)
    for D, expected in ((64, 32), (512, 256), (768, 256)):
        feats = torch.randn(600, D, generator=g).abs()
        W, b = torch.randn(4, D, generator=g), torch.randn(4, generator=g)
        fs = FeatureSet(logits=feats @ W.T + b, features=feats)
        s = create_score("vim").fit(fs, head=(W, b))
        assert s.dim_ == expected and s.residual_basis_.shape == (D, D - expected)
