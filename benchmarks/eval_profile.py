"""Profile `oaml eval` stage by stage: image-file check, feature extraction per split, each score's
fit / score / metrics, report writing and plots; writes benchmarks/results/eval_profile.json.

    .venv/bin/python benchmarks/eval_profile.py [--checkpoint CKPT] [--scores default|all|a,b,...]

The evaluation is the demo's (`fmnist`, the paper's 11 scores and MLS by default, fit on 10,000
ID train images, plots on) through ``oaml.evaluation.api.evaluate_checkpoint`` with a fresh
feature cache, so extraction is measured too. Without --checkpoint a demo-sized student is trained
first (quarter-width ResNet-18, 1 epoch on 10,000 images: the weights do not change the cost).
The goal (issue: performance) is scoring + metrics under 10% of the evaluation's wall time.
Run it on an unloaded machine (the script records `uptime`'s load).
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _student(work: Path) -> Path:
    from oaml.training.build import build_trainer
    from oaml.training.config import TrainConfig

    cfg = TrainConfig.from_dict({
        "data": {"benchmark": "fmnist", "train_limit": 10000},
        "student": {"width": 0.25}, "preprocess": {"channels": 1},
        "optim": {"lr": 0.1, "epochs": 1}, "tensorboard": False, "progress": False,
    })
    build_trainer(cfg, work / "student").fit()
    return work / "student" / "best.pt"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a student checkpoint (default: train a demo-sized one first)")
    ap.add_argument("--scores", default="default", help="default, all, or comma-separated names")
    ap.add_argument("--fit-limit", type=int, default=10000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_profile.json"))
    a = ap.parse_args()

    from oaml.evaluation.api import evaluate_checkpoint
    from oaml.evaluation.evaluator import resolve_scores

    load = os.getloadavg()[0]
    scores = resolve_scores([s.strip() for s in a.scores.split(",")])
    with tempfile.TemporaryDirectory(prefix="oaml-eval-profile-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        ckpt = Path(a.checkpoint) if a.checkpoint else _student(work)
        train_s = None if a.checkpoint else time.perf_counter() - t
        t = time.perf_counter()
        evaluate_checkpoint(ckpt, "fmnist", work / "eval", scores=scores, fit_limit=a.fit_limit, plots=True, device="auto")
        wall = time.perf_counter() - t
        prof = json.loads((work / "eval" / "profile.json").read_text())

    total = prof["total"]
    stages = {"check_files": prof["check_files"], "features": sum(prof["features"].values()), "fit": prof["fit"],
              "score": prof["score"], "metrics": prof["metrics"], "ood_val": prof.get("ood_val", 0.0),
              "write": prof["write"], "plots": prof["plots"]}
    stages["other"] = total - sum(stages.values())
    scoring = prof["fit"] + prof["score"] + prof["metrics"]
    print(f"oaml eval profile: {len(scores)} scores, total {total:.1f} s (wall {wall:.1f} s incl. model loading)")
    for k, v in stages.items():
        print(f"  {k:12s} {v:8.2f} s  {100 * v / total:5.1f} %")
    print(f"  scoring + metrics (fit + score + metrics): {scoring:.2f} s = {100 * scoring / total:.1f} % (goal < 10 %)")
    slow = sorted(prof["per_score"].items(), key=lambda kv: -sum(kv[1].values()))[:5]
    print("  slowest scores: " + ", ".join(f"{k} {sum(v.values()):.2f} s" for k, v in slow))
    row = {
        "scores": scores, "fit_limit": a.fit_limit, "checkpoint": str(a.checkpoint) if a.checkpoint else "demo-sized student (1 epoch)",
        "student_train_seconds": train_s, "wall_seconds": wall, "profile_seconds": prof, "stages_seconds": stages,
        "scoring_fraction": scoring / total, "goal": "fit + score + metrics < 10% of the evaluation's wall time",
        "met": scoring / total < 0.10,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "load_1min_before": load},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(row, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
