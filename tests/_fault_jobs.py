"""A training job for the SIGKILL tests (tests/test_faults.py), run as a child process.

    python tests/_fault_jobs.py train CONFIG OUT [--resume]

runs ``oaml train --config CONFIG --out OUT`` on :func:`tiny_benchmark` (TinyImages instead of a
registered benchmark, so the test needs no dataset on disk) with one CPU thread, and prints
``step N`` after every optimisation step, so that the test knows how far the job got before it
kills it. Nothing else differs from the real command; the test resumes the killed run in its own
process with the same :func:`use_tiny_benchmark`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from helpers import TinyImages  # noqa: E402

TRAIN_CONFIG = {
    "data": {"batch_size": 16, "eval_batch_size": 32, "augment": {"flip": True, "crop_padding": 2}},
    "student": {"width": 0.125},
    "preprocess": {"channels": 1, "mean": [0.5], "std": [0.5]},
    "optim": {"lr": 0.05, "epochs": 3},
    "checkpoint_every_steps": 2,
    "tensorboard": False,
    "progress": False,
    "device": "cpu",
}
STEPS = 3 * (128 // 16)  # epochs x steps per epoch of TRAIN_CONFIG on tiny_benchmark


class _TinyBenchmark:
    name = "tiny"
    num_classes = 4
    channels = 1

    def id_train(self, root=None, skip_bad=False):
        return TinyImages(128, seed=0)

    def id_val(self, root=None, skip_bad=False):
        return TinyImages(32, seed=1)


def use_tiny_benchmark(monkeypatch=None) -> None:
    """Make every benchmark name resolve to the tiny benchmark (``oaml train`` looks it up by name)."""
    import oaml.data

    fake = lambda name: _TinyBenchmark()  # noqa: E731
    if monkeypatch is not None:
        monkeypatch.setattr(oaml.data, "get_benchmark", fake)
    else:
        oaml.data.get_benchmark = fake


def _announce_steps() -> None:
    from oaml.training.trainer import Trainer

    real = Trainer._step
    count = {"n": 0}

    def step(self, *a, **k):
        out = real(self, *a, **k)
        count["n"] += 1
        print(f"step {count['n']}", flush=True)
        return out

    Trainer._step = step


def main(argv: list[str]) -> int:
    import torch

    torch.set_num_threads(1)
    job, config, out, *rest = argv
    assert job == "train", job
    use_tiny_benchmark()
    _announce_steps()
    from oaml.cli.main import main as cli

    return cli(["train", "--config", config, "--out", out, *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
