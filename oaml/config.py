"""Typed configuration: pydantic models that reject unknown keys, loaded from YAML.

Every component keeps its own config class next to its code (for example
``oaml.outliers.knn.KNNSamplerConfig``); they all derive from :class:`StrictModel`, so a typo
in a YAML file is an error that names the key and lists the allowed ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Type, TypeVar

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
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of keys to values, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


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
