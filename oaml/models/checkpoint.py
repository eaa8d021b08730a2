"""Student checkpoints that say what they are: architecture, preprocessing, provenance."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ..errors import OamlError, ShapeError
from ..utils.io import atomic_path
from .preprocess import Preprocess
from .resnet import create_model

FORMAT = "oaml-student/1"


def save_student(path: str | Path, model: nn.Module, arch: Dict[str, Any], preprocess: Dict[str, Any], meta: Optional[Dict[str, Any]] = None) -> None:
    blob = {"format": FORMAT, "model": model.state_dict(), "arch": arch, "preprocess": preprocess, "meta": meta or {}}
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def load_student(path: str | Path, device: str | torch.device = "cpu", expect_classes: Optional[int] = None) -> Tuple[nn.Module, Preprocess, Dict[str, Any]]:
    """Rebuild a student and its preprocessing from a checkpoint written by :func:`save_student`."""
    path = Path(path)
    if not path.is_file():
        raise OamlError(f"no checkpoint at {path}; train one with `oaml train --config FILE`")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file
        raise OamlError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise OamlError(f"{path} is not an oaml student checkpoint (use best.pt from a training run)")
    arch = dict(blob["arch"])
    if expect_classes is not None and arch["num_classes"] != expect_classes:
        raise ShapeError(
            f"checkpoint {path} predicts {arch['num_classes']} classes but the benchmark has {expect_classes}; "
            "evaluate it on a benchmark with the same ID classes"
        )
    model = create_model(arch["name"], num_classes=arch["num_classes"], in_channels=arch["in_channels"], width=arch["width"], stem=arch["stem"])
    model.load_state_dict(blob["model"])
    pre = Preprocess(**blob["preprocess"])
    return model.to(device).eval(), pre.to(device), {"arch": arch, **blob.get("meta", {})}
