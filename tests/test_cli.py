"""The command line on the real offline benchmark (prepared by setup.sh): train, then eval."""

import json
from pathlib import Path

import pytest

from oaml.cli.main import build_parser, main
from oaml.data import get_benchmark

needs_offline = pytest.mark.skipif(
    bool(get_benchmark("fmnist").missing()), reason="offline benchmark not prepared (run: oaml data prepare offline)"
)


def test_help_lists_every_command(capsys):
    text = build_parser().format_help()
    for cmd in ("data", "teacher", "bank", "sample", "generate", "train", "eval", "run", "demo"):
        assert cmd in text, cmd


def test_errors_are_one_clear_line(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "x"), "--set", "optim.lr=-1"])
    err = capsys.readouterr().err
    assert code == 1 and "optim.lr" in err and "Traceback" not in err
    code = main(["eval", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "e")])
    assert code == 1 and "no checkpoint at" in capsys.readouterr().err


@needs_offline
@pytest.mark.slow
def test_train_then_eval_on_the_offline_benchmark(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "train" / "vanilla.yaml"), "--out", str(run), "--set", "data.train_limit=512",
            "--set", "data.val_limit=256", "--set", "optim.epochs=1", "--set", "student.width=0.125",
            "--set", "progress=false", "--set", "tensorboard=false"]
    assert main(args) == 0
    assert main(args) == 1  # refuses to overwrite without --resume/--overwrite
    assert "--resume" in capsys.readouterr().err
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(run / "best.pt"), "--benchmark", "fmnist", "--scores", "ebo,knn,vim",
                 "--out", str(out), "--fit-limit", "512", "--no-plots"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["scores"]) == {"ebo", "knn", "vim"}
    names = set(res["scores"]["ebo"]["datasets"])
    assert {"MNIST", "sklearn-digits", "Textures*", "Photos*", "Gaussian", "Uniform", "Blobs"} == names
    assert res["scores"]["ebo"]["datasets"]["MNIST"]["group"] == "near"
    assert 10 < res["id_accuracy"] <= 100
    assert (out / "results.md").is_file() and (out / "results.csv").is_file()
