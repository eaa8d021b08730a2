"""Evaluator, feature cache and report on a tiny trained model and tiny OOD sets."""

import json

import numpy as np
import pytest
import torch

import oaml.evaluation.features as features_mod
from oaml.errors import ConfigError
from oaml.evaluation.evaluator import DEFAULT_SCORES, Evaluator, OODSet
from oaml.evaluation.report import write_report
from oaml.models.preprocess import Preprocess
from oaml.training.config import TrainConfig
from oaml.training.trainer import Trainer

from helpers import TinyImages


class Noise(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 1, 12, 12), generator=g, dtype=torch.uint8)
        self.labels = torch.full((n,), -1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], -1


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig.from_dict({
        "data": {"batch_size": 16, "augment": {"flip": False, "crop_padding": 0}},
        "student": {"width": 0.125}, "preprocess": {"channels": 1}, "optim": {"lr": 0.05, "epochs": 2},
        "tensorboard": False, "progress": False,
    })
    tr = Trainer(cfg, TinyImages(96), TinyImages(32, seed=1), out, num_classes=4, in_channels=1)
    tr.fit()
    return tr.model.eval(), tr.preprocess


def _evaluator(model, pre, tmp_path, scores=DEFAULT_SCORES, **kw):
    ood = [OODSet("noise-a", "near", Noise(40, 1)), OODSet("noise-b", "far", Noise(30, 2))]
    return Evaluator(model, pre, TinyImages(80, seed=3), TinyImages(40, seed=4), TinyImages(50, seed=5), ood,
                     scores=scores, device="cpu", batch_size=32, cache_dir=tmp_path / "cache", model_id="abc123",
                     benchmark="tiny", progress=False, **kw)


def test_all_scores_end_to_end_with_report(trained, tmp_path):
    model, pre = trained
    ev = _evaluator(model, pre, tmp_path)
    res = ev.run()
    assert set(res["scores"]) == set(DEFAULT_SCORES)
    for name, entry in res["scores"].items():
        assert set(entry["datasets"]) == {"noise-a", "noise-b"}
        for d in entry["datasets"].values():
            assert set(d) == {"fpr95", "fpr95_id_pos", "auroc", "aupr_in", "aupr_out", "detection_error", "group"}
            assert all(0 <= d[k] <= 100 for k in d if k != "group")
        assert entry["near"]["auroc"] == entry["datasets"]["noise-a"]["auroc"]
        assert entry["all"]["auroc"] == pytest.approx(np.mean([entry["datasets"][k]["auroc"] for k in ("noise-a", "noise-b")]))
    # the model learned the bright-square rule, so uniform noise is easy to reject by the energy score
    assert res["scores"]["ebo"]["all"]["auroc"] > 70
    paths = write_report(tmp_path / "report", res, ev.raw_scores)
    data = json.loads(paths["json"].read_text())
    assert data["id_accuracy"] == res["id_accuracy"]
    md = paths["md"].read_text()
    assert "| EBO |" in md and "noise-a (near)" in md
    assert (tmp_path / "report" / "plots" / "histograms.png").stat().st_size > 1000
    assert (tmp_path / "report" / "plots" / "roc_ebo.png").exists()
    npz = np.load(paths["scores"])
    assert npz["ebo/id_test"].shape == (50,) and npz["ebo/noise-b"].shape == (30,)


def test_feature_cache_is_reused_and_keyed_by_model(trained, tmp_path, monkeypatch):
    model, pre = trained
    calls = []
    real = features_mod.extract_features

    def counting(*a, **k):
        calls.append(k.get("desc"))
        return real(*a, **k)

    monkeypatch.setattr("oaml.evaluation.evaluator.extract_features", counting)
    _evaluator(model, pre, tmp_path, scores=("ebo", "knn")).run()
    first = len(calls)
    assert first == 4  # id_test, two OOD sets, id_train (knn fits on train)
    _evaluator(model, pre, tmp_path, scores=("ebo", "knn")).run()
    assert len(calls) == first  # all from the cache
    ev = _evaluator(model, pre, tmp_path, scores=("ebo",))
    ev.cache.model_id = "another-checkpoint"
    ev.run()
    assert len(calls) == first + 3


def test_bad_requests_fail_before_work(trained, tmp_path):
    model, pre = trained
    with pytest.raises(ConfigError, match="unknown score 'knm'"):
        _evaluator(model, pre, tmp_path, scores=("knm",))
    with pytest.raises(ConfigError, match="not among the scores"):
        _evaluator(model, pre, tmp_path, scores=("ebo",), score_kwargs={"knn": {"k": 3}})


def test_hyperparameter_search_uses_ood_val_only(trained, tmp_path):
    model, pre = trained
    with pytest.raises(ConfigError, match="OOD-val"):
        _evaluator(model, pre, tmp_path, scores=("knn",), search={"knn": {"K": [3, 5]}})
    with pytest.raises(ConfigError, match="needs the model"):
        _evaluator(model, pre, tmp_path, scores=("odin",), search={"odin": {"temperature": [1, 10]}},
                   ood_val=[OODSet("val-noise", "far", Noise(30, 9))])
    ev = _evaluator(model, pre, tmp_path, scores=("knn", "ebo"), search={"knn": {"K": [3, 5]}},
                    ood_val=[OODSet("val-noise", "far", Noise(30, 9))])
    res = ev.run()
    chosen = res["search"]["chosen"]["knn"]
    assert chosen["params"]["K"] in (3, 5) and "val_auroc" in chosen
    assert res["search"]["ood_val"] == ["val-noise"] and "ebo" not in res["search"]["chosen"]


def test_every_registered_score_runs_in_the_evaluator_and_aps_searches_the_feature_ones(trained, tmp_path):
    """``oaml eval --scores all --aps``: every score (inner-layer and model scores included) on the
    tiny model; the search covers each feature score with a grid, on OOD-val only."""
    from oaml.evaluation.evaluator import default_grids, resolve_scores

    model, pre = trained
    every = resolve_scores("all")
    kw = {"nnguide": {"K": 5, "bank_fraction": 1.0}, "residual": {"dim": 4}, "nac": {"m_bins": 8}}
    kw = {k: v for k, v in kw.items() if k in every}
    grids = default_grids(every)
    grids["knn"], grids["vim"] = {"K": [3, 5]}, {"dim": [2, 4]}
    grids.pop("nnguide", None)
    ev = _evaluator(model, pre, tmp_path, scores=every, score_kwargs=kw, search=grids,
                    ood_val=[OODSet("val-noise", "far", Noise(30, 9))])
    res = ev.run()
    assert set(res["scores"]) | set(res["skipped"]) == set(every)
    assert not res["skipped"], res["skipped"]  # our ResNet offers every layer and the head each score needs
    for name, entry in res["scores"].items():
        assert 0.0 <= entry["all"]["auroc"] <= 100.0, name
    assert set(res["search"]["chosen"]) == set(grids) and res["search"]["ood_val"] == ["val-noise"]


def test_evaluation_profile_splits_the_wall_time_by_stage(trained, tmp_path):
    """profile.json: feature extraction per split, fit / score / metrics per score, report writing
    and plots, adding up to no more than the total."""
    import oaml
    from helpers import TinyImages as T

    model, pre = trained
    data = {"id_train": T(60, seed=3), "id_val": T(30, seed=4), "id_test": T(40, seed=5), "ood": {"noise": Noise(30, 2)}}
    out = tmp_path / "report"
    oaml.evaluate(model, data, ["msp", "knn", "klm", "odin"], input_size=12, mean=[0.5], std=[0.25],
                  score_kwargs={"knn": {"K": 3}}, device="cpu", progress=False, plots=True, out_dir=out)
    prof = json.loads((out / "profile.json").read_text())
    assert set(prof["features"]) == {"id_test", "id_train", "id_val", "ood_noise"}  # every split, up front
    assert set(prof["per_score"]) == {"msp", "knn", "klm", "odin"}
    assert all(set(v) == {"fit", "score", "metrics"} and min(v.values()) >= 0 for v in prof["per_score"].values())
    assert prof["fit"] == pytest.approx(sum(v["fit"] for v in prof["per_score"].values()))
    parts = sum(prof["features"].values()) + prof["fit"] + prof["score"] + prof["metrics"] + prof["write"] + prof["plots"] + prof["check_files"]
    assert 0 < parts <= prof["total"] + 1e-6 and prof["evaluate"] <= prof["total"]
    assert prof["plots"] > 0 and (out / "plots" / "histograms.png").exists()


def test_channels_last_evaluation_equals_the_standard_layout(trained, tmp_path):
    # on a CPU the evaluator runs the model in channels-last (NHWC) memory format by default: the same scores to
    # float32 rounding, the network passes faster (oneDNN's NHWC kernels)
    import copy

    model, pre = trained
    names = ["msp", "odin", "gram", "mds", "knn"]
    std, nhwc = copy.deepcopy(model).to(memory_format=torch.contiguous_format), copy.deepcopy(model)
    ra = _evaluator(std, pre, tmp_path / "std", scores=names, channels_last=False)
    rb = _evaluator(nhwc, pre, tmp_path / "nhwc", scores=names)
    convs = lambda m: [p for p in m.parameters() if p.dim() == 4]  # noqa: E731
    assert all(p.is_contiguous() for p in convs(std))
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs(nhwc))
    assert not all(p.is_contiguous() for p in convs(nhwc))  # (1x1 and 1-channel kernels are both)
    ra.run(), rb.run()
    for name in names:
        for split, a in ra.raw_scores[name].items():
            np.testing.assert_allclose(rb.raw_scores[name][split], a, rtol=1e-4, atol=1e-6, err_msg=f"{name} {split}")
