"""Every shipped config loads, and configs/offline.yaml is exactly the embedded demo default."""

from pathlib import Path

import pytest
import yaml

from oaml.errors import ConfigError
from oaml.pipeline import PipelineConfig
from oaml.training.config import TrainConfig
from oaml.training.methods import resolve_terms

ROOT = Path(__file__).resolve().parents[1] / "configs"


def test_offline_yaml_is_the_embedded_default():
    assert PipelineConfig.from_yaml(ROOT / "offline.yaml") == PipelineConfig()


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagenet"])
def test_paper_configs_load_with_paper_settings(name):
    cfg = PipelineConfig.from_yaml(ROOT / f"{name}.yaml")
    assert cfg.benchmark == name and cfg.teacher.name == "vit_b16" and cfg.teacher.size == 224
    assert (cfg.sampler.K, cfg.sampler.S, cfg.sampler.N, cfg.sampler.sigma, cfg.sampler.m) == (300, 50, 1500, 0.07, 2)
    assert cfg.sampler.R == {"cifar10": 10, "cifar100": 100, "imagenet": 25}[name]
    assert cfg.oaml.optim.lr == {"cifar10": 1e-3, "cifar100": 1e-2, "imagenet": 5e-5}[name]
    assert cfg.oaml.optim.epochs == {"cifar10": 500, "cifar100": 500, "imagenet": 50}[name]
    assert cfg.student.name == ("resnet50" if name == "imagenet" else "resnet18")
    assert cfg.oaml.method.name == "oaml"  # the library's method; the paper's loss runs in the bench grid
    from oaml.bench import BenchConfig

    bench = BenchConfig.load(str(ROOT / "bench" / f"{name}.yaml"), [])
    assert set(resolve_terms(bench.methods["oaml-paper"].method)) == {"ce", "kd_logit", "kd_feat", "mi_cood", "mi_dood"}


@pytest.mark.parametrize("path", sorted((ROOT / "train").glob("*.yaml")), ids=lambda p: p.stem)
def test_train_configs_load(path):
    cfg = TrainConfig.from_yaml(path)
    resolve_terms(cfg.method)


def test_a_typo_in_a_pipeline_config_names_the_key(tmp_path):
    data = yaml.safe_load((ROOT / "offline.yaml").read_text())
    data["sampler"]["sigmaa"] = 0.1
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="sigmaa"):
        PipelineConfig.from_yaml(tmp_path / "bad.yaml")


def test_run_folder_config_check_tolerates_new_defaults_but_not_changes(tmp_path):
    """A run folder written by an older version (a setting added since) still continues; a changed
    value or a new term override is refused."""
    import yaml

    from oaml.errors import ConfigError
    from oaml.training.config import TrainConfig, check_same_config

    cfg = TrainConfig.from_dict({"method": {"name": "logitnorm"}})
    old = cfg.model_dump(mode="json")
    del old["teacher"]["device_cache_mb"]  # as written before the setting existed
    old["progress"] = not cfg.progress  # runtime keys may differ
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    check_same_config(tmp_path, cfg)
    with pytest.raises(ConfigError, match="optim.lr"):
        check_same_config(tmp_path, cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr": 0.5})}))
    with pytest.raises(ConfigError, match="another config"):
        check_same_config(tmp_path, TrainConfig.from_dict({"method": {"name": "logitnorm", "terms": {"logitnorm": {"tau": 0.5}}}}))
