"""Benchmark: cost of one OAML training step relative to a vanilla step (same student, same batch),
and the speed options of the student's training (channels_last, torch.compile, batch size, threads).

    .venv/bin/python benchmarks/train_step.py [--steps 20] [--warmup 3] [--teacher-checkpoint runs/demo/teacher/teacher.pt]
    python3 benchmarks/train_step.py --device cuda --scale paper   # on a GPU (benchmarks/gpu_check.sh)
    # the speed options, each contender timed in each variant in one process (speedups vs the first variant):
    .venv/bin/python benchmarks/train_step.py --threads 2 --contenders vanilla,oaml-cached \\
        --variants base,cl,compile,cl+compile,bs256,cl+compile+bs256 --out benchmarks/results/train_step_speed.json

Contenders, each a Trainer built by oaml.training.build.build_trainer with the offline demo's
settings (Fashion-MNIST, quarter-width ResNet-18, batch 128) and timed on the SAME ID batch:
  vanilla             CE only
  oaml-cached         oaml (CE + logit KD + teacher-selected image outliers: 32 outlier images per
                      128 ID images in the same forward pass, with OE),
                      the teacher's outputs for the training set computed once (teacher.cache)
  oaml-live           the same with the teacher run on the ID batch every step
  oaml-paper-cached   the paper's loss (CE + logit/feature KD + MI to C-OOD and D-OOD), cached teacher
  oaml-paper-live     the same with the teacher run every step
  oaml-cached-rR      oaml-cached with R outlier images per ID image (image_outliers.ratio; oaml's is 0.5),
                      e.g. oaml-cached-r0.25: 32 outlier images per 128 ID images
The image outliers never need a live teacher: the teacher embeds and scores them once, when the
set is built (``oaml.outliers.images``); that one-off cost (for the demo's 20,000 candidates) is
reported as ``image_outlier_set_s``.
The teacher is the demo's fine-tuned checkpoint when given (--teacher-checkpoint), otherwise the
ImageNet-pretrained EfficientNet-Lite0 at the demo's 32 px with a fresh 10-class head (the step
cost does not depend on the head's weights). C-OOD / D-OOD banks are random vectors of the
teacher's feature width, R*S*m = 400 per class (what the step reads is independent of their values).

Variants (--variants, comma-separated; each one '+'-joined tokens applied on top of the flags):
  base          the flags as given (--channels-last, --compile, --batch-size, --threads, ...)
  cl            TrainConfig.channels_last: student weights and input batches in NHWC memory format
  compile       TrainConfig.compile: torch.compile (inductor) of the student's training forward;
                its one-off compile falls in the warm-up steps (first_step_s; a later variant with
                the same shapes reuses the compiled graph, so its first step is short)
  amp           TrainConfig.amp = true: autocast to bfloat16 on a CPU with native bfloat16 (AVX-512 BF16 /
                AMX), float16/bfloat16 on CUDA; CHANGES THE NUMERICS (bfloat16 activations): flagged
                changes_numerics, its effect on accuracy and AUROC measured by benchmarks/amp_quality.py
  bsN           ID batch size N (outliers scale with it); CHANGES THE OPTIMISATION (fewer, larger
                steps per epoch): flagged changes_optimisation and reported apart from the others
  tN            N intra-op threads (torch.set_num_threads) for this variant
  fd            torch.set_flush_denormal(True)
  nomkldnn      torch.backends.mkldnn.enabled = False (the oneDNN convolutions off, for comparison)
Each contender's speedup is its ID images/s over the first variant's.

Time: median wall time of `Trainer._step` over --steps steps after --warmup steps, CPU or CUDA
(synchronised); images/s = ID batch / median step time (forward_images_per_s also counts the
outlier images in the same forward pass). The one-off cost of building the cache is reported
separately. The data part that the trainer does outside `_step` (fetching a batch: BatchFetcher's
tensor indexing, or a DataLoader for file datasets) and the ID batch's augment + preprocess inside
it are timed apart (data_s, data_fraction): the most that overlapping data loading with compute
(DataLoader workers, prefetching) could save per step.
Writes benchmarks/results/train_step.json (--out); the goals are oaml-cached within 1.5x of vanilla,
and for the speed options >= 1.5x the images/s of the first variant for vanilla and oaml-cached.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONTENDERS = ("vanilla", "oaml-cached", "oaml-live", "oaml-paper-cached", "oaml-paper-live")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _random_bank(path: Path, classes: int, per_class: int, dim: int, teacher) -> str:
    from oaml.outliers.bank import write_bank

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((classes * per_class, dim)).astype(np.float32)
    labels = np.repeat(np.arange(classes), per_class)
    write_bank(path, vecs, labels, kind="cood", meta={"source": "benchmark-random", "teacher": teacher.identity()})
    return str(path)


def _variant(spec: str, base: dict) -> dict:
    """The options of one --variants entry: ``base`` or '+'-joined tokens over the flags' options."""
    opts = dict(base)
    for tok in spec.split("+"):
        tok = tok.strip()
        if tok == "base":
            continue
        if tok == "cl":
            opts["channels_last"] = True
        elif tok == "compile":
            opts["compile"] = True
        elif tok == "amp":
            opts["amp"] = True
        elif tok == "fd":
            opts["flush_denormal"] = True
        elif tok == "nomkldnn":
            opts["mkldnn"] = False
        elif re.fullmatch(r"bs\d+", tok):
            opts["batch_size"] = int(tok[2:])
        elif re.fullmatch(r"t\d+", tok):
            opts["threads"] = int(tok[1:])
        else:
            raise SystemExit(f"--variants: unknown token {tok!r} in {spec!r} (base, cl, compile, amp, bsN, tN, fd, nomkldnn)")
    if opts["batch_size"] < 2:
        raise SystemExit(f"--variants {spec!r}: batch size must be >= 2")
    return opts


class _Process:
    """Process-wide settings of one variant (threads, denormals, oneDNN), restored afterwards."""

    def __init__(self, opts: dict):
        self.opts = opts

    def __enter__(self):
        self.saved = (torch.get_num_threads(), torch.backends.mkldnn.enabled)
        torch.set_num_threads(self.opts["threads"])
        torch.backends.mkldnn.enabled = self.opts["mkldnn"]
        torch.set_flush_denormal(self.opts["flush_denormal"])
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved[0])
        torch.backends.mkldnn.enabled = self.saved[1]
        torch.set_flush_denormal(False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (with --compile/compile variants: >= 2)")
    ap.add_argument("--teacher-checkpoint", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
    ap.add_argument("--scale", choices=["demo", "paper"], default="demo",
                    help="demo: the offline demo's student (width 1/4, 28 px) and 48 px teacher; paper: a full-width "
                         "ResNet-18 with the ImageNet stem at 224 px and the teacher at 224 px (the paper's student size)")
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma-separated subset of {', '.join(CONTENDERS)}")
    ap.add_argument("--variants", default="base", help="comma-separated variants (see above); the first is the reference")
    ap.add_argument("--channels-last", action="store_true", help="TrainConfig.channels_last in every variant")
    ap.add_argument("--compile", action="store_true", help="TrainConfig.compile in every variant")
    ap.add_argument("--amp", action="store_true", help="TrainConfig.amp = true in every variant (bfloat16 on a CPU with it)")
    ap.add_argument("--batch-size", type=int, default=None, help="ID batch size (default: the demo's, 128)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--flush-denormal", action="store_true", help="torch.set_flush_denormal(True)")
    ap.add_argument("--no-mkldnn", action="store_true", help="torch.backends.mkldnn.enabled = False")
    ap.add_argument("--train-limit", type=int, default=2048, help="ID training images (teacher cache built over them)")
    ap.add_argument("--outlier-candidates", type=int, default=None,
                    help="candidate images of the image-outlier set (default: the demo's; fewer for a quick check)")
    args = ap.parse_args()
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    bad = [c for c in contenders if c not in CONTENDERS and not re.fullmatch(r"oaml-cached-r\d*\.?\d+", c)]
    if bad or not contenders:
        raise SystemExit(f"--contenders: unknown {bad}; choose from {', '.join(CONTENDERS)} or oaml-cached-rR (R: outlier ratio)")

    from oaml.models.teachers import TeacherConfig, load_teacher, load_teacher_checkpoint
    from oaml.pipeline import PipelineConfig, _train_config, StudentRunConfig
    from oaml.training.build import build_trainer
    from oaml.training.methods import MethodConfig
    from oaml.training.trainer import augment_batch
    from oaml.utils.device import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    demo = PipelineConfig().model_copy(update={"device": str(device), "progress": False, "train_limit": args.train_limit})
    if args.scale == "paper":
        demo = demo.model_copy(update={
            "student": demo.student.model_copy(update={"width": 1.0, "stem": "imagenet"}),
            "preprocess": demo.preprocess.model_copy(update={"size": 224}),
            "teacher": demo.teacher.model_copy(update={"size": 224}),
        })
    base = {"channels_last": args.channels_last, "compile": args.compile, "amp": args.amp, "batch_size": args.batch_size or demo.batch_size,
            "threads": torch.get_num_threads(), "flush_denormal": args.flush_denormal, "mkldnn": not args.no_mkldnn}
    variants = {v.strip(): _variant(v, base) for v in args.variants.split(",") if v.strip()}
    if not variants:
        raise SystemExit("--variants: none given")
    if max(o["batch_size"] for o in variants.values()) > args.train_limit:
        raise SystemExit("--train-limit must hold at least one batch of the largest batch size")
    warmup = max(args.warmup, 2) if any(o["compile"] for o in variants.values()) else args.warmup

    if args.teacher_checkpoint:
        teacher = load_teacher_checkpoint(args.teacher_checkpoint, device=device)
    else:
        teacher = load_teacher(TeacherConfig.from_dict({"name": demo.teacher.name, "preprocess": {"size": demo.teacher.size}}), device=device)
        teacher.reset_head(10)
    tmp = Path(tempfile.mkdtemp(prefix="oaml-train-step-"))
    per_class = demo.sampler.R * demo.sampler.S * demo.sampler.m
    banks = {"cood": _random_bank(tmp / "cood", 10, per_class, teacher.feature_dim, teacher),
             "dood": _random_bank(tmp / "dood", 10, per_class, teacher.feature_dim, teacher)}
    from oaml.data import get_benchmark
    from oaml.outliers.images import build_image_outliers
    from oaml.training.build import limited

    train_set = limited(get_benchmark(demo.benchmark).id_train(), demo.train_limit, 0)
    t0 = time.perf_counter()
    img_cfg = demo.image_outliers.model_copy(update={"select": False, **({"candidates": args.outlier_candidates} if args.outlier_candidates else {})})  # selection cost is part of the one-off below
    build_image_outliers(teacher, train_set, None, tmp / "image_outliers", img_cfg, progress=False)
    image_set_s = time.perf_counter() - t0
    banks["image_outliers"] = str(tmp / "image_outliers")
    runs = {m: StudentRunConfig(optim=demo.oaml.optim, method=MethodConfig(name=m, warmup_steps=0))
            for m in ("vanilla", "oaml", "oaml-paper")}
    configs = {
        "vanilla": (_train_config(demo, runs["vanilla"], None, None, {}, 0), None),
        "oaml-cached": (_train_config(demo, runs["oaml"], None, "-", banks, 0), True),
        "oaml-live": (_train_config(demo, runs["oaml"], None, "-", banks, 0), False),
        "oaml-paper-cached": (_train_config(demo, runs["oaml-paper"], None, "-", banks, 0), True),
        "oaml-paper-live": (_train_config(demo, runs["oaml-paper"], None, "-", banks, 0), False),
    }
    for name in contenders:
        if name.startswith("oaml-cached-r"):
            run = StudentRunConfig(optim=demo.oaml.optim, method=MethodConfig(
                name="oaml", warmup_steps=0, terms={"image_outliers": {"ratio": float(name[len("oaml-cached-r"):])}}))
            configs[name] = (_train_config(demo, run, None, "-", banks, 0), True)
    teacher_cache = tmp / "teacher-cache"  # the cached contenders of later variants reuse the teacher's outputs
    results: dict = {"variants": {}}
    batches: dict = {}
    for vname, opts in variants.items():
        vres: dict = {"options": opts, "changes_optimisation": opts["batch_size"] != base["batch_size"],
                      "changes_numerics": opts["amp"] != base["amp"], "contenders": {}}
        results["variants"][vname] = vres
        with _Process(opts):
            for name in contenders:
                cfg, cache = configs[name]
                if cache is not None:
                    cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"cache": cache, "cache_dir": str(teacher_cache)})})
                cfg = cfg.model_copy(update={"channels_last": opts["channels_last"], "compile": opts["compile"], "amp": opts["amp"],
                                             "data": cfg.data.model_copy(update={"batch_size": opts["batch_size"]})})
                t0 = time.perf_counter()
                trainer = build_trainer(cfg, tmp / "runs" / vname / name, teacher=teacher if cache is not None else None)
                build_s = time.perf_counter() - t0
                bs = opts["batch_size"]
                if bs not in batches:
                    idx = torch.arange(bs)
                    raw, labels = trainer.train.get(idx.tolist())
                    batches[bs] = (raw, labels, idx)
                batch = batches[bs]
                # the first step through a recorder: the forward batch (ID + outliers) and the compile cost
                net, seen = trainer.step_net, {}
                trainer.step_net = lambda x, _net=net: (seen.setdefault("forward", x.shape[0]), _net(x))[1]
                g = torch.Generator().manual_seed(0)
                _sync(device)
                t = time.perf_counter()
                trainer._step(*batch, g)
                _sync(device)
                first_s = time.perf_counter() - t
                trainer.step_net = net
                times = []
                for i in range(warmup - 1 + args.steps):
                    _sync(device)
                    t = time.perf_counter()
                    trainer._step(*batch, g)
                    _sync(device)
                    if i >= warmup - 1:
                        times.append(time.perf_counter() - t)
                # the data part: a fresh batch as fit() fetches it, then the ID batch's augment + preprocess
                gd = torch.Generator().manual_seed(1)
                aug = cfg.data.augment
                fetch, prep = [], []
                for _ in range(max(5, min(args.steps, 20))):
                    ids = torch.randperm(len(trainer.train), generator=gd)[:bs].tolist()
                    t = time.perf_counter()
                    raw_d, _ = next(iter(trainer.train.batches([ids])))
                    t1 = time.perf_counter()
                    r = augment_batch(raw_d, aug.flip, aug.crop_padding, gd) if (aug.flip or aug.crop_padding) else raw_d
                    x = trainer._fmt(trainer.preprocess(r.to(device)))
                    _sync(device)
                    fetch.append(t1 - t)
                    prep.append(time.perf_counter() - t1)
                med = statistics.median(times)
                data_s = statistics.median(fetch) + statistics.median(prep)
                vres["contenders"][name] = {
                    "median_step_s": med, "mean_step_s": statistics.fmean(times), "min_step_s": min(times),
                    "id_images_per_s": bs / med, "forward_images_per_s": seen["forward"] / med, "forward_batch": seen["forward"],
                    "first_step_s": first_s, "build_s": build_s, "steps": len(times),
                    "fetch_s": statistics.median(fetch), "prep_s": statistics.median(prep), "data_s": data_s,
                    "data_fraction": data_s / (med + data_s), "fast_fetch_path": trainer.train.fast,
                }
                print(f"{vname:20s} {name:18s} median {1000 * med:8.1f} ms/step  {bs / med:7.0f} ID img/s  "
                      f"(forward {seen['forward']}, first step {first_s:.1f} s, data {1000 * data_s:.1f} ms, build {build_s:.1f} s)",
                      flush=True)
                del trainer
    ref_name = next(iter(variants))
    ref = results["variants"][ref_name]["contenders"]
    for vname, vres in results["variants"].items():
        c = vres["contenders"]
        vres["speedup_vs_" + ref_name] = {k: c[k]["id_images_per_s"] / ref[k]["id_images_per_s"] for k in c}
        if "vanilla" in c:
            vres["ratio_to_vanilla"] = {k: c[k]["median_step_s"] / c["vanilla"]["median_step_s"] for k in c}
    first = results["variants"][ref_name]
    # the layout of earlier versions (the first variant's numbers at the top)
    results["contenders"] = first["contenders"]
    if "ratio_to_vanilla" in first:
        results["ratio_to_vanilla"] = first["ratio_to_vanilla"]
    results["image_outlier_set_s"] = image_set_s
    results["image_outlier_set_note"] = (f"teacher outputs of {img_cfg.candidates} candidate images, once per run "
                                         "(without the boundary test, which adds a k-NN search against the ID bank)")
    if "ratio_to_vanilla" in first and "oaml-cached" in first["ratio_to_vanilla"]:
        results["goal"] = "oaml-cached / vanilla <= 1.5"
        results["goal_met"] = first["ratio_to_vanilla"]["oaml-cached"] <= 1.5
    if len(variants) > 1:
        key = [k for k in ("vanilla", "oaml-cached") if k in contenders]
        results["speed_goal"] = f">= 1.5x the ID images/s of variant {ref_name!r} for {' and '.join(key)}"
        results["speed_goal_met"] = {v: all(r["speedup_vs_" + ref_name][k] >= 1.5 for k in key)
                                     for v, r in results["variants"].items() if v != ref_name}
    results["setup"] = {"scale": args.scale, "student": demo.student.model_dump(), "student_size": demo.preprocess.size or 28,
                        "batch_size": base["batch_size"], "teacher": teacher.identity(), "teacher_size": demo.teacher.size,
                        "bank_per_class": per_class, "device": str(device), "torch_threads": base["threads"],
                        "train_limit": args.train_limit, "steps": args.steps, "warmup": warmup,
                        "options": base, "variants": list(variants)}
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    results["loadavg_1min_at_start"] = load_at_start  # > 0.5 or so on this machine: other jobs ran, the times are not clean
    results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for vname, vres in results["variants"].items():
        for k in vres["contenders"]:
            extra = f"  {vres['ratio_to_vanilla'][k]:5.2f}x vanilla" if "ratio_to_vanilla" in vres else ""
            print(f"{vname:20s} {k:18s} {vres['speedup_vs_' + ref_name][k]:5.2f}x the images/s of {ref_name}{extra}"
                  f"{'  (batch size changes the optimisation)' if vres['changes_optimisation'] else ''}"
                  f"{'  (bfloat16: changes the numerics)' if vres['changes_numerics'] else ''}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
