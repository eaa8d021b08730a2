"""``oaml train --config FILE --out DIR``: train one student with one method."""

from __future__ import annotations

import json

from ..training.config import TrainConfig
from .common import add_set_argument, load_config, prepare_out


def register(sub) -> None:
    p = sub.add_parser("train", help="train a student with one method (vanilla, oaml, oe, ...)")
    p.add_argument("--config", help="training config YAML (see configs/)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, log.csv, summary.json)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier run in --out first")
    add_set_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..training.build import build_trainer
    from ..utils.io import atomic_write_text

    cfg = load_config(TrainConfig, args.config, args.overrides)
    out = prepare_out(args.out, args.resume, args.overwrite, "last.pt")
    atomic_write_text(out / "config.yaml", cfg.to_yaml())
    summary = build_trainer(cfg, out).fit(resume=args.resume)
    print(json.dumps({k: summary[k] for k in ("method", "best_val_accuracy", "epochs", "seconds_per_epoch")}, indent=2))
    print(f"best checkpoint: {out / 'best.pt'}")
    return 0
