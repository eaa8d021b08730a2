"""``oaml eval``: post-hoc OOD scores of a checkpoint or any torchvision / timm / own model, on a
benchmark or on your own ImageFolder data, written as a report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from ..errors import ConfigError
from .common import add_progress_argument, scores_help

EXAMPLES = """examples:
  oaml eval --checkpoint runs/train/best.pt --benchmark fmnist --out runs/eval
  oaml eval --checkpoint runs/train/best.pt --out runs/eval --ood mine=my_ood_images --score-arg knn.K=100
  oaml eval --model torchvision:resnet18 --weights resnet18.pt --id-train data/train --id-test data/test --ood mine=data/ood --input-size 224 --out runs/byo
  oaml eval --model timm:resnet18 --weights resnet18.safetensors --benchmark cifar10 --input-size 32 --mean 0.49,0.48,0.45 --std 0.25,0.24,0.26 --out runs/byo
  oaml eval --model mypackage.models:build --weights model.pt --feature-layer avgpool --benchmark cifar10 --out runs/byo

--model builds torchvision:NAME / timm:NAME without downloading anything (weights from --weights),
or calls module:function (returning an nn.Module). The head is the model's last nn.Linear and the
feature its input, or the output of --feature-layer (timm: forward_head(pre_logits=True)). Your
--ood sets are reported in their own rows and group 'extra' on a benchmark (its near/far/all
averages stay as published) and in 'far' on your own ID data, unless :near/:far/:extra is given.
"""


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a classifier with post-hoc OOD scores on a benchmark or your own data",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="student checkpoint (best.pt of a training run)")
    which.add_argument("--model", metavar="SPEC", help="torchvision:NAME, timm:NAME or module:function")
    p.add_argument("--weights", help="state dict for --model (.pt/.pth or .safetensors); without it the model is random")
    p.add_argument("--feature-layer", dest="feature_layer", metavar="NAME",
                   help="--model submodule whose output is the feature (default: the input of the last nn.Linear)")
    p.add_argument("--benchmark", default="fmnist", help="benchmark name (oaml data list)")
    p.add_argument("--id-train", dest="id_train", metavar="DIR", help="your ID training images (ImageFolder: DIR/<class>/<image>)")
    p.add_argument("--id-val", dest="id_val", metavar="DIR", help="your ID validation images (default: --id-train)")
    p.add_argument("--id-test", dest="id_test", metavar="DIR", help="your ID test images (ImageFolder, same classes)")
    p.add_argument("--input-size", dest="input_size", type=int, help="--model input side length (images are resized to it)")
    p.add_argument("--mean", help="--model normalisation mean, comma-separated (default ImageNet's)")
    p.add_argument("--std", help="--model normalisation std, comma-separated (default ImageNet's)")
    p.add_argument("--scores", default="default", help=scores_help())
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--ood", action="append", default=[], metavar="NAME=PATH[:extra|near|far]",
                   help="add your own OOD folder of images (repeatable)")
    p.add_argument("--score-arg", action="append", default=[], metavar="SCORE.PARAM=VALUE",
                   help="score hyperparameter, e.g. knn.K=100 (repeatable)")
    p.add_argument("--aps", action="store_true",
                   help="choose the hyperparameters of every evaluated score that has a grid on ID-val vs OOD-val only (OpenOOD's "
                        "APS grids; scores that need the model keep their settings)")
    p.add_argument("--grid", action="append", default=[], metavar="SCORE.PARAM=V1,V2,...",
                   help="search this grid on ID-val vs OOD-val (repeatable)")
    p.add_argument("--fit-limit", type=int, default=None, help="at most this many ID train images to fit scores")
    p.add_argument("--batch-size", type=int, default=512, help="images per forward pass when extracting features (default 512)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: a GPU when there is one)")
    p.add_argument("--root", default=None, help="data root (default $OAML_DATA or ~/.cache/oaml/data)")
    p.add_argument("--no-plots", action="store_true", help="write no plots (tables and raw scores only)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier report in --out (at the end of a successful run; only the files oaml wrote)")
    p.add_argument("--skip-bad", dest="skip_bad", action="store_true",
                   help="drop unreadable (corrupt, truncated) image files of folder datasets and report how many")
    add_progress_argument(p)
    p.set_defaults(func=run)


def parse_score_args(items: List[str]) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--score-arg expects SCORE.PARAM=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        score, param = key.split(".", 1)
        out.setdefault(score.lower(), {})[param] = yaml.safe_load(raw)
    return out


def _floats(text: Optional[str], what: str) -> Optional[List[float]]:
    try:
        return None if text is None else [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{what} expects comma-separated numbers, got {text!r}") from None


def parse_ood(items: List[str], default_group: str) -> List[tuple]:
    """``NAME=PATH[:extra|near|far]`` items as ``(name, path, group)``."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--ood expects NAME=PATH[:extra|near|far], got {item!r}")
        name, rest = item.split("=", 1)
        group = default_group
        if ":" in rest and rest.rsplit(":", 1)[-1] in ("extra", "near", "far"):
            rest, group = rest.rsplit(":", 1)
        out.append((name, rest, group))
    return out


def run(args) -> int:
    from ..data import get_benchmark
    from ..evaluation.api import evaluate, evaluate_checkpoint
    from ..evaluation.evaluator import default_grids, resolve_scores
    from ..utils.io import check_writable

    scores = resolve_scores([s.strip() for s in args.scores.split(",") if s.strip()])
    own = bool(args.id_train or args.id_test)
    if own and not (args.id_train and args.id_test and args.model):
        raise ConfigError("your own ID data needs --id-train, --id-test and --model")
    model_only = [f"--{k.replace('_', '-')}" for k in ("weights", "feature_layer", "input_size", "mean", "std") if getattr(args, k) is not None]
    if args.checkpoint and model_only:
        raise ConfigError(f"{', '.join(model_only)} go with --model; a checkpoint carries its own preprocessing")
    extra = parse_ood(args.ood, "far" if own else "extra")
    search: Dict[str, Dict[str, list]] = {}
    if args.aps:
        search = default_grids(scores)
    for item in args.grid:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--grid expects SCORE.PARAM=V1,V2,..., got {item!r}")
        key, raw = item.split("=", 1)
        score, param = key.split(".", 1)
        search.setdefault(score.lower(), {})[param] = [yaml.safe_load(v) for v in raw.split(",")]
    out = Path(args.out)
    if (out / "results.json").exists() and not args.overwrite:
        raise ConfigError(f"{out} already holds results (results.json); pass --overwrite to replace them or choose another --out")
    check_writable(out, create=False)  # nothing is created or deleted before the run succeeds
    common: Dict[str, Any] = dict(score_kwargs=parse_score_args(args.score_arg), fit_limit=args.fit_limit, batch_size=args.batch_size,
                                  device=args.device, root=args.root, plots=not args.no_plots, search=search or None,
                                  skip_bad=args.skip_bad, progress=args.progress)
    if own:
        from ..data.user import FolderDataset

        train = FolderDataset(args.id_train, layout="classes", skip_bad=args.skip_bad, name="id_train")
        data: Any = {"id_train": train, "id_test": args.id_test, "ood": {n: (p, g) for n, p, g in extra},
                     **({"id_val": args.id_val} if args.id_val else {})}
        n_classes = len(train.classes)
    else:
        data = get_benchmark(args.benchmark)
        for name, path, group in extra:
            data = data.with_extra_ood(name, path, group)
        n_classes = data.num_classes
    if args.checkpoint:
        evaluate_checkpoint(args.checkpoint, data, out, scores=scores, **common)
    else:
        from ..models.wrap import IMAGENET_MEAN, IMAGENET_STD, build_model

        evaluate(build_model(args.model, args.weights, n_classes), data, scores, input_size=args.input_size,
                 mean=_floats(args.mean, "--mean") or IMAGENET_MEAN, std=_floats(args.std, "--std") or IMAGENET_STD,
                 feature_layer=args.feature_layer, out_dir=out, **common)
    print((Path(out) / "results.md").read_text())
    return 0
