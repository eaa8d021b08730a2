"""The paper's CIFAR-10 setting runs: one OAML epoch (two steps) of configs/cifar10.yaml on tiny fake
CIFAR-10 in torchvision's layout, with the real ViT-B/16 teacher architecture (random weights:
none can be downloaded here) at 224 px with its own preprocessing, the ResNet-18 student at 224 px,
augmentation on (so the teacher runs live every step) and both CLUB terms."""

from pathlib import Path

import numpy as np
import pytest

from oaml.data import get_dataset_spec
from oaml.models.teachers import TeacherConfig, load_teacher
from oaml.outliers.bank import write_bank
from oaml.pipeline import PipelineConfig, _train_config
from oaml.training.build import build_trainer

from test_data_paper import make_tiny_cifar10

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_cifar10_paper_config_trains_one_step(tmp_path, monkeypatch):
    make_tiny_cifar10(tmp_path / "data", monkeypatch)
    monkeypatch.setattr(get_dataset_spec("cifar10"), "holdout_from_test", 10)
    cfg = PipelineConfig.from_yaml(CONFIGS / "cifar10.yaml")
    cfg = cfg.model_copy(update={"root": str(tmp_path / "data"), "batch_size": 5, "train_limit": 10})
    # the paper's loss (the bench grid's oaml-paper) with the paper config's schedule; one warm-up batch
    from oaml.training.methods import MethodConfig

    run = cfg.oaml.model_copy(update={"optim": cfg.oaml.optim.model_copy(update={"epochs": 1}),
                                      "method": MethodConfig(name="oaml-paper", warmup_steps=1)})

    teacher = load_teacher(TeacherConfig.from_dict({"name": "vit_b16", "pretrained": False, "num_classes": 10,
                                                    "preprocess": {"size": cfg.teacher.size}}))
    assert teacher.feature_dim == 768 and teacher.preprocess.size == 224
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 4)
    banks = {k: str(write_bank(tmp_path / k, rng.normal(size=(40, 768)), labels, kind=k).path) for k in ("cood", "dood")}

    tcfg = _train_config(cfg, run, None, None, banks, subset_seed=0)
    assert tcfg.preprocess.size == 224 and tcfg.student.stem == "imagenet" and tcfg.data.augment.flip
    trainer = build_trainer(tcfg, tmp_path / "run", teacher=teacher)
    assert not getattr(trainer.teacher, "cached", False)  # augmentation on: the teacher runs live
    summary = trainer.fit()
    row = summary["history"][0]
    assert row["steps"] == 2
    for term in ("ce", "kd_logit", "kd_feat", "mi_cood", "mi_dood"):
        assert np.isfinite(row[term]), term
