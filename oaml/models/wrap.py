"""Any torch classifier as a :class:`~oaml.models.adapter.Classifier` (what the evaluator takes).

:func:`wrap_model` finds the penultimate feature and the head by the first rule that applies:

1. a ``(features_fn, head)`` pair: ``features_fn(x)`` flattened is the feature, ``head`` (an
   ``nn.Linear``) maps it to the logits;
2. ``feature_layer="name"``: the output of the submodule ``name`` (flattened) is the feature,
   the model's last ``nn.Linear`` the head, ``model(x)`` the logits (e.g. ``"avgpool"`` of a
   torchvision ResNet);
3. a model that already is a Classifier (oaml students, teachers) is used as it is;
4. a timm model (``forward_head`` and ``get_classifier``): ``forward_head(pre_logits=True)`` is the
   feature, ``get_classifier()`` the head;
5. anything else (torchvision classifiers): the model's last ``nn.Linear`` (registration order:
   ResNet ``fc``, VGG / EfficientNet / MobileNet ``classifier[-1]``, ViT ``heads.head``) is the
   head and its input the feature.

Rules 2 and 5 run ``model(x)`` with a temporary forward hook (nothing of the model is replaced)
and check on the first batch that the head maps the feature to the model's logits; if it does
not, the error says to name ``feature_layer`` or pass the pair. The model is not copied: the
evaluator moves it to its device and sets eval mode.

:func:`build_model` builds ``torchvision:NAME``, ``timm:NAME`` (never downloading: weights come
from a file) or ``module:function`` (a callable returning an ``nn.Module``).
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from ..errors import ConfigError, ShapeError
from .adapter import Classifier, ClassifierProtocol, HeadAdapter

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "wrap_model", "build_model", "input_channels", "module_sha256", "HookedClassifier"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _last_linear(model: nn.Module) -> Tuple[str, nn.Linear]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ShapeError(f"{type(model).__name__} has no nn.Linear layer to use as the head; "
                         "pass (features_fn, head) or wrap it as an oaml.models.Classifier")
    return found[-1]


class HookedClassifier(Classifier):
    """``model(x)`` gives the logits; a forward hook on ``layer`` gives the feature (its input when
    ``take="input"``, its output otherwise, flattened); ``fc`` is the head."""

    def __init__(self, model: nn.Module, layer: str, fc: nn.Linear, take: str):
        super().__init__()
        self.model, self.fc, self.layer, self.take = model, fc, layer, take
        self.feature_dim, self.num_classes = int(fc.in_features), int(fc.out_features)
        self._checked = False

    def forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        seen: List[torch.Tensor] = []
        module = self.model.get_submodule(self.layer)
        # a copy: the model may change the output in place afterwards (``out += identity``, ReLU(inplace=True))
        handle = (module.register_forward_pre_hook(lambda m, args: seen.append(args[0])) if self.take == "input"
                  else module.register_forward_hook(lambda m, args, out: seen.append(out.clone() if torch.is_tensor(out) else out)))
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        where = f"{self.take} of {self.layer!r}"
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            raise ShapeError(f"{type(self.model).__name__}(x) must return logits (B, C), got {type(logits).__name__}; "
                             "pass (features_fn, head) instead")
        if not seen or not isinstance(seen[-1], torch.Tensor):
            raise ShapeError(f"the {where} was not a tensor during model(x); name another feature_layer")
        f = seen[-1].flatten(1)
        if not self._checked:
            if f.shape[1] != self.feature_dim:
                raise ShapeError(f"the {where} has {f.shape[1]} values per image but the head takes {self.feature_dim}; "
                                 "name the layer that feeds the head (feature_layer=...) or pass (features_fn, head)")
            with torch.no_grad():
                gap = float((self.fc(f) - logits).abs().max())
                scale = float(logits.abs().max())
            if gap > 1e-3 * (1.0 + scale):
                raise ShapeError(f"the head does not map the {where} to the model's logits (max difference {gap:.3g}); "
                                 "name the layer that feeds the head (feature_layer=...) or pass (features_fn, head)")
            self._checked = True
        return logits, f

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[1]

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def fc_weights(self):
        return self.fc.weight, self.fc.bias


class _Flat(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x).flatten(1)


def wrap_model(model, feature_layer: Optional[str] = None) -> Classifier:
    """``model`` (an ``nn.Module`` or a ``(features_fn, head)`` pair) as a Classifier, by the rules
    of this module's docstring."""
    if isinstance(model, tuple):
        if len(model) != 2 or not isinstance(model[1], nn.Linear) or not callable(model[0]):
            raise ConfigError("a (features_fn, head) pair needs a callable and an nn.Linear head")
        return HeadAdapter(_Flat(model[0]), model[1])
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module or a (features_fn, head) pair, got {type(model).__name__}")
    if feature_layer is not None:
        names = dict(model.named_modules())
        if feature_layer not in names or not feature_layer:
            raise ConfigError(f"{type(model).__name__} has no submodule {feature_layer!r}; "
                              f"it has {', '.join(n for n in names if n and '.' not in n)}")
        return HookedClassifier(model, feature_layer, _last_linear(model)[1], "output")
    if isinstance(model, ClassifierProtocol):
        return model  # type: ignore[return-value]
    if callable(getattr(model, "forward_head", None)) and callable(getattr(model, "get_classifier", None)):
        from .teachers import TimmTeacher

        return TimmTeacher(model)
    name, fc = _last_linear(model)
    return HookedClassifier(model, name, fc, "input")


def input_channels(model: nn.Module) -> int:
    """Input channels of the model's first ``nn.Conv2d`` (3 when it has none)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return int(conv.in_channels) if conv is not None else 3


def module_sha256(model: nn.Module) -> str:
    """sha256 of the model's state (names, dtypes, shapes, values): its identity for the feature cache."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build_model(spec: str, weights: Optional[str | Path] = None, num_classes: Optional[int] = None) -> nn.Module:
    """``torchvision:NAME`` / ``timm:NAME`` (built without weights, ``num_classes`` outputs) or
    ``module:function`` (called with no arguments); then the state dict in ``weights`` (a torch
    or safetensors file) is loaded strictly. Nothing is downloaded."""
    from .teachers import _strict_load, load_state_dict_file

    prefix, _, name = spec.partition(":")
    if not prefix or not name:
        raise ConfigError(f"--model expects torchvision:NAME, timm:NAME or module:function, got {spec!r}")
    kw = {"num_classes": num_classes} if num_classes else {}
    try:
        if prefix == "torchvision":
            import torchvision

            model = torchvision.models.get_model(name, weights=None, **kw)
        elif prefix == "timm":
            import timm

            model = timm.create_model(name, pretrained=False, **kw)
        else:
            model = getattr(importlib.import_module(prefix), name)()
    except (ImportError, AttributeError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"cannot build model {spec!r}: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    if weights is not None:
        try:
            _strict_load(model, load_state_dict_file(weights), str(weights))
        except RuntimeError as exc:  # shapes that differ (load_state_dict raises even when not strict)
            raise ConfigError(f"weights from {weights} do not fit {spec} with {num_classes or 'its default'} classes: "
                              f"{'; '.join(line.strip() for line in str(exc).splitlines()[1:])}") from None
    return model
