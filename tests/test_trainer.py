import csv

import pytest
import torch

from oaml.errors import ConfigError, NonFiniteError
from oaml.models.checkpoint import load_student
from oaml.training.config import TrainConfig
from oaml.training.terms import TERMS, Term
from oaml.training.trainer import Trainer, augment_batch

from helpers import Killed, TinyImages, crash_at_step


def _cfg(**kw):
    base = {
        "data": {"batch_size": 16, "eval_batch_size": 32, "augment": {"flip": True, "crop_padding": 2}},
        "student": {"width": 0.125},
        "preprocess": {"channels": 1, "mean": [0.5], "std": [0.5]},
        "optim": {"lr": 0.05, "epochs": 2},
        "tensorboard": False,
        "progress": False,
    }
    for k, v in kw.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return TrainConfig.from_dict(base)


def _trainer(tmp_path, cfg=None, name="run", fast=True):
    return Trainer(cfg or _cfg(), TinyImages(64, fast=fast), TinyImages(32, seed=1, fast=fast), tmp_path / name, num_classes=4, in_channels=1)


def test_vanilla_trains_and_writes_artifacts(tmp_path):
    tr = _trainer(tmp_path)
    summary = tr.fit()
    out = tmp_path / "run"
    assert {"last.pt", "best.pt", "log.csv", "summary.json"} <= {p.name for p in out.iterdir()}
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and "ce" in rows[0] and "lr" in rows[0]
    model, pre, meta = load_student(out / "best.pt")
    assert meta["val_accuracy"] == summary["best_val_accuracy"]
    assert model.num_classes == 4


def test_fast_path_and_dataloader_path_agree(tmp_path):
    a = _trainer(tmp_path, name="a", fast=True)
    b = _trainer(tmp_path, name="b", fast=False)
    a.fit(), b.fit()
    for pa, pb in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(pa, pb)


def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path, monkeypatch):
    cfg = _cfg(checkpoint_every_steps=3, optim={"epochs": 3})
    ref = _trainer(tmp_path, cfg, "ref")
    ref.fit()

    crashed = _trainer(tmp_path, cfg, "run")
    crash_at_step(crashed, 8, monkeypatch)  # inside epoch 2, after the checkpoint at step 6
    with pytest.raises(Killed):
        crashed.fit()
    resumed = _trainer(tmp_path, cfg, "run")
    resumed.fit(resume=True)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert [r["val_acc"] for r in ref.history] == [r["val_acc"] for r in resumed.history]


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    _trainer(tmp_path).fit()
    with pytest.raises(ConfigError, match="--resume"):
        _trainer(tmp_path).fit()


@TERMS.register("_test_nan")
class _NanTerm(Term):
    def forward(self, state):
        return state.logits.sum() * float("nan")


def test_non_finite_loss_names_the_term_and_keeps_last_checkpoint(tmp_path):
    from oaml.training.methods import Method, register_method

    register_method(Method(name="_test_nan_method", terms={"ce": {}, "_test_nan": {"weight": 1.0}}, description="test"))
    tr = _trainer(tmp_path, _cfg(method={"name": "_test_nan_method"}))
    with pytest.raises(NonFiniteError, match="'_test_nan'"):
        tr.fit()
    assert not (tmp_path / "run" / "best.pt").exists()


def test_unknown_config_key_is_rejected():
    with pytest.raises(ConfigError, match="unknown key 'optim.learning_rate'"):
        TrainConfig.from_dict({"optim": {"learning_rate": 0.1}})

def test_unknown_method_is_rejected_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match="unknown method 'vanila'.*Did you mean vanilla"):
        _trainer(tmp_path, _cfg(method={"name": "vanila"}))


def test_augment_is_seeded_and_shape_preserving():
    x = torch.randint(0, 255, (5, 3, 9, 9), dtype=torch.uint8)
    a = augment_batch(x, True, 3, torch.Generator().manual_seed(1))
    b = augment_batch(x, True, 3, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and a.dtype == torch.uint8
