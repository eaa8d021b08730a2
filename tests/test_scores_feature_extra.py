"""Feature-shaping and feature-space scores: ASH-P/B/S, SCALE, DICE, SHE, NNGuide, NCI, fDBD,
Relation, Residual. Agreement with pytorch-ood 0.4.0 and with OpenOOD v1.5's definitions
(re-expressed here in a few lines each, citing the file), formulas, validation and shape checks."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

import oaml.scores.ash  # noqa: F401  registers ash_p, ash_b, ash_s
import oaml.scores.dice  # noqa: F401
import oaml.scores.fdbd  # noqa: F401
import oaml.scores.nci  # noqa: F401
import oaml.scores.nnguide  # noqa: F401
import oaml.scores.relation  # noqa: F401
import oaml.scores.residual  # noqa: F401
import oaml.scores.scale  # noqa: F401
import oaml.scores.she  # noqa: F401
from oaml.errors import ConfigError, DataError, NonFiniteError, ShapeError
from oaml.metrics import ood_metrics
from oaml.scores import SCORES, FeatureSet, create_score

pod = pytest.importorskip("pytorch_ood.detector")

NAMES = ["ash_p", "ash_b", "ash_s", "scale", "dice", "she", "nnguide", "nci", "fdbd", "relation", "residual"]
SMALL = {"nnguide": {"K": 10, "bank_fraction": 1.0}}


# ------------------------------------------------------------------------------ synthetic data


def make_problem(seed=0, C=6, D=48, n_train=400, n_test=300):
    """Post-ReLU class-clustered ID features, a linear head that roughly fits them (~80% train
    accuracy), OOD = post-ReLU mixtures of the class centres plus noise (AUROC 45-90%)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.relu(torch.randn(C, D, generator=g)) * 1.5 + 0.3
    W = torch.randn(C, D, generator=g) * 0.3 + (centers - centers.mean(0)) * 0.5
    b = 0.1 * torch.randn(C, generator=g)

    def id_set(n):
        y = torch.randint(0, C, (n,), generator=g)
        f = torch.relu(centers[y] + 0.8 * torch.randn(n, D, generator=g))
        return FeatureSet(f @ W.T + b, f, y)

    def ood_set(n):
        mix = torch.softmax(torch.randn(n, C, generator=g), dim=1)
        f = torch.relu(0.8 * mix @ centers + 0.9 * torch.randn(n, D, generator=g))
        return FeatureSet(f @ W.T + b, f, torch.full((n,), -1))

    return (W, b), id_set(n_train), id_set(n_test), ood_set(n_test)


@pytest.fixture(scope="module")
def problem():
    return make_problem()


def fitted(name, problem, **kw):
    head, tr, _, _ = problem
    return create_score(name, **{**SMALL.get(name, {}), **kw}).fit(tr, head=head)


def agreement(ours_id, ours_ood, ref_id, ref_ood):
    """(Spearman rho over ID+OOD, |AUROC difference| in points, our AUROC in %)."""
    a = np.concatenate([ours_id, ours_ood])
    r = np.concatenate([np.asarray(ref_id, dtype=np.float64), np.asarray(ref_ood, dtype=np.float64)])
    rho = scipy.stats.spearmanr(a, r).statistic
    au = 100 * ood_metrics(ours_id, ours_ood)["auroc"]
    au_ref = 100 * ood_metrics(np.asarray(ref_id, np.float64), np.asarray(ref_ood, np.float64))["auroc"]
    return rho, abs(au - au_ref), au


def assert_agree(ours_id, ours_ood, ref_id, ref_ood):
    rho, dau, au = agreement(ours_id, ours_ood, ref_id, ref_ood)
    assert 55.0 < au < 99.0 or 1.0 < au < 45.0, f"AUROC {au:.2f} is too trivial to test agreement"
    assert rho >= 0.999 and dau <= 0.1, (rho, dau)


def f32(fs):
    return fs.features.float()


def head_fn(W, b):
    return lambda x: x.reshape(x.shape[0], -1) @ W.T.float() + b.float()


def linear(W, b):
    lin = nn.Linear(W.shape[1], W.shape[0])
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(b)
    return lin


# -------------------------------------------------------------------------------- registry


def test_registered_with_fit_split_needs_and_grid():
    expect = {
        "ash_p": ("none", True), "ash_b": ("none", True), "ash_s": ("none", True),
        "scale": ("none", True), "dice": ("train", True), "she": ("train", False),
        "nnguide": ("train", False), "nci": ("train", True), "fdbd": ("train", True),
        "relation": ("train", False), "residual": ("train", True),
    }
    for n, (fit_on, needs_head) in expect.items():
        cls = SCORES.get(n)
        assert (cls.fit_on, cls.needs_head) == (fit_on, needs_head), n
        assert isinstance(cls.grid, dict)
        for k, vals in cls.grid.items():  # every grid point is a valid setting
            for v in vals:
                create_score(n, **{k: v})
    assert SCORES.get("ash_b").grid == {"percentile": [65, 70, 75, 80, 85, 90, 95]}
    assert SCORES.get("she").needs_fit_labels and not SCORES.get("dice").needs_fit_labels
    assert "ish" not in SCORES  # training-time method, scored with SCALE (see report)


def make_easy_problem(seed=0, C=5, D=24, n=300):
    """Well-separated post-ReLU class clusters, a head aligned with them, diffuse OOD (as in
    tests/test_scores.py)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.relu(torch.randn(C, D, generator=g)) * 3.0
    W = centers / centers.norm(dim=1, keepdim=True) * 2.0
    b = 0.1 * torch.randn(C, generator=g)

    def id_set():
        y = torch.randint(0, C, (n,), generator=g)
        f = torch.relu(centers[y] + 0.5 * torch.randn(n, D, generator=g))
        return FeatureSet(f @ W.T + b, f, y)

    f = torch.relu(0.6 * torch.randn(n, D, generator=g) + 0.3)
    return (W, b), id_set(), id_set(), FeatureSet(f @ W.T + b, f)


@pytest.mark.parametrize("name", NAMES)
def test_sign_higher_is_id_on_easy_problem(name):
    head, tr, te, ood = make_easy_problem()
    s = create_score(name, **SMALL.get(name, {})).fit(tr, head=head)
    a, o = s.score(te), s.score(ood)
    assert a.dtype == np.float64 and a.shape == (len(te),) and o.shape == (len(ood),)
    assert ood_metrics(a, o)["auroc"] > 0.75


# ------------------------------------------------------------------- ASH / SCALE formulas


def test_ash_and_scale_hand_example():
    # D=5, percentile 60 -> keep k = 5 - round(3.0) = 2: the entries 3 and 2
    f = torch.tensor([[1.0, 3.0, 0.0, 2.0, 0.5]], dtype=torch.float64)
    W = torch.eye(5, dtype=torch.float64)
    data = FeatureSet(f @ W.T, f)
    s1, s2 = 6.5, 5.0
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    want = {
        "ash_p": t([0, 3.0, 0, 2.0, 0]),
        "ash_b": t([0, s1 / 2, 0, s1 / 2, 0]),
        "ash_s": t([0, 3.0, 0, 2.0, 0]) * np.exp(s1 / s2),
        "scale": f[0] * np.exp(s1 / s2),
    }
    for n, shaped in want.items():
        s = create_score(n, percentile=60).fit(head=(W, None))
        assert s.k_ == 2
        np.testing.assert_allclose(s.score(data), torch.logsumexp(shaped, 0).item(), rtol=1e-12)


def test_ash_b_ties_broken_by_lower_index():
    # one positive activation, k = 3: the kept set is {1, 0, 2} (stable), not arbitrary zeros
    f = torch.tensor([[0.0, 4.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    W = torch.eye(6, dtype=torch.float64) * torch.arange(1.0, 7.0, dtype=torch.float64)[:, None]
    s = create_score("ash_b", percentile=50).fit(head=(W, None))
    fill = 4.0 / 3
    z = torch.tensor([fill * 1, fill * 2, fill * 3, 0, 0, 0], dtype=torch.float64)
    np.testing.assert_allclose(s.score(FeatureSet(f @ W.T, f)), torch.logsumexp(z, 0).item(), rtol=1e-12)


def test_shaping_all_zero_rows_are_finite():
    W = torch.randn(3, 8, dtype=torch.float64)
    zero = FeatureSet(torch.zeros(2, 3), torch.zeros(2, 8))
    for n in ["ash_p", "ash_b", "ash_s", "scale"]:
        out = create_score(n).fit(head=(W, None)).score(zero)
        np.testing.assert_allclose(out, np.log(3.0))


# ----------------------------------------------------------- agreement with pytorch-ood 0.4.0


@pytest.mark.parametrize("name, variant", [("ash_p", "ash-p"), ("ash_b", "ash-b"), ("ash_s", "ash-s")])
@pytest.mark.parametrize("percentile", [65, 90])
def test_ash_matches_pytorch_ood(problem, name, variant, percentile):
    (W, b), _, te, ood = problem
    s = create_score(name, percentile=percentile).fit(head=(W, b))
    det = pod.ASH(backbone=None, head=head_fn(W, b), variant=variant, percentile=percentile / 100)
    ref = [-det.predict_feature_maps(f32(x)[:, :, None, None]).numpy() for x in (te, ood)]
    assert_agree(s.score(te), s.score(ood), *ref)


def test_scale_matches_pytorch_ood(problem):
    (W, b), _, te, ood = problem
    s = create_score("scale", percentile=85).fit(head=(W, b))
    det = pod.SCALE(backbone=None, head=head_fn(W, b), percentile=0.85)
    ref = [-det.predict_feature_maps(f32(x)[:, :, None, None]).numpy() for x in (te, ood)]
    assert_agree(s.score(te), s.score(ood), *ref)


@pytest.mark.parametrize("p", [50, 90])
def test_dice_matches_pytorch_ood(problem, p):
    (W, b), tr, te, ood = problem
    s = create_score("dice", p=p).fit(tr, head=(W, b))
    det = pod.DICE(None, W, b, p=p / 100).fit_features(f32(tr), tr.labels)
    ref = [-det.predict_features(f32(x)).numpy() for x in (te, ood)]
    assert abs(det.threshold - s.threshold_) < 1e-5
    assert_agree(s.score(te), s.score(ood), *ref)


def test_she_matches_pytorch_ood(problem):
    (W, b), tr, te, ood = problem
    s = fitted("she", problem)
    assert s.fallback_classes_ == []
    det = pod.SHE(None, head=head_fn(W, b)).fit_features(f32(tr), tr.labels)
    torch.testing.assert_close(det.patterns.double(), s.patterns_, rtol=1e-5, atol=1e-5)
    ref = [-det.predict_features(f32(x)).numpy() for x in (te, ood)]
    assert_agree(s.score(te), s.score(ood), *ref)


def test_nnguide_matches_pytorch_ood(problem):
    (W, b), tr, te, ood = problem
    s = create_score("nnguide", K=10, bank_fraction=1.0).fit(tr)
    det = pod.NNGuide(None, head=head_fn(W, b), k=10).fit_features(f32(tr), tr.labels)
    ref = [-det.predict_features(f32(x)).numpy() for x in (te, ood)]
    assert_agree(s.score(te), s.score(ood), *ref)


@pytest.mark.parametrize("alpha", [0.0, 0.01])
def test_nci_matches_pytorch_ood(problem, alpha):
    (W, b), tr, te, ood = problem
    s = create_score("nci", alpha=alpha).fit(tr, head=(W, b))
    det = pod.NCI(None, linear(W, b), alpha=alpha).fit_features(f32(tr))
    ref = [-det.predict_features(f32(x)).numpy() for x in (te, ood)]
    assert_agree(s.score(te), s.score(ood), *ref)


def test_fdbd_matches_pytorch_ood(problem):
    (W, b), tr, te, ood = problem
    s = fitted("fdbd", problem)
    det = pod.fDBD(None, linear(W, b)).fit_features(f32(tr))
    ref = [-det.predict_features(f32(x)).numpy() for x in (te, ood)]
    np.testing.assert_allclose(s.score(te), ref[0], rtol=1e-4)  # same scale (1/(C-1)) too
    assert_agree(s.score(te), s.score(ood), *ref)


# ------------------------------------------------- agreement with OpenOOD v1.5, re-expressed


def openood_ash(x, percentile, variant):
    """openood/networks/ash_net.py: ash_{b,p,s} on the pooled feature viewed as (B, D, 1, 1)."""
    x = x.clone().view(x.shape[0], -1, 1, 1)
    n = x.shape[1:].numel()
    k = n - int(np.round(n * percentile / 100.0))
    t = x.view(x.shape[0], n)
    s1 = x.sum(dim=[1, 2, 3])
    v, i = torch.topk(t, k, dim=1)
    if variant == "b":
        v = (s1 / k).unsqueeze(1).expand(v.shape)
    t.zero_().scatter_(dim=1, index=i, src=v)
    if variant == "s":
        x = x * torch.exp(s1 / x.sum(dim=[1, 2, 3]))[:, None, None, None]
    return x.view(x.shape[0], -1)


def openood_scale(x, percentile):
    """openood/networks/scale_net.py: scale()."""
    n = x.shape[1]
    k = n - int(np.round(n * percentile / 100.0))
    v, _ = torch.topk(x, k, dim=1)
    return x * torch.exp(x.sum(1) / v.sum(1))[:, None]


@pytest.mark.parametrize("name", ["ash_p", "ash_b", "ash_s", "scale"])
def test_shaping_matches_openood(problem, name):
    # openood/postprocessors/{ash,scale}_postprocessor.py: energy = logsumexp(fc(shaped feature))
    (W, b), _, te, ood = problem
    s = create_score(name, percentile=80).fit(head=(W, b))

    def ref(x):
        f = f32(x)
        g = openood_scale(f, 80) if name == "scale" else openood_ash(f, 80, name[-1])
        return torch.logsumexp(g @ W.T + b, dim=1).numpy()

    assert_agree(s.score(te), s.score(ood), ref(te), ref(ood))


def test_dice_matches_openood(problem):
    # openood/postprocessors/dice_postprocessor.py
    (W, b), tr, te, ood = problem
    mean_act = tr.features.numpy().mean(0)
    contrib = mean_act[None, :] * W.numpy()
    masked_w = W * torch.as_tensor(contrib > np.percentile(contrib, 90))

    def ref(x):
        return torch.logsumexp((f32(x)[:, None, :] * masked_w).sum(2) + b, dim=1).numpy()

    s = fitted("dice", problem)
    assert_agree(s.score(te), s.score(ood), ref(te), ref(ood))


@pytest.mark.parametrize("metric", ["inner_product", "euclidean", "cosine"])
def test_she_matches_openood(problem, metric):
    # openood/postprocessors/she_postprocessor.py (distance() with the three metrics)
    _, tr, te, ood = problem
    pred = tr.logits.argmax(1)
    pats = torch.cat([tr.features[(tr.labels == c) & (pred == c)].mean(0, keepdim=True) for c in range(6)])

    def ref(x):
        t = pats[x.logits.argmax(1)]
        f = x.features
        if metric == "inner_product":
            return (f * t).sum(1).numpy()
        if metric == "euclidean":
            return (-torch.sqrt(((f - t) ** 2).sum(1))).numpy()
        return torch.cosine_similarity(f, t, dim=1).numpy()

    s = fitted("she", problem, metric=metric)
    assert_agree(s.score(te), s.score(ood), ref(te), ref(ood))


def test_nnguide_matches_openood(problem):
    # openood/postprocessors/nnguide_postprocessor.py (faiss IndexFlatIP search -> exact top-K here)
    _, tr, te, ood = problem
    norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True) + 1e-10  # noqa: E731
    lse = lambda z: torch.logsumexp(z, 1).numpy()  # noqa: E731
    bank = norm(tr.features.numpy()) * lse(tr.logits)[:, None]

    def ref(x):
        sims = norm(x.features.numpy()) @ bank.T
        return np.sort(sims, axis=1)[:, -10:].mean(1) * lse(x.logits)

    s = create_score("nnguide", K=10, bank_fraction=1.0).fit(tr)
    assert_agree(s.score(te), s.score(ood), ref(te), ref(ood))


def test_nci_matches_openood(problem):
    # openood/postprocessors/nci_postprocessor.py
    (W, b), tr, te, ood = problem
    mu = tr.features.mean(0)

    def ref(x):
        f, idx = x.features, x.logits.argmax(1)
        return ((W[idx] * (f - mu)).sum(1) / torch.norm(f - mu, dim=1) + 1e-3 * torch.norm(f, p=1, dim=1)).numpy()

    s = fitted("nci", problem, alpha=1e-3)
    assert_agree(s.score(te), s.score(ood), ref(te), ref(ood))


@pytest.mark.parametrize("distance_as_normalizer", [True, False])
def test_fdbd_matches_openood(problem, distance_as_normalizer):
    # openood/postprocessors/fdbd_postprocessor.py (no 1/(C-1): a constant factor)
    (W, b), tr, te, ood = problem
    mu = tr.features.mean(0)
    denom = np.stack([np.linalg.norm(W.numpy() - W.numpy()[p], axis=1) for p in range(6)])
    denom[np.arange(6), np.arange(6)] = 1
    denom = torch.as_tensor(denom, dtype=torch.float32)

    def ref(x):
        out, f = x.logits, x.features
        values, idx = out.max(1)
        num = torch.sum(torch.abs(out - values[:, None]) / denom[idx], dim=1)
        return (num / torch.norm(f - mu if distance_as_normalizer else f, dim=1)).numpy()

    s = fitted("fdbd", problem, distance_as_normalizer=distance_as_normalizer)
    np.testing.assert_allclose(s.score(te) * 5, ref(te), rtol=1e-4)
    assert_agree(s.score(te), s.score(ood), ref(te), ref(ood))


@pytest.mark.parametrize("pow_", [1, 4])
def test_relation_matches_openood(problem, pow_):
    # openood/postprocessors/relation_postprocessor.py: normalize, kernel, get_relation
    _, tr, te, ood = problem
    norm = lambda f: f / torch.sqrt((f**2).sum(-1) + 1e-10).reshape(-1, 1)  # noqa: E731
    bank_f, bank_p = norm(tr.features), torch.softmax(tr.logits, 1)

    def ref(x):
        rel = torch.clamp(norm(x.features) @ bank_f.T, min=0.0) * (torch.softmax(x.logits, 1) @ bank_p.T)
        rel = (rel.abs() > 0.03) * rel
        return (rel.sign() * rel.abs() ** pow_).sum(-1).numpy()

    s = fitted("relation", problem, pow=pow_)
    assert s.bank_size_ == len(tr)
    np.testing.assert_allclose(s.score(te), ref(te), rtol=1e-4, atol=1e-4)
    assert_agree(s.score(te), s.score(ood), ref(te), ref(ood))


def test_residual_matches_openood(problem):
    # openood/postprocessors/residual_postprocessor.py, fitted on the same (train) features
    (W, b), tr, te, ood = problem
    w, bb = W.double().numpy(), b.double().numpy()
    u = -np.matmul(np.linalg.pinv(w), bb)
    Xc = tr.features.double().numpy() - u
    cov = Xc.T @ Xc / len(Xc)  # EmpiricalCovariance(assume_centered=True)
    eig_vals, eigen_vectors = np.linalg.eig(cov)
    NS = np.ascontiguousarray((eigen_vectors.T[np.argsort(eig_vals * -1)[20:]]).T)

    def ref(x):
        return -np.linalg.norm((x.features.double().numpy() - u) @ NS, axis=-1)

    s = fitted("residual", problem, dim=20)
    np.testing.assert_allclose(s.score(te), ref(te), rtol=1e-6)
    assert_agree(s.score(te), s.score(ood), ref(te), ref(ood))


def test_relation_float32_matches_float64(problem):
    _, tr, te, _ = problem
    a = fitted("relation", problem).score(te)
    c = fitted("relation", problem, dtype="float64").score(te)
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pow_", [1, 4])
def test_relation_blocks_do_not_change_the_score(problem, monkeypatch, pow_):
    _, tr, te, _ = problem
    whole = fitted("relation", problem, pow=pow_, dtype="float64").score(te)
    monkeypatch.setattr(oaml.scores.relation, "_BLOCK", 7 * len(tr))  # blocks of 7 rows, a shorter last one
    assert len(te) % 7
    blocked = fitted("relation", problem, pow=pow_, dtype="float64").score(te)
    np.testing.assert_allclose(blocked, whole, rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "name, kw, param",
    [
        ("ash_p", {"percentile": 100}, "percentile"),
        ("ash_b", {"percentile": -1}, "percentile"),
        ("ash_s", {"percentile": "90"}, "percentile"),
        ("scale", {"percentile": float("nan")}, "percentile"),
        ("dice", {"p": 100}, "p"),
        ("dice", {"p": -5}, "p"),
        ("she", {"metric": "l2"}, "metric"),
        ("nnguide", {"K": 0}, "K"),
        ("nnguide", {"bank_fraction": 0.0}, "bank_fraction"),
        ("nnguide", {"seed": -1}, "seed"),
        ("nci", {"alpha": -0.1}, "alpha"),
        ("fdbd", {"distance_as_normalizer": "yes"}, "distance_as_normalizer"),
        ("relation", {"pow": 0}, "pow"),
        ("relation", {"threshold": -0.01}, "threshold"),
        ("relation", {"dtype": "float16"}, "dtype"),
        ("residual", {"dim": 0}, "dim"),
        ("residual", {"dim": 2.5}, "dim"),
    ],
)
def test_hyperparameter_validation(name, kw, param):
    with pytest.raises(ConfigError, match=param):
        create_score(name, **kw)


def test_data_dependent_validation(problem):
    (W, b), tr, _, _ = problem
    with pytest.raises(ConfigError, match="keeps no activation"):
        create_score("ash_s", percentile=95).fit(head=(torch.ones(2, 4), None))  # k = 4 - 4 = 0
    with pytest.raises(ConfigError, match="keeps no activation"):
        create_score("scale", percentile=99).fit(head=(torch.ones(2, 10), None))
    with pytest.raises(ConfigError, match="exceeds the bank size 4"):
        create_score("nnguide", K=5, bank_fraction=0.01).fit(tr)
    with pytest.raises(ConfigError, match=r"dim=48 must be < the feature dimension D=48"):
        create_score("residual", dim=48).fit(tr, head=(W, b))
    one = FeatureSet(tr.logits[:, :1], tr.features, torch.zeros(len(tr), dtype=torch.long))
    with pytest.raises(ShapeError, match="at least 2 classes"):
        create_score("fdbd").fit(one, head=(W[:1], b[:1]))
    W2 = W.clone()
    W2[3] = W2[1]
    with pytest.raises(DataError, match="classes 1 and 3 have identical"):
        create_score("fdbd").fit(tr, head=(W2, b))
    no5 = FeatureSet(tr.logits, tr.features, tr.labels.clamp(max=4))
    with pytest.raises(DataError, match=r"no train sample of class\(es\) \[5\]"):
        create_score("she").fit(no5)
    with pytest.raises(ShapeError, match="labels"):
        create_score("she").fit(FeatureSet(tr.logits, tr.features))


def test_she_falls_back_to_all_samples_of_a_class_never_predicted(problem):
    _, tr, te, _ = problem
    logits = tr.logits.clone()
    logits[:, 2] = -1e3  # class 2 is never predicted: no correctly classified sample
    s = create_score("she").fit(FeatureSet(logits, tr.features, tr.labels))
    assert s.fallback_classes_ == [2]
    # (the class sums add float32 chunks of up to 2,048 rows: at most 2,048 * 2^-24 relative to the sum of |x|)
    ref = tr.features[tr.labels == 2].double()
    assert float((s.patterns_[2] - ref.mean(0)).abs().max()) <= 2048 * 2.0**-24 * float(ref.abs().mean(0).max())
    assert np.isfinite(s.score(te)).all()


# ------------------------------------------------------------------------------ shape checks


@pytest.mark.parametrize("name", NAMES)
def test_fit_and_score_shapes_are_checked(problem, name):
    (W, b), tr, te, _ = problem
    s = fitted(name, problem)
    with pytest.raises(ShapeError, match="fitted on"):
        s.score(FeatureSet(te.logits[:, :3], te.features))
    with pytest.raises(ShapeError, match="fitted on"):
        s.score(FeatureSet(te.logits, te.features[:, :5]))
    with pytest.raises(ShapeError):
        s.score(te.features)  # a tensor is not a FeatureSet
    bad = FeatureSet(te.logits.clone(), te.features.clone())
    bad.features[3, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="1 non-finite"):
        s.score(bad)
    fresh = create_score(name, **SMALL.get(name, {}))
    with pytest.raises(ConfigError, match="fit"):
        fresh.score(te)
    if fresh.needs_head:
        with pytest.raises(ConfigError, match="head"):
            fresh.fit(tr)
        with pytest.raises(ShapeError, match="head W"):
            fresh.fit(tr, head=(W[:, :5], b))
        with pytest.raises(ShapeError, match="head bias"):
            fresh.fit(tr, head=(W, b[:2]))
    else:
        with pytest.raises(ShapeError):
            fresh.fit(tr.features)


def test_head_only_scores_check_data_given_to_fit(problem):
    (W, b), tr, _, _ = problem
    with pytest.raises(ShapeError, match="head W is"):
        create_score("ash_p").fit(FeatureSet(tr.logits, tr.features[:, :10]), head=(W, b))
    s = create_score("scale").fit(tr, head=(W, b))  # data is optional and only checked
    assert s.is_fitted and s.k_ == 48 - int(np.round(48 * 0.85))


def test_top_k_mask_is_the_stable_sort_set_and_top_k_sum_its_sum():
    """The O(D) selection keeps exactly the first k of a stable descending sort (ties, e.g. the many
    exact zeros of post-ReLU features, by the lower index), and top_k_sum is the sum of that set."""
    from oaml.scores.ash import top_k_mask, top_k_sum

    g = torch.Generator().manual_seed(3)
    f = torch.relu(torch.randn(400, 37, generator=g, dtype=torch.float64) - 0.8)  # ~80% exact zeros
    f[::7, 5:9] = 1.25  # ties above zero too
    for k in (1, 4, 9, 20, 37):
        idx = torch.sort(f, dim=1, descending=True, stable=True).indices[:, :k]
        ref = torch.zeros_like(f, dtype=torch.bool).scatter_(1, idx, True)
        mask = top_k_mask(f, k)
        assert torch.equal(mask, ref), k
        assert torch.equal(mask.sum(dim=1), torch.full((400,), k))
        torch.testing.assert_close(top_k_sum(f, k), f.gather(1, idx).sum(dim=1), rtol=1e-13, atol=1e-13)


def test_chunked_float64_means_and_class_sums_equal_the_direct_ones():
    from oaml.scores.base import class_sums, mean64

    g = torch.Generator().manual_seed(4)
    x = torch.randn(1000, 6, generator=g) * 1e3 + 1e4
    y = torch.randint(0, 3, (1000,), generator=g)
    x64 = x.double()
    torch.testing.assert_close(mean64(x, chunk=128), x64.mean(dim=0), rtol=1e-14, atol=0)
    direct = torch.zeros(3, 6, dtype=torch.float64).index_add_(0, y, x64)
    # float32 sums of at most 100 rows (positive here): relative error at most 100 * 2^-24; float64 input: exact
    torch.testing.assert_close(class_sums(x, y, 3, chunk=100), direct, rtol=100 * 2.0**-24, atol=0)
    torch.testing.assert_close(class_sums(x64, y, 3, chunk=100), direct, rtol=1e-14, atol=0)
    assert not torch.equal(class_sums(x, y, 3, chunk=100), direct)  # the bound is what is tested, not equality


@pytest.mark.parametrize("name", ["fdbd", "nci"])
@pytest.mark.parametrize("where", ["fit features", "score features", "score logits"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_inline_finiteness_checks_name_the_field(problem, name, where, value):
    # fDBD and NCI check their inputs from the sums and norms they compute anyway (not a separate pass): any
    # NaN or inf is still found, with the stage and the field named
    (W, b), tr, te, _ = problem
    stage, field = where.split()
    data = tr if stage == "fit" else te
    bad = FeatureSet(data.logits.clone(), data.features.clone(), data.labels)
    getattr(bad, field)[7, 1] = value
    s = create_score(name) if stage == "fit" else fitted(name, problem)
    with pytest.raises(NonFiniteError, match=rf"{name}\.{stage}\(\): {field} contains 1 non-finite"):
        s.fit(bad, head=(W, b)) if stage == "fit" else s.score(bad)
