"""An evaluator that can never silently report stale numbers.

* the feature cache is keyed by the content of every dataset (files: paths, sizes, mtimes;
  arrays: their bytes) and by the checkpoint's sha256, so other images under the same name and
  count are never served from it, in the report folder's cache or a shared one;
* ``oaml eval`` checks everything (checkpoint, score settings, every image file) before any
  work, touches nothing when it fails (``--overwrite`` included) and at the end replaces only
  the files an earlier oaml report wrote;
* outputs respect the umask; training state resumes with ``torch.load(weights_only=True)``;
* a fine-tuned teacher is evaluated as a detector by the same evaluator and report.

All on a tiny benchmark: sklearn digits (8x8) against small noise arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

import oaml.evaluation.evaluator as evaluator_mod
from oaml.cli.main import main
from oaml.data.benchmarks import Benchmark, OODSetRef as R
from oaml.errors import ConfigError
from oaml.evaluation.api import evaluate_checkpoint
from oaml.evaluation.evaluator import DEFAULT_SCORES
from oaml.utils.io import atomic_write_text, write_json

from _data_helpers import write_png
from helpers import TinyImages

pytestmark = pytest.mark.usefixtures("one_thread")


def _noise(seed: int, n: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8), dtype=np.uint8)


TINY = Benchmark(
    name="tinyd", description="sklearn digits (8x8) against noise arrays", id_dataset="sklearn-digits",
    num_classes=10, image_size=8, channels=1,
    near=[R("noise-a", group="near", array=_noise(1))], far=[R("noise-b", group="far", array=_noise(2))],
    ood_val=[R("noise-val", group="val", array=_noise(3))], oe=[],
    id_splits={"train": "test", "val": "val", "test": "val"},
)
FAST = dict(fit_limit=200, batch_size=256, device="cpu", plots=False, progress=False)


@pytest.fixture
def tiny(monkeypatch):
    import oaml.data

    monkeypatch.setattr(oaml.data, "get_benchmark", lambda name: TINY)


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    from oaml.models.checkpoint import save_student
    from oaml.models.resnet import create_model

    torch.manual_seed(0)
    arch = {"name": "resnet18", "width": 0.125, "stem": "cifar", "num_classes": 10, "in_channels": 1}
    model = create_model("resnet18", num_classes=10, in_channels=1, width=0.125)
    path = tmp_path_factory.mktemp("ckpt") / "s.pt"
    save_student(path, model, arch, {"size": None, "channels": 1, "mean": [0.5], "std": [0.5]})
    return path


def _images(folder: Path, seed: int, n: int = 12) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        write_png(folder / f"img{i:02d}.png", rng.integers(0, 256, (10, 10), dtype=np.uint8))
    return folder


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def no_extraction(monkeypatch) -> None:
    def started(*a, **k):
        raise AssertionError("feature extraction started before the run was validated")

    monkeypatch.setattr(evaluator_mod, "extract_features", started)


def eval_argv(ckpt, out, *more, plots=False) -> list:
    return ["eval", "--checkpoint", str(ckpt), "--benchmark", "tinyd", "--out", str(out), "--device", "cpu",
            "--fit-limit", "200", *([] if plots else ["--no-plots"]), *more]


# ----------------------------------------------------------------------------- 1. stale feature cache
@pytest.mark.parametrize("kind", ["folder", "array"])
def test_other_images_of_the_same_name_and_count_are_never_served_from_the_cache(kind, tiny, student, tmp_path):
    """Swap the images of an extra OOD set for others of the same count, evaluate again into the
    same folder (folder set) or with a shared cache_dir (array set): the numbers are those of a
    fresh run."""
    def run(out, seed, cache=None):
        data = str(_images(tmp_path / "mine", seed)) if kind == "folder" else _noise(10 + seed, 12)
        res = evaluate_checkpoint(student, "tinyd", out, scores=["ebo", "knn"], extra_ood=[("mine", data, "far")],
                                  cache_dir=cache, **FAST)
        return res["scores"], np.load(Path(out) / "scores.npz")["ebo/mine"]

    shared = tmp_path / "shared-cache" if kind == "array" else None
    first = run(tmp_path / "out", 1, shared)
    again = run(tmp_path / ("out" if kind == "folder" else "out2"), 2, shared)
    fresh = run(tmp_path / "fresh", 2, tmp_path / "fresh-cache")
    assert not np.array_equal(first[1], fresh[1])  # the swap changes the numbers
    np.testing.assert_array_equal(again[1], fresh[1])
    assert again[0] == fresh[0]


# ----------------------------------------------------------------------------- 2. validate first, replace at the end
def test_help_example_of_score_arg_names_a_real_parameter(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "knn.K=100" in capsys.readouterr().out


def test_failed_overwrite_touches_nothing_and_leaves_no_new_folder(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    (out / "notes.txt").write_text("the user's own file")
    before = snapshot(out)
    assert main(eval_argv(tmp_path / "nope.pt", out, "--overwrite")) == 1
    assert "no checkpoint at" in capsys.readouterr().err
    assert snapshot(out) == before
    assert main(eval_argv(tmp_path / "nope.pt", tmp_path / "new" / "deeper")) == 1
    assert not (tmp_path / "new").exists()


def test_a_run_that_fails_at_the_end_changes_no_report(tiny, student, tmp_path, monkeypatch, capsys):
    import errno

    out = tmp_path / "out"
    assert main(eval_argv(student, out, "--scores", "ebo")) == 0
    before = snapshot(out)

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("oaml.evaluation.api.write_report", disk_full)
    assert main(eval_argv(student, out, "--scores", "ebo,knn", "--overwrite")) == 1
    assert {k: v for k, v in snapshot(out).items() if not k.startswith("feature_cache/")} == \
        {k: v for k, v in before.items() if not k.startswith("feature_cache/")}
    assert main(eval_argv(student, tmp_path / "new", "--scores", "ebo")) == 1
    assert not (tmp_path / "new").exists()


def test_every_bad_score_arg_is_named_before_any_extraction(tiny, student, tmp_path, monkeypatch, capsys):
    no_extraction(monkeypatch)
    argv = eval_argv(student, tmp_path / "out", "--scores", "knn,ebo,msp", "--score-arg", "knn.k=100",
                     "--score-arg", "ebo.temperature=-1", "--score-arg", "msp.temperature=2")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "score 'knn' has no parameter(s) ['k']" in err and "ebo: temperature=-1" in err and "msp" not in err
    assert not (tmp_path / "out").exists()


def test_every_unreadable_image_is_named_before_any_extraction(tiny, student, tmp_path, monkeypatch, capsys):
    folder = _images(tmp_path / "mine", 1)
    (folder / "garbage.png").write_bytes(b"not an image at all")
    good = (folder / "img00.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    no_extraction(monkeypatch)
    assert main(eval_argv(student, tmp_path / "out", "--scores", "ebo", "--ood", f"mine={folder}")) == 1
    err = capsys.readouterr().err
    assert "garbage.png" in err and "truncated.png" in err and "--skip-bad" in err
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_only_what_oaml_wrote(tiny, student, tmp_path, capsys):
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert main(eval_argv(student, out, "--scores", "ebo,knn", plots=True)) == 0
        assert (out / "plots" / "roc_knn.png").is_file()
        (out / "notes.txt").write_text("the user's own file")
        (out / "plots" / "mine.png").write_text("the user's own plot")
        assert main(eval_argv(student, out, "--scores", "ebo")) == 1  # results exist: refused
        assert main(eval_argv(student, out, "--scores", "ebo", "--overwrite")) == 0
    finally:
        os.umask(old)
    assert set(json.loads((out / "results.json").read_text())["scores"]) == {"ebo"}
    assert not (out / "plots" / "roc_knn.png").exists()  # the earlier report's, not rewritten: gone
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert (out / "plots" / "mine.png").read_text() == "the user's own plot"
    assert stat.S_IMODE((out / "results.json").stat().st_mode) == 0o644
    assert not [p for p in out.iterdir() if "staging" in p.name]


# ----------------------------------------------------------------------------- 3. umask
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        atomic_write_text(tmp_path / "b.txt", "text")
    finally:
        os.umask(old)
    for name in ("a.json", "b.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


# ----------------------------------------------------------------------------- 4. resume with weights_only
def test_training_state_loads_with_weights_only_and_restores_every_rng(tmp_path):
    import random

    from oaml.training.config import TrainConfig
    from oaml.training.trainer import Trainer

    cfg = TrainConfig.from_dict({"data": {"batch_size": 16}, "student": {"width": 0.125}, "preprocess": {"channels": 1},
                                 "optim": {"epochs": 1}, "tensorboard": False, "progress": False})
    tr = Trainer(cfg, TinyImages(32), TinyImages(16, seed=1), tmp_path, num_classes=4, in_channels=1)
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    tr.save()
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    state = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert isinstance(state["rng"]["python"], list)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    assert tr.try_resume()
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want
    # a state with pickled numpy objects (as older versions wrote) is refused, never loaded unsafely
    torch.save({**state, "rng": {**state["rng"], "numpy": np.random.get_state()}}, tmp_path / "last.pt")
    with pytest.raises(ConfigError, match="numpy.*never loaded unsafely"):
        tr.try_resume()


# ----------------------------------------------------------------------------- 6. the teacher as a detector
@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A tiny timm teacher, its head fine-tuned on the digits (so that it predicts every class)."""
    from oaml.models.finetune import FinetuneConfig, finetune_teacher
    from oaml.models.teachers import TeacherConfig, load_teacher

    torch.manual_seed(0)
    t = load_teacher(TeacherConfig(name="timm:test_efficientnet", pretrained=False, num_classes=10, preprocess={"size": 32}))
    cfg = FinetuneConfig(epochs=30, batch_size=128, head_lr=1e-2, progress=False, device="cpu")
    return finetune_teacher(t, TINY.id_train(), TINY.id_val(), cfg, out_path=tmp_path_factory.mktemp("teacher") / "t.pt")


def test_teacher_is_evaluated_by_the_same_evaluator_and_schema(tiny, student, teacher_ckpt, tmp_path):
    from oaml.evaluation.api import evaluate_teacher
    from oaml.models.teachers import load_teacher_checkpoint

    res = evaluate_teacher(teacher_ckpt, "tinyd", tmp_path / "t", list(DEFAULT_SCORES), fit_limit=None,
                           device="cpu", plots=False, progress=False)
    on_disk = json.loads((tmp_path / "t" / "results.json").read_text())
    assert set(on_disk) == set(res)
    assert set(res["scores"]) | set(res["skipped"]) == set(DEFAULT_SCORES)
    assert all(isinstance(why, str) and why for why in res["skipped"].values())
    assert {"odin", "gram", "gradnorm", "vim", "react"} <= set(res["scores"])  # a linear head and feature maps
    ref = evaluate_checkpoint(student, "tinyd", tmp_path / "s", ["ebo"], **FAST)
    assert set(ref) == set(res)
    # the features are the teacher's own outputs (its own preprocessing of the raw images)
    teacher = load_teacher_checkpoint(teacher_ckpt)
    test = TINY.id_test()
    acc = float((teacher.outputs(test.images)[0].argmax(1) == test.labels).double().mean()) * 100
    assert res["id_accuracy"] == pytest.approx(acc)
    assert res["checkpoint"] == str(teacher_ckpt) and res["checkpoint_meta"]["kind"] == "teacher"


def test_teacher_scores_it_cannot_support_are_skipped_with_the_reason(tiny, teacher_ckpt, tmp_path, monkeypatch):
    from oaml.evaluation.api import evaluate_teacher
    from oaml.models.adapter import Classifier
    from oaml.models.teachers import TimmTeacher

    def no_linear_head(self):
        raise NotImplementedError("this teacher has no linear head")

    monkeypatch.setattr(TimmTeacher, "feature_maps", Classifier.feature_maps)
    monkeypatch.setattr(TimmTeacher, "fc_weights", no_linear_head)
    res = evaluate_teacher(teacher_ckpt, "tinyd", tmp_path / "t", ["gram", "vim", "ebo"], fit_limit=100,
                           device="cpu", plots=False, progress=False)
    assert set(res["scores"]) == {"ebo"}
    assert "feature maps" in res["skipped"]["gram"] and "linear head" in res["skipped"]["vim"]
    assert json.loads((tmp_path / "t" / "results.json").read_text())["skipped"] == res["skipped"]


def test_overwrite_of_train_run_and_bench_removes_only_what_they_write(tmp_path):
    """--overwrite of oaml train / run / bench deletes the command's own outputs, never the user's files."""
    from oaml.cli.common import BENCH_OUTPUTS, PIPELINE_OUTPUTS, TRAIN_OUTPUTS, prepare_out, remove_outputs

    for i, names in enumerate((TRAIN_OUTPUTS, PIPELINE_OUTPUTS, BENCH_OUTPUTS)):
        out = tmp_path / f"cmd{i}"
        out.mkdir(parents=True)
        for n in names:
            (out / n).mkdir() if "." not in n else (out / n).write_text("oaml's")
        (out / "notes.txt").write_text("the user's own file")
        (out / "mine").mkdir()
        (out / "mine" / "a.txt").write_text("kept")
        remove_outputs(out, names)
        assert sorted(p.name for p in out.iterdir()) == ["mine", "notes.txt"]
        assert (out / "mine" / "a.txt").read_text() == "kept"
    out = tmp_path / "train"
    out.mkdir()
    (out / "last.pt").write_bytes(b"x")
    (out / "notes.txt").write_text("the user's own file")
    prepare_out(out, resume=False, overwrite=True, marker="last.pt")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
