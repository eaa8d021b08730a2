"""Tests of oaml.losses.outlier: OE, energy margin, LogitNorm, VOS, MixOE, the class queue."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oaml.errors import ConfigError, DataError, ShapeError
from oaml.losses.outlier import (
    ClassFeatureQueue,
    LogitNormLoss,
    VOSUncertaintyLoss,
    energy_margin_loss,
    mixoe_loss,
    mixoe_targets,
    oe_loss,
    vos_uncertainty_loss,
    weighted_energy,
)


def test_oe_loss_known_values():
    assert float(oe_loss(torch.zeros(3, 10))) == pytest.approx(math.log(10), rel=1e-6)  # minimum: log C
    z = torch.tensor([[1.0, 2.0, 3.0]])
    expected = math.log(math.e + math.e**2 + math.e**3) - 2.0
    assert float(oe_loss(z)) == pytest.approx(expected, rel=1e-6)
    # = cross-entropy from the uniform distribution = log C + KL(U || p)
    zz = torch.randn(5, 4)
    p = F.softmax(zz, 1)
    kl_u_p = (0.25 * (torch.log(torch.tensor(0.25)) - torch.log(p))).sum(1).mean()
    assert float(oe_loss(zz)) == pytest.approx(math.log(4) + float(kl_u_p), rel=1e-5)


def test_energy_margin_known_value():
    logits_in = torch.tensor([[0.0, 0.0], [30.0, -100.0]])  # E = -ln 2 ; E ~ -30 (below m_in: no loss)
    logits_out = torch.tensor([[10.0, 10.0], [-5.0, -5.0]])  # E = -10 - ln 2 ; E = 5 - ln 2 (above m_out)
    e_in0 = -math.log(2)
    e_out0 = -10 - math.log(2)
    expected = ((e_in0 + 25) ** 2 + 0.0) / 2 + ((-7 - e_out0) ** 2 + 0.0) / 2
    assert float(energy_margin_loss(logits_in, logits_out)) == pytest.approx(expected, rel=1e-5)
    assert float(energy_margin_loss(logits_in, logits_out, m_in=-1.0, m_out=20.0)) > expected
    with pytest.raises(ConfigError):
        energy_margin_loss(logits_in, logits_out, m_in=-5, m_out=-7)


def test_logitnorm_known_value():
    loss = LogitNormLoss()  # tau = 0.04
    z = torch.tensor([[3.0, 4.0]])  # norm 5 -> (0.6, 0.8) / 0.04 = (15, 20)
    assert float(loss(z, torch.tensor([0]))) == pytest.approx(5 + math.log1p(math.exp(-5)), rel=1e-5)
    assert float(loss(z, torch.tensor([1]))) == pytest.approx(math.log1p(math.exp(-5)), rel=1e-4)
    # invariant to the logits' scale
    assert float(loss(10 * z, torch.tensor([0]))) == pytest.approx(float(loss(z, torch.tensor([0]))), rel=1e-5)
    with pytest.raises(ConfigError):
        LogitNormLoss(tau=0)


def test_vos_uncertainty_loss_exact():
    z_in = torch.tensor([[1.0, 2.0, 0.0]])
    z_out = torch.tensor([[0.0, 0.0, 0.0]])
    w = torch.tensor([1.0, 0.5, -3.0], requires_grad=True)  # relu -> (1, 0.5, 0)
    s_in = math.log(math.e + 0.5 * math.e**2)
    s_out = math.log(1.5)
    assert float(weighted_energy(z_in, w).detach()) == pytest.approx(s_in, rel=1e-6)
    lr = nn.Linear(1, 2)
    with torch.no_grad():
        lr.weight.copy_(torch.tensor([[0.0], [2.0]]))
        lr.bias.copy_(torch.tensor([0.0, -1.0]))
    # CE with label 1 for ID, 0 for outliers; logit difference = 2 s - 1
    a_in, a_out = 2 * s_in - 1, 2 * s_out - 1
    expected = (math.log1p(math.exp(-a_in)) + math.log1p(math.exp(a_out))) / 2
    loss = vos_uncertainty_loss(z_in, z_out, w, lr)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert w.grad is not None and float(w.grad[2]) == 0.0  # relu'd weight gets no gradient
    m = VOSUncertaintyLoss(3)
    assert m.weight_energy.shape == (3,) and bool((m.weight_energy >= 0).all())
    assert m(torch.randn(4, 3), torch.randn(2, 3)).dim() == 0
    with pytest.raises(ShapeError):
        weighted_energy(z_in, torch.ones(4))


def test_mixoe_loss():
    z = torch.randn(6, 5)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    assert float(mixoe_loss(z, y, 1.0)) == pytest.approx(float(F.cross_entropy(z, y)), rel=1e-6)
    assert float(mixoe_loss(z, y, 0.0)) == pytest.approx(float(oe_loss(z)), rel=1e-6)
    t = mixoe_targets(torch.tensor([1]), 4, 0.6)
    torch.testing.assert_close(t, torch.tensor([[0.1, 0.7, 0.1, 0.1]]))
    lam = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    per = mixoe_targets(y, 5, lam)
    assert torch.allclose(per.sum(1), torch.ones(6))
    assert float(per[1].max()) == pytest.approx(0.2)
    with pytest.raises(ConfigError):
        mixoe_targets(y, 5, 1.5)
    with pytest.raises(ShapeError):
        mixoe_targets(y, 5, torch.ones(3))


def _sequential_queue(num_classes, dim, size, batches):
    data = torch.zeros(num_classes, size, dim)
    ptr = [0] * num_classes
    count = [0] * num_classes
    for f, l in batches:
        for v, c in zip(f, l.tolist()):
            data[c, ptr[c]] = v
            ptr[c] = (ptr[c] + 1) % size
            count[c] = min(count[c] + 1, size)
    return data, torch.tensor(ptr), torch.tensor(count)


def test_queue_push_matches_sequential_fifo():
    g = torch.Generator().manual_seed(0)
    q = ClassFeatureQueue(3, 2, 4)
    batches = []
    for n in (5, 1, 11, 3):  # the 11-batch overflows some classes
        f = torch.randn(n, 2, generator=g)
        l = torch.randint(0, 3, (n,), generator=g)
        batches.append((f, l))
        q.push(f, l)
    data, ptr, count = _sequential_queue(3, 2, 4, batches)
    assert torch.equal(q.ptr, ptr) and torch.equal(q.count, count)
    torch.testing.assert_close(q.data, data)
    feats, labels = q.features()
    assert feats.shape == (int(count.sum()), 2) and labels.shape == (int(count.sum()),)
    with pytest.raises(ShapeError):
        q.push(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ShapeError):
        q.push(torch.randn(2, 2), torch.tensor([0, 3]))


def test_queue_virtual_outliers_shapes_and_low_likelihood():
    torch.manual_seed(0)
    C, D, size = 3, 6, 200
    q = ClassFeatureQueue(C, D, size)
    with pytest.raises(DataError):
        q.sample_virtual_outliers(100, 2)
    centres = torch.randn(C, D) * 5
    labels = torch.arange(C).repeat(size)
    feats = centres[labels] + torch.randn(C * size, D)
    q.push(feats[:100], labels[:100])
    with pytest.raises(DataError):
        q.sample_virtual_outliers(100, 2)  # not full yet
    q.push(feats[100:], labels[100:])
    assert q.is_full
    g = torch.Generator().manual_seed(1)
    out, out_labels = q.sample_virtual_outliers(num=2000, select=3, generator=g)
    assert out.shape == (C * 3, D)
    assert torch.equal(out_labels, torch.arange(C).repeat_interleave(3))
    means, cov = q.fit_gaussian()
    torch.testing.assert_close(means, centres + (feats - centres[labels]).reshape(size, C, D).mean(0), atol=1e-4, rtol=0)
    dist = torch.distributions.MultivariateNormal(means, covariance_matrix=cov)
    ll_out = dist.log_prob(out.unsqueeze(1))[torch.arange(C * 3), out_labels]
    ll_mean = dist.log_prob(means)  # peak density of each class
    stored, stored_labels = q.features()
    ll_stored = dist.log_prob(stored.unsqueeze(1))[torch.arange(stored.shape[0]), stored_labels]
    assert bool((ll_out < ll_mean[out_labels]).all())
    assert bool((ll_out < torch.quantile(ll_stored, 0.05)).all())
    # reproducible with a seeded generator
    out2, _ = q.sample_virtual_outliers(num=2000, select=3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, out2)
