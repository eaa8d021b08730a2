"""Bring your own model and data: ``oaml.evaluate`` on any torch classifier (torchvision, timm, a
named feature layer, a ``(features_fn, head)`` pair) and on ImageFolders, arrays or torch
Datasets; ``oaml eval --model``; a Benchmark object with the user's extra OOD set, which gets its
own row and group and leaves the benchmark's averages alone; what results.json records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import oaml
from oaml.cli.main import main
from oaml.errors import ConfigError, ShapeError
from oaml.evaluation.api import evaluate_checkpoint
from oaml.models import wrap_model

from _data_helpers import make_image_folder, write_png
from helpers import TinyImages
from test_eval_safety import FAST, TINY, eval_argv, student, tiny  # noqa: F401  (student, tiny: fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")
SCORES = ["msp", "ebo", "knn", "vim", "react", "gram"]
QUICK = dict(device="cpu", progress=False, plots=False)


def tiny_classifier() -> nn.Module:
    """What ``--model test_byo:tiny_classifier`` builds: a small conv net with a linear head."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("byo")
    return {"id_train": make_image_folder(root / "train", per_class=4, seed=0),
            "id_test": make_image_folder(root / "test", per_class=3, seed=1),
            "ood": make_image_folder(root / "ood", classes=("any",), per_class=5, seed=2) / "any"}


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(model.state_dict(), path)
    return model, path


def data_of(folders: dict) -> dict:
    return {"id_train": folders["id_train"], "id_test": folders["id_test"], "ood": {"mine": folders["ood"]}}


# ----------------------------------------------------------------------------- 1. Python API
def test_evaluate_a_torchvision_model_on_image_folders(folders, resnet):
    model, _ = resnet
    res = oaml.evaluate(model, data_of(folders), SCORES, input_size=32, score_kwargs={"knn": {"K": 2}}, **QUICK)
    assert set(res["scores"]) == set(SCORES) - {"gram"} and "feature maps" in res["skipped"]["gram"]
    assert res["scores"]["knn"]["datasets"]["mine"]["group"] == "far" and res["ood_sets"][0]["count"] == 5
    assert isinstance(model.fc, nn.Linear) and not model.fc._forward_pre_hooks  # the user's model is left as it was
    plain = res.to_dict()
    assert type(plain) is dict and json.loads(json.dumps(plain)) == json.loads(json.dumps(res))
    lines = res.to_csv().splitlines()
    assert lines[0].startswith("score,dataset,group,fpr95") and len(lines) == 1 + 5 * 3  # per set, mean_far, mean_all
    assert "| MSP |" in repr(res) and "skipped gram" in repr(res)
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install pandas"):
            res.to_pandas()
    else:
        assert len(res.to_pandas()) == 15


def test_arrays_and_torch_datasets(folders, resnet):
    rng = np.random.default_rng(0)
    train = (rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8), np.arange(12) % 2)
    data = {"id_train": train, "id_test": TinyImages(10, num_classes=2, size=16, channels=3, fast=False),
            "ood": {"noise": rng.random((6, 16, 16)), "also": (rng.random((4, 3, 16, 16)), "near")}}
    res = oaml.evaluate(resnet[0], data, ["msp", "mds"], **QUICK)
    assert {k: v["group"] for k, v in res["scores"]["mds"]["datasets"].items()} == {"noise": "far", "also": "near"}
    assert res["settings"]["fit_count"] == 12 and res["settings"]["preprocess"]["size"] is None


def test_bad_data_is_named_before_any_work(folders, resnet):
    with pytest.raises(ConfigError, match="id_train, id_test and ood"):
        oaml.evaluate(resnet[0], {"id_train": folders["id_train"], "ood": {}}, ["msp"], **QUICK)
    with pytest.raises(ConfigError, match="input_size"):
        oaml.evaluate(resnet[0], data_of(folders), ["msp"], **QUICK)
    with pytest.raises(ShapeError, match="predicts 10 classes"):
        oaml.evaluate(torchvision.models.resnet18(num_classes=10), data_of(folders), ["msp"], input_size=32, **QUICK)
    with pytest.raises(ConfigError, match=r"need their labels"):
        oaml.evaluate(resnet[0], {**data_of(folders), "id_train": np.zeros((4, 8, 8), np.uint8)}, ["msp"], **QUICK)


# ----------------------------------------------------------------------------- wrapping rules
def test_every_wrapping_rule_gives_the_same_features_and_logits(resnet):
    import timm

    model = resnet[0].eval()
    x = torch.randn(3, 3, 32, 32)
    trunk = nn.Sequential(*list(model.children())[:-1])
    outs = [wrap_model(m, layer).eval().forward_features(x) for m, layer in
            [(model, None), (model, "avgpool"), ((trunk, model.fc), None)]]
    for logits, feats in outs:
        torch.testing.assert_close(logits, model(x))
        torch.testing.assert_close(feats, outs[0][1])
        assert feats.shape == (3, 512)
    t = timm.create_model("resnet18", pretrained=False, num_classes=2).eval()
    wrapped = wrap_model(t)
    logits, feats = wrapped.forward_features(x)
    torch.testing.assert_close(logits, t(x))
    assert type(wrapped).__name__ == "TimmTeacher" and wrapped.fc_weights()[0].shape == (2, 512)


def test_a_wrong_feature_layer_or_head_is_explained(resnet):
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ShapeError, match="does not map"):
        wrap_model(resnet[0], "layer4.1.bn2").eval().forward_features(x)
    with pytest.raises(ShapeError, match="values per image"):
        wrap_model(resnet[0], "layer3").eval().forward_features(x)
    with pytest.raises(ConfigError, match="no submodule 'nope'.*avgpool"):
        wrap_model(resnet[0], "nope")
    with pytest.raises(ShapeError, match="no nn.Linear"):
        wrap_model(nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten()))


# ----------------------------------------------------------------------------- 2. CLI
def test_cli_model_with_weights_on_your_image_folders(folders, resnet, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["eval", "--model", "torchvision:resnet18", "--weights", str(resnet[1]), "--id-train", str(folders["id_train"]),
            "--id-test", str(folders["id_test"]), "--ood", f"mine={folders['ood']}", "--input-size", "32",
            "--scores", "msp,ebo,knn", "--score-arg", "knn.K=2", "--out", str(out), "--device", "cpu", "--no-plots"]
    assert main(argv) == 0, capsys.readouterr().err
    got = json.loads((out / "results.json").read_text())
    want = oaml.evaluate(resnet[0], data_of(folders), ["msp", "ebo", "knn"], input_size=32, score_kwargs={"knn": {"K": 2}}, **QUICK)
    assert got["scores"] == json.loads(json.dumps(want["scores"]))  # the weights file was loaded
    assert got["checkpoint_meta"]["kind"] == "model" and got["settings"]["preprocess"]["size"] == 32
    assert "| MSP |" in capsys.readouterr().out
    argv[argv.index("torchvision:resnet18")] = "test_byo:tiny_classifier"
    del argv[argv.index("--weights"):argv.index("--weights") + 2]
    assert main(argv + ["--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["checkpoint_meta"]["model"] == "Sequential"


@pytest.mark.parametrize("more, message", [
    (["--model", "torchvision:nope"], "cannot build model"),
    (["--model", "torchvision:resnet34", "--weights", "W"], "do not fit"),
    (["--model", "torchvision:resnet18", "--id-train", "D"], "--id-train, --id-test and --model"),
    (["--checkpoint", "c.pt", "--input-size", "32"], "--input-size go with --model"),
])
def test_cli_model_mistakes(more, message, resnet, tmp_path, capsys):
    more = [str(resnet[1]) if m == "W" else m for m in more]
    assert main(["eval", *more, "--out", str(tmp_path / "o"), "--device", "cpu"]) == 1
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- 3, 4. a Benchmark object, the extra group
def _ood_folder(folder: Path, n: int = 30, bad: bool = False) -> Path:
    rng = np.random.default_rng(5)
    for i in range(n):
        write_png(folder / f"{i:02d}.png", rng.integers(0, 256, (10, 10), dtype=np.uint8))
    if bad:
        (folder / "broken.png").write_bytes(b"not a png")
    return folder


def test_extra_ood_of_a_benchmark_object_has_its_own_row_and_leaves_the_averages(student, tmp_path):  # noqa: F811
    bench = TINY.with_extra_ood("mine", _ood_folder(tmp_path / "mine"))
    with_mine = evaluate_checkpoint(student, bench, tmp_path / "a", scores=["ebo", "knn"], **FAST)
    base = evaluate_checkpoint(student, TINY, tmp_path / "b", scores=["ebo", "knn"], **FAST)
    for name, entry in with_mine["scores"].items():
        assert {g: entry[g] for g in ("near", "far", "all")} == {g: base["scores"][name][g] for g in ("near", "far", "all")}
        assert entry["datasets"]["mine"]["group"] == "extra" and entry["extra"] == {
            k: v for k, v in entry["datasets"]["mine"].items() if k != "group"}
    assert {"name": "mine", "group": "extra", "count": 30} in with_mine["ood_sets"]
    far = evaluate_checkpoint(student, TINY.with_extra_ood("mine", tmp_path / "mine", "far"), tmp_path / "c", scores=["ebo"], **FAST)
    assert far["scores"]["ebo"]["all"] != base["scores"]["ebo"]["all"]  # asked for: joins far and all


def test_cli_ood_on_a_benchmark_defaults_to_extra(tiny, student, tmp_path):  # noqa: F811
    assert main(eval_argv(student, tmp_path / "o", "--scores", "ebo", "--ood", f"mine={_ood_folder(tmp_path / 'm', 8)}")) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["scores"]["ebo"]["datasets"]["mine"]["group"] == "extra" and "all" in res["scores"]["ebo"]


# ----------------------------------------------------------------------------- 5. what results.json records
def test_results_record_settings_fit_limit_skipped_files_and_one_unit(student, tmp_path):  # noqa: F811
    blob = torch.load(student, weights_only=True)
    blob["meta"] = {"val_accuracy": 0.5, "epoch": 3}
    torch.save(blob, tmp_path / "s.pt")
    bench = TINY.with_extra_ood("mine", _ood_folder(tmp_path / "mine", 6, bad=True))
    evaluate_checkpoint(tmp_path / "s.pt", bench, tmp_path / "out", scores=["knn", "vim", "react", "ebo"],
                        score_kwargs={"knn": {"K": 7}}, skip_bad=True, **FAST)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    s = res["settings"]
    assert s["fit_limit"] == 200 and s["fit_count"] == 200 and s["preprocess"]["channels"] == 1
    assert s["scores"]["knn"]["K"] == 7 and s["scores"]["ebo"] == {"temperature": 1.0}
    assert s["scores"]["vim"]["dim"] is None and s["scores"]["vim"]["dim_"] == 32  # resolved: D // 2 of 64 features
    assert s["scores"]["react"]["percentile"] == 90.0 and isinstance(s["scores"]["react"]["threshold_"], float)
    assert [Path(p).name for p in res["skipped_files"]["mine"]] == ["broken.png"]
    assert res["units"] == {"metrics": "percent", "accuracy": "percent"}
    assert res["checkpoint_meta"]["val_accuracy"] == 50.0 and res["checkpoint_meta"]["epoch"] == 3
    assert 0 <= res["id_accuracy"] <= 100
