"""Batch preprocessing from the raw uint8 images every dataset yields to a model's input.

Datasets give ``uint8`` tensors ``(B, C, H, W)`` with C in {1, 3}. Each model (student or
teacher) owns a :class:`Preprocess` that converts such a batch on the model's device: channel
conversion (grey -> RGB by repetition, RGB -> grey by ITU-R 601 luma), resize (bilinear,
antialiased) and normalisation. The teacher and the student therefore see the same images with
their own preprocessing (the authors fed the teacher the student's normalisation by mistake).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..config import StrictModel
from ..errors import ShapeError


class PreprocessConfig(StrictModel):
    size: int | None = None  # output side length; None keeps the input size
    channels: int = 1
    mean: list[float] = [0.5]
    std: list[float] = [0.5]


class Preprocess(torch.nn.Module):
    def __init__(self, size: int | None = None, channels: int = 3, mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,)):
        super().__init__()
        if channels not in (1, 3):
            raise ShapeError(f"channels must be 1 or 3, got {channels}")
        mean, std = list(mean), list(std)
        if len(mean) == 1:
            mean = mean * channels
        if len(std) == 1:
            std = std * channels
        if len(mean) != channels or len(std) != channels:
            raise ShapeError(f"mean/std need 1 or {channels} values, got {len(mean)}/{len(std)}")
        if any(s <= 0 for s in std):
            raise ShapeError(f"std must be positive, got {std}")
        self.size = size
        self.channels = channels
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, cfg: PreprocessConfig) -> "Preprocess":
        return cls(cfg.size, cfg.channels, cfg.mean, cfg.std)

    def config(self) -> dict:
        return {"size": self.size, "channels": self.channels, "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ShapeError(f"expected a batch (B, 1|3, H, W), got shape {tuple(x.shape)}")
        x = x.to(self.mean.device)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and self.channels == 1:
            w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
            x = (x * w).sum(1, keepdim=True)
        if self.size is not None and (x.shape[-2] != self.size or x.shape[-1] != self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std
