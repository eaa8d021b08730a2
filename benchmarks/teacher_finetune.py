"""Fine-tune the offline teacher (EfficientNet-Lite0) on Fashion-MNIST with one setting and print
its validation accuracy per epoch and its time: how the demo's teacher setting was chosen.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/teacher_finetune.py SIZE TRAIN_BLOCKS EPOCHS TRAIN_LIMIT LR [--out FILE]

e.g. `48 3 2 20000 0.001` is the demo default and `96 3 5 10000 0.001 --augment --label-smoothing 0.1
--tta hflip` the v2 fmnist grid's teacher (TRAIN_BLOCKS None = full fine-tune). The result is
printed as JSON and appended to --out (default benchmarks/results/teacher_finetune.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("size", type=int)
    ap.add_argument("train_blocks")
    ap.add_argument("epochs", type=int)
    ap.add_argument("train_limit", type=int)
    ap.add_argument("lr", type=float)
    ap.add_argument("--augment", action="store_true", help="random horizontal flips (no cached activations)")
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--tta", default="none", choices=["none", "hflip"], help="hflip: validate on the mean over each image and its mirror")
    ap.add_argument("--benchmark", default="fmnist")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "teacher_finetune.jsonl"))
    a = ap.parse_args()

    from oaml.data import get_benchmark
    from oaml.models.finetune import FinetuneConfig, finetune_teacher
    from oaml.models.teachers import TeacherConfig, load_teacher

    bench = get_benchmark(a.benchmark)
    teacher = load_teacher(TeacherConfig.from_dict({"name": "efficientnet_lite0", "preprocess": {"size": a.size}, "tta": a.tta}))
    blocks = None if a.train_blocks == "None" else int(a.train_blocks)
    cfg = FinetuneConfig(epochs=a.epochs, head_lr=a.lr, backbone_lr=a.lr, train_blocks=blocks, train_limit=a.train_limit, progress=False,
                         augment=a.augment, cache=not a.augment, label_smoothing=a.label_smoothing, weight_decay=a.weight_decay)
    t0 = time.time()
    r = finetune_teacher(teacher, bench.id_train(None), bench.id_val(None), cfg, out_path=None, num_classes=bench.num_classes)
    row = {"benchmark": a.benchmark, "augment": a.augment, "tta": a.tta, "label_smoothing": a.label_smoothing,
           "weight_decay": a.weight_decay, "size": a.size, "train_blocks": blocks, "epochs": a.epochs, "train_limit": a.train_limit, "lr": a.lr,
           "best_val_accuracy": r.get("val_accuracy"), "val_per_epoch": [h["val_acc"] for h in r.get("history", [])],
           "seconds": time.time() - t0, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(row))
    with open(a.out, "a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
