"""Tests of oaml.losses.distill: logit KD, feature KD, the transfer MLP."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oaml.errors import ConfigError, ShapeError
from oaml.losses.distill import TransferMLP, feature_kd, logit_kd


def test_kd_zero_when_student_equals_teacher():
    z = torch.randn(8, 5)
    assert float(logit_kd(z, z.clone(), tau=3.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(logit_kd(z, z.clone(), direction="reverse")) == pytest.approx(0.0, abs=1e-6)
    f = torch.randn(8, 16)
    assert float(feature_kd(f, f.clone())) == pytest.approx(0.0, abs=1e-6)
    # and strictly positive otherwise
    assert float(logit_kd(z, z + torch.randn(8, 5))) > 1e-3


def test_kd_known_value_tiny_logits():
    # p_T = (3/4, 1/4), p_S = (1/2, 1/2)
    zs = torch.tensor([[0.0, 0.0]])
    zt = torch.tensor([[math.log(3.0), 0.0]])
    fwd = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    rev = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert float(logit_kd(zs, zt)) == pytest.approx(fwd, rel=1e-6)
    assert float(logit_kd(zs, zt, direction="reverse")) == pytest.approx(rev, rel=1e-6)
    assert abs(fwd - rev) > 1e-3  # the direction matters here
    # tau = 2: p_T = (sqrt3, 1) / (1 + sqrt3), p_S uniform; value scaled by tau^2 = 4
    s3 = math.sqrt(3.0)
    pt = (s3 / (1 + s3), 1 / (1 + s3))
    fwd2 = sum(p * math.log(p / 0.5) for p in pt)
    assert float(logit_kd(zs, zt, tau=2.0)) == pytest.approx(4.0 * fwd2, rel=1e-6)


def test_kd_matches_authors_kldivloss_batchmean():
    zs, zt = torch.randn(16, 10), torch.randn(16, 10) * 2
    ref = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(zs, 1), F.softmax(zt, 1))
    assert float(logit_kd(zs, zt)) == pytest.approx(float(ref), rel=1e-5)
    fs, g = torch.randn(16, 32), torch.randn(16, 32)
    ref2 = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(fs, 1), F.softmax(g, 1))
    assert float(feature_kd(fs, g)) == pytest.approx(float(ref2), rel=1e-5)
    ref3 = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(g, 1), F.softmax(fs, 1))
    assert float(feature_kd(fs, g, direction="reverse")) == pytest.approx(float(ref3), rel=1e-5)


def test_tau_squared_scaling_high_temperature_limit():
    # tau^2 * KL -> (1 / 2C) * sum_k (d_k - mean d)^2 with d = z_T - z_S as tau -> infinity:
    # without the tau^2 factor the value would vanish like 1/tau^2.
    torch.manual_seed(0)
    zs, zt = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    d = zt - zs
    d = d - d.mean(1, keepdim=True)
    limit = float((d.pow(2).sum(1) / (2 * 6)).mean())
    for tau in (50.0, 200.0):
        assert float(logit_kd(zs, zt, tau=tau)) == pytest.approx(limit, rel=2e-2)
        assert float(logit_kd(zs, zt, tau=tau, direction="reverse")) == pytest.approx(limit, rel=2e-2)


def test_kd_gradients_and_errors():
    zs = torch.randn(4, 3, requires_grad=True)
    zt = torch.randn(4, 3, requires_grad=True)
    logit_kd(zs, zt).backward()
    assert zs.grad is not None and zt.grad is None  # teacher is a constant
    with pytest.raises(ConfigError):
        logit_kd(zs, zt, direction="sideways")
    with pytest.raises(ShapeError):
        logit_kd(torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(ConfigError):
        logit_kd(zs, zt, tau=0.0)


def test_transfer_mlp_structure_and_gradient():
    dt = TransferMLP(12, 6)
    kinds = [type(m) for m in dt.blocks[0]]
    assert kinds == [nn.BatchNorm1d, nn.Linear, nn.ReLU, nn.BatchNorm1d]
    assert len(dt.blocks) == 1 and dt.blocks[0][1].in_features == 12 and dt.blocks[0][1].out_features == 6
    deep = TransferMLP(12, 6, depth=3, hidden=20)
    assert len(deep.blocks) == 3
    assert [b[1].out_features for b in deep.blocks] == [20, 20, 6]
    ft, fs = torch.randn(8, 12), torch.randn(8, 6, requires_grad=True)
    out = deep(ft)
    assert out.shape == (8, 6)
    feature_kd(fs, out).backward()
    # the target DT(f_T) is not detached: DT learns through the feature-KD term
    assert all(p.grad is not None for p in deep.parameters())
    assert fs.grad is not None
    with pytest.raises(ShapeError):
        deep(torch.randn(8, 11))
    with pytest.raises(ConfigError):
        TransferMLP(12, 6, depth=0)
