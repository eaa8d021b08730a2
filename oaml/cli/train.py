"""``oaml train --config FILE --out DIR``: train one student with one method."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from ..training.config import TrainConfig
from .common import add_set_argument, load_config, prepare_out

# settings that do not change what a run computes: a resumed run may change them
_RUNTIME_KEYS = {"progress", "tensorboard", "device", "data.num_workers", "data.eval_batch_size"}


def register(sub) -> None:
    p = sub.add_parser("train", help="train a student with one method (vanilla, oaml, oe, ...)")
    p.add_argument("--config", help="training config YAML (see configs/)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, log.csv, summary.json)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier run in --out first")
    add_set_argument(p)
    p.set_defaults(func=run)


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def check_same_config(out: Path, cfg: TrainConfig) -> None:
    """``--resume`` continues a run only with the config it was started with (runtime keys aside)."""
    import yaml

    from ..errors import ConfigError

    prev = out / "config.yaml"
    if not prev.is_file():
        return
    old = _flat(yaml.safe_load(prev.read_text()) or {})
    new = _flat(cfg.model_dump(mode="json"))
    # keys only one side has (a setting added or removed between versions) take the other's value
    diff = sorted(k for k in set(old) & set(new) if old[k] != new[k] and k not in _RUNTIME_KEYS)
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:5])
        raise ConfigError(
            f"{out} holds a run started with another config ({shown}{' ...' if len(diff) > 5 else ''}); "
            "--resume continues a run only with its own config: pass --overwrite to start again or choose another --out"
        )


def checkpoint_bytes(cfg: TrainConfig) -> int:
    """Disk space the run's checkpoints take: last.pt (weights, SGD momentum and the copy written
    next to it while it is replaced) and best.pt."""
    import torch

    from ..data import get_benchmark
    from ..models.resnet import create_model

    bench = get_benchmark(cfg.data.benchmark)
    with torch.device("meta"):
        model = create_model(cfg.student.name, num_classes=bench.num_classes, in_channels=bench.channels,
                             width=cfg.student.width, stem=cfg.student.stem)
    n = sum(p.numel() for p in model.parameters())
    return 4 * n * 5 + (1 << 20)


def run(args) -> int:
    from ..training.build import build_trainer, method_requirements
    from ..utils.io import atomic_write_text

    cfg = load_config(TrainConfig, args.config, args.overrides)
    method_requirements(cfg.method)  # an unknown method or term fails before anything is written
    if args.resume and not args.overwrite:
        check_same_config(Path(args.out), cfg)
    out = prepare_out(args.out, args.resume, args.overwrite, "last.pt", need_bytes=checkpoint_bytes(cfg))
    atomic_write_text(out / "config.yaml", cfg.to_yaml())
    summary = build_trainer(cfg, out).fit(resume=args.resume)
    print(json.dumps({k: summary[k] for k in ("method", "best_val_accuracy", "epochs", "seconds_per_epoch")}, indent=2))
    print(f"best checkpoint: {out / 'best.pt'}")
    return 0
