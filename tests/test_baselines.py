"""Training baselines (OE, energy-OE, MixOE, LogitNorm, VOS, NPOS, MCD) in the one training loop:
known-answer tests of the new loss pieces and a 1-epoch tiny run per method."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oaml.errors import ConfigError
from oaml.training.baselines import (
    cutmix_box,
    ema_prototypes,
    entropy,
    mcd_discrepancy_loss,
    mix_images,
    npos_compactness,
    npos_dispersion,
    sample_beta,
)
from oaml.training.config import TrainConfig
from oaml.training.methods import METHODS, MethodConfig, resolve_terms
from oaml.training.trainer import Trainer

from helpers import TinyImages

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# loss pieces with known answers
# --------------------------------------------------------------------------------------------
def test_mix_images_mixup_and_cutmix_area():
    x = torch.ones(2, 1, 4, 4)
    xo = torch.zeros(2, 1, 4, 4)
    mixed, lam = mix_images(x, xo, 0.25, "mixup", torch.Generator().manual_seed(0))
    assert lam == 0.25 and torch.allclose(mixed, torch.full_like(x, 0.25))
    g = torch.Generator().manual_seed(3)
    mixed, lam = mix_images(x, xo, 0.75, "cutmix", g)
    # lam is the exact fraction of ID pixels left, the same box for every image
    assert lam == pytest.approx(float(mixed[0].mean()))
    assert torch.equal(mixed[0], mixed[1])
    # side ratio sqrt(1 - 0.75) = 0.5 of 4 -> a 2x2 box unless clipped at the border
    y1, y2, x1, x2 = cutmix_box(4, 4, 0.75, torch.Generator().manual_seed(3))
    assert (y2 - y1) <= 2 and (x2 - x1) <= 2 and lam == pytest.approx(1 - (y2 - y1) * (x2 - x1) / 16)
    with pytest.raises(ConfigError, match="equal shape"):
        mix_images(x, xo[:1], 0.5, "mixup", g)


def test_sample_beta_is_seeded_and_matches_the_quantile():
    a = sample_beta(0.1, 1.0, torch.Generator().manual_seed(7))
    u = float(torch.rand((), generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    assert a == pytest.approx(u ** (1 / 0.1))  # Beta(a, 1) has CDF x^a
    assert sample_beta(1.0, 1.0, torch.Generator().manual_seed(7)) == pytest.approx(u)


def test_npos_compactness_and_dispersion_known_values():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    z = torch.tensor([[1.0, 0.0]])
    T = 0.5
    # logits z.mu / T = [2, 0, -2]; label 0
    expected = -(2 - math.log(math.exp(2) + 1 + math.exp(-2)))
    assert float(npos_compactness(z, protos * 3, torch.tensor([0]), T)) == pytest.approx(expected, rel=1e-6)
    # sims / T: p0.p1 = 0, p0.p2 = -1 -> -2; p1.p2 = 0
    rows = [math.log((1 + math.exp(-2)) / 2), math.log((1 + 1) / 2), math.log((math.exp(-2) + 1) / 2)]
    assert float(npos_dispersion(protos, T)) == pytest.approx(sum(rows) / 3, rel=1e-6)


def test_ema_prototypes_sequential_and_differentiable():
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[0.0, 1.0], [0.0, 1.0]], requires_grad=True)
    out = ema_prototypes(p, z, torch.tensor([0, 0]), 0.5)
    # step 1: normalise(0.5*(1,0) + 0.5*(0,1)) = (1,1)/sqrt2; step 2: normalise(0.5*(1,1)/sqrt2 + 0.5*(0,1))
    s = 1 / math.sqrt(2)
    v = torch.tensor([0.5 * s, 0.5 * s + 0.5])
    assert torch.allclose(out[0], v / v.norm(), atol=1e-6)
    assert torch.equal(out[1], p[1]) and torch.equal(p, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    out[0].sum().backward()
    assert z.grad is not None and float(z.grad.abs().sum()) > 0


def test_entropy_and_mcd_discrepancy_known_values():
    uniform = torch.zeros(3, 4)
    onehot = torch.tensor([[50.0, 0, 0, 0]] * 3)
    assert torch.allclose(entropy(uniform), torch.full((3,), math.log(4)))
    assert float(entropy(onehot).max()) < 1e-10
    # d = log 4 - 0 = 1.386 > margin 1.2 -> 0; reversed heads: d = -1.386 -> 1.2 + 1.386
    assert float(mcd_discrepancy_loss(uniform, onehot, 1.2)) == 0.0
    assert float(mcd_discrepancy_loss(onehot, uniform, 1.2)) == pytest.approx(1.2 + math.log(4), rel=1e-6)


# --------------------------------------------------------------------------------------------
# one tiny epoch per method in the one training loop
# --------------------------------------------------------------------------------------------
def _aux():
    ds = TinyImages(48, seed=9)
    ds.labels = ds._labels = torch.full_like(ds._labels, -1)
    return ds


def _cfg(method, **terms):
    return TrainConfig.from_dict({
        "data": {"batch_size": 16, "eval_batch_size": 32, "augment": {"flip": True, "crop_padding": 1}},
        "student": {"width": 0.125},
        "preprocess": {"channels": 1},
        "optim": {"lr": 0.02, "epochs": 1},
        "method": {"name": method, "terms": terms},
        "tensorboard": False,
        "progress": False,
    })


def _run(tmp_path, method, aux=True, **terms):
    tr = Trainer(_cfg(method, **terms), TinyImages(64), TinyImages(32, seed=1), tmp_path / method, num_classes=4,
                 in_channels=1, aux_set=_aux() if aux else None)
    return tr, tr.fit()


SMALL = {
    "vos": {"vos": {"start_epoch": 0, "queue_size": 3, "sample_from": 40, "select": 2}},
    "npos": {"npos": {"start_epoch": 0, "queue_size": 4, "K": 2, "boundary": 2, "candidates": 12, "keep": 3}},
    "mcd": {"mcd": {"start_epoch": 0}},
}
EXPECTED = {
    "oe": ["ce", "oe"], "energy-oe": ["ce", "energy_oe"], "mixoe": ["ce", "mixoe"], "logitnorm": ["logitnorm"],
    "vos": ["ce", "vos", "vos_active"], "npos": ["npos", "ce_probe", "npos_comp", "npos_disp", "npos_open", "npos_active"],
    "mcd": ["ce", "mcd"],
}


@pytest.mark.parametrize("method", list(EXPECTED))
def test_one_epoch_logs_finite_terms(tmp_path, method):
    tr, summary = _run(tmp_path, method, **SMALL.get(method, {}))
    row = summary["history"][-1]
    for key in EXPECTED[method]:
        assert key in row and np.isfinite(row[key]), (key, row)
    assert set(resolve_terms(MethodConfig(name=method))) == set(EXPECTED[method]) - {
        "vos_active", "npos_comp", "npos_disp", "npos_open", "npos_active"}
    if method in ("vos", "npos"):
        assert row[f"{method}_active"] > 0 and row[method if method == "vos" else "npos_open"] > 0
    if method == "npos":  # the linear probe trains fc; the representation gets no CE gradient
        assert "ce" not in row


def test_mixoe_feeds_id_and_mixtures_in_one_pass_without_raw_outliers(tmp_path):
    tr = Trainer(_cfg("mixoe", mixoe={"mix_op": "mixup"}), TinyImages(64), TinyImages(32, seed=1), tmp_path / "m",
                 num_classes=4, in_channels=1, aux_set=_aux())
    sizes = []
    orig = tr.net.forward

    def record(x):
        sizes.append(x.shape[0])
        return orig(x)

    tr.net.forward = record
    tr.fit()
    assert sizes == [32] * tr.steps_per_epoch  # 16 ID + 16 mixtures, one forward pass per step
    # the same run again gives the same weights (lam and boxes come from the seeded generator)
    tr2 = Trainer(_cfg("mixoe", mixoe={"mix_op": "mixup"}), TinyImages(64), TinyImages(32, seed=1), tmp_path / "m2",
                  num_classes=4, in_channels=1, aux_set=_aux())
    tr2.fit()
    for k, v in tr.model.state_dict().items():
        assert torch.equal(v, tr2.model.state_dict()[k]), k


def test_oe_feeds_id_and_outliers_in_one_pass(tmp_path):
    tr = Trainer(_cfg("oe"), TinyImages(64), TinyImages(32, seed=1), tmp_path / "o", num_classes=4, in_channels=1,
                 aux_set=_aux())
    sizes = []
    orig = tr.net.forward
    tr.net.forward = lambda x: (sizes.append(x.shape[0]), orig(x))[1]
    tr.fit()
    assert sizes == [32] * tr.steps_per_epoch


def test_vos_inactive_before_start_epoch_and_npos_probe_leaves_backbone(tmp_path):
    tr, summary = _run(tmp_path, "vos", aux=False, vos={"queue_size": 3, "sample_from": 40})  # start_epoch 40
    assert summary["history"][-1]["vos"] == 0.0 and summary["history"][-1]["vos_active"] == 0.0
    # the probe's gradient reaches fc only
    from oaml.training.baselines import LinearProbeTerm
    from oaml.training.state import StepState

    model = tr.model
    x = torch.randn(4, 1, 12, 12)
    logits, feats = model.forward_features(x)
    s = StepState(images=x, labels=torch.tensor([0, 1, 2, 3]), logits=logits, features=feats,
                  generator=torch.Generator(), epoch=0, step=0, model=model)
    model.zero_grad()
    from oaml.training.terms import BuildContext, TermConfig

    probe = LinearProbeTerm(TermConfig(), BuildContext(4, model.feature_dim, torch.device("cpu")))
    probe(s).backward()
    assert model.fc.weight.grad is not None
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("fc."))


def test_oe_methods_need_the_outlier_pool(tmp_path):
    with pytest.raises(ConfigError, match="auxiliary outlier images"):
        Trainer(_cfg("oe"), TinyImages(64), TinyImages(32), tmp_path / "x", 4, 1)


def test_methods_documented_and_train_configs_load():
    for name in EXPECTED:
        m = METHODS.get(name)
        assert m.description and m.paper, name
        cfg = TrainConfig.from_yaml(ROOT / "configs" / "train" / f"{name}.yaml")
        assert cfg.method.name == name and cfg.data.benchmark == "fmnist"
        resolve_terms(cfg.method)  # term overrides are valid keys of existing terms
        for tname, tcfg in resolve_terms(cfg.method).items():
            from oaml.training.terms import TERMS

            TERMS.get(tname).config_cls.from_dict(tcfg)


def test_npos_batched_sampler_equals_the_knn_sampler():
    from oaml.outliers.knn import KNNSamplerConfig, sample_class_outliers
    from oaml.training.baselines import npos_boundary_outliers

    Q = torch.randn(3, 40, 6, generator=torch.Generator().manual_seed(1))
    fast = npos_boundary_outliers(Q, K=5, S=2, N=30, sigma=0.3, m=4, generator=torch.Generator().manual_seed(2))
    cfg = KNNSamplerConfig(K=5, S=2, N=30, sigma=0.3, m=4, R=1, features_per_class=None, backend="torch", device="cpu")
    g = torch.Generator().manual_seed(2)
    exact = torch.cat([sample_class_outliers(Q[c], cfg, generator=g) for c in range(3)])
    assert fast.shape == (3 * 2 * 4, 6)
    assert torch.allclose(fast, exact, atol=1e-6)
