"""Device, precision and seeding helpers. Nothing in oaml calls ``.cuda()`` directly."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU. A CUDA device without an index (``auto``,
    ``"cuda"``) is this process's GPU: ``LOCAL_RANK`` under torchrun, else 0."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = device if isinstance(device, torch.device) else torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def amp_enabled(device: torch.device, requested: bool | str = "auto") -> bool:
    """Mixed precision is used on CUDA only (``auto``), never on CPU."""
    if requested == "auto":
        return device.type == "cuda"
    return bool(requested) and device.type == "cuda"


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to ``device`` without waiting for the queued GPU work (pinned staging)."""
    if device.type != "cuda" or t.device == device:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
