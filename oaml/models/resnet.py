"""ResNet students that implement the :class:`~oaml.models.adapter.Classifier` interface.

Built from torchvision's ``BasicBlock``/``Bottleneck`` with the same attribute names as
``torchvision.models.ResNet`` (``conv1``, ``bn1``, ``layer1..4``, ``fc``), so ImageNet-layout
weights from torchvision load directly. Two stems:

- ``cifar``: 3x3 conv, stride 1, no max-pool (the usual CIFAR ResNet, for 28-32 px inputs);
- ``imagenet``: 7x7 conv, stride 2, 3x3 max-pool (224 px inputs).

``width`` multiplies the channel counts (64, 128, 256, 512) for fast CPU students; the
penultimate feature is the global-average-pooled, post-ReLU ``layer4`` output.
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Type

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from ..errors import ConfigError
from ..registry import Registry
from .adapter import Classifier

MODELS: Registry = Registry("model")


class ResNet(Classifier):
    def __init__(
        self,
        block: Type[BasicBlock] | Type[Bottleneck],
        layers: List[int],
        num_classes: int,
        in_channels: int = 3,
        width: float = 1.0,
        stem: str = "cifar",
    ):
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
        if in_channels not in (1, 3):
            raise ConfigError(f"in_channels must be 1 or 3, got {in_channels}")
        if not 0 < width <= 4:
            raise ConfigError(f"width must be in (0, 4], got {width}")
        if stem not in ("cifar", "imagenet"):
            raise ConfigError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        planes = [max(4, int(round(p * width))) for p in (64, 128, 256, 512)]
        self.inplanes = planes[0]
        self.stem = stem
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, planes[0], 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, planes[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, planes[0], layers[0], 1)
        self.layer2 = self._make_layer(block, planes[1], layers[1], 2)
        self.layer3 = self._make_layer(block, planes[2], layers[2], 2)
        self.layer4 = self._make_layer(block, planes[3], layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = planes[3] * block.expansion
        self.num_classes = num_classes
        self.fc = nn.Linear(self.feature_dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _maps(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = [x]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            out.append(x)
        return out

    def feature_maps(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Stem output and the output of each of the four stages."""
        return self._maps(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self._maps(x)[-1]), 1)

    def maps_and_logits(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Feature maps and logits from one pass."""
        maps = self._maps(x)
        return maps, self.fc(torch.flatten(self.avgpool(maps[-1]), 1))

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f)

    def fc_weights(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.fc.weight, self.fc.bias


@MODELS.register("resnet18")
def resnet18(num_classes: int, in_channels: int = 3, width: float = 1.0, stem: str = "cifar") -> ResNet:
    """ResNet-18; ``stem='cifar'`` (default) for small images, ``'imagenet'`` for 224 px."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, width, stem)


@MODELS.register("resnet34")
def resnet34(num_classes: int, in_channels: int = 3, width: float = 1.0, stem: str = "cifar") -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, in_channels, width, stem)


@MODELS.register("resnet50")
def resnet50(num_classes: int, in_channels: int = 3, width: float = 1.0, stem: str = "imagenet") -> ResNet:
    """ResNet-50 (ImageNet layout by default; torchvision V1 weights load with ``load_weights``)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, width, stem)


def create_model(name: str, **kwargs) -> ResNet:
    return MODELS.create(name, **kwargs)


def load_weights(model: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Load a state dict (torchvision ``.pth`` or an oaml checkpoint's ``model`` entry)."""
    from ..errors import ShapeError

    state = torch.load(path, map_location="cpu", weights_only=True)
    made = ""
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        arch = state.get("arch")
        if isinstance(arch, dict):  # an oaml student checkpoint says what it is
            made = (f"; the file holds a {arch.get('name')} (width {arch.get('width')}, {arch.get('in_channels')} input "
                    f"channels, {arch.get('num_classes')} classes)")
        state = state["model"]
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        k = bad[0]
        raise ShapeError(
            f"weights in {path} do not fit this model: {k} has shape {tuple(state[k].shape)} in the file "
            f"but {tuple(own[k].shape)} in the model (architecture, width, input channels or class count differ){made}"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise ShapeError(
            f"weights in {path} do not fit this model (another architecture?): missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}{made}"
        )
    return model
