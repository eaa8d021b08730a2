"""Faults: jobs killed with SIGKILL at a random point, then restarted, end exactly where an
uninterrupted job ends; a killed job never leaves a bank that looks complete; an unwritable
output folder or a full disk stops every command before its long work.

Each killed job runs the real command in a child process (``python -m oaml.cli.main ...``; the
training job through tests/_fault_jobs.py, which only swaps in a tiny benchmark and prints its
steps). The test watches what the job writes anyway (bank manifests) or its step lines, and
sends SIGKILL once the job is past a point drawn from a seeded random generator; where exactly
the kill lands (inside a step, a checkpoint or a shard write) is up to the scheduler. The
restart and the uninterrupted reference run in the test process with one thread, as the child.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from oaml.cli.main import main
from oaml.errors import BankError
from oaml.outliers.bank import Bank, write_bank

import _fault_jobs

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals"),
]

TESTS = Path(__file__).parent
CLI = [sys.executable, "-m", "oaml.cli.main"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _killed_when(cmd: list[str], ready, log: Path, timeout: float = 120.0) -> None:
    """Start ``cmd``; SIGKILL it as soon as ``ready()`` is true. The job must not have finished."""
    with open(log, "w") as err:
        p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        t0 = time.monotonic()
        while p.poll() is None and not ready():
            if time.monotonic() - t0 > timeout:
                p.kill()
                pytest.fail(f"{cmd} did not reach the kill point in {timeout} s; stderr: {log.read_text()[-2000:]}")
            time.sleep(0.002)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert p.returncode == -signal.SIGKILL, f"the job ended with {p.returncode} before it was killed: {log.read_text()[-2000:]}"
    print(f"\nkilled {' '.join(cmd[3:5])} (SIGKILL) at {time.monotonic() - t0:.2f} s")  # pytest -s


def _shards(bank: Path) -> int:
    try:
        return len(json.loads((bank / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def _assert_killed_bank_is_incomplete(path: Path) -> Bank:
    """A killed job's bank says it is incomplete, and every shard it lists is whole (checksums)."""
    with pytest.raises(BankError, match="incomplete"):
        Bank.open(path)
    part = Bank.open(path, allow_incomplete=True, verify=True)
    assert not part.manifest["complete"] and len(part) > 0
    return part


def _same_bank(a: Path, b: Path) -> None:
    va, la = Bank.open(a, verify=True).to_numpy()
    vb, lb = Bank.open(b, verify=True).to_numpy()
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(va, vb)


# ---------------------------------------------------------------------------------------- training
def test_training_killed_at_a_random_step_resumes_to_the_same_weights_and_metrics(tmp_path, monkeypatch):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(_fault_jobs.TRAIN_CONFIG))
    kill_after = random.Random(8).randint(3, _fault_jobs.STEPS // 2)  # checkpoints every 2 steps

    run = tmp_path / "run"
    with open(tmp_path / "stderr.txt", "w") as err:
        p = subprocess.Popen([sys.executable, str(TESTS / "_fault_jobs.py"), "train", str(cfg), str(run)],
                             env=_env(), stdout=subprocess.PIPE, stderr=err, text=True)
        for line in p.stdout:  # type: ignore[union-attr]
            if line.strip() == f"step {kill_after}":
                os.kill(p.pid, signal.SIGKILL)
                break
        p.wait()
        p.stdout.close()  # type: ignore[union-attr]
    assert p.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-2000:]
    assert not (run / "summary.json").exists()
    killed_at = torch.load(run / "last.pt", weights_only=False)  # whole, whenever the kill came
    assert killed_at["global_step"] < _fault_jobs.STEPS

    _fault_jobs.use_tiny_benchmark(monkeypatch)
    assert main(["train", "--config", str(cfg), "--out", str(run)]) == 1  # no silent restart over it
    assert main(["train", "--config", str(cfg), "--out", str(run), "--resume"]) == 0
    ref = tmp_path / "ref"
    assert main(["train", "--config", str(cfg), "--out", str(ref)]) == 0

    for name in ("last.pt", "best.pt"):
        a = torch.load(ref / name, weights_only=False)["model"]
        b = torch.load(run / name, weights_only=False)["model"]
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs after a kill at step {kill_after}"

    def metrics(folder):
        hist = json.loads((folder / "summary.json").read_text())["history"]
        return [{k: v for k, v in row.items() if k != "seconds"} for row in hist]

    assert metrics(run) == metrics(ref)  # per-epoch losses, accuracies, lr, steps
    assert [r["steps"] for r in metrics(run)] == [8, 8, 8]


# ----------------------------------------------------------------------------- ID feature bank
@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    from oaml.models.teachers import TeacherConfig, load_teacher, save_teacher_checkpoint

    torch.manual_seed(0)
    t = load_teacher(TeacherConfig(name="timm:test_efficientnet", pretrained=False, num_classes=10, preprocess={"size": 32}))
    return save_teacher_checkpoint(t, tmp_path_factory.mktemp("teacher") / "teacher.pt", val_accuracy=0.1)


def test_feature_bank_killed_mid_extraction_resumes_to_the_same_bank(tmp_path, teacher_ckpt):
    args = ["bank", "features", "--teacher-checkpoint", str(teacher_ckpt), "--dataset", "sklearn-digits",
            "--split", "val", "--shard-size", "4", "--batch-size", "4", "--no-progress", "--device", "cpu",
            "--threads", "1"]  # 300 images: 75 shards
    out = tmp_path / "bank"
    kill_after = random.Random(1).randint(2, 25)
    _killed_when(CLI + args + ["--out", str(out)], lambda: _shards(out) >= kill_after, tmp_path / "stderr.txt")
    part = _assert_killed_bank_is_incomplete(out)
    assert len(part) < 300 and len(part) % 4 == 0

    assert main(args + ["--out", str(out)]) == 0  # the same command again resumes
    assert main(args + ["--out", str(tmp_path / "ref")]) == 0
    _same_bank(out, tmp_path / "ref")
    assert len(Bank.open(out)) == 300


# ------------------------------------------------------------------------------------ C-OOD
def _id_bank(path: Path, classes: int = 12, n: int = 300, d: int = 32) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(classes, n, d)) + 2.0 * rng.normal(size=(classes, 1, d))
    write_bank(path, x.reshape(-1, d), np.repeat(np.arange(classes), n), kind="id_features",
               meta={"teacher": "synthetic", "dataset": "toy"})
    return path


def test_sampling_killed_mid_run_resumes_to_the_same_bank(tmp_path):
    idb = _id_bank(tmp_path / "id")
    per = 2 * 8 * 2  # R * S * m
    args = ["sample", "--bank", str(idb), "--K", "50", "--S", "8", "--N", "512", "--R", "2", "--m", "2",
            "--sigma", "0.1", "--device", "cpu", "--no-progress", "--shard-size", str(per * 3 // 2)]  # 8 shards
    out = tmp_path / "cood"
    kill_after = random.Random(2).randint(1, 4)
    _killed_when(CLI + args + ["--out", str(out)], lambda: _shards(out) >= kill_after, tmp_path / "stderr.txt")
    part = _assert_killed_bank_is_incomplete(out)
    assert len(part) < 12 * per

    assert main(args + ["--out", str(out)]) == 0  # resume is the default
    assert main(args + ["--out", str(tmp_path / "ref")]) == 0
    _same_bank(out, tmp_path / "ref")


# ------------------------------------------------------------------------------------ D-OOD
def test_generation_killed_mid_run_resumes_to_the_same_bank(tmp_path):
    from oaml.outliers.generators import FeatureDiffusionTrainConfig, train_feature_diffusion

    idb = _id_bank(tmp_path / "id", classes=3, n=100, d=8)
    rng = np.random.default_rng(1)
    write_bank(tmp_path / "cood", rng.normal(size=(480, 8)), np.arange(480) % 3, kind="cood",
               meta={"teacher": "synthetic", "dataset": "toy"})
    model = train_feature_diffusion(Bank.open(idb), FeatureDiffusionTrainConfig(width=32, depth=1, train_steps=40, device="cpu"),
                                    progress=False)
    model.save(tmp_path / "fd.safetensors")

    def config(out: Path) -> Path:
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump({
            "cood": str(tmp_path / "cood"), "out": str(out), "model": str(tmp_path / "fd.safetensors"),
            "batch_size": 8, "batches_per_shard": 1, "seed": 3,
            "feature_diffusion": {"strength": 0.5, "steps": 20, "device": "cpu", "num_threads": 1},
        }))
        return path

    out = tmp_path / "dood"
    kill_after = random.Random(3).randint(2, 20)  # of 60 shards
    _killed_when(CLI + ["generate", "--config", str(config(out)), "--no-progress"], lambda: _shards(out) >= kill_after,
                 tmp_path / "stderr.txt")
    part = _assert_killed_bank_is_incomplete(out)
    assert len(part) < 480 and len(part) % 8 == 0

    assert main(["generate", "--config", str(config(out)), "--no-progress"]) == 0
    ref = tmp_path / "ref"
    assert main(["generate", "--config", str(config(ref)), "--no-progress"]) == 0
    _same_bank(out, ref)


def test_a_mid_epoch_checkpoint_resumes_only_with_the_same_number_of_processes(tmp_path, monkeypatch):
    """Each process draws its own augmentation stream; a mid-epoch checkpoint keeps one state per
    process (gathered under torchrun), so it resumes exactly only with as many processes."""
    from oaml.errors import ConfigError
    from oaml.training.config import TrainConfig
    from oaml.training.trainer import Trainer

    from helpers import Killed, TinyImages, crash_at_step

    cfg = TrainConfig.from_dict(_fault_jobs.TRAIN_CONFIG)

    def trainer():
        return Trainer(cfg, TinyImages(128), TinyImages(32, seed=1), tmp_path / "run", num_classes=4, in_channels=1)

    tr = trainer()
    crash_at_step(tr, 5, monkeypatch)  # after the checkpoint at step 4
    with pytest.raises(Killed):
        tr.fit()
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["world_size"] == 1
    two = trainer()
    two.world = 2  # as if started by torchrun with two processes
    with pytest.raises(ConfigError, match="by 1 process\\(es\\); resume it with the same number of processes"):
        two.fit(resume=True)
