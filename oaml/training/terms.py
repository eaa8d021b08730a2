"""Pluggable loss terms of the one training loop.

A term is an ``nn.Module`` built from its own strict config; the trainer sums
``weight * term(state)`` over the method's terms. A term may

- own parameters trained with the student (``student_parameters()``: e.g. the transfer MLP);
- own a separate optimiser (``own_optimizer``: e.g. a CLUB estimator fitted by likelihood);
- do work before the student's loss (``pre_step``: e.g. that estimator's likelihood step);
- do work at the start of every epoch (``on_epoch_start``: e.g. UDG's clustering of the
  features of the whole ID training set and outlier pool);
- require inputs (``requires``): ``teacher`` outputs, auxiliary outlier images (``aux``), or an
  outlier bank (``cood`` / ``dood``).

Terms are registered with ``@TERMS.register(name)``; methods (``oaml.training.methods``) name
the terms they use with their default settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Iterable, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from ..config import StrictModel
from ..registry import Registry
from .state import StepState

TERMS: Registry = Registry("loss term")


class TermConfig(StrictModel):
    weight: float = 1.0


class BuildContext:
    """What a term may need to build itself: dimensions, banks, device."""

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        device: torch.device,
        teacher_feature_dim: Optional[int] = None,
        banks: Optional[Dict[str, Any]] = None,
        aux_available: bool = False,
        num_train: Optional[int] = None,
        num_aux: Optional[int] = None,
        preprocess: Optional[nn.Module] = None,
    ):
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.device = device
        self.teacher_feature_dim = teacher_feature_dim
        self.banks = banks or {}
        self.aux_available = aux_available
        self.num_train = num_train  # size of the ID training set (per-sample state, e.g. UDG)
        self.num_aux = num_aux  # size of the auxiliary outlier pool
        self.preprocess = preprocess  # the student's preprocessing (raw uint8 -> model input), for extra images


@dataclass
class EpochContext:
    """What :meth:`Term.on_epoch_start` may use.

    ``extract(which)`` (``"train"`` or ``"aux"``) runs the student in eval mode, without
    gradients and without augmentation, over the whole ID training set or outlier pool in dataset
    order and returns ``(logits, features, labels)`` (float32 on the training device; labels on
    the CPU). ``generator`` is seeded from (seed, epoch) and is the SAME on every process, so
    epoch-level random choices agree across processes and are reproduced on resume.
    """

    epoch: int
    generator: torch.Generator
    model: nn.Module
    device: torch.device
    extract: Callable[[str], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class Term(nn.Module):
    config_cls: ClassVar[Type[TermConfig]] = TermConfig
    requires: ClassVar[frozenset] = frozenset()

    def __init__(self, cfg: TermConfig, ctx: BuildContext):
        super().__init__()
        self.cfg = cfg
        self.weight = float(cfg.weight)

    @classmethod
    def requirements(cls, settings: Dict[str, Any]) -> frozenset:
        """What this term needs with these settings (default: ``requires``); terms whose banks are a
        setting add them, so the pipeline builds exactly those."""
        return cls.requires

    def student_parameters(self) -> Iterable[nn.Parameter]:
        """Parameters updated by the student's optimiser together with the student."""
        return self.parameters()

    def student_param_groups(self) -> list:
        """Param groups for the student's optimiser; a group may set its own ``lr``."""
        params = [p for p in self.student_parameters() if p.requires_grad]
        return [{"params": params}] if params else []

    own_optimizer: Optional[torch.optim.Optimizer] = None
    #: whether the auxiliary outlier images themselves go through the student (terms that only
    #: use them inside :meth:`extra_inputs`, e.g. MixOE, set this to False)
    forward_aux: ClassVar[bool] = True

    def extra_inputs(
        self, x: torch.Tensor, labels: torch.Tensor, aux_x: Optional[torch.Tensor], generator: torch.Generator
    ) -> Optional[Tuple[torch.Tensor, Any]]:
        """Extra preprocessed images this term adds to the step's ONE forward pass, built from the
        ID batch ``x`` (and the auxiliary batch ``aux_x``), with ``info`` for the term (e.g. mixing
        coefficients); ``generator`` is the step's seeded generator. Their outputs reach the term as
        ``state.extras[<term name>] = {"logits", "features", "info"}``. Default: none."""
        return None

    def pre_step(self, state: StepState) -> Dict[str, Any]:
        """Work before the loss; returns values to log (floats or 0-d tensors, read back once per step)."""
        return {}

    def post_step(self, state: StepState) -> None:
        """Work after the student's optimiser step (e.g. fitting an estimator on this step's
        detached pairs, so that the NEXT step's bound uses a q that has not seen its pairs)."""

    def on_epoch_start(self, ctx: EpochContext) -> Dict[str, float]:
        """Called once at the start of every epoch, before its first step (not again when a run
        resumes in the middle of the epoch: whatever it computes must live in the term's
        buffers, which checkpoints carry). Returns values logged in the epoch's row. Default:
        nothing."""
        return {}

    def forward(self, state: StepState) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@TERMS.register("ce")
class CrossEntropyTerm(Term):
    """Cross-entropy of the student's ID logits with the labels."""

    def forward(self, state: StepState) -> torch.Tensor:
        return F.cross_entropy(state.logits, state.labels)


def build_term(name: str, cfg: Dict[str, Any] | TermConfig, ctx: BuildContext) -> Term:
    cls = TERMS.get(name)
    if not isinstance(cfg, TermConfig):
        cfg = cls.config_cls.from_dict(cfg, source=f"loss term {name!r}")
    return cls(cfg, ctx)
