"""Device, precision and seeding helpers. Nothing in oaml calls ``.cuda()`` directly."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError


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


def cpu_bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 convolutions and GEMMs natively through oneDNN (AVX-512 BF16 or
    AMX); without it, bfloat16 autocast on the CPU is emulated and slower than float32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the oneDNN ops
        return False


def amp_enabled(device: torch.device, requested: bool | str = "auto") -> bool:
    """Whether a run uses mixed precision. ``auto``: on CUDA only (CPU runs stay float32, so their
    results do not depend on the CPU's instruction set). ``True``: on CUDA, and on a CPU with native
    bfloat16 (see :func:`amp_dtype`); on a CPU without it this raises, since the emulated bfloat16 is
    slower than float32. ``False``: never."""
    if requested == "auto":
        return device.type == "cuda"
    if not requested:
        return False
    if device.type == "cpu" and not cpu_bf16_supported():
        raise ConfigError(
            "amp: true on a CPU without native bfloat16 (AVX-512 BF16 or AMX): its bfloat16 autocast would be "
            "emulated and slower than float32. Set amp: false (or auto) on this machine"
        )
    return device.type in ("cuda", "cpu")


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype of a mixed-precision run: bfloat16 on the CPU and on CUDA GPUs that support
    it (no loss scaling needed), float16 with a GradScaler on older GPUs."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to ``device`` without waiting for the queued GPU work (pinned staging)."""
    if device.type != "cuda" or t.device == device:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
