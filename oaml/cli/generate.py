"""``oaml generate``: D-OOD bank from a C-OOD bank with a diffusion generator.

    oaml generate --config gen.yaml [--resume | --overwrite]
    oaml generate --cood runs/x/cood --out runs/x/dood --generator feature_diffusion --id-bank runs/x/id
    oaml generate --cood ... --out ... --generator stable_diffusion --sd-model /models/sd-v1-4

Flags given on the command line override the YAML. Under ``torchrun`` every rank generates a
contiguous block of batches and rank 0 merges them (see ``oaml.outliers.generators.base``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import yaml

from ..config import StrictModel
from ..errors import ConfigError

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
    p.add_argument("--generator", choices=["feature_diffusion", "stable_diffusion"])
    p.add_argument("--id-bank", dest="id_bank", help="ID feature bank (trains the feature diffusion model)")
    p.add_argument("--model", help="feature diffusion model file (default <out>.fdiff.safetensors)")
    p.add_argument("--sd-model", dest="sd_model", help="Stable Diffusion folder or cached HF id")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--num-samples", dest="num_samples", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--strength", type=float, help="feature diffusion SDEdit strength")
    p.add_argument("--steps", type=int, help="sampling steps (feature diffusion DDIM or SD)")
    p.add_argument("--train-steps", dest="train_steps", type=int, help="feature diffusion training steps")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, help="torch CPU threads for feature diffusion (1 is fastest on a busy machine)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", default=None, help="continue an interrupted bank (default)")
    g.add_argument("--no-resume", dest="resume", action="store_false", help="restart an interrupted bank")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing bank/model")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run)


def _set(model: StrictModel, key: str, value: object) -> None:
    if value is not None:
        setattr(model, key, value)


def run(args: argparse.Namespace) -> int:
    from ..outliers.generators.run import GenerateConfig, run_generate

    data: dict = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping")
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
