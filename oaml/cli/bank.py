"""oaml bank: build and inspect banks. features is OAML step 1, the ID feature bank.

    oaml bank features --teacher-checkpoint runs/teacher/teacher.pt --dataset fashion-mnist \\
        --split train --out runs/bank [--per-class 500] [--with-logits] [--resume] [--overwrite]
    oaml bank teacher-cache --teacher-checkpoint runs/teacher/teacher.pt --dataset fashion-mnist \\
        --split train --out runs/teacher_cache
    oaml bank info runs/bank

An interrupted features run leaves whole shards and an incomplete manifest; running the same
command again (--resume is the default) continues after the last whole shard.
"""

from __future__ import annotations

import argparse
import json

from ..errors import ConfigError
from .common import DATA_ROOT_HELP, DEVICE_HELP, add_progress_argument


def _teacher_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher-checkpoint", dest="teacher_checkpoint", default=None,
                   help="fine-tuned teacher (oaml teacher finetune); the usual choice")
    p.add_argument("--teacher", default=None, help="or a pretrained teacher by name (ImageNet head)")
    p.add_argument("--teacher-weights", dest="teacher_weights", default=None,
                   help="with --teacher: local weights file/folder or a Hugging Face id found in the local cache")
    p.add_argument("--dataset", required=True, help="ID dataset name (oaml data list)")
    p.add_argument("--split", default="train", help="dataset split (default train)")
    p.add_argument("--data-root", dest="data_root", default=None, help=DATA_ROOT_HELP)
    p.add_argument("--out", required=True, help="bank folder")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=256, help="images per teacher batch (default 256)")
    p.add_argument("--shard-size", dest="shard_size", type=int, default=65536, help="rows per shard (bounds memory)")
    p.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="continue an interrupted extraction (default)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="start over")
    p.add_argument("--overwrite", action="store_true", help="replace a bank made with other settings")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_progress_argument(p)
    p.add_argument("--skip-bad", dest="skip_bad", action="store_true",
                   help="drop unreadable (corrupt, truncated) image files of folder datasets and report how many")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bank", help="ID feature bank, teacher-output cache, bank info", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bank_command", metavar="SUBCOMMAND")

    pf = sub.add_parser("features", help="teacher features of the ID training images, per class (OAML step 1)")
    _teacher_args(pf)
    pf.add_argument("--per-class", dest="per_class", type=int, default=None,
                    help="a seeded subset of N images per class (the authors used 500)")
    pf.add_argument("--seed", type=int, default=0, help="seed of the --per-class subset (default 0)")
    pf.add_argument("--with-logits", dest="with_logits", action="store_true", help="also store logits in <out>/logits")
    pf.set_defaults(func=run_features)

    pc = sub.add_parser("teacher-cache", help="teacher logits + features of every sample, in dataset order")
    _teacher_args(pc)
    pc.set_defaults(func=run_cache)

    pi = sub.add_parser("info", help="print a bank's manifest summary")
    pi.add_argument("path", help="bank folder")
    pi.add_argument("--verify", action="store_true", help="check shard checksums")
    pi.set_defaults(func=run_info)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _load(args: argparse.Namespace):
    from ..data import build_dataset
    from ..models.teachers import TeacherConfig, load_teacher
    from ..utils.device import resolve_device

    from ..utils.io import check_writable
    from .teacher import set_threads

    check_writable(args.out)  # before loading anything; the space needed is checked once it is known
    set_threads(args)
    device = resolve_device(args.device)
    if args.teacher_checkpoint and args.teacher:
        raise ConfigError("give --teacher-checkpoint or --teacher, not both")
    if args.teacher_checkpoint:
        teacher = load_teacher(checkpoint=args.teacher_checkpoint, device=device)
    elif args.teacher:
        teacher = load_teacher(TeacherConfig(name=args.teacher, weights=args.teacher_weights), device=device)
    else:
        raise ConfigError("give --teacher-checkpoint (a fine-tuned teacher from `oaml teacher finetune`) or --teacher NAME")
    dataset = build_dataset(args.dataset, args.split, root=args.data_root, skip_bad=args.skip_bad)
    return teacher, dataset


def run_features(args: argparse.Namespace) -> int:
    import time

    from ..outliers.features import extract_feature_bank

    teacher, dataset = _load(args)
    t0 = time.perf_counter()
    bank = extract_feature_bank(
        teacher, dataset, args.out, batch_size=args.batch_size, per_class_limit=args.per_class,
        shard_size=args.shard_size, resume=args.resume, overwrite=args.overwrite, with_logits=args.with_logits,
        dataset_name=args.dataset, split=args.split, seed=args.seed, progress=args.progress,
    )
    size = sum((bank.path / s["file"]).stat().st_size for s in bank.manifest["shards"])
    print(f"ID feature bank {bank.path}: {len(bank)} x {bank.dim}, {len(bank.classes)} classes, "
          f"{size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f}s")
    return 0


def run_cache(args: argparse.Namespace) -> int:
    import time

    from ..outliers.features import TeacherOutputCache

    teacher, dataset = _load(args)
    t0 = time.perf_counter()
    cache = TeacherOutputCache.build(
        teacher, dataset, args.out, batch_size=args.batch_size, shard_size=args.shard_size, resume=args.resume,
        overwrite=args.overwrite, dataset_name=args.dataset, split=args.split, progress=args.progress,
    )
    print(f"teacher-output cache {args.out}: {len(cache)} samples, {time.perf_counter() - t0:.1f}s")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from ..outliers.bank import Bank

    bank = Bank.open(args.path, allow_incomplete=True, verify=args.verify)
    m = bank.manifest
    print(f"{bank.path}: kind {m['kind']}, {m['count']} x {m['dim']}, {len(m['shards'])} shards, "
          f"{'complete' if m.get('complete') else 'INCOMPLETE'}")
    if m.get("class_counts"):
        print("class counts:", json.dumps(m["class_counts"]))
    print("meta:", json.dumps(m.get("meta", {}), indent=2))
    return 0
