"""Benchmark: what bfloat16 mixed precision (TrainConfig.amp = true) does to a trained student on the CPU.

    .venv/bin/python benchmarks/amp_quality.py [--seeds 0 1 2] [--train-limit 10000] [--epochs 6] [--threads 2]

`amp: true` runs the student's forward pass under bfloat16 autocast on a CPU with native bfloat16
(AVX-512 BF16 or AMX; float32 master weights, no loss scaling). It is faster (benchmarks/train_step.py,
variant `amp`) but not equal to float32 up to rounding: the activations keep 8 bits of mantissa. This
script measures the difference where it matters, on trained models: for each seed it trains the
offline demo's vanilla student (Fashion-MNIST, quarter-width ResNet-18, 28 px, batch 128, SGD
Nesterov, cosine) twice from the same initialisation and batch order, once in float32 and once with
amp, evaluates both with the same scores on the `fmnist` benchmark, and reports the paired
differences (bfloat16 - float32) with 95% t-intervals: ID test accuracy, best validation accuracy,
AUROC and FPR@95 (mean over the OOD test sets) per score, and the training time per epoch.
Each pair runs back to back in one process; the time ratio is only meaningful on an unloaded machine
(load average recorded). Writes benchmarks/results/amp_quality.json (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-limit", type=int, default=10000, help="class-stratified ID training images")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--scores", nargs="+", default=["msp", "ebo", "gen", "knn", "mds"])
    ap.add_argument("--fit-limit", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--work", default=None, help="run folder (default: a temporary one, removed at the end)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "amp_quality.json"))
    args = ap.parse_args()

    from oaml.bench import paired_difference
    from oaml.pipeline import Pipeline, PipelineConfig
    from oaml.utils.device import cpu_bf16_supported, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device("auto")
    if device.type == "cpu" and not cpu_bf16_supported():
        raise SystemExit("this CPU has no native bfloat16 (AVX-512 BF16 / AMX): amp: true is refused here, nothing to measure")
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="oaml-amp-quality-"))
    runs: dict = {"float32": [], "bfloat16": []}
    for seed in args.seeds:
        for prec in ("float32", "bfloat16"):
            cfg = PipelineConfig.from_dict({
                "seed": seed, "train_limit": args.train_limit, "progress": False, "amp": prec == "bfloat16",
                "vanilla": {"optim": {"lr": args.lr, "epochs": args.epochs}},
                "eval": {"scores": args.scores, "fit_limit": args.fit_limit, "plots": False},
            }, source="amp_quality")
            p = Pipeline(cfg, work / f"seed{seed}-{prec}")
            t0 = time.perf_counter()
            ckpt = p.train("vanilla", cfg.vanilla)
            train_s = time.perf_counter() - t0
            res = p.evaluate("vanilla", ckpt)
            summ = json.loads((ckpt.parent / "summary.json").read_text())
            row = {
                "seed": seed,
                "train_s": train_s,
                "seconds_per_epoch": summ.get("seconds_per_epoch"),
                "best_val_accuracy": 100 * summ["best_val_accuracy"],
                "id_accuracy": res["id_accuracy"],
                "scores": {s: {"auroc": res["scores"][s]["all"]["auroc"], "fpr95": res["scores"][s]["all"]["fpr95"]} for s in args.scores},
            }
            runs[prec].append(row)
            print(f"seed {seed} {prec:8s}: {row['seconds_per_epoch']:.1f} s/epoch, val {row['best_val_accuracy']:.2f}, "
                  f"test {row['id_accuracy']:.2f}, " + ", ".join(f"{s} {v['auroc']:.2f}" for s, v in row["scores"].items()), flush=True)

    f32, b16 = runs["float32"], runs["bfloat16"]

    def diff(get):  # bfloat16 - float32 of one figure, paired by seed
        return paired_difference([get(r) for r in b16], [get(r) for r in f32])

    paired = {
        "id_accuracy": diff(lambda r: r["id_accuracy"]),
        "best_val_accuracy": diff(lambda r: r["best_val_accuracy"]),
        "scores": {s: {m: diff(lambda r, s=s, m=m: r["scores"][s][m]) for m in ("auroc", "fpr95")} for s in args.scores},
    }
    speed = [a["seconds_per_epoch"] / b["seconds_per_epoch"] for a, b in zip(f32, b16)]
    out = {
        "what": "bfloat16 autocast (TrainConfig.amp = true) vs float32, paired by seed: bfloat16 - float32",
        "setup": {"benchmark": "fmnist", "student": "resnet18 width 0.25, 28 px", "train_limit": args.train_limit,
                  "epochs": args.epochs, "lr": args.lr, "seeds": args.seeds, "scores": args.scores, "fit_limit": args.fit_limit,
                  "metric": "AUROC / FPR@95 in percent, mean over the benchmark's OOD test sets"},
        "runs": runs,
        "paired": paired,
        "epoch_speedup_bf16": {"per_seed": speed, "mean": float(np.mean(speed))},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}",
        "loadavg_1min_at_start": load_start,
        "loadavg_1min_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    fmt = lambda d: f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d["ci95"] else f"{d['mean']:+.2f}"  # noqa: E731
    print(f"bfloat16 - float32 over {len(args.seeds)} seeds (mean [95% CI]):")
    print(f"  ID test accuracy {fmt(paired['id_accuracy'])}, best val accuracy {fmt(paired['best_val_accuracy'])}")
    for s in args.scores:
        print(f"  {s:6s} AUROC {fmt(paired['scores'][s]['auroc'])}, FPR@95 {fmt(paired['scores'][s]['fpr95'])}")
    print(f"  seconds per epoch: float32 / bfloat16 = {out['epoch_speedup_bf16']['mean']:.2f}x")
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {dest}")
    if not args.work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)  # the temporary folder this script created
    return 0


if __name__ == "__main__":
    sys.exit(main())
