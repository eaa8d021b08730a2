"""``oaml sample``: C-OOD outlier embeddings by k-NN boundary sampling of an ID feature bank.

    oaml sample --bank runs/id_bank --out runs/cood [--config sampler.yaml] [--K 300] [--R 10] ...

Settings come from ``KNNSamplerConfig`` defaults, then the YAML file, then the flags given.
"""

from __future__ import annotations

import argparse
import logging

from ..errors import ConfigError
from .common import DEVICE_HELP, add_progress_argument

log = logging.getLogger(__name__)

# flag -> (config key, type, help)
_OVERRIDES = [
    ("--K", "K", int, "K of the K-th nearest neighbour distance (default 300; clamped to class size - 1)"),
    ("--S", "S", int, "boundary points per class (default 50)"),
    ("--N", "N", int, "Gaussian candidates per boundary point (default 1500)"),
    ("--sigma", "sigma", float, "noise std per dimension (default 0.07)"),
    ("--m", "m", int, "candidates kept per boundary point (default 2)"),
    ("--R", "R", int, "repeats; each class yields R*S*m vectors (default 10)"),
    ("--features-per-class", "features_per_class", str, "ID features used per class: a number or 'all' (default 500)"),
    ("--backend", "backend", str, "torch | faiss | auto (default auto: torch for exact search, faiss for ivf)"),
    ("--faiss-index", "faiss_index", str, "flat (exact) | ivf (approximate, faiss only)"),
    ("--ivf-nlist", "ivf_nlist", int, "IVF lists (default: min(4*sqrt(n), n/39))"),
    ("--ivf-nprobe", "ivf_nprobe", int, "IVF lists probed per query (default 8)"),
    ("--chunk-size", "chunk_size", int, "query rows per search block (default: from --chunk-mb)"),
    ("--chunk-mb", "chunk_mb", float, "working memory of one search block in MiB (default 128)"),
    ("--device", "device", str, DEVICE_HELP),
    ("--noise-device", "noise_device", str, "cpu (device-independent results, default) | compute"),
    ("--seed", "seed", int, "base seed; class c uses a seed derived from (seed, c)"),
    ("--rescale-norm", "rescale_norm", float, "multiply the unit outputs by this norm (e.g. token-embedding norm for SD)"),
]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample",
        help="C-OOD: sample outlier embeddings at the class boundaries of an ID feature bank (k-NN)",
        description="Per class: the S points with the largest K-th neighbour distance are boundary points; "
        "around each, N candidates normalise(b + sigma*eps) are drawn and the m farthest (by K-th neighbour "
        "distance) kept; repeated R times. Writes a kind='cood' bank; resumable class by class.",
    )
    p.add_argument("--bank", required=True, help="ID feature bank folder (input)")
    p.add_argument("--out", required=True, help="C-OOD bank folder (output)")
    p.add_argument("--config", help="YAML file with KNNSamplerConfig keys")
    for flag, key, typ, help_ in _OVERRIDES:
        p.add_argument(flag, dest=f"cfg_{key}", type=typ, default=None, help=help_)
    p.add_argument("--reference-bugs", dest="cfg_reference_bugs", action="store_true", default=None,
                   help="ABLATION/REPRODUCTION ONLY: reproduce the authors' scrambled selection and shared noise")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue an interrupted run in --out (default: on)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing bank in --out and rebuild it")
    p.add_argument("--shard-size", dest="shard_size", type=int, default=None,
                   help="vectors per bank shard (default: whole classes, about 32k vectors); an interrupted run "
                        "keeps its whole shards")
    add_progress_argument(p)
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    from ..outliers.knn import KNNSamplerConfig

    data = {}
    if args.config:
        data = KNNSamplerConfig.from_yaml(args.config).model_dump()
    for key, value in vars(args).items():
        if key.startswith("cfg_") and value is not None:
            key = key[4:]
            if key == "features_per_class":
                if value.lower() in ("all", "none"):
                    value = None
                else:
                    try:
                        value = int(value)
                    except ValueError:
                        raise ConfigError(f"--features-per-class takes a number or 'all', got {value!r}") from None
            data[key] = value
    return KNNSamplerConfig.from_dict(data, source="oaml sample settings")


def run(args: argparse.Namespace) -> int:
    from ..outliers.knn import sample_outliers

    cfg = build_config(args)
    if args.shard_size is not None and args.shard_size < 1:
        raise ConfigError(f"--shard-size must be positive, got {args.shard_size}")
    bank = sample_outliers(args.bank, args.out, cfg, progress=args.progress, resume=args.resume,
                           overwrite=args.overwrite, shard_size=args.shard_size)
    counts = bank.manifest.get("class_counts", {})
    print(f"C-OOD bank {bank.path}: {len(bank)} vectors of dim {bank.dim}, {len(counts)} classes "
          f"({cfg.per_class} per class){' [reference-bugs mode]' if cfg.reference_bugs else ''}")
    return 0
