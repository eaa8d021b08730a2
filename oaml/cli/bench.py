"""``oaml bench --config FILE``: methods x seeds on one benchmark -> results.md / results.json / plots."""

from __future__ import annotations

from .common import add_progress_argument, add_set_argument


def register(sub) -> None:
    p = sub.add_parser("bench", help="run a grid of methods x seeds and aggregate mean +- std (cached per method and seed)")
    p.add_argument("--config", required=True, help="bench config YAML (see configs/bench/)")
    p.add_argument("--out", default="runs/bench", help="output folder; finished (method, seed) runs there are reused")
    p.add_argument("--overwrite", action="store_true", help="delete what an earlier grid wrote in --out first (other files are kept)")
    p.add_argument("--report-only", action="store_true", help="only aggregate what has finished (no training)")
    add_set_argument(p, "pipeline.oaml.optim.lr=0.01")
    add_progress_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import shlex
    import sys
    from pathlib import Path

    from ..bench import Bench, BenchConfig

    cfg = BenchConfig.load(args.config, args.overrides)
    out = Path(args.out)
    if out.exists() and args.overwrite:
        from .common import BENCH_OUTPUTS, remove_outputs

        remove_outputs(out, BENCH_OUTPUTS)
    bench = Bench(cfg, out)
    command = "oaml " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] and sys.argv[1] == "bench" else "oaml bench"
    result = bench.report(command) if args.report_only else bench.run(command)
    print(result["report"])
    print(f"results: {out / 'results.md'}, {out / 'results.json'}")
    return 0
