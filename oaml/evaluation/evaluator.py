"""One object that takes a classifier and a benchmark to a results table.

Features of every split are extracted once (and cached on disk per checkpoint and dataset
content), every feature-based score fits on its stated ID split and scores from those features;
ODIN and Gram get the model and a loader. Metrics are computed per OOD set and averaged (plain
means) over the near, far and all (near + far) groups; the user's own sets (group ``extra``) get
their own rows and ``extra`` mean and leave those averages alone. Every metric and accuracy in the
results is a percentage (``results["units"]``). ``results["settings"]`` holds ``fit_limit`` and
each score's settings as fitted (its hyperparameters plus what fitting resolved, e.g. ViM's
``dim_``, ReAct's ``threshold_``); ``results["skipped_files"]`` the unreadable files ``skip_bad``
dropped per split. A score that needs what the model does not expose (a linear head, feature
maps, known inner layers) is skipped, with the reason, under ``results["skipped"]``. The pooled
activations of the inner layers that the scores read (``Score.needed_layers``, e.g. MDS-multi's
four ResNet stages) are extracted with the features, once per split, and cached with them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ..errors import ConfigError, ShapeError
from ..utils.device import resolve_device
from .features import FeatureCache, PreprocessedLoader, dataset_fingerprint, extract_features, skipped_files
from .metrics import ood_metrics

log = logging.getLogger(__name__)

METRIC_KEYS = ("fpr95", "fpr95_id_pos", "auroc", "aupr_in", "aupr_out", "detection_error")
# the averages of the results, by the OOD set groups they take
GROUPS: Dict[str, Tuple[str, ...]] = {"near": ("near",), "far": ("far",), "all": ("near", "far"), "extra": ("extra",)}
DEFAULT_SCORES = ("msp", "odin", "mds", "klm", "gram", "react", "gradnorm", "vim", "knn", "gen", "ebo", "mls")

# OpenOOD v1.5's APS sweeps (feature scores); used by ``search="default"``. Scores added later
# declare theirs on the class (``Score.grid``); :func:`default_grids` merges both.
DEFAULT_GRIDS: Dict[str, Dict[str, list]] = {
    "react": {"percentile": [85, 90, 95, 99]},
    "knn": {"K": [10, 20, 50, 100, 200]},
    "gen": {"gamma": [0.01, 0.1, 0.5, 1, 2, 5, 10], "M": [10, 50, 100]},
    "ebo": {"temperature": [1, 10, 100, 1000]},
    "mds": {"shrinkage": [0.0, 0.01, 0.1]},
}


def resolve_scores(scores: Optional[Sequence[str] | str]) -> List[str]:
    """Score names to evaluate: None or "default" = :data:`DEFAULT_SCORES` (the paper's 11 and
    MLS); "all" = every registered score, once each (aliases left out); a list may contain "all"."""
    from ..scores import SCORES

    if scores is None or scores == "default":
        return list(DEFAULT_SCORES)
    if isinstance(scores, str):
        scores = [scores]
    out: List[str] = []
    for name in scores:
        for n in (SCORES.primary_names() if name == "all" else list(DEFAULT_SCORES) if name == "default" else [name]):
            if n not in out:
                out.append(n)
    return out


def default_grids(names: Sequence[str]) -> Dict[str, Dict[str, list]]:
    """The ``--aps`` grids of ``names``: OpenOOD's sweeps (:data:`DEFAULT_GRIDS`) and the grids the
    newer scores declare (``Score.grid``); scores that need the model (searched only with fixed
    settings) and scores without hyperparameters are left out."""
    from ..scores import SCORES

    out: Dict[str, Dict[str, list]] = {}
    for n in names:
        cls = SCORES.get(n)
        grid = DEFAULT_GRIDS.get(n) or getattr(cls, "grid", None)
        if grid and not cls.requires_model:
            out[n] = {k: list(v) for k, v in grid.items()}
    return out


@dataclass
class OODSet:
    name: str
    group: str  # "near" | "far" | "extra" (the user's own set: own row, outside near / far / all)
    dataset: Dataset


class Evaluator:
    """Evaluate ``model`` (a :class:`~oaml.models.adapter.Classifier`) with post-hoc scores.

    ``id_train`` feeds the scores that fit on ID train (MDS, KNN, ViM, Gram), ``id_val`` those
    that fit on ID validation data (ReAct, KLM); ``id_test`` and ``ood_sets`` are scored.
    ``fit_limit`` caps the number of ID train images used for fitting (seeded subset).
    ``channels_last`` (default: on where the device is a CPU) converts the model's 4-D weights to the
    channels-last (NHWC) memory format, in place, so that its convolutions run oneDNN's NHWC kernels:
    a demo student's forward pass 1.6-1.9x faster on this project's CPU, ODIN's passes 1.2x, the
    outputs equal to float32 rounding (~1e-7 relative).
    """

    def __init__(
        self,
        model: nn.Module,
        preprocess: nn.Module,
        id_train: Dataset,
        id_val: Dataset,
        id_test: Dataset,
        ood_sets: Sequence[OODSet],
        scores: Sequence[str] = DEFAULT_SCORES,
        score_kwargs: Optional[Dict[str, Dict[str, Any]]] = None,
        device: str | torch.device = "auto",
        batch_size: int = 512,
        cache_dir: Optional[str | Path] = None,
        model_id: Optional[str] = None,
        benchmark: str = "custom",
        fit_limit: Optional[int] = None,
        seed: int = 0,
        progress: bool = True,
        ood_val: Sequence[OODSet] = (),
        search: Optional[Dict[str, Dict[str, list]]] = None,
        search_metric: str = "auroc",
        channels_last: Optional[bool] = None,
    ):
        from ..scores import SCORES

        if not ood_sets:
            raise ConfigError("no OOD sets to evaluate against")
        names = [o.name for o in ood_sets]
        if len(set(names)) != len(names):
            raise ConfigError(f"OOD set names must be unique, got {names}")
        for o in ood_sets:
            if o.group not in GROUPS["all"] + GROUPS["extra"]:
                raise ConfigError(f"OOD set {o.name!r} has group {o.group!r}; use 'near', 'far' or 'extra'")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        if channels_last is None:
            channels_last = self.device.type == "cpu"
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.preprocess = preprocess.to(self.device)
        if fit_limit is not None and len(id_train) > fit_limit:  # type: ignore[arg-type]
            idx = np.sort(np.random.default_rng(seed).choice(len(id_train), fit_limit, replace=False))  # type: ignore[arg-type]
            id_train = _subset(id_train, idx)
        self.fit_limit, self.seed = fit_limit, seed
        self.splits: Dict[str, Dataset] = {"id_train": id_train, "id_val": id_val, "id_test": id_test}
        self.ood_sets = list(ood_sets)
        self.score_names = list(scores)
        self.score_kwargs = score_kwargs or {}
        self.batch_size = batch_size
        self.benchmark = benchmark
        self.progress = progress
        self.cache = FeatureCache(cache_dir, model_id) if cache_dir and model_id else None
        self.ood_val = list(ood_val)
        self.search = dict(search or {})
        self.search_metric = search_metric
        self._check_scores()
        self.layer_names = self._needed_layers()
        for name in self.search:
            if name not in self.score_names:
                raise ConfigError(f"a search grid is given for {name!r}, which is not among the scores evaluated")
            if SCORES.get(name).requires_model:
                raise ConfigError(f"hyperparameter search of {name!r} (it needs the model) is not supported; give fixed settings")
        if self.search and not self.ood_val:
            raise ConfigError("hyperparameter search needs OOD-val sets (the benchmark's ood_val); test sets are never used")
        self._feats: Dict[str, Any] = {}
        self.timings: Dict[str, float] = {}

    def _check_scores(self) -> None:
        """Every unknown score name, stray setting and bad setting (first grid values included) at
        once, before any work."""
        from ..scores import create_score

        problems = []
        for name in self.score_names:
            try:
                grid = {p: v[0] for p, v in self.search.get(name, {}).items() if v}
                create_score(name, **{**self._score_kwargs(name), **grid})
            except ConfigError as exc:
                problems.append(str(exc))
        problems += [f"score settings given for {s!r}, which is not among the scores evaluated ({', '.join(self.score_names)})"
                     for s in self.score_kwargs if s not in self.score_names]
        if problems:
            raise ConfigError("; ".join(problems))

    def _needed_layers(self) -> list:
        """The union (in order) of the inner layers the scores read from ``FeatureSet.layers``
        (:meth:`Score.needed_layers`), extracted once per split; names are checked now, before any
        work. A score whose layers the model lacks (NotImplementedError) adds none and is skipped
        with the reason when its turn comes."""
        from ..scores import create_score
        from ..scores.base import find_modules

        names: list = []
        for name in self.score_names:
            try:
                need = create_score(name, **self._score_kwargs(name)).needed_layers(self.model)
            except NotImplementedError:
                continue
            find_modules(self.model, need, name)
            names += [n for n in need if n not in names]
        return names

    # ---------------------------------------------------------------------------------------
    def features(self, key: str, dataset: Dataset):
        same = [k for k, d in self.splits.items() if d is dataset and k in self._feats]  # e.g. id_val = id_train
        if same:
            return self._feats[same[0]]
        if key not in self._feats:
            more = {"layers": list(self.layer_names)} if self.layer_names else {}
            compute = lambda: extract_features(  # noqa: E731
                self.model, self.preprocess, dataset, self.batch_size, self.device, self.progress, desc=key, **more
            )
            meta = {"count": len(dataset), "preprocess": getattr(self.preprocess, "config", lambda: {})(),  # type: ignore[arg-type]
                    "content": dataset_fingerprint(dataset) if self.cache else None, **more}
            self._feats[key] = self.cache.get_or_compute(key, meta, compute) if meta["content"] else compute()
        return self._feats[key]

    def _head(self):
        """``(W, b)`` of the model's last linear layer on the CPU and ``None``, or ``None`` and why not."""
        try:
            return tuple(t.detach().cpu() if t is not None else None for t in self.model.fc_weights()), None  # type: ignore[operator]
        except (NotImplementedError, ShapeError) as exc:
            return None, str(exc)

    def _score_kwargs(self, name: str) -> Dict[str, Any]:
        """The user's settings; a score that perturbs inputs in pixel units (ODIN's ``std``)
        gets the model's normalisation std unless the user set it."""
        import inspect

        from ..scores import SCORES

        kw = dict(self.score_kwargs.get(name, {}))
        params = inspect.signature(SCORES.get(name)).parameters
        std = getattr(self.preprocess, "std", None)
        if "std" in params and "std" not in kw and isinstance(std, torch.Tensor):
            kw["std"] = tuple(float(v) for v in std.flatten())
        return kw

    def _loader(self, dataset: Dataset) -> PreprocessedLoader:
        return PreprocessedLoader(dataset, self.preprocess, min(self.batch_size, 256), self.device)

    def _score(self, name: str, head, test, ood_feats) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        """Fit score ``name`` (or search its grid) and score ID test and every OOD set."""
        from ..scores import create_score
        from ..scores.search import search_hyperparameters

        score = create_score(name, **self._score_kwargs(name))
        score.needed_layers(self.model)  # NotImplementedError (skipped, with the reason) before any fitting
        fit_split = {"train": "id_train", "val": "id_val"}.get(score.fit_on)
        fit_data = self.features(fit_split, self.splits[fit_split]) if fit_split else None
        if score.requires_model:
            loader = self._loader(self.splits[fit_split]) if fit_split else None
            score.fit(fit_data, model=self.model, loader=loader, head=head)
            t = time.perf_counter()
            self._fit_seconds[name] = t - self._t_score
            s_id = score.score(test, model=self.model, loader=self._loader(self.splits["id_test"]))
            s_ood = {o.name: score.score(ood_feats[o.name], model=self.model, loader=self._loader(o.dataset)) for o in self.ood_sets}
            self._score_seconds[name] = time.perf_counter() - t
            self.settings[name] = score_settings(score)
            return s_id, s_ood
        if name in self.search:
            val = self.features("id_val", self.splits["id_val"])
            oodv = {o.name: self.features(f"oodval_{o.name}", o.dataset) for o in self.ood_val}
            found = search_hyperparameters(
                name, self.search[name], id_val=val, ood_val=oodv, fit_data=fit_data, head=head,
                metric=self.search_metric, fixed=self.score_kwargs.get(name),
            )
            score = found.best_score
            self.chosen[name] = {"params": found.best_params, "val_" + found.metric: 100 * found.best_value}
            log.info("%s: chosen on ID-val vs OOD-val: %s", name, found.best_params)
        else:
            score.fit(fit_data, head=head)
        self.settings[name] = score_settings(score)
        t = time.perf_counter()
        self._fit_seconds[name] = t - self._t_score
        out = score.score(test), {k: score.score(v) for k, v in ood_feats.items()}
        self._score_seconds[name] = time.perf_counter() - t
        return out

    def run(self) -> Dict[str, Any]:
        from ..scores import SCORES

        self.chosen: Dict[str, Any] = {}
        self.settings: Dict[str, Dict[str, Any]] = {}
        t0 = time.time()
        self._fit_seconds: Dict[str, float] = {}
        self._score_seconds: Dict[str, float] = {}
        feature_seconds: Dict[str, float] = {}
        # every split the scores read, extracted up front (the fit splits too), so that each score's
        # time below is its own arithmetic
        fit_splits = {"train": "id_train", "val": "id_val"}
        wanted = [("id_test", self.splits["id_test"])]
        wanted += [(k, self.splits[k]) for k in dict.fromkeys(fit_splits[SCORES.get(n).fit_on] for n in self.score_names
                                                             if SCORES.get(n).fit_on in fit_splits and not SCORES.get(n).requires_model)]
        wanted += [(f"ood_{o.name}", o.dataset) for o in self.ood_sets]
        for key, ds in wanted:
            t = time.perf_counter()
            self.features(key, ds)
            feature_seconds[key] = time.perf_counter() - t
        test = self.features("id_test", self.splits["id_test"])
        id_acc = float((test.logits.argmax(1) == test.labels).double().mean()) * 100
        ood_feats = {o.name: self.features(f"ood_{o.name}", o.dataset) for o in self.ood_sets}
        self.timings["features"] = time.time() - t0
        per_score: Dict[str, Dict[str, float]] = {}
        head, no_head = self._head()
        results: Dict[str, Any] = {"benchmark": self.benchmark, "id_accuracy": id_acc, "scores": {}, "skipped": {}}
        self.raw_scores: Dict[str, Dict[str, np.ndarray]] = {}
        for name in self.score_names:
            t1 = time.time()
            self._t_score = time.perf_counter()
            try:
                if no_head and SCORES.get(name).needs_head:
                    raise NotImplementedError(f"it needs the last linear layer ({no_head})")
                s_id, s_ood = self._score(name, head, test, ood_feats)
            except NotImplementedError as exc:  # the model lacks what this score needs
                results["skipped"][name] = f"{name} cannot run on this model: {exc}"
                log.warning("%s skipped: %s", name, results["skipped"][name])
                continue
            self.raw_scores[name] = {"id_test": np.asarray(s_id, np.float64), **{k: np.asarray(v, np.float64) for k, v in s_ood.items()}}
            t_metrics = time.perf_counter()
            per_set = {}
            for o in self.ood_sets:
                m = ood_metrics(s_id, s_ood[o.name])
                per_set[o.name] = {k: 100.0 * float(m[k]) for k in METRIC_KEYS} | {"group": o.group}
            entry: Dict[str, Any] = {"datasets": per_set}
            for group, takes in GROUPS.items():
                members = [v for v in per_set.values() if v["group"] in takes]
                if members:
                    entry[group] = {k: float(np.mean([v[k] for v in members])) for k in METRIC_KEYS}
            results["scores"][name] = entry
            self.timings[name] = time.time() - t1
            # model scores (ODIN, Gram, ...) run the network inside fit/score: that time is theirs
            per_score[name] = {"fit": self._fit_seconds[name], "score": self._score_seconds[name],
                               "metrics": time.perf_counter() - t_metrics}
            shown = entry.get("all", entry.get("extra"))
            log.info("%s: AUROC %.2f FPR@95 %.2f (%.1fs)", name, shown["auroc"], shown["fpr95"], self.timings[name])
        results["timings_seconds"] = dict(self.timings)
        results["profile_seconds"] = {
            "features": feature_seconds,
            "fit": sum(v["fit"] for v in per_score.values()),
            "score": sum(v["score"] for v in per_score.values()),
            "metrics": sum(v["metrics"] for v in per_score.values()),
            "per_score": per_score,
        }
        results["units"] = {"metrics": "percent", "accuracy": "percent"}
        results["settings"] = {"fit_limit": self.fit_limit, "fit_count": len(self.splits["id_train"]), "seed": self.seed,  # type: ignore[arg-type]
                               "preprocess": getattr(self.preprocess, "config", lambda: None)(), "scores": self.settings}
        datasets = {**self.splits, **{o.name: o.dataset for o in self.ood_sets}}
        results["skipped_files"] = {k: files for k, d in datasets.items() if (files := skipped_files(d))}
        if self.chosen:
            results["search"] = {"metric": self.search_metric, "ood_val": [o.name for o in self.ood_val], "chosen": self.chosen}
        results["ood_sets"] = [{"name": o.name, "group": o.group, "count": len(o.dataset)} for o in self.ood_sets]  # type: ignore[arg-type]
        return results


def score_settings(score) -> Dict[str, Any]:
    """A fitted score's hyperparameters and the scalars fitting resolved (attributes ``name_``)."""
    def plain(v) -> bool:
        return v is None or isinstance(v, (bool, int, float, str)) or (isinstance(v, (list, tuple)) and all(map(plain, v)))

    resolved = {k: v for k, v in vars(score).items() if k.endswith("_") and not k.startswith("_")}
    return {k: v for k, v in {**score.hyperparameters(), **resolved}.items() if plain(v)}


def _subset(dataset: Dataset, idx: np.ndarray) -> Dataset:
    """A subset that keeps the fast ``images``/``labels`` path when the dataset has one."""
    imgs, labs = getattr(dataset, "images", None), getattr(dataset, "labels", None)
    if isinstance(imgs, torch.Tensor) and isinstance(labs, torch.Tensor):
        return _TensorSubset(imgs[torch.as_tensor(idx)], labs[torch.as_tensor(idx)])
    return Subset(dataset, idx.tolist())


class _TensorSubset(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])
