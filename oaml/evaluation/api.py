"""Evaluate a checkpoint on a named benchmark in one call (what ``oaml eval`` runs).

Everything is checked before any feature is extracted: the checkpoint, the score names and
settings, that every OOD set exists, that every image file opens, and the free space. The report
is written to a staging folder and moved into ``out_dir`` at the end, replacing only the files
an earlier report wrote there (:func:`~oaml.utils.io.replace_outputs`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from torch import nn

from .evaluator import DEFAULT_SCORES, Evaluator, OODSet
from ..utils.io import check_writable, replace_outputs, sha256_file
from .features import check_image_files
from .report import write_report

log = logging.getLogger(__name__)


def evaluate_checkpoint(
    checkpoint: str | Path,
    benchmark: str,
    out_dir: str | Path,
    scores: Optional[Sequence[str]] = None,
    extra_ood: Sequence[Tuple[str, str, str]] = (),
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
) -> Dict[str, Any]:
    """``skip_bad``: drop unreadable image files of folder / image-list datasets (each dataset logs
    how many it dropped); otherwise every unreadable file is named before any work and the run
    stops. ``score_ood_val``: also score the benchmark's OOD-val sets with the scores that need no
    model (features come from the cache) as ``results["ood_val"]``: what methods and settings are
    chosen on, never the test sets."""
    from ..data import get_benchmark
    from ..errors import ShapeError
    from ..models.checkpoint import load_student
    from ..utils.device import resolve_device

    bench = get_benchmark(benchmark)
    for name, path, group in extra_ood:
        bench = bench.with_extra_ood(name, path, group)
    dev = resolve_device(device)
    model, pre, meta = load_student(checkpoint, dev, expect_classes=bench.num_classes)
    if pre.channels != bench.channels:
        raise ShapeError(f"checkpoint {checkpoint} takes {pre.channels}-channel input but benchmark {benchmark!r} has {bench.channels}")
    meta = {"kind": "student", **{k: v for k, v in meta.items() if k != "config"}}
    return _evaluate(model, pre, checkpoint, sha256_file(checkpoint), meta, bench, benchmark, out_dir, scores=scores,
                     score_kwargs=score_kwargs, fit_limit=fit_limit, batch_size=batch_size, device=dev, root=root, plots=plots,
                     cache_dir=cache_dir, progress=progress, search=search, skip_bad=skip_bad, score_ood_val=score_ood_val)


def evaluate_teacher(
    teacher_checkpoint: str | Path,
    benchmark: str,
    out_dir: str | Path,
    scores: Optional[Sequence[str]],
    fit_limit: Optional[int] = None,
    batch_size: int = 512,
    device: str = "auto",
    root: Optional[str] = None,
    plots: bool = True,
    progress: bool = True,
    score_ood_val: bool = False,
) -> Dict[str, Any]:
    """The fine-tuned teacher at ``teacher_checkpoint`` as an OOD detector, with the evaluator and
    report of :func:`evaluate_checkpoint` (same ``results.json`` schema). The teacher sees the raw
    images through its own preprocessing. A score that needs what the teacher does not expose (a
    linear head for ViM / ReAct, feature maps for Gram) is skipped, the reason in ``results["skipped"]``."""
    from ..data import get_benchmark
    from ..errors import ShapeError
    from ..models.teachers import load_teacher_checkpoint

    bench = get_benchmark(benchmark)
    teacher = load_teacher_checkpoint(teacher_checkpoint, device=device)
    if teacher.num_classes != bench.num_classes:
        raise ShapeError(f"teacher {teacher_checkpoint} predicts {teacher.num_classes} classes but benchmark {benchmark!r} "
                         f"has {bench.num_classes}; fine-tune it on the benchmark's ID classes (`oaml teacher finetune`)")
    meta = {"kind": "teacher", **teacher.identity(), **teacher.info}
    # the teacher's model is a Classifier and its preprocessing a raw-uint8 -> input module, which
    # is what the evaluator takes from a student: no adapter needed (outputs() is exactly this pair)
    return _evaluate(teacher.model, teacher.preprocess, teacher_checkpoint, teacher.checkpoint_sha256, meta, bench, benchmark,
                     out_dir, scores=scores, fit_limit=fit_limit, batch_size=batch_size, device=teacher.device, root=root,
                     plots=plots, progress=progress, score_ood_val=score_ood_val)


def _evaluate(model: nn.Module, pre: nn.Module, checkpoint, model_id: str, meta: Dict[str, Any], bench, benchmark: str,
              out_dir, *, scores, device, root, plots, progress, fit_limit, batch_size, score_ood_val, score_kwargs=None,
              cache_dir=None, search=None, skip_bad=False) -> Dict[str, Any]:
    """Build the datasets and the evaluator, check everything, then run and publish the report."""
    from ..errors import ConfigError, DataError

    missing = [r.name for r in bench.ood_test_sets if not r.available(root)]
    if missing:
        raise DataError(
            f"benchmark {benchmark!r} lacks OOD sets {', '.join(missing)} under the data root; "
            f"run `oaml data prepare` for them (see `oaml data list`)"
        )
    if score_ood_val and not bench.ood_val:
        raise ConfigError(f"benchmark {benchmark!r} has no OOD-val sets; set eval.ood_val: false")
    ood = [OODSet(r.name, r.group, bench.build_ood(r, root, skip_bad)) for r in bench.ood_test_sets]
    val_sets = [OODSet(r.name, "far", bench.build_ood(r, root, skip_bad)) for r in bench.ood_val] if (search or score_ood_val) else []
    cache = cache_dir or Path(out_dir) / "feature_cache"
    ev = Evaluator(
        model, pre, bench.id_train(root, skip_bad), bench.id_val(root, skip_bad), bench.id_test(root, skip_bad), ood,
        scores=list(scores or DEFAULT_SCORES), score_kwargs=score_kwargs, device=device, batch_size=batch_size,
        cache_dir=cache, model_id=model_id,
        benchmark=benchmark, fit_limit=fit_limit, progress=progress, ood_val=val_sets if search else [], search=search,
    )
    datasets = [*ev.splits.values(), *(o.dataset for o in ood + val_sets)]
    if not skip_bad:  # skip_bad datasets decoded every file already
        check_image_files(datasets, progress)
    n_images = sum(len(d) for d in datasets)  # type: ignore[arg-type]
    feature_bytes = 4 * n_images * (int(getattr(model, "feature_dim", 0)) + int(getattr(model, "num_classes", 0)) + 2)
    report_bytes = 8 * n_images * len(ev.score_names) + (8 << 20 if plots else 0)
    check_writable(out_dir, report_bytes + (0 if cache_dir else feature_bytes), create=False)
    if cache_dir:
        check_writable(cache_dir, feature_bytes, create=False)
    with replace_outputs(out_dir) as stage:
        results = ev.run()
        if score_ood_val:
            results["ood_val"] = _score_ood_val(ev, val_sets, score_kwargs, fit_limit, progress, cache, model_id, benchmark)
        results["checkpoint"] = str(checkpoint)
        results["checkpoint_meta"] = meta
        write_report(stage, results, ev.raw_scores, plots=plots)
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
