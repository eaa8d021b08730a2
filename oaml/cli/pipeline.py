"""``oaml run --config FILE`` (whole pipeline) and ``oaml demo`` (the embedded offline default)."""

from __future__ import annotations

from .common import add_progress_argument, add_set_argument


def register(sub) -> None:
    p = sub.add_parser("run", help="run the whole pipeline: teacher, banks, outliers, students, evaluation, report")
    p.add_argument("--config", help="pipeline config YAML (default: the embedded offline demo)")
    p.add_argument("--out", default="runs/pipeline", help="output folder (stages already complete there are skipped)")
    p.add_argument("--overwrite", action="store_true", help="delete what an earlier pipeline wrote in --out first (other files are kept)")
    add_set_argument(p, "oaml.optim.lr=0.01")
    add_progress_argument(p)
    p.set_defaults(func=run)

    d = sub.add_parser("demo", help="the offline demo: Fashion-MNIST, EfficientNet-Lite0 teacher, OAML vs vanilla")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo; rerun continues it)")
    d.add_argument("--overwrite", action="store_true", help="start again from scratch (deletes what an earlier demo wrote in --out, nothing else)")
    add_set_argument(d, "oaml.optim.lr=0.01")
    add_progress_argument(d)
    d.set_defaults(func=run, config=None)


def run(args) -> int:
    from pathlib import Path

    from ..config import load_config
    from ..errors import ConfigError
    from ..pipeline import Pipeline, PipelineConfig
    from ..utils.io import check_writable

    cfg = load_config(PipelineConfig, args.config, args.overrides)
    out = Path(args.out)
    check_writable(out)  # before any stage (each stage checks the space it needs before its work)
    if out.exists() and args.overwrite:
        from .common import PIPELINE_OUTPUTS, remove_outputs

        remove_outputs(out, PIPELINE_OUTPUTS)
    prev = out / "config.yaml"
    if prev.is_file() and prev.read_text() != cfg.to_yaml():
        raise ConfigError(f"{out} holds a pipeline run with another config ({prev}); pass --overwrite or choose another --out")
    result = Pipeline(cfg, out).run()
    print(result["report"])
    print(f"report: {out / 'report.md'} (per-run reports and plots under {out / 'eval'})")
    return 0
