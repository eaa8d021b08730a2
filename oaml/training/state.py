"""What one training step knows: the batch, the student's outputs and the outlier sources."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch


@dataclass
class StepState:
    """Everything a loss term may read during one step.

    ``logits``/``features`` are the student's outputs on the ID batch; when the method uses
    auxiliary outlier images they were passed through the student in the SAME forward pass as
    the ID images (one BatchNorm pass, unlike OpenOOD's OE) and appear as ``aux_logits`` /
    ``aux_features``. Teacher outputs come from the live teacher or from the teacher cache.
    """

    images: torch.Tensor  # preprocessed ID batch fed to the student
    labels: torch.Tensor
    logits: torch.Tensor
    features: torch.Tensor
    generator: torch.Generator  # seeded per (seed, epoch); every random draw of the step uses it
    epoch: int
    step: int
    aux_images: Optional[torch.Tensor] = None
    aux_logits: Optional[torch.Tensor] = None
    aux_features: Optional[torch.Tensor] = None
    teacher_logits: Optional[torch.Tensor] = None
    teacher_features: Optional[torch.Tensor] = None
    model: Any = None
    extras: Dict[str, Any] = field(default_factory=dict)
    indices: Optional[torch.Tensor] = None  # dataset indices of the ID batch
    labels_cpu: Optional[torch.Tensor] = None  # ``labels`` on the CPU (for index draws without a device sync)
    aux_indices: Optional[torch.Tensor] = None  # indices of the auxiliary images in the outlier pool
