"""oaml teacher: list, verify and fine-tune teachers (OAML step 0).

    oaml teacher list
    oaml teacher verify [--teacher efficientnet_lite0] [--teacher-weights PATH]
    oaml teacher finetune --teacher efficientnet_lite0 --dataset fashion_mnist --out runs/teacher \\
        [--image-size 64] [--epochs 30] [--backbone-lr 1e-4 --train-blocks 3] [--train-limit N]

finetune writes <out>/teacher.pt (weights, preprocessing, class count, val accuracy) and
<out>/finetune.json (history, timings, test accuracy when --test-split is given).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError
from .common import DATA_ROOT_HELP, DEVICE_HELP, add_progress_argument


def _add_teacher_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default="efficientnet_lite0",
                   help="registry name, timm:<arch> or torchvision:<arch> (default efficientnet_lite0, the offline teacher)")
    p.add_argument("--teacher-weights", dest="teacher_weights", default=None,
                   help="local weights file/folder or a Hugging Face id found in the local cache")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (on a shared machine 1 can be many times faster than 2)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("teacher", help="list, verify and fine-tune teachers", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="teacher_command", metavar="SUBCOMMAND")

    pl = sub.add_parser("list", help="registered teachers")
    pl.set_defaults(func=run_list)

    pv = sub.add_parser("verify", help="top-1/top-5 of the pretrained teacher on real ImageNet photos")
    _add_teacher_args(pv)
    pv.add_argument("--image-size", dest="image_size", type=int, default=None, help="override the input size")
    pv.add_argument("--min-top5", dest="min_top5", type=float, default=0.5,
                    help="fail (exit 1) below this top-5 rate (default 0.5)")
    pv.add_argument("--json", action="store_true", help="print the full result as JSON")
    pv.set_defaults(func=run_verify)

    pf = sub.add_parser("finetune", help="fine-tune the teacher's head (and optionally last stages) on the ID classes")
    _add_teacher_args(pf)
    pf.add_argument("--dataset", required=True, help="ID dataset name (oaml data list)")
    pf.add_argument("--data-root", dest="data_root", default=None, help=DATA_ROOT_HELP)
    pf.add_argument("--train-split", dest="train_split", default="train", help="split to fine-tune on (default train)")
    pf.add_argument("--val-split", dest="val_split", default="val",
                    help="split that picks the best epoch (default val)")
    pf.add_argument("--test-split", dest="test_split", default=None, help="also report accuracy on this split")
    pf.add_argument("--out", required=True, help="output folder (teacher.pt, finetune.json)")
    pf.add_argument("--image-size", dest="image_size", type=int, default=None,
                    help="teacher input size (default: the teacher's own, 224 for ImageNet models)")
    pf.add_argument("--config", default=None, help="YAML with FinetuneConfig fields")
    pf.add_argument("--epochs", type=int, default=None, help="training epochs (default 30)")
    pf.add_argument("--batch-size", dest="batch_size", type=int, default=None, help="batch size (default 256)")
    pf.add_argument("--head-lr", dest="head_lr", type=float, default=None,
                    help="learning rate of the classifier head (default 1e-3)")
    pf.add_argument("--backbone-lr", dest="backbone_lr", type=float, default=None,
                    help="also train the backbone with this lr (default: head only)")
    pf.add_argument("--train-blocks", dest="train_blocks", type=int, default=None,
                    help="with --backbone-lr: train only the last N stages (default: all)")
    pf.add_argument("--train-limit", dest="train_limit", type=int, default=None,
                    help="use a seeded class-stratified subset of N training images")
    pf.add_argument("--no-cache", dest="cache", action="store_false", default=None,
                    help="do not cache frozen features/activations")
    pf.add_argument("--augment", action="store_true", default=None, help="random horizontal flips (needs --no-cache)")
    pf.add_argument("--seed", type=int, default=None, help="random seed of the subset, the batch order and the head (default 0)")
    pf.add_argument("--overwrite", action="store_true", help="replace an existing <out>/teacher.pt")
    add_progress_argument(pf, default=None)
    pf.set_defaults(func=run_finetune)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def set_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def run_list(args: argparse.Namespace) -> int:
    from ..models.teachers import TEACHERS

    for name in TEACHERS.names():
        print(name + (":<arch>" if name in ("timm", "torchvision") else ""))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from ..models.teachers import TeacherConfig, load_teacher, verify_imagenet_teacher
    from ..utils.device import resolve_device

    set_threads(args)
    cfg = TeacherConfig(name=args.teacher, weights=args.teacher_weights)
    if args.image_size:
        cfg = cfg.model_copy(update={"preprocess": cfg.preprocess.model_copy(update={"size": args.image_size})})
    teacher = load_teacher(cfg, device=resolve_device(args.device))
    res = verify_imagenet_teacher(teacher.model, teacher.preprocess)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for row in res["images"]:
            mark = "ok " if row["top1_ok"] else ("top5" if row["top5_ok"] else "MISS")
            print(f"  {mark:4s} {row['image']:28s} labels {row['labels']} top5 {row['top5']}")
        print(f"{args.teacher} ({teacher.info.get('weights')}), preprocessing {teacher.preprocess.config()}: "
              f"top-1 {res['top1']}/{res['n']}, top-5 {res['top5']}/{res['n']}")
    if res["top5_rate"] < args.min_top5:
        print(f"FAILED: top-5 rate {res['top5_rate']:.2f} < {args.min_top5}: the weights or the preprocessing are wrong")
        return 1
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..data import build_dataset
    from ..models.finetune import FinetuneConfig, evaluate_teacher, finetune_teacher
    from ..models.teachers import TeacherConfig, load_teacher
    from ..utils.device import resolve_device
    from ..utils.io import check_writable, write_json

    set_threads(args)
    overrides = []
    for key in ("epochs", "batch_size", "head_lr", "backbone_lr", "train_blocks", "train_limit", "cache", "augment", "seed", "progress"):
        v = getattr(args, key)
        if v is not None:
            overrides.append(f"{key}={json.dumps(v)}")
    overrides.append(f"device={args.device}")
    cfg = load_config(FinetuneConfig, args.config, overrides)
    out = Path(args.out)
    ckpt = out / "teacher.pt"
    if ckpt.exists() and not args.overwrite:
        raise ConfigError(f"{ckpt} exists; pass --overwrite to replace it or choose another --out")
    check_writable(out)  # before loading data and fine-tuning
    tcfg = TeacherConfig(name=args.teacher, weights=args.teacher_weights)
    if args.image_size:
        tcfg = tcfg.model_copy(update={"preprocess": tcfg.preprocess.model_copy(update={"size": args.image_size})})
    train = build_dataset(args.dataset, args.train_split, root=args.data_root)
    val = build_dataset(args.dataset, args.val_split, root=args.data_root)
    teacher = load_teacher(tcfg, device=resolve_device(args.device))
    print(f"teacher {args.teacher} ({teacher.info.get('weights')}), preprocessing {teacher.preprocess.config()}")
    info = {"name": args.dataset, "train_split": args.train_split, "val_split": args.val_split}
    path = finetune_teacher(teacher, train, val, cfg, out_path=ckpt, dataset_info=info)
    from ..models.teachers import read_teacher_checkpoint

    saved = read_teacher_checkpoint(path)
    summary = {k: saved[k] for k in ("val_accuracy", "best_epoch", "history", "timings", "finetune", "dataset")}
    summary["checkpoint"] = str(path)
    summary["preprocess"] = saved["preprocess"]
    if args.test_split:
        test = build_dataset(args.dataset, args.test_split, root=args.data_root)
        summary["test_split"] = args.test_split
        summary["test_accuracy"] = evaluate_teacher(load_teacher(checkpoint=path, device=resolve_device(args.device)), test,
                                                    progress=cfg.progress)
    write_json(out / "finetune.json", summary)
    t = summary["timings"]
    msg = f"wrote {path}: val accuracy {summary['val_accuracy']:.4f} (epoch {summary['best_epoch']}), {t['total_s']:.0f}s"
    if "test_accuracy" in summary:
        msg += f", {args.test_split} accuracy {summary['test_accuracy']:.4f}"
    print(msg)
    return 0
