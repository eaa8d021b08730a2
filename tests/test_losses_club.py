"""Tests of oaml.losses.club: CLUB bound (fitted and reference modes), pooling, pairing."""

import math

import pytest
import torch

from oaml.errors import BankError, ConfigError, ShapeError
from oaml.losses.club import CLUB, OutlierPairer, club_negative_term, pair_outliers, pool_outliers


pytestmark = pytest.mark.usefixtures("one_thread")


def naive_negative(mu, logvar, y):
    """mean_j log N(y_j; mu_i, diag exp(logvar_i)) by the explicit B x B x D sum."""
    diff = y.unsqueeze(0) - mu.unsqueeze(1)  # (B_i, B_j, D)
    lp = -0.5 * (diff**2 / logvar.exp().unsqueeze(1) + logvar.unsqueeze(1) + math.log(2 * math.pi))
    return lp.sum(-1).mean(1)


def naive_bound(mu, logvar, y):
    pos = (-0.5 * ((y - mu) ** 2 / logvar.exp() + logvar + math.log(2 * math.pi))).sum(-1)
    return (pos - naive_negative(mu, logvar, y)).mean()


def test_memory_efficient_negative_term_equals_naive():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3 + 10
    logvar = torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.randn(7, 5, generator=g, dtype=torch.float64) * 2 + 10
    torch.testing.assert_close(club_negative_term(mu, logvar, y), naive_negative(mu, logvar, y))
    with pytest.raises(ShapeError):
        club_negative_term(mu, logvar, y[:, :3])


@pytest.mark.parametrize("mode", ["fitted", "reference"])
def test_bound_equals_naive_formula(mode):
    torch.manual_seed(1)
    club = CLUB(6, 10, hidden=16, mode=mode, y_pool_dim=5).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    y = torch.randn(9, 10, dtype=torch.float64)
    yp = pool_outliers(y, 5)
    with torch.no_grad():
        if mode == "fitted":
            mu, lv = club.q(x)
            expected = naive_bound(mu, lv, yp)
        else:  # authors: q(f_S | outlier), roles swapped
            mu, lv = club.q(yp)
            expected = naive_bound(mu, lv, x)
        torch.testing.assert_close(club.bound(x, y), expected)


def test_pooling_is_contiguous_average():
    y = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 16)
    p = pool_outliers(y, 4)
    torch.testing.assert_close(p, y.reshape(2, 4, 4).mean(-1))
    assert pool_outliers(y.reshape(2, 4, 4), None).shape == (2, 16)  # flattened
    with pytest.raises(ConfigError):
        pool_outliers(y, 17)
    with pytest.raises(ConfigError):
        CLUB(4, 8, y_pool_dim=9)


def test_fitted_bound_gradient_only_through_x():
    torch.manual_seed(0)
    club = CLUB(4, 3, hidden=8)
    x = torch.randn(16, 4, requires_grad=True)
    y = torch.randn(16, 3, requires_grad=True)
    ll = club.estimator_step(x, y)
    assert math.isfinite(ll)
    assert x.grad is None and y.grad is None  # likelihood step uses detached inputs
    assert all(p.grad is None for p in club.q.parameters())  # no stale likelihood gradient left
    club.bound(x, y).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert y.grad is None
    assert all(p.grad is None for p in club.q.parameters())
    assert club.student_parameters() == []
    assert len(club.estimator_parameters()) == len(list(club.q.parameters()))


def test_estimator_step_increases_likelihood_and_updates_only_q():
    torch.manual_seed(0)
    club = CLUB(4, 3, hidden=16, lr=1e-2, steps=20)
    x = torch.randn(64, 4)
    y = x[:, :3] * 2 + 0.1 * torch.randn(64, 3)
    before = [p.detach().clone() for p in club.q.parameters()]
    ll0 = club.estimator_step(x, y)
    ll1 = club.estimator_step(x, y)
    assert ll1 > ll0
    assert any(not torch.equal(a, b) for a, b in zip(before, club.q.parameters()))
    assert int(club.estimator_updates) == 40


def _fit_and_estimate(noise, independent, seed=0, steps=250):
    dx, dy = 6, 4
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(dy, dx, generator=g) / math.sqrt(dx)
    torch.manual_seed(seed)
    club = CLUB(dx, dy, hidden=32, lr=1e-2, steps=1)

    def batch(n):
        x = torch.randn(n, dx, generator=g)
        y = torch.randn(n, dy, generator=g) if independent else x @ A.T + noise * torch.randn(n, dy, generator=g)
        return x, y

    for _ in range(steps):
        club.estimator_step(*batch(256))
    x, y = batch(4096)  # held-out evaluation
    with torch.no_grad():
        return float(club.bound(x, y))


def test_fitted_estimate_rises_as_dependence_grows_and_vanishes_when_independent():
    est = [_fit_and_estimate(noise, False) for noise in (2.0, 0.7, 0.25)]
    assert est[0] > 0.05
    assert est[0] < est[1] < est[2]
    indep = _fit_and_estimate(0.0, True, seed=3)
    assert abs(indep) < 0.05
    assert est[0] > 5 * abs(indep)


def test_reference_mode_roles_gradients_and_no_likelihood_fit():
    club = CLUB(8, 20, hidden=6, mode="reference", y_pool_dim=5)
    assert club.q.mu[0].in_features == 5 and club.q.mu[-1].out_features == 8  # q(f_S | outlier)
    x = torch.randn(10, 8, requires_grad=True)
    y = torch.randn(10, 20)
    club.bound(x, y).backward()
    assert x.grad is not None
    assert all(p.grad is not None for p in club.q.parameters())  # trained jointly with the student
    assert len(club.student_parameters()) == len(list(club.q.parameters()))
    assert club.estimator_parameters() == []
    with pytest.raises(ConfigError):
        club.estimator_step(x, y)
    # authors' Tanh-bounded log-variance
    lv = club.q(pool_outliers(y, 5))[1]
    assert float(lv.detach().abs().max()) <= 1.0


def test_reference_mode_expectation_is_zero_on_independent_pairs():
    torch.manual_seed(0)
    club = CLUB(8, 12, hidden=16, mode="reference")
    g = torch.Generator().manual_seed(1)
    vals = []
    with torch.no_grad():
        for _ in range(300):
            x = torch.relu(torch.randn(32, 8, generator=g)) + 0.5  # post-ReLU-like student features
            y = torch.randn(32, 12, generator=g) * 2.0 + 1.0  # independent outliers, random pairing
            vals.append(float(club.bound(x, y)))
    v = torch.tensor(vals, dtype=torch.float64)
    se = float(v.std()) / math.sqrt(len(vals))
    assert float(v.std()) > 1e-3  # each batch is noisy ...
    assert abs(float(v.mean())) < 4 * se  # ... but zero in expectation


def test_bound_shape_errors():
    club = CLUB(4, 6)
    with pytest.raises(ShapeError):
        club.bound(torch.randn(5, 4), torch.randn(4, 6))  # unequal pair counts
    with pytest.raises(ShapeError):
        club.bound(torch.randn(5, 3), torch.randn(5, 6))
    with pytest.raises(ShapeError):
        club.bound(torch.randn(5, 4), torch.randn(5, 7))
    with pytest.raises(ConfigError):
        CLUB(4, 6, mode="joint")


def test_pairing_class_mode_returns_same_class():
    bank_labels = torch.tensor([2, 0, 1, 2, 0, 0, 1, 2, 2, 1])
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 0, 2] * 8)
    g = torch.Generator().manual_seed(0)
    idx = pair_outliers(labels, bank_labels, mode="class", generator=g)
    assert idx.shape == labels.shape and idx.dtype == torch.long
    assert torch.equal(bank_labels[idx], labels)
    # every outlier of a class is reachable
    pairer = OutlierPairer(bank_labels)
    seen = set()
    for _ in range(30):
        seen |= set(pairer(torch.zeros(16, dtype=torch.long), "class", g).tolist())
    assert seen == {1, 4, 5}
    # reproducible with the same generator seed
    a = pairer(labels, "class", torch.Generator().manual_seed(5))
    b = pairer(labels, "class", torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_pairing_random_and_missing_class():
    bank_labels = torch.tensor([0, 0, 1, 1, 1])
    g = torch.Generator().manual_seed(0)
    idx = pair_outliers(torch.zeros(200, dtype=torch.long), bank_labels, mode="random", generator=g)
    assert set(idx.tolist()) == set(range(5))  # uniform over the whole bank, ignoring class
    with pytest.raises(BankError, match=r"\[2\]"):
        pair_outliers(torch.tensor([0, 2]), bank_labels, mode="class", generator=g)
    with pytest.raises(BankError, match=r"\[1\]"):
        OutlierPairer(torch.tensor([0, 0, 2]))(torch.tensor([1]), "class", g)
    with pytest.raises(ConfigError):
        pair_outliers(torch.tensor([0]), bank_labels, mode="nearest")
