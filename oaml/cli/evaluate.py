"""``oaml eval``: post-hoc OOD scores of a checkpoint on a benchmark, written as a report."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import yaml

from ..errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a classifier with post-hoc OOD scores on a benchmark")
    p.add_argument("--checkpoint", required=True, help="student checkpoint (best.pt of a training run)")
    p.add_argument("--benchmark", default="fmnist", help="benchmark name (oaml data list)")
    p.add_argument("--scores", default="all", help="comma-separated score names, or 'all'")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--ood", action="append", default=[], metavar="NAME=PATH[:near|far]",
                   help="add your own OOD folder of images (repeatable)")
    p.add_argument("--score-arg", action="append", default=[], metavar="SCORE.PARAM=VALUE",
                   help="score hyperparameter, e.g. knn.K=100 (repeatable)")
    p.add_argument("--aps", action="store_true",
                   help="choose hyperparameters of react, knn, gen, ebo, mds on ID-val vs OOD-val (OpenOOD's grids)")
    p.add_argument("--grid", action="append", default=[], metavar="SCORE.PARAM=V1,V2,...",
                   help="search this grid on ID-val vs OOD-val (repeatable)")
    p.add_argument("--fit-limit", type=int, default=None, help="at most this many ID train images to fit scores")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--root", default=None, help="data root (default $OAML_DATA or ~/.cache/oaml/data)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier report in --out (at the end of a successful run; only the files oaml wrote)")
    p.add_argument("--skip-bad", dest="skip_bad", action="store_true",
                   help="drop unreadable (corrupt, truncated) image files of folder datasets and report how many")
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


def run(args) -> int:
    from ..evaluation.api import evaluate_checkpoint
    from ..utils.io import check_writable

    scores = None if args.scores == "all" else [s.strip() for s in args.scores.split(",") if s.strip()]
    extra = []
    for item in args.ood:
        if "=" not in item:
            raise ConfigError(f"--ood expects NAME=PATH[:near|far], got {item!r}")
        name, rest = item.split("=", 1)
        group = "far"
        if rest.rsplit(":", 1)[-1] in ("near", "far") and ":" in rest:
            rest, group = rest.rsplit(":", 1)
        extra.append((name, rest, group))
    from ..evaluation.evaluator import DEFAULT_GRIDS

    search: Dict[str, Dict[str, list]] = {}
    if args.aps:
        chosen = scores or list(DEFAULT_GRIDS)
        search = {k: dict(v) for k, v in DEFAULT_GRIDS.items() if k in chosen}
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
    results = evaluate_checkpoint(
        args.checkpoint, args.benchmark, out, scores=scores, extra_ood=extra, score_kwargs=parse_score_args(args.score_arg),
        fit_limit=args.fit_limit, batch_size=args.batch_size, device=args.device, root=args.root, plots=not args.no_plots,
        search=search or None, skip_bad=args.skip_bad,
    )
    print((Path(out) / "results.md").read_text())
    return 0
