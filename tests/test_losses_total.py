"""Tests of oaml.losses.total: config, weighted sum with finiteness checks, the OAML criterion."""

import pytest
import torch

from oaml.errors import ConfigError, NonFiniteError
from oaml.losses.total import LossCombiner, OAMLCriterion, OAMLLossConfig


def test_config_defaults_and_strictness():
    cfg = OAMLLossConfig()
    assert cfg.weights() == {"ce": 1.0, "kd_logit": 4.0, "kd_feat": 8.0, "mi_cood": 0.1, "mi_dood": 0.2}
    assert (cfg.tau, cfg.kd_direction, cfg.mi_mode, cfg.pairing) == (1.0, "forward", "fitted", "class")
    with pytest.raises(ConfigError, match="unknown key"):
        OAMLLossConfig.from_dict({"beta": 0.1})
    with pytest.raises(ConfigError):
        OAMLLossConfig.from_dict({"b": -1})
    with pytest.raises(ConfigError):
        OAMLLossConfig.from_dict({"mi_mode": "joint"})
    with pytest.raises(ConfigError):
        OAMLLossConfig.from_dict({"club_logvar_bounds": [2, 1]})


def test_combiner_weighted_total_and_logs():
    comb = LossCombiner({"ce": 1.0, "kd_logit": 4.0, "mi_cood": 0.5})
    a = torch.tensor(2.0, requires_grad=True)
    total, logs = comb({"ce": a, "kd_logit": lambda: a * 3, "mi_cood": torch.tensor(-1.0)})
    assert float(total.detach()) == pytest.approx(2 + 4 * 6 - 0.5)
    assert logs == {"ce": 2.0, "kd_logit": 6.0, "mi_cood": -1.0, "total": pytest.approx(25.5)}
    total.backward()
    assert float(a.grad) == pytest.approx(13.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_term_raises_naming_it(bad):
    comb = LossCombiner({"ce": 1.0, "kd_feat": 8.0, "mi_dood": 0.2})
    terms = {"ce": torch.tensor(1.0), "kd_feat": torch.tensor(0.5), "mi_dood": torch.tensor(bad)}
    with pytest.raises(NonFiniteError, match="mi_dood"):
        comb(terms)


def test_zero_weight_term_is_not_computed():
    comb = LossCombiner({"ce": 1.0, "mi_cood": 0.0})

    def boom():
        raise AssertionError("a zero-weight term must not be computed")

    total, logs = comb({"ce": torch.tensor(1.5), "mi_cood": boom})
    assert float(total) == 1.5 and "mi_cood" not in logs
    assert not comb.active("mi_cood") and comb.active("ce")
    # a NaN in a switched-off term is not an error: it is never looked at
    total, _ = comb({"ce": torch.tensor(1.5), "mi_cood": torch.tensor(float("nan"))})
    assert float(total) == 1.5


def test_combiner_missing_or_unknown_terms():
    comb = LossCombiner({"ce": 1.0, "kd_logit": 4.0})
    with pytest.raises(ConfigError, match="kd_logit"):
        comb({"ce": torch.tensor(1.0)})
    with pytest.raises(ConfigError, match="mi_x"):
        comb({"ce": torch.tensor(1.0), "kd_logit": torch.tensor(1.0), "mi_x": torch.tensor(1.0)})
    with pytest.raises(ConfigError):
        LossCombiner({"ce": -1.0})
    with pytest.raises(ConfigError):
        LossCombiner({"ce": 0.0})({})


def _batch(B=8, C=4, ds=6, dt=10, dc=12, dd=32):
    g = torch.Generator().manual_seed(0)
    return dict(
        student_logits=torch.randn(B, C, generator=g, requires_grad=True),
        labels=torch.randint(0, C, (B,), generator=g),
        student_feat=torch.randn(B, ds, generator=g, requires_grad=True),
        teacher_logits=torch.randn(B, C, generator=g),
        teacher_feat=torch.randn(B, dt, generator=g),
        y_cood=torch.randn(B, dc, generator=g),
        y_dood=torch.randn(B, 2, 4, 4, generator=g),
    )


def test_criterion_fitted_mode_end_to_end():
    cfg = OAMLLossConfig(club_hidden=8, y_pool_dim_dood=8)
    crit = OAMLCriterion(cfg, student_dim=6, teacher_dim=10, cood_dim=12, dood_dim=32)
    b = _batch()
    with pytest.raises(ConfigError, match="fit_estimators"):
        crit(**b)
    lls = crit.fit_estimators(b["student_feat"], b["y_cood"], b["y_dood"])
    assert set(lls) == {"mi_cood_loglik", "mi_dood_loglik"}
    assert b["student_feat"].grad is None
    total, logs = crit(**b)
    assert set(logs) == {"ce", "kd_logit", "kd_feat", "mi_cood", "mi_dood", "total"}
    total.backward()
    assert b["student_feat"].grad is not None and b["student_logits"].grad is not None
    assert all(p.grad is not None for p in crit.dt.parameters())
    assert all(p.grad is None for p in crit.club_cood.parameters())
    assert all(p.grad is None for p in crit.club_dood.parameters())
    groups = crit.student_param_groups()
    assert [g["name"] for g in groups] == ["dt"]


def test_criterion_reference_mode_and_switched_off_terms():
    cfg = OAMLLossConfig(mi_mode="reference", pairing="random", g=0.0, a1=0.0, club_hidden=8)
    crit = OAMLCriterion(cfg, student_dim=6, teacher_dim=10, cood_dim=12)
    assert crit.club_dood is None and crit.club_cood is not None
    assert not crit.needs_estimator_fit
    with pytest.raises(ConfigError):
        crit.fit_estimators(torch.randn(8, 6), torch.randn(8, 12))
    b = _batch()
    b["teacher_logits"] = None  # logit KD off: not needed
    b["y_dood"] = None
    total, logs = crit(**b)
    assert "kd_logit" not in logs and "mi_dood" not in logs
    total.backward()
    assert all(p.grad is not None for p in crit.club_cood.parameters())  # joint with the student
    names = [g["name"] for g in crit.student_param_groups()]
    assert names == ["dt", "club_mi_cood"]
    assert crit.student_param_groups()[1]["lr"] == cfg.reference_club_lr


def test_criterion_missing_inputs_are_errors():
    with pytest.raises(ConfigError, match="cood_dim"):
        OAMLCriterion(OAMLLossConfig(), student_dim=6, teacher_dim=10)
    crit = OAMLCriterion(OAMLLossConfig(b=0, g=0), student_dim=6, teacher_dim=10)
    b = _batch()
    b["teacher_feat"] = None
    with pytest.raises(ConfigError, match="teacher_feat"):
        crit(**b)
