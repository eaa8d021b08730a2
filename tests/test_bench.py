"""`oaml bench`: a grid of methods x seeds, cached per (method, seed), aggregated as mean +- std."""

from __future__ import annotations

import json

import pytest

from oaml.bench import Bench, BenchConfig, aggregate
from oaml.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def small_fmnist(monkeypatch):
    """Every split and OOD set of the benchmark cut to its first 150 images (the grid's logic is
    what is tested here, not the numbers)."""
    import numpy as np

    from oaml.data.benchmarks import Benchmark
    from oaml.evaluation.evaluator import _subset

    id_split, build_ood = Benchmark.id_split, Benchmark.build_ood

    def cut(ds):
        return _subset(ds, np.arange(min(150, len(ds))))

    monkeypatch.setattr(Benchmark, "id_split", lambda self, *a, **k: cut(id_split(self, *a, **k)))
    monkeypatch.setattr(Benchmark, "build_ood", lambda self, *a, **k: cut(build_ood(self, *a, **k)))


def _cfg(seeds, methods=("vanilla-cont", "logitnorm")):
    specs = {
        "vanilla-cont": {"method": {"name": "vanilla"}},
        "logitnorm": {"method": {"name": "logitnorm"}},
        "oe": {"method": {"name": "oe"}},
    }
    return BenchConfig.from_dict({
        "pipeline": {
            "train_limit": 150, "batch_size": 50, "student": {"width": 0.125},
            "vanilla": {"optim": {"epochs": 1}}, "oaml": {"optim": {"epochs": 1}},
            "eval": {"scores": ["ebo", "gen", "knn"], "fit_limit": 150, "plots": False, "ood_val": True},
            "progress": False,
        },
        "seeds": list(seeds),
        "methods": {m: specs[m] for m in methods},
    })


def test_aggregate_is_mean_sample_std_and_count():
    assert aggregate([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "n": 2}
    assert aggregate([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}


def test_bench_config_rejects_typos_and_reserved_names(tmp_path):
    with pytest.raises(ConfigError, match="metods"):
        BenchConfig.from_dict({"metods": {}})
    with pytest.raises(ConfigError, match="reserved"):
        BenchConfig.from_dict({"methods": {"vanilla": {"method": {"name": "vanilla"}}}})
    with pytest.raises(ConfigError, match="main_scores"):
        BenchConfig.from_dict({"main_scores": ["ebo"], "pipeline": {"eval": {"scores": ["knn"]}}})
    with pytest.raises(ConfigError, match="does not exist"):
        (tmp_path / "b.yaml").write_text("pipeline: missing.yaml\n")
        BenchConfig.load(str(tmp_path / "b.yaml"), [])


def test_shipped_bench_configs_load():
    from pathlib import Path

    for p in sorted((Path(__file__).resolve().parents[1] / "configs" / "bench").glob("*.yaml")):
        cfg = BenchConfig.load(str(p), [])
        assert cfg.methods and len(cfg.seeds) >= 3, p


def test_bench_grid_is_cached_per_method_and_seed_and_extends(tmp_path, monkeypatch, small_fmnist):
    from oaml.pipeline import Pipeline

    trained = []
    orig = Pipeline.train

    def counting(self, name, run, init=None):
        if not (self.out / "students" / name / "summary.json").is_file():
            trained.append((self.cfg.seed, name))
        return orig(self, name, run, init)

    monkeypatch.setattr(Pipeline, "train", counting)
    out = tmp_path / "bench"
    res = Bench(_cfg([0]), out).run()["results"]
    assert sorted(trained) == [(0, "logitnorm"), (0, "vanilla"), (0, "vanilla-cont")]
    m = res["methods"]
    assert set(m) == {"vanilla", "vanilla-cont", "logitnorm"}
    assert m["vanilla"]["id_accuracy"]["n"] == 1
    ebo = m["logitnorm"]["scores"]["ebo"]
    assert set(ebo) >= {"datasets", "near", "far", "all"}
    assert set(ebo["all"]["auroc"]) == {"mean", "std", "n"}
    assert "MNIST" in ebo["datasets"] and m["vanilla"]["seconds_per_epoch"]["mean"] > 0
    assert set(m["vanilla"]["ood_val"]["ebo"]) >= {"fpr95", "auroc"}

    # rerun: nothing trained again; extended by a seed and a method: only the new pairs run
    trained.clear()
    Bench(_cfg([0]), out).run()
    assert trained == []
    res = Bench(_cfg([0, 1], ("vanilla-cont", "logitnorm", "oe")), out).run()["results"]
    assert sorted(trained) == [(0, "oe"), (1, "logitnorm"), (1, "oe"), (1, "vanilla"), (1, "vanilla-cont")]
    agg = res["methods"]["vanilla"]["scores"]["knn"]["all"]["auroc"]
    per_seed = [json.loads((out / "runs" / f"seed{s}" / "eval" / "vanilla" / "results.json").read_text())["scores"]["knn"]["all"]["auroc"] for s in (0, 1)]
    assert agg["n"] == 2 and agg["mean"] == pytest.approx(sum(per_seed) / 2)
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) >= {"methods", "config"} and (out / "results.md").read_text().count("logitnorm") >= 2

    # a run folder trained with another config is not silently reused
    changed = _cfg([0])
    changed.methods["logitnorm"].method.terms = {"logitnorm": {"tau": 0.5}}
    with pytest.raises(ConfigError, match="another config"):
        Bench(changed, out).run()


def test_bench_rejects_bad_term_settings_before_any_work():
    """A term setting that only a late run would reach (NPOS's k-NN needs queue_size > K) fails
    when the grid is read."""
    with pytest.raises(ConfigError, match="queue_size"):
        BenchConfig.from_dict({"methods": {"npos": {"method": {"name": "npos", "terms": {"npos": {"queue_size": 200}}}}}, "delta_vs": None})


def test_teacher_is_evaluated_by_one_of_the_processes_sharing_out(tmp_path, caplog):
    """Two grid workers on one --out: the one holding the teacher-eval lock evaluates the teacher;
    the other goes on with its seeds instead of evaluating it a second time."""
    import fcntl
    import logging
    from types import SimpleNamespace

    from oaml.bench import Bench

    calls = []
    shared = SimpleNamespace(out=tmp_path, teacher_path=tmp_path / "teacher.pt",
                             evaluate=lambda name, path, teacher: calls.append((name, path, teacher)))
    with open(tmp_path / ".teacher-eval.lock", "w") as other:  # another worker is evaluating it
        fcntl.flock(other, fcntl.LOCK_EX)
        with caplog.at_level(logging.INFO, logger="oaml.bench"):
            Bench._evaluate_teacher(shared)
        assert calls == []
        assert "another process is evaluating the teacher" in caplog.text
    Bench._evaluate_teacher(shared)  # the lock is free: this process evaluates (Pipeline.evaluate caches)
    assert calls == [("teacher", tmp_path / "teacher.pt", True)]
    with open(tmp_path / ".teacher-eval.lock", "w") as fh:  # and released it afterwards
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
