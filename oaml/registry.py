"""One decorator-filled registry type, used for scores, models, datasets, methods, generators.

    SCORES = Registry("score")

    @SCORES.register("msp")
    class MSP(Score): ...

    SCORES.create("msp", temperature=1.0)
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, Generic, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, T] = {}
        self._primary: Dict[str, T] = {}  # each entry under its own name (no aliases)

    def register(self, name: str | None = None, *aliases: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = (name or getattr(obj, "name", None) or obj.__name__).lower()  # type: ignore[attr-defined]
            for k in (key, *[a.lower() for a in aliases]):
                if k in self._items and self._items[k] is not obj:
                    raise ConfigError(f"{self.kind} {k!r} is registered twice")
                self._items[k] = obj
            self._primary[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        key = name.lower().strip()
        if key not in self._items:
            close = difflib.get_close_matches(key, list(self._items), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(sorted(self._items))}"
            )
        return self._items[key]

    def create(self, name: str, /, **kwargs: Any) -> Any:
        factory: Any = self.get(name)
        return factory(**kwargs)

    def names(self) -> list[str]:
        """Every registered name, aliases included."""
        return sorted(self._items)

    def primary_names(self) -> list[str]:
        """Each entry once, under the name it was registered with (no aliases)."""
        return sorted(self._primary)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
