"""OAML in the one training loop: teacher terms, CLUB terms in both modes, resume, ablations."""

import numpy as np
import pytest
import torch

from oaml.errors import ConfigError
from oaml.outliers.bank import Bank, write_bank
from oaml.training.config import TrainConfig
from oaml.training.methods import MethodConfig, resolve_terms
from oaml.training.trainer import Trainer

from helpers import Killed, TinyImages, crash_at_step


class FakeTeacher:
    """A fixed random projection of the raw image: features (8-d) and logits (4 classes)."""

    def __init__(self):
        g = torch.Generator().manual_seed(5)
        self.P = torch.randn(144, 8, generator=g)
        self.W = torch.randn(8, 4, generator=g)

    def __call__(self, raw, idx):
        f = raw.float().flatten(1) / 255 @ self.P
        return f @ self.W, f


def _banks(tmp_path):
    if not (tmp_path / "cood").exists():
        rng = np.random.default_rng(0)
        write_bank(tmp_path / "cood", rng.normal(size=(40, 8)), np.repeat(np.arange(4), 10), kind="cood")
        write_bank(tmp_path / "dood", rng.normal(size=(40, 6)), np.repeat(np.arange(4), 10), kind="dood")
    return {"cood": Bank.open(tmp_path / "cood"), "dood": Bank.open(tmp_path / "dood")}


def _cfg(method="oaml-paper", epochs=2, warmup=3, **terms):
    return TrainConfig.from_dict({
        "data": {"batch_size": 16, "eval_batch_size": 32, "augment": {"flip": False, "crop_padding": 0}},
        "student": {"width": 0.125},
        "preprocess": {"channels": 1},
        "optim": {"lr": 0.02, "epochs": epochs},
        "method": {"name": method, "terms": terms, "warmup_steps": warmup},
        "checkpoint_every_steps": 2,
        "tensorboard": False,
        "progress": False,
    })


def _trainer(tmp_path, cfg, name):
    return Trainer(cfg, TinyImages(64), TinyImages(32, seed=1), tmp_path / name, num_classes=4, in_channels=1,
                   teacher=FakeTeacher(), teacher_feature_dim=8, banks=_banks(tmp_path))


def test_oaml_trains_all_terms_and_fits_club(tmp_path):
    tr = _trainer(tmp_path, _cfg(), "oaml")
    summary = tr.fit()
    row = summary["history"][-1]
    for term in ("ce", "kd_logit", "kd_feat", "mi_cood", "mi_dood", "cood_club_loglik", "dood_club_loglik"):
        assert term in row and np.isfinite(row[term]), term
    # q fits once per warm-up batch and once after every student step (on the pairs just scored)
    assert int(tr.terms["mi_cood"].club.estimator_updates) == 3 + summary["epochs"] * tr.steps_per_epoch
    # DT is trained by the student's optimiser; q of fitted CLUB is not
    sgd_params = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in sgd_params for p in tr.terms["kd_feat"].dt.parameters())
    assert not any(id(p) in sgd_params for p in tr.terms["mi_cood"].club.q.parameters())


def test_reference_mode_trains_q_with_the_student(tmp_path):
    tr = _trainer(tmp_path, _cfg("oaml-reference", epochs=1), "ref")
    before = [p.detach().clone() for p in tr.terms["mi_cood"].club.q.parameters()]
    tr.fit()
    sgd_params = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in sgd_params for p in tr.terms["mi_cood"].club.q.parameters())
    after = list(tr.terms["mi_cood"].club.q.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert int(tr.terms["mi_cood"].club.estimator_updates) == 0


def test_oaml_resume_restores_estimators_exactly(tmp_path, monkeypatch):
    cfg = _cfg(epochs=2)
    ref = _trainer(tmp_path, cfg, "a")
    ref.fit()
    run = _trainer(tmp_path, cfg, "b")
    crash_at_step(run, 6, monkeypatch)
    with pytest.raises(Killed):
        run.fit()
    resumed = _trainer(tmp_path, cfg, "b")
    resumed.fit(resume=True)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    for k, v in ref.term_modules.state_dict().items():
        assert torch.equal(v, resumed.term_modules.state_dict()[k]), k


def test_ablation_methods_and_switching_terms_off():
    assert set(resolve_terms(MethodConfig(name="oaml-paper"))) == {"ce", "kd_logit", "kd_feat", "mi_cood", "mi_dood"}
    assert set(resolve_terms(MethodConfig(name="oaml-kd-cood"))) == {"ce", "kd_logit", "kd_feat", "mi_cood"}
    assert set(resolve_terms(MethodConfig(name="oaml-paper", terms={"mi_dood": {"weight": 0}}))) == {"ce", "kd_logit", "kd_feat", "mi_cood"}
    assert resolve_terms(MethodConfig(name="oaml-paper"))["kd_logit"] == {}
    assert resolve_terms(MethodConfig(name="oaml-paper-class"))["mi_cood"] == {"pairing": "class"}


def test_warm_up_fits_term_modules_with_the_student_frozen(tmp_path):
    """Warm-up changes DT and q, never the student (weights or BatchNorm statistics)."""
    tr = _trainer(tmp_path, _cfg(warmup=4), "w")
    student = {k: v.clone() for k, v in tr.model.state_dict().items()}
    dt = [p.detach().clone() for p in tr.terms["kd_feat"].dt.parameters()]
    q = [p.detach().clone() for p in tr.terms["mi_cood"].club.q.parameters()]
    tr._warm_up_terms(4)
    assert all(torch.equal(v, tr.model.state_dict()[k]) for k, v in student.items())
    assert any(not torch.equal(a, b) for a, b in zip(dt, tr.terms["kd_feat"].dt.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(q, tr.terms["mi_cood"].club.q.parameters()))
    assert int(tr.terms["mi_cood"].club.estimator_updates) == 4


def test_bound_is_scored_by_a_q_that_has_not_seen_its_pairs(tmp_path, monkeypatch):
    """fit_on previous: q's likelihood step comes after the student's step; current: before it."""
    for fit_on, first in (("previous", "bound"), ("current", "fit")):
        tr = _trainer(tmp_path, _cfg(warmup=0, epochs=1, mi_cood={"fit_on": fit_on}), f"f{fit_on}")
        club = tr.terms["mi_cood"].club
        calls = []
        for name in ("bound", "fit_step"):
            orig = getattr(club, name)
            monkeypatch.setattr(club, name, lambda *a, _o=orig, _n=name: (calls.append(_n), _o(*a))[1])
        tr._step(*tr.train.get(list(range(16))), torch.arange(16), torch.Generator().manual_seed(0))
        assert calls[0] == ("bound" if first == "bound" else "fit_step"), (fit_on, calls)


def test_missing_sources_are_named(tmp_path):
    with pytest.raises(ConfigError, match="C-OOD bank"):
        Trainer(_cfg(), TinyImages(64), TinyImages(32), tmp_path / "x", 4, 1, teacher=FakeTeacher(), teacher_feature_dim=8, banks={})
    with pytest.raises(ConfigError, match="(?s)loss term 'mi_cood'.*unknown key 'pairng'.*pairing"):
        _trainer(tmp_path, _cfg(mi_cood={"pairng": "class"}), "y")
