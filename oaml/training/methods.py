"""Methods = named sets of loss terms with their default settings (no forked trainers).

    method:
      name: oaml
      terms:                 # optional overrides, merged onto the method's defaults
        club_dood: {weight: 0}       # weight 0 switches a term off (it is not even built)
        logit_kd: {tau: 2.0}

Adding a method is one ``METHODS.register`` call; every method runs in
:class:`oaml.training.trainer.Trainer`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from pydantic import Field

from ..config import StrictModel
from ..errors import ConfigError
from ..registry import Registry

METHODS: Registry = Registry("method")


@dataclass(frozen=True)
class Method:
    name: str
    terms: Dict[str, Dict[str, Any]]
    description: str
    paper: str = ""
    needs_teacher: bool = False
    notes: str = ""
    warmup_steps: int = 0  # default of MethodConfig.warmup_steps
    extra: Dict[str, Any] = field(default_factory=dict)


def register_method(method: Method) -> Method:
    METHODS.register(method.name)(method)
    return method


class MethodConfig(StrictModel):
    name: str = "vanilla"
    terms: Dict[str, Dict[str, Any]] = {}
    # batches over which the terms' own modules are fitted with the student frozen before the
    # first step (None: the method's default, ``Method.warmup_steps``)
    warmup_steps: Optional[int] = Field(None, ge=0)


def method_warmup_steps(cfg: MethodConfig) -> int:
    return cfg.warmup_steps if cfg.warmup_steps is not None else METHODS.get(cfg.name).warmup_steps


def resolve_terms(cfg: MethodConfig) -> Dict[str, Dict[str, Any]]:
    """The method's default terms with the config's overrides merged in; weight-0 terms dropped."""
    from .terms import TERMS

    method: Method = METHODS.get(cfg.name)
    terms = copy.deepcopy(method.terms)
    for name, override in cfg.terms.items():
        if name not in TERMS:
            TERMS.get(name)  # raises a ConfigError listing the known terms
        if not isinstance(override, dict):
            raise ConfigError(f"method.terms.{name} must be a mapping of settings, got {override!r}")
        terms.setdefault(name, {}).update(override)
    return {k: v for k, v in terms.items() if float(v.get("weight", 1.0)) != 0.0}


def validate_method(cfg: MethodConfig, source: str = "method") -> None:
    """Parse every term's settings now, so that a bad value fails before hours of other work."""
    from .terms import TERMS

    for name, settings in resolve_terms(cfg).items():
        TERMS.get(name).config_cls.from_dict(settings, source=f"loss term {name!r} ({source}.terms.{name})")


register_method(
    Method(
        name="vanilla",
        terms={"ce": {}},
        description="Plain cross-entropy training (also the equal-compute continuation baseline).",
    )
)
