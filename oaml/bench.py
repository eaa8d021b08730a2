"""``oaml bench``: a grid of methods x seeds on one benchmark, aggregated as mean +- std.

Every seed trains its own vanilla student from scratch (``pipeline.vanilla``); the other methods
start from that seed's vanilla checkpoint (``init: vanilla``, OAML's protocol, and the
equal-compute ``vanilla-cont``) or from scratch (``init: scratch``). The teacher, ID feature
bank, C-OOD and D-OOD banks are built once, with ``pipeline.seed``, and shared by all runs.

Seeds can run in parallel processes on one ``--out`` (``--set 'seeds=[2]'`` in one, the others
in another); the shared artefacts are built under a lock (the others wait for them), the teacher's
own evaluation by whichever process takes it first (the others go on with their seeds), and
``--report-only`` with every seed then aggregates what all of them finished. Give the processes
disjoint seeds: two processes training the same (method, seed) at once would resume each other.

Layout of ``--out``::

    shared/                     teacher, banks (built once)
    runs/seed<S>/students/<M>/  checkpoints, log.csv, summary.json, config.yaml
    runs/seed<S>/eval/<M>/      results.json (+ .md, .csv, plots)
    results.json, results.md, plots/

The report leads with paired per-seed differences of every run to ``delta_vs`` (``vanilla-cont``:
same seed, same starting checkpoint) with 95% t-intervals, then mean +- std per run over the OOD
sets the benchmark's OE pool does not share a source with (``oe_disjoint``), beside those it does
(``oe_overlap``), all, near and far; ``shared/eval/teacher/results.json``, when present, adds the
teacher as a one-seed ceiling row. ``contrasts: [[a, b], ...]`` adds the same paired statistics for
a - b between two runs (a candidate setting against the current default, say), on the test sets
and on OOD-val.

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
from typing import Any, Dict, List, Literal, Optional, Tuple

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
    seeds: Optional[List[int]] = None  # run on those of the grid's seeds that are in this list (None: all of them)


class BenchConfig(StrictModel):
    pipeline: PipelineConfig = PipelineConfig()  # data, student, teacher, banks, vanilla run, evaluation
    seeds: List[int] = Field([0, 1, 2], min_length=1)
    methods: Dict[str, BenchRun] = {}  # the grid besides `vanilla` (always run: it is every other run's start)
    main_scores: List[str] = ["ebo", "gen", "knn"]
    delta_vs: Optional[str] = "vanilla-cont"  # reference run of the paired per-seed differences (null: none)
    # further paired comparisons [a, b]: per-seed differences a - b between two runs of the grid
    # (e.g. a candidate setting against the current default), with the same statistics
    contrasts: List[Tuple[str, str]] = []
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
        if self.delta_vs is not None and self.delta_vs not in {"vanilla", *self.methods}:
            raise ConfigError(f"delta_vs {self.delta_vs!r} is not a run of the grid (vanilla, {', '.join(self.methods)}); name one, or set delta_vs: null")
        for a, b in self.contrasts:
            bad = [x for x in (a, b) if x not in {"vanilla", *self.methods}]
            if bad or a == b:
                raise ConfigError(f"contrasts entry [{a}, {b}]: " + (f"{bad} not a run of the grid (vanilla, {', '.join(self.methods)})"
                                                                     if bad else "compares a run with itself"))
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
        from .config import apply_overrides, read_config_file

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


GROUPS = ("near", "far", "all", "oe_disjoint", "oe_overlap")
PAIRED_METRICS = ("auroc", "fpr95", "fpr95_id_pos", "aupr_in", "aupr_out")


def paired_difference(a: List[float], b: List[float]) -> Dict[str, Any]:
    """Differences a[i] - b[i] of paired runs: mean, 95% Student-t interval
    mean +- t_{0.975, n-1} sd / sqrt(n) (sd with ddof 1; None for fewer than two pairs), n, and
    whether the interval excludes 0."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs as many values on both sides, got {len(a)} and {len(b)}")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = int(d.size)
    mean = float(d.mean()) if n else None
    ci = None
    if n > 1:
        from scipy.stats import t

        half = float(t.ppf(0.975, n - 1) * d.std(ddof=1) / np.sqrt(n))
        ci = [mean - half, mean + half]
    return {"mean": mean, "ci95": ci, "n": n, "excludes_zero": ci is not None and (ci[0] > 0 or ci[1] < 0)}


def _val_curve(summaries: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Validation accuracy (%) per epoch over seeds: [{"epoch", "mean", "std", "n"}]."""
    by_epoch: Dict[int, List[float]] = {}
    for summ in summaries:
        for row in summ.get("history", []):
            if row.get("val_acc") is not None:
                by_epoch.setdefault(int(row["epoch"]), []).append(100.0 * float(row["val_acc"]))
    return [{"epoch": e, **aggregate(v)} for e, v in sorted(by_epoch.items())]


def _teacher_margin(teacher_val: Optional[float], vanilla_curve: Optional[List[Dict[str, Any]]]) -> Optional[Dict[str, Any]]:
    """How far the teacher (ID val accuracy %, from its checkpoint) is above the converged vanilla
    student (its last epoch's ID val accuracy, mean over seeds): a teacher no better than its
    student tests nothing."""
    if teacher_val is None or not vanilla_curve:
        return None
    last = vanilla_curve[-1]
    return {"teacher_val_accuracy": float(teacher_val), "vanilla_val_accuracy": {k: last[k] for k in ("mean", "std", "n")},
            "vanilla_epoch": int(last["epoch"]), "margin": float(teacher_val) - float(last["mean"])}


def _aggregate_evals(evals: List[Dict[str, Any]]) -> Dict[str, Any]:
    """ID accuracy and every score's per-set and group metrics (and OOD-val, when every evaluation
    has it) of one run's evaluations, as mean +- std over them."""

    def agg(entries: List[Dict[str, float]]) -> Dict[str, Any]:
        return {m: aggregate([e[m] for e in entries]) for m in METRICS}

    scores: Dict[str, Any] = {}
    for score, first in evals[0]["scores"].items():
        scores[score] = {"datasets": {ds: agg([e["scores"][score]["datasets"][ds] for e in evals]) for ds in first["datasets"]}}
        scores[score].update({g: agg([e["scores"][score][g] for e in evals]) for g in GROUPS if g in first})
    out: Dict[str, Any] = {"id_accuracy": aggregate([e["id_accuracy"] for e in evals]), "scores": scores}
    if all("ood_val" in e for e in evals):
        val = [e["ood_val"]["scores"] for e in evals]
        out["ood_val"] = {s: agg([v[s]["all"] for v in val]) for s in val[0]}
        if all("oe_disjoint" in v[s] for v in val for s in val[0]):
            out["ood_val_oe_disjoint"] = {s: agg([v[s]["oe_disjoint"] for v in val]) for s in val[0]}
    return out


def _split_by_oe(refs) -> Dict[str, List[str]]:
    groups = {"oe_disjoint": [r.name for r in refs if not getattr(r, "shares_oe_source", False)],
              "oe_overlap": [r.name for r in refs if getattr(r, "shares_oe_source", False)]}
    return {g: names for g, names in groups.items() if names}


def _pair(runs_a: Dict[int, Dict[str, Any]], runs_b: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
    """Paired differences a - b on the seeds both runs finished: ID accuracy, every score's group
    metrics and (where both have them) the OOD-val metrics."""
    pairs = [(runs_a[s]["eval"], runs_b[s]["eval"]) for s in sorted(set(runs_a) & set(runs_b))]

    def diff(get) -> Dict[str, Any]:
        return paired_difference([get(a) for a, _ in pairs], [get(b) for _, b in pairs])

    a0, b0 = pairs[0] if pairs else ({"scores": {}}, {"scores": {}})
    scores = {s: {g: {m: diff(lambda e: e["scores"][s][g][m]) for m in PAIRED_METRICS}
                  for g in GROUPS if g in a0["scores"][s] and g in b0["scores"][s]}
              for s in a0["scores"] if s in b0["scores"]}
    out = {"id_accuracy": diff(lambda e: e["id_accuracy"]), "scores": scores}
    if pairs and "ood_val" in a0 and "ood_val" in b0:  # what a method is chosen on: OOD-val, never a test set
        va, vb = a0["ood_val"]["scores"], b0["ood_val"]["scores"]
        out["ood_val"] = {s: {g: {m: diff(lambda e: e["ood_val"]["scores"][s][g][m]) for m in PAIRED_METRICS}
                              for g in ("all", "oe_disjoint") if g in va[s] and g in vb[s]}
                          for s in va if s in vb}
    return out


def _paired(found: Dict[str, Dict[int, Dict[str, Any]]], ref: str) -> Dict[str, Any]:
    """Per method besides ``ref``: paired differences to ``ref`` (:func:`_pair`)."""
    base = found.get(ref, {})
    return {name: _pair(per_seed, base) for name, per_seed in found.items() if name != ref}


class Bench:
    def __init__(self, cfg: BenchConfig, out_dir: str | Path, progress: Optional[bool] = None):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.progress = cfg.pipeline.progress if progress is None else progress
        self.times: Dict[str, float] = {}

    # -- running -------------------------------------------------------------------------------
    def _shared_settings(self) -> str:
        p = self.cfg.pipeline
        shared = p.model_dump(mode="json", include={"benchmark", "teacher", "bank", "sampler", "generator", "image_outliers", "train_limit"})
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
        from .training.build import method_requirements
        from .utils.progress import Stages

        runs = self._runs()
        stages = Stages(0, enabled=self.progress)
        shared = Pipeline(cfg.pipeline, shared_dir, stages=stages)
        t0 = time.time()
        seeds = {seed: Pipeline(cfg.pipeline.model_copy(update={"seed": seed}), self.out / "runs" / f"seed{seed}",
                                artefacts=shared, stages=stages) for seed in cfg.seeds}
        need = set().union(*(method_requirements(spec.method) for spec in runs.values()))
        stages.total = shared.pending_shared(need) + int("teacher" in need and not (shared_dir / "eval" / "teacher" / "results.json").is_file()) + sum(
            p.pending_run(name) for seed, p in seeds.items() for name, spec in runs.items()
            if spec.seeds is None or seed in spec.seeds)
        self._build_shared(shared, runs)
        if "teacher" in need:  # the ceiling a distilled student can hope to approach
            self._evaluate_teacher(shared)
        for seed, p in seeds.items():
            # vanilla first, as pipeline.vanilla whole (its `pretrained` weights, e.g. ImageNet's ResNet-50)
            log.info("=== bench: vanilla, seed %d", seed)
            vanilla_ckpt = p.train("vanilla", cfg.pipeline.vanilla)
            p.evaluate("vanilla", vanilla_ckpt)
            for name, spec in cfg.methods.items():
                if spec.seeds is not None and seed not in spec.seeds:
                    continue
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
        if not need & {"teacher", "cood", "dood", "image_outliers"}:
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
                if "image_outliers" in need:
                    shared.image_outliers()
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @staticmethod
    def _evaluate_teacher(shared: Pipeline) -> None:
        """The teacher's own evaluation, by ONE of the processes sharing ``--out``: the first to take
        its lock evaluates (or finds the cached result); the others go on with their seeds, and the
        report includes the teacher once its results exist."""
        import fcntl

        with open(shared.out / ".teacher-eval.lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("bench: another process is evaluating the teacher; going on with the seeds")
                return
            try:
                shared.evaluate("teacher", shared.teacher_path, teacher=True)
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- aggregation and report ------------------------------------------------------------------
    def oe_groups(self) -> Dict[str, List[str]]:
        """The benchmark's OOD test sets split by whether its outlier-exposure pool shares a source
        family with them: {"oe_disjoint": [...], "oe_overlap": [...]} (a group without sets is left out)."""
        from .data import get_benchmark

        return _split_by_oe(get_benchmark(self.cfg.pipeline.benchmark).ood_test_sets)

    def oe_val_groups(self) -> Dict[str, List[str]]:
        """The same split of the benchmark's OOD-val sets."""
        from .data import get_benchmark

        return _split_by_oe(get_benchmark(self.cfg.pipeline.benchmark).ood_val)

    def _load_eval(self, path: Path) -> Dict[str, Any]:
        """An evaluation's results.json, with the ``oe_disjoint`` / ``oe_overlap`` means per score
        added (plain means over that group's sets, like near / far / all)."""
        res = json.loads(path.read_text())
        parts = [(res["scores"], set(self.oe_groups().get("oe_overlap", [])))]
        if "ood_val" in res:
            parts.append((res["ood_val"]["scores"], set(self.oe_val_groups().get("oe_overlap", []))))
        for entries, overlap in parts:
            for entry in entries.values():
                ds = entry["datasets"]
                for group, names in (("oe_disjoint", [n for n in ds if n not in overlap]), ("oe_overlap", [n for n in ds if n in overlap])):
                    if names:
                        entry[group] = {m: float(np.mean([ds[n][m] for n in names])) for m in METRICS}
        return res

    def collect(self) -> Dict[str, Dict[int, Dict[str, Any]]]:
        """{method: {seed: {"eval": results.json, "train": summary.json}}} for every finished pair."""
        found: Dict[str, Dict[int, Dict[str, Any]]] = {}
        for name in self._runs():
            for seed in self.cfg.seeds:
                base = self.out / "runs" / f"seed{seed}"
                res, summ = base / "eval" / name / "results.json", base / "students" / name / "summary.json"
                if res.is_file() and summ.is_file():
                    found.setdefault(name, {})[seed] = {"eval": self._load_eval(res), "train": json.loads(summ.read_text())}
        return found

    def aggregate(self) -> Dict[str, Any]:
        methods: Dict[str, Any] = {}
        runs = self._runs()
        found = self.collect()
        for name, per_seed in found.items():
            spe = [v["train"]["seconds_per_epoch"] for v in per_seed.values() if v["train"].get("seconds_per_epoch") is not None]
            methods[name] = {
                **_aggregate_evals([v["eval"] for v in per_seed.values()]),
                "seconds_per_epoch": aggregate(spe) if spe else None,
                "seeds": sorted(per_seed),
                "method": runs[name].method.model_dump(mode="json"),
                "init": runs[name].init,
                "epochs": per_seed[min(per_seed)]["train"]["epochs"],
                "val_curve": _val_curve([v["train"] for v in per_seed.values()]),
            }
        agg: Dict[str, Any] = {"methods": methods, "oe_groups": self.oe_groups()}
        teacher = self.out / "shared" / "eval" / "teacher" / "results.json"
        if teacher.is_file():  # the lead's evaluation of the shared teacher: a ceiling, one seed
            res = self._load_eval(teacher)
            agg["teacher"] = {**_aggregate_evals([res]), "seeds": [self.cfg.pipeline.seed]}
            margin = _teacher_margin(res.get("checkpoint_meta", {}).get("val_accuracy"), methods.get("vanilla", {}).get("val_curve"))
            if margin:
                agg["teacher_margin"] = margin
        if self.cfg.delta_vs is not None:
            agg["paired"] = {"delta_vs": self.cfg.delta_vs, "methods": _paired(found, self.cfg.delta_vs)}
        if self.cfg.contrasts:
            agg["contrasts"] = [{"a": a, "b": b, **_pair(found.get(a, {}), found.get(b, {}))} for a, b in self.cfg.contrasts]
        agg["config"] = self.cfg.model_dump(mode="json")
        return agg

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
