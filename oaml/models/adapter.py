"""The typed model interface every part of oaml relies on (no forward flags, no string switches).

A :class:`Classifier` is an ``nn.Module`` that exposes

- ``features(x)``      -> penultimate feature ``(B, D)`` (after global pooling, post-activation)
- ``head(f)``          -> logits ``(B, C)`` from penultimate features
- ``forward(x)``       -> logits
- ``forward_features(x)`` -> ``(logits, features)`` in one pass
- ``feature_maps(x)``  -> list of intermediate maps ``[(B, C_l, H_l, W_l), ...]`` (for Gram)
- ``fc_weights()``     -> ``(W (C, D), b (C,) or None)`` of the final linear layer
- ``feature_dim`` and ``num_classes`` attributes

Students in :mod:`oaml.models.resnet` implement it directly; :class:`HeadAdapter` wraps any
backbone that returns pooled features plus an ``nn.Linear`` head (timm / torchvision models).
"""

from __future__ import annotations

from typing import List, Optional, Protocol, Tuple, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class ClassifierProtocol(Protocol):
    feature_dim: int
    num_classes: int

    def features(self, x: torch.Tensor) -> torch.Tensor: ...

    def head(self, f: torch.Tensor) -> torch.Tensor: ...

    def forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]: ...

    def feature_maps(self, x: torch.Tensor) -> List[torch.Tensor]: ...

    def fc_weights(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]: ...


class Classifier(nn.Module):
    """Base class implementing the shared parts of the protocol on top of ``features``/``head``."""

    feature_dim: int
    num_classes: int

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def head(self, f: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def feature_maps(self, x: torch.Tensor) -> List[torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} does not expose intermediate feature maps")

    def fc_weights(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.head(f), f

    def maps_and_logits(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """``(feature_maps(x), self(x))``; two passes here, one in models whose logits follow from their last map
        (ResNet), which override it."""
        return self.feature_maps(x), self(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class HeadAdapter(Classifier):
    """Wrap ``backbone`` (x -> pooled features ``(B, D)``) and a linear ``fc`` into a Classifier."""

    def __init__(self, backbone: nn.Module, fc: nn.Linear, maps_fn=None):
        super().__init__()
        self.backbone = backbone
        self.fc = fc
        self.feature_dim = fc.in_features
        self.num_classes = fc.out_features
        self._maps_fn = maps_fn

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f)

    def feature_maps(self, x: torch.Tensor) -> List[torch.Tensor]:
        if self._maps_fn is None:
            return super().feature_maps(x)
        return self._maps_fn(x)

    def fc_weights(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.fc.weight, self.fc.bias


class FlipAveraged(Classifier):
    """Test-time augmentation by horizontal flips: the features of an input are the mean of
    ``inner``'s features of the input and of its mirror image, the logits are ``inner``'s head on
    them. For a linear head (``fc_weights``) that is also the mean of the two logits, so scores
    that use ``(W, b)`` with these features stay consistent. Both views run as one batch.

    Feature maps (Gram) are not averaged: :meth:`feature_maps` refuses rather than mix views.
    """

    def __init__(self, inner: Classifier):
        super().__init__()
        self.inner = inner
        self.feature_dim = inner.feature_dim
        self.num_classes = inner.num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        f = self.inner.features(torch.cat([x, x.flip(-1)]))
        return (f[:n] + f[n:]) * 0.5

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.inner.head(f)

    def feature_maps(self, x: torch.Tensor) -> List[torch.Tensor]:
        raise NotImplementedError("feature maps of a flip-averaged (tta: hflip) model are not defined; use tta: none")

    def fc_weights(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.inner.fc_weights()
