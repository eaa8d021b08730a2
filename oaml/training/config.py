"""Typed configuration of one training run (YAML in, unknown keys rejected)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Literal, Optional

from pydantic import Field

from ..config import StrictModel
from ..errors import ConfigError
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
    subset_seed: Optional[int] = Field(None, ge=0)  # seed of that subset (None: the run's seed); oaml bench fixes it
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
    cache_dir: Optional[str] = None  # keep those outputs on disk here, keyed by teacher and image content (reused by later runs)
    device_cache_mb: float = Field(2048, ge=0)  # on CUDA, a cache up to this size is kept on the GPU


class OutlierSourcesConfig(StrictModel):
    cood_bank: Optional[str] = None
    dood_bank: Optional[str] = None
    image_outliers: Optional[str] = None  # a teacher-selected image-outlier set (oaml.outliers.images)


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
    # speed-only settings: the same losses and weights up to float rounding, so --resume may change them.
    # channels_last: the student's conv weights and its input batches in channels_last (NHWC) memory format
    # (oneDNN convolutions on CPU without layout reorders; tensor cores on CUDA).
    channels_last: bool = False
    # compile: torch.compile (inductor) of the student's training forward; the first step of each input shape
    # and mode pays a one-off compile (tens of seconds for ResNet-18 on CPU; needs a C++ compiler there).
    # Evaluation and checkpoints use the plain module (state dicts keep their keys, no ``_orig_mod.``).
    compile: bool = False
    checkpoint_every_steps: int = Field(0, ge=0)  # 0: checkpoint at the end of each epoch only
    tensorboard: bool = True
    progress: bool = True

    @classmethod
    def from_dict(cls, data: Optional[Dict[str, Any]], source: str = "config") -> "TrainConfig":
        from .methods import validate_method

        cfg = super().from_dict(data, source)
        validate_method(cfg.method)  # every term's settings, before data or models are touched
        return cfg


# settings that do not change what a run computes: a resumed run may change them
_RUNTIME_KEYS = {"progress", "tensorboard", "device", "data.num_workers", "data.eval_batch_size", "channels_last", "compile"}


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def check_same_config(out: Path, cfg: "TrainConfig") -> None:
    """A run folder continues only with the config it was started with (``--resume``, a rerun
    pipeline or bench): runtime keys aside, and keys that only one side has (a setting added or
    removed between versions) take the other side's value."""
    import yaml

    prev = out / "config.yaml"
    if not prev.is_file():
        return
    raw = yaml.safe_load(prev.read_text()) or {}
    new = _flat(cfg.model_dump(mode="json"))
    try:  # read with this version's schema: settings added since then take their defaults
        old = _flat(type(cfg).from_dict(raw, source=str(prev)).model_dump(mode="json"))
        keys = set(old) | set(new)
    except ConfigError:  # it holds a key this version no longer has: compare the keys both have
        old = _flat(raw)
        keys = set(old) & set(new)
    diff = sorted(k for k in keys if old.get(k) != new.get(k) and k not in _RUNTIME_KEYS)
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:5])
        raise ConfigError(
            f"{out} holds a run started with another config ({shown}{' ...' if len(diff) > 5 else ''}); "
            "--resume continues a run only with its own config: pass --overwrite to start again or choose another --out"
        )
