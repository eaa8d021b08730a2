"""``oaml bench``: a grid of methods x seeds on one benchmark, aggregated as mean +- std.

Every seed trains its own vanilla student from scratch (``pipeline.vanilla``); the other methods
start from that seed's vanilla checkpoint (``init: vanilla``, OAML's protocol, and the
equal-compute ``vanilla-cont``) or from scratch (``init: scratch``). The teacher, ID feature
bank, C-OOD and D-OOD banks are built once, with ``pipeline.seed``, and shared by all runs.

Seeds can run in parallel processes on one ``--out`` (``--set 'seeds=[2]'`` in one, the others
in another); ``--report-only`` with every seed then aggregates what all of them finished.

Layout of ``--out``::

    shared/                     teacher, banks (built once)
    runs/seed<S>/students/<M>/  checkpoints, log.csv, summary.json, config.yaml
    runs/seed<S>/eval/<M>/      results.json (+ .md, .csv, plots)
    results.json, results.md, plots/

A (method, seed) whose evaluation is complete is not run again, so an interrupted grid, or one
extended with methods or seeds, reruns only what is missing. A run folder trained with another
configuration is an error (``--overwrite`` starts the grid again).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

import numpy as np
import yaml
from pydantic import Field, model_validator

from .config import StrictModel
from .errors import ConfigError
from .pipeline import Pipeline, PipelineConfig, StudentRunConfig
from .training.config import OptimConfig
from .training.methods import MethodConfig
from .utils.io import atomic_write_text, write_json

log = logging.getLogger(__name__)

METRICS = ("fpr95", "fpr95_id_pos", "auroc", "aupr_in", "aupr_out", "detection_error")


class BenchRun(StrictModel):
    method: MethodConfig
    init: Literal["vanilla", "scratch"] = "vanilla"  # start from the seed's vanilla checkpoint, or from scratch
    optim: Optional[OptimConfig] = None  # None: pipeline.oaml.optim (init vanilla) / pipeline.vanilla.optim (scratch)
    description: str = ""


class BenchConfig(StrictModel):
    pipeline: PipelineConfig = PipelineConfig()  # data, student, teacher, banks, vanilla run, evaluation
    seeds: List[int] = Field([0, 1, 2], min_length=1)
    methods: Dict[str, BenchRun] = {}  # the grid besides `vanilla` (always run: it is every other run's start)
    main_scores: List[str] = ["ebo", "gen", "knn"]
    notes: List[str] = []  # the choices to state in the report (width, epochs, training-set size, ...)

    @model_validator(mode="after")
    def _check(self) -> "BenchConfig":
        if "vanilla" in self.methods:
            raise ConfigError("methods.vanilla is reserved for the from-scratch run of pipeline.vanilla; name the entry otherwise")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct, got {self.seeds}")
        missing = [s for s in self.main_scores if s not in self.pipeline.eval.scores]
        if missing:
            raise ConfigError(f"main_scores {missing} are not in pipeline.eval.scores {self.pipeline.eval.scores}")
        return self

    @classmethod
    def from_dict(cls, data: Optional[Dict[str, Any]], source: str = "config") -> "BenchConfig":
        data = dict(data or {})
        pipe = data.get("pipeline") or {}
        if not isinstance(pipe, dict):
            raise ConfigError(f"{source}: pipeline must be a mapping (or, in a file, a path to a pipeline YAML)")
        data["pipeline"] = PipelineConfig.from_dict(pipe, source=f"{source}: pipeline")
        cfg = super().from_dict(data, source)
        from .training.methods import validate_method

        for name, spec in cfg.methods.items():  # every run's term settings, before any training
            validate_method(spec.method, source=f"methods.{name}.method")
        return cfg

    @classmethod
    def load(cls, path: Optional[str], overrides: List[str]) -> "BenchConfig":
        """Read a bench YAML; ``pipeline: other.yaml`` (relative to the file) loads a pipeline
        config, ``pipeline_overrides:`` then merges onto it. ``--set`` overrides apply last."""
        from .cli.common import apply_overrides, read_config_file

        data: Dict[str, Any] = {}
        if path:
            p = Path(path)
            data = read_config_file(p)
            if isinstance(data.get("pipeline"), str):
                base = (p.parent / data["pipeline"]).resolve()
                if not base.is_file():
                    raise ConfigError(f"{p}: pipeline config {base} does not exist")
                data["pipeline"] = read_config_file(base)
            if "pipeline_overrides" in data:
                from .pipeline import _deep_merge

                data["pipeline"] = _deep_merge(data.get("pipeline") or {}, data.pop("pipeline_overrides") or {})
        return cls.from_dict(apply_overrides(data, overrides), source=str(path or "config"))


def aggregate(values: List[float]) -> Dict[str, float]:
    """Mean, sample standard deviation (ddof 1; 0 for one value) and count."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size)}


class Bench:
    def __init__(self, cfg: BenchConfig, out_dir: str | Path, progress: Optional[bool] = None):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.progress = cfg.pipeline.progress if progress is None else progress
        self.times: Dict[str, float] = {}

    # -- running -------------------------------------------------------------------------------
    def _shared_settings(self) -> str:
        p = self.cfg.pipeline
        shared = p.model_dump(mode="json", include={"benchmark", "teacher", "bank", "sampler", "generator"})
        return yaml.safe_dump({"seed": p.seed, **shared}, sort_keys=False)

    def _runs(self) -> Dict[str, BenchRun]:
        return {"vanilla": BenchRun(method=MethodConfig(name="vanilla"), init="scratch", optim=self.cfg.pipeline.vanilla.optim,
                                    description="cross-entropy from scratch (every init: vanilla run starts here)"),
                **self.cfg.methods}

    def run(self, command: str = "oaml bench") -> Dict[str, Any]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "config.yaml", cfg.to_yaml())
        shared_dir = self.out / "shared"
        shared_dir.mkdir(exist_ok=True)
        settings = shared_dir / "settings.yaml"
        if settings.is_file() and settings.read_text() != self._shared_settings():
            raise ConfigError(
                f"{shared_dir} holds a teacher and banks built with other settings ({settings}); "
                "pass --overwrite or choose another --out"
            )
        atomic_write_text(settings, self._shared_settings())
        shared = Pipeline(cfg.pipeline, shared_dir)
        t0 = time.time()
        runs = self._runs()
        self._build_shared(shared, runs)
        for seed in cfg.seeds:
            p = Pipeline(cfg.pipeline.model_copy(update={"seed": seed}), self.out / "runs" / f"seed{seed}", artefacts=shared)
            # vanilla first, as pipeline.vanilla whole (its `pretrained` weights, e.g. ImageNet's ResNet-50)
            log.info("=== bench: vanilla, seed %d", seed)
            vanilla_ckpt = p.train("vanilla", cfg.pipeline.vanilla)
            p.evaluate("vanilla", vanilla_ckpt)
            for name, spec in cfg.methods.items():
                default = cfg.pipeline.oaml.optim if spec.init == "vanilla" else cfg.pipeline.vanilla.optim
                run = StudentRunConfig(optim=spec.optim or default, method=spec.method)
                log.info("=== bench: %s, seed %d", name, seed)
                ckpt = p.train(name, run, init=str(vanilla_ckpt) if spec.init == "vanilla" else None)
                p.evaluate(name, ckpt)
            self.times.update({f"seed{seed}/{k}": v for k, v in p.times.items()})
        self.times.update({f"shared/{k}": v for k, v in shared.times.items()})
        self.times["total_this_invocation"] = time.time() - t0
        return self.report(command)

    @staticmethod
    def _build_shared(shared: Pipeline, runs: Dict[str, BenchRun]) -> None:
        """Teacher and banks first, under a lock: processes running other seeds on the same
        ``--out`` wait for them instead of building them twice into one folder."""
        import fcntl

        from .training.build import method_requirements

        need = set().union(*(method_requirements(spec.method) for spec in runs.values()))
        if not need & {"teacher", "cood", "dood"}:
            return
        with open(shared.out / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                if "teacher" in need:
                    shared.teacher()
                if "cood" in need:
                    shared.cood()
                if "dood" in need:
                    shared.dood()
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- aggregation and report ------------------------------------------------------------------
    def collect(self) -> Dict[str, Dict[int, Dict[str, Any]]]:
        """{method: {seed: {"eval": results.json, "train": summary.json}}} for every finished pair."""
        found: Dict[str, Dict[int, Dict[str, Any]]] = {}
        for name in self._runs():
            for seed in self.cfg.seeds:
                base = self.out / "runs" / f"seed{seed}"
                res, summ = base / "eval" / name / "results.json", base / "students" / name / "summary.json"
                if res.is_file() and summ.is_file():
                    found.setdefault(name, {})[seed] = {"eval": json.loads(res.read_text()), "train": json.loads(summ.read_text())}
        return found

    def aggregate(self) -> Dict[str, Any]:
        methods: Dict[str, Any] = {}
        runs = self._runs()
        for name, per_seed in self.collect().items():
            evals = [v["eval"] for v in per_seed.values()]
            spe = [v["train"]["seconds_per_epoch"] for v in per_seed.values() if v["train"].get("seconds_per_epoch") is not None]
            scores: Dict[str, Any] = {}
            for score in evals[0]["scores"]:
                entry: Dict[str, Any] = {"datasets": {}}
                for ds in evals[0]["scores"][score]["datasets"]:
                    entry["datasets"][ds] = {m: aggregate([e["scores"][score]["datasets"][ds][m] for e in evals]) for m in METRICS}
                for group in ("near", "far", "all"):
                    if group in evals[0]["scores"][score]:
                        entry[group] = {m: aggregate([e["scores"][score][group][m] for e in evals]) for m in METRICS}
                scores[score] = entry
            m: Dict[str, Any] = {
                "id_accuracy": aggregate([e["id_accuracy"] for e in evals]),
                "scores": scores,
                "seconds_per_epoch": aggregate(spe) if spe else None,
                "seeds": sorted(per_seed),
                "method": runs[name].method.model_dump(mode="json"),
                "init": runs[name].init,
                "epochs": per_seed[min(per_seed)]["train"]["epochs"],
            }
            if all("ood_val" in e for e in evals):
                m["ood_val"] = {s: {k: aggregate([e["ood_val"]["scores"][s]["all"][k] for e in evals]) for k in METRICS}
                                for s in evals[0]["ood_val"]["scores"]}
            methods[name] = m
        return {"methods": methods, "config": self.cfg.model_dump(mode="json")}

    def report(self, command: str = "oaml bench") -> Dict[str, Any]:
        from .evaluation.report import bench_markdown, bench_plots

        agg = self.aggregate()
        agg["machine"] = _machine()
        agg["date"] = time.strftime("%Y-%m-%d", time.gmtime())
        agg["command"] = command
        prev = self.out / "results.json"
        if prev.is_file():
            old = json.loads(prev.read_text()).get("stage_seconds", {})
            agg["stage_seconds"] = {**old, **self.times}
        else:
            agg["stage_seconds"] = dict(self.times)
        plots = bench_plots(self.out / "plots", agg, self.cfg.main_scores) if self.cfg.pipeline.eval.plots else {}
        text = bench_markdown(agg, self.cfg.main_scores, self.cfg.notes, plots={k: p.relative_to(self.out) for k, p in plots.items()})
        atomic_write_text(self.out / "results.md", text)
        write_json(self.out / "results.json", agg)
        return {"report": text, "results": agg}


def _machine() -> str:
    import os

    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {dev}, torch {torch.__version__}, {platform.python_implementation()} {platform.python_version()}"
