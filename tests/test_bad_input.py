"""Bad input and bad output folders: each case is a clear error that names the problem, raised
before any long work, and every file that existed before is left exactly as it was (hashed
before and after).

Cases: an unwritable output folder or a full disk (every command), a disk that fills up while a
bank is written; unknown or mistyped config keys and wrong types; a teacher whose feature width
does not fit the transfer network or the C-OOD bank; a bank made by another teacher than the
config's; a student checkpoint of another architecture or class count; corrupt and truncated
image files and empty classes (and the option that skips bad files); NaN / infinite logits or
features given to every score; an output folder holding results of another config.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from oaml.cli.main import main
from oaml.errors import BankError, NonFiniteError, ShapeError
from oaml.outliers.bank import Bank, write_bank

import _fault_jobs
from _data_helpers import make_image_folder
from helpers import TinyImages

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(*folders: Path) -> dict:
    """sha256 of every file under ``folders`` (what must not change when a command is refused)."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def fail(argv: list[str], capsys) -> str:
    """Run the CLI, expect exit code 1 and one clear line on stderr (no traceback); return it."""
    capsys.readouterr()
    assert main(argv) == 1, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith(f"oaml {argv[0]}: error:"), err
    if os.environ.get("OAML_SHOW_ERRORS"):  # OAML_SHOW_ERRORS=1 pytest -s: the messages users see
        with capsys.disabled():
            print(f"\n$ oaml {' '.join(argv)}\n{err.strip()}")
    return err


def _train_cfg(folder: Path, **over) -> Path:
    cfg = json.loads(json.dumps(_fault_jobs.TRAIN_CONFIG))
    cfg["optim"]["epochs"] = 1
    for k, v in over.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    path = folder / f"train-{abs(hash(json.dumps(cfg, sort_keys=True))) % 10**8}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture()
def tiny(monkeypatch):
    """``oaml train`` / ``oaml eval`` see the tiny 4-class benchmark of tests/_fault_jobs.py."""
    _fault_jobs.use_tiny_benchmark(monkeypatch)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two tiny teachers (other weights, same width) saved as checkpoints, 4 classes."""
    from oaml.models.teachers import TeacherConfig, load_teacher, save_teacher_checkpoint

    folder = tmp_path_factory.mktemp("teachers")
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        t = load_teacher(TeacherConfig(name="timm:test_efficientnet", pretrained=False, num_classes=4, preprocess={"size": 32}))
        path = save_teacher_checkpoint(t, folder / f"t{seed}.pt", val_accuracy=0.5)
        out.append((path, load_teacher(checkpoint=path)))
    return out


def _id_bank(path: Path, classes=3, n=40, d=8) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(classes * n, d))
    return write_bank(path, x, np.repeat(np.arange(classes), n), kind="id_features", meta={"teacher": "t", "dataset": "toy"}).path


def _student_ckpt(path: Path, name="resnet18", classes=4, width=0.125) -> Path:
    from oaml.models.checkpoint import save_student
    from oaml.models.resnet import create_model

    model = create_model(name, num_classes=classes, in_channels=1, width=width)
    save_student(path, model, {"name": name, "width": width, "stem": "cifar", "num_classes": classes, "in_channels": 1},
                 {"size": None, "channels": 1, "mean": [0.5], "std": [0.5]})
    return path


# ------------------------------------------------------------------ unwritable output, full disk
COMMANDS = ["train", "bank", "sample", "generate", "run", "eval", "teacher"]
# what each command must not have started when it refuses its output folder
LONG_WORK = {
    "train": ("oaml.training.build", "build_trainer"),
    "bank": ("oaml.models.teachers", "load_teacher"),
    "sample": ("oaml.outliers.knn", "sample_class_outliers"),
    "generate": ("oaml.outliers.generators.run", "train_feature_diffusion"),
    "run": ("oaml.pipeline.Pipeline", "run"),
    "eval": ("oaml.evaluation.api", "evaluate_checkpoint"),
    "teacher": ("oaml.models.teachers", "load_teacher"),
}


def _argv(cmd: str, out: Path, tmp_path: Path, teachers) -> list[str]:
    if cmd == "train":
        return ["train", "--config", str(_train_cfg(tmp_path)), "--out", str(out)]
    if cmd == "bank":
        return ["bank", "features", "--teacher-checkpoint", str(teachers[0][0]), "--dataset", "sklearn-digits",
                "--split", "val", "--out", str(out), "--no-progress", "--device", "cpu"]
    if cmd == "sample":
        return ["sample", "--bank", str(_id_bank(tmp_path / "id")), "--out", str(out), "--K", "5", "--S", "2",
                "--N", "8", "--R", "1", "--no-progress"]
    if cmd == "generate":
        idb = _id_bank(tmp_path / "id")
        return ["generate", "--cood", str(idb), "--out", str(out), "--id-bank", str(idb), "--no-progress"]
    if cmd == "run":
        return ["run", "--out", str(out)]
    if cmd == "teacher":
        return ["teacher", "finetune", "--teacher", "timm:test_efficientnet", "--dataset", "sklearn-digits",
                "--train-split", "test", "--val-split", "val", "--out", str(out), "--device", "cpu"]
    return ["eval", "--checkpoint", str(_student_ckpt(tmp_path / "s.pt")), "--benchmark", "tiny", "--out", str(out)]


def _forbid_long_work(cmd: str, monkeypatch) -> None:
    import importlib

    mod, attr = LONG_WORK[cmd]
    if mod.endswith(".Pipeline"):
        target = importlib.import_module(mod.rsplit(".", 1)[0]).Pipeline
    else:
        target = importlib.import_module(mod)

    def started(*a, **k):
        raise AssertionError(f"oaml {cmd} started its work before checking its output folder")

    monkeypatch.setattr(target, attr, started)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_output_under_a_file_fails_before_any_work(cmd, tmp_path, tiny, teachers, monkeypatch, capsys):
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    out = blocker / "out"
    argv = _argv(cmd, out, tmp_path, teachers)
    _forbid_long_work(cmd, monkeypatch)
    before = snapshot(tmp_path)
    err = fail(argv, capsys)
    assert f"{blocker} is a file, not a folder" in err and str(out) in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("cmd", COMMANDS)
def test_full_disk_fails_before_any_work(cmd, tmp_path, tiny, teachers, monkeypatch, capsys):
    out = tmp_path / "new" / "out"
    argv = _argv(cmd, out, tmp_path, teachers)
    _forbid_long_work(cmd, monkeypatch)
    real = os.statvfs

    def full(path):  # the file system reports 8 kB free
        st = real(path)
        return os.statvfs_result((st.f_bsize, 4096, st.f_blocks, 2, 2, st.f_files, st.f_ffree, st.f_favail, st.f_flag,
                                  st.f_namemax))

    monkeypatch.setattr(os, "statvfs", full)
    before = snapshot(tmp_path)
    err = fail(argv, capsys)
    assert f"output folder {out} has 8.19 kB free but this job writes about" in err
    assert not out.parent.exists() and snapshot(tmp_path) == before


@pytest.mark.parametrize("cmd", COMMANDS)
def test_read_only_output_folder_fails_before_any_work(cmd, tmp_path, tiny, teachers, monkeypatch, capsys):
    """chmod 0o500; as root (CI), where permissions do not stop writes, the refusal is simulated."""
    ro = tmp_path / "ro"
    ro.mkdir()
    argv = _argv(cmd, ro / "out", tmp_path, teachers)
    _forbid_long_work(cmd, monkeypatch)
    if os.geteuid() == 0:
        import tempfile

        real = tempfile.NamedTemporaryFile

        def denied(*a, dir=None, **k):
            if dir is not None and Path(dir).is_relative_to(ro):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
            return real(*a, dir=dir, **k)

        monkeypatch.setattr(tempfile, "NamedTemporaryFile", denied)
    ro.chmod(0o500)
    try:
        err = fail(argv, capsys)
    finally:
        ro.chmod(0o700)
    assert f"output folder {ro / 'out'} is not writable (Permission denied)" in err


def test_disk_filling_up_while_writing_a_bank_is_a_clear_error_and_resumes(tmp_path, monkeypatch, capsys):
    import oaml.outliers.bank as bank_mod

    idb = _id_bank(tmp_path / "id", classes=4)
    args = ["sample", "--bank", str(idb), "--K", "5", "--S", "2", "--N", "16", "--R", "2", "--no-progress", "--shard-size", "8"]
    real, calls = np.save, {"n": 0}

    def save(fh, arr, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # the third shard's vectors
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), getattr(fh, "name", None))
        return real(fh, arr, *a, **k)

    monkeypatch.setattr(bank_mod.np, "save", save)
    err = fail(args + ["--out", str(tmp_path / "cood")], capsys)
    assert "No space left on device" in err and "free some space, then rerun" in err
    with pytest.raises(BankError, match="incomplete"):
        Bank.open(tmp_path / "cood")
    assert len(Bank.open(tmp_path / "cood", allow_incomplete=True, verify=True)) == 16  # two whole shards kept
    monkeypatch.setattr(bank_mod.np, "save", real)
    assert main(args + ["--out", str(tmp_path / "cood")]) == 0
    assert main(args + ["--out", str(tmp_path / "ref")]) == 0
    np.testing.assert_array_equal(Bank.open(tmp_path / "cood").to_numpy()[0], Bank.open(tmp_path / "ref").to_numpy()[0])


# ---------------------------------------------------------------------------- config keys, types
@pytest.mark.parametrize(
    "cmd, text, expected",
    [
        ("train", "optim:\n  learning_rate: 0.1\n", ["unknown key 'optim.learning_rate'", "allowed keys:", "lr"]),
        ("train", "optim:\n  lr: fast\n", ["optim.lr", "valid number", "'fast'"]),
        ("train", "data:\n  batch_size: 1.5\n", ["data.batch_size", "valid integer"]),
        ("train", "student: resnet18\n", ["student", "'resnet18'"]),
        ("train", "method:\n  name: vanila\n", ["unknown method 'vanila'", "Did you mean vanilla"]),
        ("run", "vanila:\n  optim: {epochs: 1}\n", ["unknown key 'vanila'"]),
        ("run", "seed: zero\n", ["seed", "valid integer"]),
        ("sample", "K: many\n", ["K", "valid integer", "'many'"]),
        ("sample", "sigmaa: 0.1\n", ["unknown key 'sigmaa'", "sigma"]),
        ("generate", "batch_size: -4\n", ["batch_size", "greater than 0"]),
        ("generate", "feature_diffusion: {strenght: 0.5}\n", ["unknown key 'feature_diffusion.strenght'", "strength"]),
    ],
)
def test_config_errors_name_the_key(cmd, text, expected, tmp_path, tiny, capsys):
    cfg = tmp_path / "cfg.yaml"
    out = tmp_path / "out"
    idb = _id_bank(tmp_path / "id") if cmd in ("sample", "generate") else None
    if cmd == "generate":
        text = f"cood: {idb}\nout: {out}\nid_bank: {idb}\n" + text
    cfg.write_text(text)
    argv = {
        "train": ["train", "--config", str(cfg), "--out", str(out)],
        "run": ["run", "--config", str(cfg), "--out", str(out)],
        "sample": ["sample", "--bank", str(idb), "--config", str(cfg), "--out", str(out)],
        "generate": ["generate", "--config", str(cfg)],
    }[cmd]
    err = fail(argv, capsys)
    for part in expected:
        assert part in err, (part, err)
    assert not out.exists() or not any(out.iterdir())  # nothing was written


# ------------------------------------------------------------- teacher, transfer network, banks
def _fake_teacher(width: int):
    def teacher(raw, idx):
        g = torch.Generator().manual_seed(int(idx.sum()))
        return torch.randn(len(idx), 4, generator=g), torch.randn(len(idx), width, generator=g)

    return teacher


def test_teacher_width_that_does_not_fit_the_transfer_network(tmp_path):
    from oaml.training.config import TrainConfig
    from oaml.training.trainer import Trainer

    cfg = TrainConfig.from_dict({**_fault_jobs.TRAIN_CONFIG, "method": {"name": "oaml-kd"}, "optim": {"epochs": 1}})

    def trainer(width_said, width_given, name="run"):
        return Trainer(cfg, TinyImages(64), TinyImages(32, seed=1), tmp_path / name, num_classes=4, in_channels=1,
                       teacher=_fake_teacher(width_given), teacher_feature_dim=width_said)

    # a teacher that says 16-d but returns 24-d features
    with pytest.raises(ShapeError, match=r"TransferMLP expects \(batch, 16\) teacher features, got \(16, 24\)"):
        trainer(16, 24, "lying").fit()
    # a run started with a 16-d teacher, resumed with a 24-d one: the transfer network no longer fits
    trainer(16, 16).fit()
    before = snapshot(tmp_path / "run")
    with pytest.raises(ShapeError, match="does not fit this run's loss-term modules.*teacher feature width"):
        trainer(24, 24).fit(resume=True)
    assert snapshot(tmp_path / "run") == before


def test_banks_of_another_teacher_or_width_are_refused(tmp_path, tiny, teachers, monkeypatch, capsys):
    (t0_path, t0), (t1_path, _) = teachers
    ident = json.loads(json.dumps(t0.identity()))
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 4
    good = write_bank(tmp_path / "cood", rng.normal(size=(40, t0.feature_dim)), labels, kind="cood", meta={"teacher": ident}).path
    wide = write_bank(tmp_path / "wide", rng.normal(size=(40, t0.feature_dim + 3)), labels, kind="cood", meta={"teacher": ident}).path
    import oaml.models.teachers as teachers_mod

    calls = {"n": 0}
    real = teachers_mod.compute_teacher_outputs

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(teachers_mod, "compute_teacher_outputs", counted)

    def argv(teacher, bank, out):
        cfg = _train_cfg(tmp_path, **{"method.name": "oaml-kd-cood", "teacher.checkpoint": str(teacher),
                                      "outliers.cood_bank": str(bank), "data.augment.flip": False,
                                      "data.augment.crop_padding": 0})
        return ["train", "--config", str(cfg), "--out", str(tmp_path / out)]

    before = snapshot(tmp_path / "cood", tmp_path / "wide")
    err = fail(argv(t1_path, good, "other-teacher"), capsys)
    assert f"bank {good} was made from teacher 'timm:test_efficientnet' (weights sha256" in err
    assert "(they differ in checkpoint_sha256)" in err and "rebuild the bank with this teacher" in err
    err = fail(argv(t0_path, wide, "other-width"), capsys)
    assert f"C-OOD bank {wide} holds {t0.feature_dim + 3}-d vectors but the teacher's features are {t0.feature_dim}-d" in err
    assert calls["n"] == 0  # refused before any teacher output was computed
    assert snapshot(tmp_path / "cood", tmp_path / "wide") == before
    assert main(argv(t0_path, good, "matching")) == 0  # the matching teacher and bank train


def test_student_checkpoint_of_another_architecture_or_class_count(tmp_path, tiny, capsys):
    three = _student_ckpt(tmp_path / "three.pt", classes=3)
    r34 = _student_ckpt(tmp_path / "r34.pt", name="resnet34")
    before = snapshot(tmp_path)
    err = fail(["train", "--config", str(_train_cfg(tmp_path, **{"student.init_checkpoint": str(three)})),
                "--out", str(tmp_path / "a")], capsys)
    assert f"weights in {three} do not fit this model: fc.weight has shape (3, 64)" in err and "3 classes" in err
    err = fail(["train", "--config", str(_train_cfg(tmp_path, **{"student.init_checkpoint": str(r34)})),
                "--out", str(tmp_path / "b")], capsys)
    assert "another architecture" in err and "resnet34" in err
    err = fail(["eval", "--checkpoint", str(three), "--benchmark", "tiny", "--out", str(tmp_path / "e")], capsys)
    assert f"checkpoint {three} predicts 3 classes but the benchmark has 4" in err
    assert {k: v for k, v in snapshot(tmp_path).items() if k in before} == before

    # resuming a run with another student: refused by the config check (CLI) and by the checkpoint (API)
    cfg = _train_cfg(tmp_path)
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run)]) == 0
    before = snapshot(run)
    err = fail(["train", "--config", str(cfg), "--out", str(run), "--resume", "--set", "student.width=0.25"], capsys)
    assert "another config (student.width: 0.125 -> 0.25)" in err
    from oaml.training.config import TrainConfig
    from oaml.training.trainer import Trainer

    wider = TrainConfig.from_dict({**yaml.safe_load(cfg.read_text()), "student": {"width": 0.25}})
    tr = Trainer(wider, TinyImages(128), TinyImages(32, seed=1), run, num_classes=4, in_channels=1)
    with pytest.raises(ShapeError, match="does not fit this run's student"):
        tr.fit(resume=True)
    assert snapshot(run) == before


# ------------------------------------------------------------------------------------- images
def _imagenet_root(tmp_path: Path, empty_class: bool = False) -> tuple[Path, list[Path]]:
    from PIL import Image

    root = tmp_path / "data"
    train = make_image_folder(root / "imagenet" / "train", classes=("a", "b", "c"), per_class=4, size=(16, 16))
    (root / "imagenet" / "val").mkdir()
    good = (train / "a" / "0.png").read_bytes()
    bad = [train / "a" / "9.png", train / "b" / "8.jpg", train / "c" / "7.jpg"]
    bad[0].write_bytes(good[: len(good) // 2])  # truncated PNG
    bad[1].write_bytes(os.urandom(300))  # not an image at all
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(bad[2], quality=90)
    jpg = bad[2].read_bytes()
    bad[2].write_bytes(jpg[: len(jpg) * 2 // 3])  # truncated JPEG
    if empty_class:
        (train / "d").mkdir()
    return root, bad


def test_corrupt_truncated_images_and_empty_classes(tmp_path, teachers, capsys, caplog):
    root, bad = _imagenet_root(tmp_path)
    args = ["bank", "features", "--teacher-checkpoint", str(teachers[0][0]), "--dataset", "imagenet", "--data-root",
            str(root), "--split", "train", "--batch-size", "4", "--shard-size", "4", "--no-progress", "--device", "cpu"]
    before = snapshot(root)
    err = fail(args + ["--out", str(tmp_path / "bank")], capsys)
    assert f"cannot read image file {bad[0]}" in err and "--skip-bad" in err
    with pytest.raises(BankError, match="incomplete"):
        Bank.open(tmp_path / "bank")  # never looks complete
    with caplog.at_level(logging.WARNING, logger="oaml.data.user"):
        assert main(args + ["--out", str(tmp_path / "good"), "--skip-bad"]) == 0
    assert "imagenet:train: skipped 3 unreadable image file(s)" in caplog.text
    assert len(Bank.open(tmp_path / "good")) == 12
    assert snapshot(root) == before  # the data are only read

    root, _ = _imagenet_root(tmp_path / "e", empty_class=True)
    for extra in ([], ["--skip-bad"]):
        err = fail(args[:7] + [str(root)] + args[8:] + ["--out", str(tmp_path / "e" / "bank"), *extra], capsys)
        assert "class folder(s) with no images" in err and ": d." in err
    assert not (tmp_path / "e" / "bank" / "manifest.json").exists()


# ------------------------------------------------------------------------------------- scores
def _feature_set(seed, n=60, C=4, D=12, labels=True):
    from oaml.scores import FeatureSet

    g = torch.Generator().manual_seed(seed)
    f = torch.relu(torch.randn(n, D, generator=g) + 0.5)
    y = torch.arange(n) % C
    f[torch.arange(n), y] += 2.0
    W = torch.randn(C, D, generator=g)
    return FeatureSet(f @ W.T, f, y if labels else None), (W, torch.zeros(C))


def _feature_scores():
    from oaml.scores import SCORES, Score

    # scores of inner-layer activations (mds_multi) check theirs in tests/test_scores_inner.py
    return [n for n in SCORES.names() if not SCORES.get(n).requires_model and SCORES.get(n).needed_layers is Score.needed_layers]


@pytest.mark.parametrize("name", _feature_scores())
@pytest.mark.parametrize("field, value", [("logits", float("nan")), ("features", float("inf")), ("logits", -float("inf"))])
def test_non_finite_logits_or_features_are_an_error_in_every_score(name, field, value):
    from oaml.scores import FeatureSet, create_score

    kw = {"vim": {"dim": 4}, "knn": {"K": 5}, "nnguide": {"K": 5, "bank_fraction": 1.0}}.get(name, {})
    train, head = _feature_set(0)
    test, _ = _feature_set(1, labels=False)
    score = create_score(name, **kw)
    uses = field in score.uses
    bad_train = FeatureSet(train.logits.clone(), train.features.clone(), train.labels)
    getattr(bad_train, field)[3, 1] = value
    fit_uses = field in (score.uses if score.fit_uses is None else score.fit_uses)
    if score.fit_on != "none" and fit_uses:
        with pytest.raises(NonFiniteError, match=f"{score.name}.fit\\(\\): {field} contains 1 non-finite"):
            score.fit(bad_train, head=head)
    elif score.fit_on != "none":  # a field fit never reads (fDBD's train logits) cannot spoil the fit
        score.fit(bad_train, head=head)
    score.fit(train, head=head)
    bad = FeatureSet(test.logits.clone(), test.features.clone())
    getattr(bad, field)[7, 2] = value
    if uses:
        with pytest.raises(NonFiniteError, match=f"{score.name}.score\\(\\): {field} contains 1 non-finite"):
            score.score(bad)
    else:  # a field the score never reads cannot spoil it
        assert np.isfinite(score.score(bad)).all()


@pytest.mark.parametrize("name", ["odin", "gram"])
def test_model_scores_reject_non_finite_outputs(name):
    from oaml.models.resnet import create_model
    from oaml.scores import create_score

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=3, in_channels=1, width=0.125).eval()
    x, y = torch.rand(12, 1, 8, 8), torch.arange(12) % 3
    score = create_score(name, **({"group_by": "label"} if name == "gram" else {})).fit(model=model, loader=[(x, y)])
    with pytest.raises(NonFiniteError):
        score.score(model=model, loader=[(torch.full((4, 1, 8, 8), float("nan")), y[:4])])


def test_metrics_refuse_non_finite_scores_instead_of_a_nan_auroc():
    from oaml.metrics import ood_metrics

    with pytest.raises(NonFiniteError, match="non-finite"):
        ood_metrics(np.array([1.0, np.nan, 2.0]), np.array([0.0, 0.5]))
    with pytest.raises(NonFiniteError, match="non-finite"):
        ood_metrics(np.array([1.0, 2.0]), np.array([0.0, np.inf]))


# ------------------------------------------------------------- output folder of another config
def test_output_folders_holding_results_of_another_config_are_refused(tmp_path, tiny, monkeypatch, capsys):
    cfg = _train_cfg(tmp_path)
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run)]) == 0
    before = snapshot(run)
    err = fail(["train", "--config", str(cfg), "--out", str(run)], capsys)
    assert "already holds results (last.pt)" in err and "--overwrite" in err
    err = fail(["train", "--config", str(cfg), "--out", str(run), "--resume", "--set", "optim.lr=0.01"], capsys)
    assert f"{run} holds a run started with another config (optim.lr: 0.05 -> 0.01)" in err
    assert snapshot(run) == before
    assert main(["train", "--config", str(cfg), "--out", str(run), "--resume", "--set", "progress=true"]) == 0  # runtime key

    import oaml.pipeline

    monkeypatch.setattr(oaml.pipeline.Pipeline, "run", lambda self: pytest.fail("the pipeline started"))
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "config.yaml").write_text(oaml.pipeline.PipelineConfig().to_yaml())
    before = snapshot(tmp_path / "pipe")
    err = fail(["run", "--out", str(tmp_path / "pipe"), "--set", "seed=5"], capsys)
    assert "holds a pipeline run with another config" in err
    assert snapshot(tmp_path / "pipe") == before

    idb = _id_bank(tmp_path / "id")
    sample = ["sample", "--bank", str(idb), "--out", str(tmp_path / "cood"), "--S", "2", "--N", "8", "--R", "1", "--no-progress"]
    assert main(sample + ["--K", "5"]) == 0
    before = snapshot(tmp_path / "cood")
    err = fail(sample + ["--K", "6"], capsys)
    assert "holds a bank made with other settings" in err and "--overwrite" in err
    assert snapshot(tmp_path / "cood") == before

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text("{}")
    err = fail(["eval", "--checkpoint", str(run / "best.pt"), "--benchmark", "tiny", "--out", str(tmp_path / "eval")], capsys)
    assert "already holds results (results.json); pass --overwrite to replace them" in err
    assert (tmp_path / "eval" / "results.json").read_text() == "{}"
