"""Typed configuration: pydantic models that reject unknown keys, loaded from YAML.

Every component keeps its own config class next to its code (for example
``oaml.outliers.knn.KNNSamplerConfig``); they all derive from :class:`StrictModel`, so a typo
in a YAML file is an error that names the key and lists the allowed ones. :func:`load_config`
reads one: defaults, then a YAML file (:func:`read_config_file`), then ``--set`` overrides
(:func:`apply_overrides`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Type, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError

M = TypeVar("M", bound="StrictModel")


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @classmethod
    def from_dict(cls: Type[M], data: dict[str, Any] | None, source: str = "config") -> M:
        try:
            return cls.model_validate(data or {})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, cls, source)) from None

    @classmethod
    def from_yaml(cls: Type[M], path: str | Path) -> M:
        return cls.from_dict(read_config_file(path), source=str(path))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def read_config_file(path: str | Path) -> Dict[str, Any]:
    """A YAML config file as a mapping (empty file: ``{}``), or a ConfigError naming the file and what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of keys to values, got {type(data).__name__}")
    return data or {}


def apply_overrides(data: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """Apply ``--set KEY=VALUE`` items in place: dotted keys reach into sections, VALUE is YAML."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(cls: Type[M], path: Optional[str | Path], overrides: List[str]) -> M:
    """``cls`` from its defaults, then the YAML file ``path`` (if any), then the ``--set`` overrides."""
    data: Dict[str, Any] = read_config_file(path) if path else {}
    return cls.from_dict(apply_overrides(data, overrides), source=str(path or "config"))


def format_validation_error(exc: ValidationError, cls: type, source: str) -> str:
    lines = [f"invalid {source} ({cls.__name__}):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            parent = cls
            allowed: list[str] = []
            try:
                for part in err["loc"][:-1]:
                    ann = parent.model_fields[str(part)].annotation  # type: ignore[attr-defined]
                    parent = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None  # type: ignore[assignment]
                    if parent is None:
                        break
                if parent is not None:
                    allowed = sorted(parent.model_fields)  # type: ignore[attr-defined]
            except Exception:  # pragma: no cover - best effort hint only
                allowed = []
            hint = f" (allowed keys: {', '.join(allowed)})" if allowed else ""
            lines.append(f"  unknown key {loc!r}{hint}")
        else:
            lines.append(f"  {loc}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)
