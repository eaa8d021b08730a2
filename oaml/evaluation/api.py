"""Evaluate a model on a benchmark or on your own data in one call (what ``oaml eval`` runs).

* :func:`evaluate` - any ``torch.nn.Module`` classifier (wrapped by
  :func:`~oaml.models.wrap.wrap_model`) on a benchmark (name or :class:`~oaml.data.Benchmark`)
  or on your datasets ``{"id_train", "id_test", "ood", optionally "id_val"}``;
* :func:`evaluate_checkpoint` - an oaml student checkpoint; :func:`evaluate_teacher` - a
  fine-tuned teacher.

All return :class:`Results` (the ``results.json`` dict, with ``to_csv`` / ``to_pandas`` /
markdown). Everything is checked before any feature is extracted: the model, the score names
and settings, that every OOD set exists, that every image file opens, and the free space. With an
``out_dir`` the report is written to a staging folder and moved into it at the end, replacing
only the files an earlier report wrote there (:func:`~oaml.utils.io.replace_outputs`).
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import ConfigError, ShapeError
from ..models.wrap import IMAGENET_MEAN, IMAGENET_STD
from ..utils.io import atomic_write_text, check_writable, replace_outputs, sha256_file, write_json
from .evaluator import GROUPS, METRIC_KEYS, Evaluator, OODSet, resolve_scores
from .features import check_image_files
from .report import markdown_table, plot_scores, write_report

log = logging.getLogger(__name__)

DATA_KEYS = ("id_train", "id_val", "id_test", "ood")


class Results(dict):
    """What an evaluation returns and writes as ``results.json``: ``id_accuracy``, ``scores``
    (per score: ``datasets`` -> per OOD set metrics and ``group``; ``near`` / ``far`` / ``all`` /
    ``extra`` means), ``ood_sets``, ``settings``, ``skipped``, ``skipped_files``. Every metric and
    accuracy is in percent. ``repr()`` is the markdown table."""

    def to_dict(self) -> Dict[str, Any]:
        return copy.deepcopy(dict(self))

    def rows(self) -> List[Dict[str, Any]]:
        """One row per (score, OOD set) and per (score, group mean ``mean_<group>``)."""
        out = []
        for score, entry in self["scores"].items():
            named = [(n, d["group"], d) for n, d in entry["datasets"].items()]
            named += [(f"mean_{g}", g, entry[g]) for g in GROUPS if g in entry]
            out += [{"score": score, "dataset": n, "group": g, **{k: d[k] for k in METRIC_KEYS}, "id_accuracy": self["id_accuracy"]}
                    for n, g, d in named]
        return out

    def to_csv(self, path: Optional[str | Path] = None) -> str:
        """The rows as CSV text (written to ``path`` too when given)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["score", "dataset", "group", *METRIC_KEYS, "id_accuracy"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows())
        if path is not None:
            atomic_write_text(path, buf.getvalue())
        return buf.getvalue()

    def to_pandas(self):
        """The rows as a ``pandas.DataFrame`` (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Results.to_pandas() needs pandas (pip install pandas); "
                              "to_csv(), to_dict() and rows() need nothing extra") from None
        return pd.DataFrame(self.rows())

    def to_markdown(self) -> str:
        lines = [f"ID accuracy {self['id_accuracy']:.2f}% ({self.get('benchmark', '')})", "", markdown_table(self).rstrip()]
        lines += [f"- skipped {name}: {why}" for name, why in self.get("skipped", {}).items()]
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return self.to_markdown()

    _repr_markdown_ = to_markdown


def evaluate(
    model,
    data,
    scores: Optional[Sequence[str]] = None,
    *,
    input_size: Optional[int] = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    feature_layer: Optional[str] = None,
    out_dir: Optional[str | Path] = None,
    score_kwargs: Optional[Dict[str, Dict[str, Any]]] = None,
    fit_limit: Optional[int] = None,
    batch_size: int = 256,
    device: str = "auto",
    root: Optional[str] = None,
    skip_bad: bool = False,
    cache_dir: Optional[str | Path] = None,
    search: Optional[Dict[str, Dict[str, list]]] = None,
    plots: bool = True,
    progress: bool = True,
) -> Results:
    """Post-hoc OOD scores of any classifier; returns :class:`Results`.

    ``model``: an ``nn.Module`` classifier (torchvision, timm, an oaml student, your own) or a
    ``(features_fn, head)`` pair; the feature and head are found as
    :func:`~oaml.models.wrap.wrap_model` documents (``feature_layer`` names the feature layer).
    ``data``: a benchmark name or :class:`~oaml.data.Benchmark` (with your sets added by
    ``with_extra_ood``), or ``{"id_train": ds, "id_test": ds, "ood": {name: ds or (ds, group)}}``
    plus optionally ``"id_val"`` (default: id_train; ReAct and KLM fit on it). A ``ds`` is a
    folder (ImageFolder layout for ID, ``classes`` sorted as torchvision; any images for OOD), an
    array ``(N, H, W[, C])`` (ID: ``(images, labels)``), or a torch ``Dataset`` yielding
    ``(image (C, H, W) uint8 or float in [0, 1], label)`` of one size. ``group``: near, far
    (default) or extra. Folders and arrays are resized to ``input_size``; every batch is then
    resized to ``input_size`` and normalised by ``mean`` / ``std`` (default ImageNet's), with the
    channels of the model's first convolution. ``out_dir``: also write the report there.
    """
    from ..models.preprocess import Preprocess
    from ..models.wrap import input_channels, module_sha256, wrap_model

    clf = wrap_model(model, feature_layer)
    pre = Preprocess(input_size, input_channels(clf), mean, std)
    model_id = module_sha256(clf) if (out_dir or cache_dir) else None
    meta = {"kind": "model", "model": type(model).__name__, "wrapper": type(clf).__name__, "feature_layer": feature_layer}
    kw = dict(scores=scores, score_kwargs=score_kwargs, fit_limit=fit_limit, batch_size=batch_size, device=device, plots=plots,
              progress=progress, cache_dir=cache_dir, search=search, skip_bad=skip_bad)
    if isinstance(data, dict):
        splits, ood, classes = _user_data(data, input_size, pre.channels, skip_bad)
        _check_classes(clf, len(classes) if classes else None, "the ID folder's classes")
        return _run(clf, pre, splits, ood, [], "custom", None, model_id, meta, out_dir, **kw)
    bench = _benchmark(data)
    _check_classes(clf, bench.num_classes, f"benchmark {bench.name!r}")
    return _evaluate(clf, pre, None, model_id, meta, bench, out_dir, root=root, **kw)


def _check_classes(clf: nn.Module, n: Optional[int], what: str) -> None:
    have = getattr(clf, "num_classes", None)
    if n is not None and have is not None and int(have) != n:
        raise ShapeError(f"the model predicts {have} classes but {what} has {n}; evaluate it on data with its ID classes")


def _benchmark(benchmark):
    """A :class:`~oaml.data.Benchmark` as given, or the registered one of that name."""
    from ..data import Benchmark, get_benchmark

    return benchmark if isinstance(benchmark, Benchmark) else get_benchmark(benchmark)


def _user_data(data: Dict[str, Any], size: Optional[int], channels: int, skip_bad: bool):
    """``(splits, ood sets, ID class names or None)`` from an ``evaluate`` data dict."""
    unknown, missing = set(data) - set(DATA_KEYS), {"id_train", "id_test", "ood"} - set(data)
    if unknown or missing or not isinstance(data.get("ood"), dict) or not data["ood"]:
        raise ConfigError(f"data needs the keys id_train, id_test and ood (a non-empty dict name -> dataset or (dataset, group)), "
                          f"optionally id_val; got {sorted(data)}")
    train, classes = _user_dataset(data["id_train"], "id_train", size, channels, skip_bad)
    splits = {"id_train": train}
    for key in ("id_val", "id_test"):
        splits[key] = _user_dataset(data[key], key, size, channels, skip_bad, classes=classes)[0] if key in data else train
    ood = []
    for name, item in data["ood"].items():
        item, group = item if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], str) else (item, "far")
        ood.append(OODSet(name, group, _user_dataset(item, name, size, channels, skip_bad, ood=True)[0]))
    return splits, ood, classes


def _user_dataset(item, what: str, size: Optional[int], channels: int, skip_bad: bool, ood: bool = False, classes=None):
    """``(dataset in the model's size and channels, its class names or None)``: a folder, an array
    (ID: ``(images, labels)``), an oaml folder / array dataset, or any torch Dataset (as it is)."""
    from ..data.base import ConvertedDataset, TensorImageDataset
    from ..data.user import ArrayDataset, FolderDataset, _FileImageDataset

    if isinstance(item, (str, os.PathLike)):
        item = FolderDataset(item, layout="flat" if ood else "classes", skip_bad=skip_bad, classes=classes, name=what)
    elif isinstance(item, (np.ndarray, torch.Tensor, tuple)):
        images, labels = item if isinstance(item, tuple) else (item, None)
        if labels is None and not ood:
            raise ConfigError(f"{what}: ID images as an array need their labels: pass (images, labels)")
        item = ArrayDataset(images, labels, name=what)
    if isinstance(item, TensorImageDataset):
        return item.converted(size, channels), None
    if isinstance(item, _FileImageDataset):
        if size is None:
            raise ConfigError(f"{what}: image folders need input_size (CLI: --input-size), the side their images are resized to")
        return ConvertedDataset(item, size, channels, ood=ood), (getattr(item, "classes", None) or None)
    if not isinstance(item, Dataset):
        raise ConfigError(f"{what}: expected a folder, an array or a torch Dataset, got {type(item).__name__}")
    return item, None


def evaluate_checkpoint(
    checkpoint: str | Path,
    benchmark,
    out_dir: str | Path,
    scores: Optional[Sequence[str]] = None,
    extra_ood: Sequence[Tuple[str, Any, str]] = (),
    score_kwargs: Optional[Dict[str, Dict[str, Any]]] = None,
    fit_limit: Optional[int] = None,
    batch_size: int = 512,
    device: str = "auto",
    root: Optional[str] = None,
    plots: bool = True,
    cache_dir: Optional[str | Path] = None,
    progress: bool = True,
    search: Optional[Dict[str, Dict[str, list]]] = None,
    skip_bad: bool = False,
    score_ood_val: bool = False,
) -> Results:
    """``benchmark``: a name or a :class:`~oaml.data.Benchmark` (e.g. with ``with_extra_ood``);
    ``extra_ood``: ``(name, folder or array, group)`` sets to add (group ``extra``: own row,
    outside near / far / all). ``skip_bad``: drop unreadable image files of folder / image-list datasets (each dataset logs
    how many it dropped); otherwise every unreadable file is named before any work and the run
    stops. ``score_ood_val``: also score the benchmark's OOD-val sets with the scores that need no
    model (features come from the cache) as ``results["ood_val"]``: what methods and settings are
    chosen on, never the test sets."""
    from ..models.checkpoint import load_student
    from ..utils.device import resolve_device

    bench = _benchmark(benchmark)
    for name, path, group in extra_ood:
        bench = bench.with_extra_ood(name, path, group)
    dev = resolve_device(device)
    model, pre, meta = load_student(checkpoint, dev, expect_classes=bench.num_classes)
    if pre.channels != bench.channels:
        raise ShapeError(f"checkpoint {checkpoint} takes {pre.channels}-channel input but benchmark {bench.name!r} has {bench.channels}")
    meta = {"kind": "student", **{k: v for k, v in meta.items() if k != "config"}}
    return _evaluate(model, pre, checkpoint, sha256_file(checkpoint), meta, bench, out_dir, scores=scores,
                     score_kwargs=score_kwargs, fit_limit=fit_limit, batch_size=batch_size, device=dev, root=root, plots=plots,
                     cache_dir=cache_dir, progress=progress, search=search, skip_bad=skip_bad, score_ood_val=score_ood_val)


def evaluate_teacher(
    teacher_checkpoint: str | Path,
    benchmark,
    out_dir: str | Path,
    scores: Optional[Sequence[str]],
    fit_limit: Optional[int] = None,
    batch_size: int = 512,
    device: str = "auto",
    root: Optional[str] = None,
    plots: bool = True,
    progress: bool = True,
    score_ood_val: bool = False,
) -> Results:
    """The fine-tuned teacher at ``teacher_checkpoint`` as an OOD detector, with the evaluator and
    report of :func:`evaluate_checkpoint` (same ``results.json`` schema). The teacher sees the raw
    images through its own preprocessing. A score that needs what the teacher does not expose (a
    linear head for ViM / ReAct, feature maps for Gram) is skipped, the reason in ``results["skipped"]``."""
    from ..models.teachers import load_teacher_checkpoint

    bench = _benchmark(benchmark)
    teacher = load_teacher_checkpoint(teacher_checkpoint, device=device)
    if teacher.num_classes != bench.num_classes:
        raise ShapeError(f"teacher {teacher_checkpoint} predicts {teacher.num_classes} classes but benchmark {bench.name!r} "
                         f"has {bench.num_classes}; fine-tune it on the benchmark's ID classes (`oaml teacher finetune`)")
    meta = {"kind": "teacher", **teacher.identity(), **teacher.info}
    # the teacher's model (flip-averaged under tta: hflip) is a Classifier and its preprocessing a raw-uint8 ->
    # input module, which is what the evaluator takes from a student: no adapter needed (outputs() is this pair)
    return _evaluate(teacher.net, teacher.preprocess, teacher_checkpoint, teacher.checkpoint_sha256, meta, bench, out_dir,
                     scores=scores, fit_limit=fit_limit, batch_size=batch_size, device=teacher.device, root=root,
                     plots=plots, progress=progress, score_ood_val=score_ood_val)


def _evaluate(model: nn.Module, pre: nn.Module, checkpoint, model_id: Optional[str], meta: Dict[str, Any], bench, out_dir, *,
              root, skip_bad=False, search=None, score_ood_val=False, **kw) -> Results:
    """Build the benchmark's datasets (checking that every OOD set exists), then :func:`_run`."""
    from ..errors import DataError

    missing = [r.name for r in bench.ood_test_sets if not r.available(root)]
    if missing:
        raise DataError(
            f"benchmark {bench.name!r} lacks OOD sets {', '.join(missing)} under the data root; "
            f"run `oaml data prepare` for them (see `oaml data list`)"
        )
    if score_ood_val and not bench.ood_val:
        raise ConfigError(f"benchmark {bench.name!r} has no OOD-val sets; set eval.ood_val: false")
    ood = [OODSet(r.name, r.group, bench.build_ood(r, root, skip_bad)) for r in bench.ood_test_sets]
    val_sets = [OODSet(r.name, "far", bench.build_ood(r, root, skip_bad)) for r in bench.ood_val] if (search or score_ood_val) else []
    splits = {f"id_{s}": bench.id_split(s, root, skip_bad) for s in ("train", "val", "test")}
    return _run(model, pre, splits, ood, val_sets, bench.name, checkpoint, model_id, meta, out_dir, skip_bad=skip_bad,
                search=search, score_ood_val=score_ood_val, **kw)


def _run(model: nn.Module, pre: nn.Module, splits: Dict[str, Dataset], ood: List[OODSet], val_sets: List[OODSet], benchmark: str,
         checkpoint, model_id: Optional[str], meta: Dict[str, Any], out_dir, *, scores, device, plots, progress, fit_limit,
         batch_size, score_ood_val=False, score_kwargs=None, cache_dir=None, search=None, skip_bad=False) -> Results:
    """Build the evaluator, check every image file and the free space, then run; with ``out_dir``
    publish the report there."""
    cache = cache_dir or (Path(out_dir) / "feature_cache" if out_dir else None)
    ev = Evaluator(
        model, pre, splits["id_train"], splits["id_val"], splits["id_test"], ood,
        scores=resolve_scores(scores), score_kwargs=score_kwargs, device=device, batch_size=batch_size,
        cache_dir=cache, model_id=model_id,
        benchmark=benchmark, fit_limit=fit_limit, progress=progress, ood_val=val_sets if search else [], search=search,
    )
    datasets = [*ev.splits.values(), *(o.dataset for o in ood + val_sets)]
    t_start = time.perf_counter()
    if not skip_bad:  # skip_bad datasets decoded every file already
        check_image_files(datasets, progress)
    t_checked = time.perf_counter()
    n_images = sum(len(d) for d in datasets)  # type: ignore[arg-type]
    feature_bytes = 4 * n_images * (int(getattr(model, "feature_dim", 0)) + int(getattr(model, "num_classes", 0)) + 2)
    if out_dir is not None:
        report_bytes = 8 * n_images * len(ev.score_names) + (8 << 20 if plots else 0)
        check_writable(out_dir, report_bytes + (0 if cache_dir else feature_bytes), create=False)
    if cache_dir:
        check_writable(cache_dir, feature_bytes, create=False)

    def compute() -> Results:
        t = time.perf_counter()
        results = Results(ev.run())
        results["profile_seconds"]["evaluate"] = time.perf_counter() - t
        if score_ood_val:
            t = time.perf_counter()
            results["ood_val"] = _score_ood_val(ev, val_sets, score_kwargs, fit_limit, progress, cache, model_id, benchmark)
            results["profile_seconds"]["ood_val"] = time.perf_counter() - t
        results["checkpoint"] = None if checkpoint is None else str(checkpoint)
        # one unit: accuracies in percent, as id_accuracy and every metric (checkpoints store fractions)
        results["checkpoint_meta"] = {k: 100.0 * v if k.endswith("accuracy") and isinstance(v, float) else v for k, v in meta.items()}
        return results

    if out_dir is None:
        return compute()
    with replace_outputs(out_dir) as stage:
        results = compute()
        prof = results["profile_seconds"]
        prof["check_files"] = t_checked - t_start
        t = time.perf_counter()
        write_report(stage, results, ev.raw_scores, plots=False)
        prof["write"] = time.perf_counter() - t
        t = time.perf_counter()
        if plots:
            plot_scores(Path(stage) / "plots", ev.raw_scores, results)
        prof["plots"] = time.perf_counter() - t
        prof["total"] = time.perf_counter() - t_start
        # the whole profile, writing and plots included (results.json was written before they ended)
        write_json(Path(stage) / "profile.json", prof)
    return results


def _score_ood_val(ev: Evaluator, val_sets, score_kwargs, fit_limit, progress, cache, model_id, benchmark) -> Dict[str, Any]:
    from ..scores import SCORES

    feature_scores = [s for s in ev.score_names if not SCORES.get(s).requires_model]
    val = Evaluator(
        # the ID splits the first evaluator already built (and subset): their features come from the cache
        ev.model, ev.preprocess, ev.splits["id_train"], ev.splits["id_val"], ev.splits["id_test"], val_sets,
        scores=feature_scores, score_kwargs={k: v for k, v in (score_kwargs or {}).items() if k in feature_scores},
        device=ev.device, batch_size=ev.batch_size, cache_dir=cache, model_id=model_id, benchmark=benchmark,
        fit_limit=fit_limit, progress=progress,
    ).run()
    return {"scores": {k: {"all": v["all"], "datasets": v["datasets"]} for k, v in val["scores"].items()},
            "ood_sets": val["ood_sets"]}
