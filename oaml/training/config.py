"""Typed configuration of one training run (YAML in, unknown keys rejected)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from ..config import StrictModel
from ..models.preprocess import PreprocessConfig
from .methods import MethodConfig


class AugmentConfig(StrictModel):
    flip: bool = True
    crop_padding: int = Field(4, ge=0)


class DataConfig(StrictModel):
    """ID data come from a named benchmark (``oaml data list`` shows them); auxiliary outlier
    images for OE-style methods come from that benchmark's outlier-exposure pool."""

    benchmark: str = "fmnist"
    root: Optional[str] = None
    train_limit: Optional[int] = Field(None, ge=1)  # seeded, class-stratified subset of ID train
    val_limit: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(128, ge=2)
    aux_batch_size: Optional[int] = Field(None, ge=1)  # default: the ID batch size
    eval_batch_size: int = Field(512, ge=1)
    num_workers: int = Field(0, ge=0)
    skip_bad: bool = False  # drop unreadable image files (folder / image-list datasets) and report how many
    augment: AugmentConfig = AugmentConfig()


class StudentConfig(StrictModel):
    name: str = "resnet18"
    width: float = Field(1.0, gt=0)
    stem: Literal["cifar", "imagenet"] = "cifar"
    init_checkpoint: Optional[str] = None  # start from this (vanilla) checkpoint, as the paper does


class OptimConfig(StrictModel):
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    epochs: int = Field(100, ge=1)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)


class TeacherRefConfig(StrictModel):
    checkpoint: Optional[str] = None  # a fine-tuned teacher (oaml teacher finetune)
    cache: bool = True  # use cached teacher outputs when the ID images are not augmented


class OutlierSourcesConfig(StrictModel):
    cood_bank: Optional[str] = None
    dood_bank: Optional[str] = None


class TrainConfig(StrictModel):
    data: DataConfig = DataConfig()
    student: StudentConfig = StudentConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    optim: OptimConfig = OptimConfig()
    method: MethodConfig = MethodConfig()
    teacher: TeacherRefConfig = TeacherRefConfig()
    outliers: OutlierSourcesConfig = OutlierSourcesConfig()
    seed: int = 0
    device: str = "auto"
    amp: bool | Literal["auto"] = "auto"
    checkpoint_every_steps: int = Field(0, ge=0)  # 0: checkpoint at the end of each epoch only
    tensorboard: bool = True
    progress: bool = True
