"""oaml analyze-outliers: how far C-OOD / D-OOD / real OOD features are from the ID features.

    oaml analyze-outliers --id-bank runs/x/id --cood runs/x/cood --dood runs/x/dood \\
        --ood-features mnist=runs/x/feat_mnist --out runs/x/analysis

Writes analysis.json, analysis.md, knn_distances.png and pca.png into --out.
"""

from __future__ import annotations

import argparse

from ..errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze-outliers",
        help="distances, k-NN distance quantiles and probe separability of outlier sets vs ID features",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--id-bank", dest="id_bank", required=True, help="ID feature bank")
    p.add_argument("--cood", help="C-OOD bank")
    p.add_argument("--dood", help="D-OOD bank")
    p.add_argument("--ood-features", dest="ood", action="append", default=[], metavar="NAME=BANK",
                   help="a bank of real OOD features (repeatable)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--k", type=int, default=50, help="k of the k-NN distance (default 50)")
    p.add_argument("--max-samples", dest="max_samples", type=int, default=5000,
                   help="seeded subset size per set (default 5000)")
    p.add_argument("--no-normalize", dest="normalize", action="store_false", help="skip L2 normalisation")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsets and the probe split (default 0)")
    p.add_argument("--threads", type=int, default=None, help="cap BLAS threads (default: unchanged)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..outliers.analysis import analyze_outliers, markdown_table

    sets: dict[str, str] = {}
    if args.cood:
        sets["cood"] = args.cood
    if args.dood:
        sets["dood"] = args.dood
    for item in args.ood:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--ood-features expects NAME=BANK, got {item!r}")
        if name in sets or name == "id_heldout":
            raise ConfigError(f"set name {name!r} is used twice")
        sets[name] = path
    if not sets:
        raise ConfigError("give at least one of --cood, --dood, --ood-features")
    result = analyze_outliers(args.id_bank, sets, k=args.k, max_samples=args.max_samples,
                              normalize=args.normalize, seed=args.seed, out_dir=args.out,
                              num_threads=args.threads)
    print(markdown_table(result))
    print(f"written to {args.out}")
    return 0
