"""``oaml train --config FILE --out DIR``: train one student with one method."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from .common import add_progress_argument, add_set_argument, prepare_out

if TYPE_CHECKING:
    from ..training.config import TrainConfig


def register(sub) -> None:
    p = sub.add_parser("train", help="train a student with one method (vanilla, oaml, oe, ...)")
    p.add_argument("--config", help="training config YAML (see configs/)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, log.csv, summary.json)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--overwrite", action="store_true", help="delete what an earlier run wrote in --out first (other files are kept)")
    add_set_argument(p)
    add_progress_argument(p)
    p.set_defaults(func=run)


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
    from ..config import load_config
    from ..training.build import build_trainer, method_requirements
    from ..training.config import TrainConfig, check_same_config
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
