"""Helpers shared by the commands: config loading with ``--set`` overrides, output folders."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any, Dict, List, Type, TypeVar

import yaml

from ..config import StrictModel
from ..errors import ConfigError

M = TypeVar("M", bound=StrictModel)


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=0.01 (repeatable; VALUE is YAML)",
    )


def apply_overrides(data: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
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


def load_config(cls: Type[M], path: str | None, overrides: List[str]) -> M:
    data: Dict[str, Any] = read_config_file(path) if path else {}
    return cls.from_dict(apply_overrides(data, overrides), source=str(path or "config"))


def read_config_file(path: str | Path) -> Dict[str, Any]:
    """A YAML config file as a mapping, or a ConfigError naming the file and what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of keys to values")
    return data


def prepare_out(out: str | Path, resume: bool, overwrite: bool, marker: str, need_bytes: int = 0,
                resumable: bool = True) -> Path:
    """Refuse to write over earlier results unless --resume or --overwrite says what to do; fail
    at once if ``out`` cannot be written or lacks ``need_bytes`` of free space."""
    from ..utils.io import check_writable

    out = Path(out)
    if (out / marker).exists() and not resume:
        if not overwrite:
            how = "pass --resume to continue or --overwrite to replace them" if resumable else \
                "pass --overwrite to replace them or choose another --out"
            raise ConfigError(f"{out} already holds results ({marker}); {how}")
        check_writable(out, need_bytes)  # before deleting anything
        shutil.rmtree(out)
    return check_writable(out, need_bytes)
