"""Small data the tests build themselves."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from oaml.scores import FeatureSet


class TinyImages(Dataset):
    """uint8 images whose class is encoded by a bright square's position (learnable in a few steps)."""

    def __init__(self, n: int = 64, num_classes: int = 4, size: int = 12, channels: int = 1, seed: int = 0, fast: bool = True):
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        imgs = (torch.rand(n, channels, size, size, generator=g) * 60).to(torch.uint8)
        step = size // num_classes
        for i, c in enumerate(labels.tolist()):
            imgs[i, :, c * step : (c + 1) * step, :] = 230
        self._images, self._labels = imgs, labels
        if fast:
            self.images, self.labels = imgs, labels

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i: int):
        return self._images[i], int(self._labels[i])


class Killed(Exception):
    """Stands for a process killed in the middle of training."""


def crash_at_step(trainer, step: int, monkeypatch) -> None:
    """Make ``trainer`` raise :class:`Killed` when it starts its ``step``-th optimisation step."""
    orig, calls = trainer._step, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == step:
            raise Killed()
        return orig(*a, **k)

    monkeypatch.setattr(trainer, "_step", dying)


def make_problem(seed=0, C=5, D=24, n_train=600, n_val=300, n_test=300):
    """Post-ReLU class-clustered ID features, a linear head that fits them, OOD = diffuse."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.relu(torch.randn(C, D, generator=g)) * 3.0
    W = centers / centers.norm(dim=1, keepdim=True) * 2.0
    b = 0.1 * torch.randn(C, generator=g)

    def id_set(n):
        y = torch.randint(0, C, (n,), generator=g)
        f = torch.relu(centers[y] + 0.5 * torch.randn(n, D, generator=g))
        return FeatureSet(f @ W.T + b, f, y)

    def ood_set(n):
        f = torch.relu(0.6 * torch.randn(n, D, generator=g) + 0.3)
        return FeatureSet(f @ W.T + b, f, torch.full((n,), -1))

    return (W, b), id_set(n_train), id_set(n_val), id_set(n_test), ood_set(n_test)


class FakeTeacher:
    """A fixed random projection of the raw image: features (8-d) and logits (4 classes)."""

    def __init__(self):
        g = torch.Generator().manual_seed(5)
        self.P = torch.randn(144, 8, generator=g)
        self.W = torch.randn(8, 4, generator=g)
        self.feature_dim = 8

    def outputs(self, raw):
        f = raw.float().flatten(1) / 255 @ self.P
        return f @ self.W, f

    def __call__(self, raw, idx):
        return self.outputs(raw)

    def identity(self):
        return {"name": "fake"}
