"""oaml generate: D-OOD bank from a C-OOD bank with a diffusion generator.

    oaml generate --config gen.yaml [--resume | --overwrite]
    oaml generate --cood runs/x/cood --out runs/x/dood --generator feature_diffusion --id-bank runs/x/id
    oaml generate --cood runs/x/cood --out runs/x/dood-sd --generator stable_diffusion --sd-model /models/sd-v1-4

Flags given on the command line override the YAML. Under torchrun every rank generates a
contiguous block of batches and rank 0 merges them.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .common import DEVICE_HELP, add_progress_argument

if TYPE_CHECKING:
    from ..config import StrictModel

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="D-OOD bank from a C-OOD bank (feature diffusion or Stable Diffusion)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML with GenerateConfig keys (cood, out, generator, train, ...)")
    p.add_argument("--cood", help="C-OOD bank folder")
    p.add_argument("--out", help="D-OOD bank folder to write")
    p.add_argument("--generator", choices=["feature_diffusion", "stable_diffusion"],
                   help="feature_diffusion (default; trained on --id-bank) or stable_diffusion (needs --sd-model)")
    p.add_argument("--id-bank", dest="id_bank", help="ID feature bank (trains the feature diffusion model)")
    p.add_argument("--model", help="feature diffusion model file (default <out>.fdiff.safetensors)")
    p.add_argument("--sd-model", dest="sd_model", help="Stable Diffusion folder or cached HF id")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="vectors per generation batch (default 256)")
    p.add_argument("--num-samples", dest="num_samples", type=int,
                   help="D-OOD vectors to write (default: one per C-OOD vector)")
    p.add_argument("--seed", type=int, help="base seed; batch b uses a seed derived from (seed, b) (default 0)")
    p.add_argument("--strength", type=float, help="feature diffusion SDEdit strength")
    p.add_argument("--steps", type=int, help="sampling steps (feature diffusion DDIM or SD)")
    p.add_argument("--train-steps", dest="train_steps", type=int, help="feature diffusion training steps")
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--threads", type=int, help="torch CPU threads for feature diffusion (1 is fastest on a busy machine)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", default=None, help="continue an interrupted bank (default)")
    g.add_argument("--no-resume", dest="resume", action="store_false", help="restart an interrupted bank")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing bank/model")
    add_progress_argument(p)
    p.set_defaults(func=run)


def _set(model: StrictModel, key: str, value: object) -> None:
    if value is not None:
        setattr(model, key, value)


def run(args: argparse.Namespace) -> int:
    from ..config import read_config_file
    from ..outliers.generators.run import GenerateConfig, run_generate

    data = read_config_file(args.config) if args.config else {}
    for key in ("cood", "out", "generator", "id_bank", "model", "batch_size", "num_samples", "seed", "resume",
                "overwrite"):
        if getattr(args, key, None) is not None:
            data[key] = getattr(args, key)
    for key in ("cood", "out"):
        if not data.get(key):
            raise ConfigError(f"--{key} (or `{key}:` in --config) is required")
    cfg = GenerateConfig.from_dict(data, source=args.config or "command line")
    _set(cfg.feature_diffusion, "strength", args.strength)
    if args.steps is not None:
        cfg.feature_diffusion.steps = args.steps
        cfg.stable_diffusion.steps = args.steps
    _set(cfg.train, "train_steps", args.train_steps)
    _set(cfg.stable_diffusion, "model", args.sd_model)
    if args.threads is not None:
        cfg.train.num_threads = args.threads
        cfg.feature_diffusion.num_threads = args.threads
    if args.device:
        for sub in (cfg.train, cfg.feature_diffusion, cfg.stable_diffusion):
            sub.device = args.device
    bank = run_generate(cfg, progress=args.progress)
    print(f"D-OOD bank {bank.path}: {len(bank)} vectors of dim {bank.dim} ({cfg.generator})")
    return 0
