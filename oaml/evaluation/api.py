"""Evaluate a checkpoint on a named benchmark in one call (what ``oaml eval`` runs)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .evaluator import DEFAULT_SCORES, Evaluator, OODSet
from ..utils.io import sha256_file
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
    how many it dropped); otherwise the first unreadable file stops the run with its name.
    ``score_ood_val``: also score the benchmark's OOD-val sets with the scores that need no model
    (features come from the cache) as ``results["ood_val"]``: what methods and settings are
    chosen on, never the test sets."""
    from ..data import get_benchmark
    from ..models.checkpoint import load_student
    from ..utils.device import resolve_device

    bench = get_benchmark(benchmark)
    for name, path, group in extra_ood:
        bench = bench.with_extra_ood(name, path, group)
    dev = resolve_device(device)
    model, pre, meta = load_student(checkpoint, dev, expect_classes=bench.num_classes)
    if pre.channels != bench.channels:
        from ..errors import ShapeError

        raise ShapeError(f"checkpoint {checkpoint} takes {pre.channels}-channel input but benchmark {benchmark!r} has {bench.channels}")
    missing = [r.name for r in bench.ood_test_sets if not r.available(root)]
    if missing:
        from ..errors import DataError

        raise DataError(
            f"benchmark {benchmark!r} lacks OOD sets {', '.join(missing)} under the data root; "
            f"run `oaml data prepare` for them (see `oaml data list`)"
        )
    ood = [OODSet(r.name, r.group, bench.build_ood(r, root, skip_bad)) for r in bench.ood_test_sets]
    if score_ood_val and not bench.ood_val:
        from ..errors import ConfigError

        raise ConfigError(f"benchmark {benchmark!r} has no OOD-val sets; set eval.ood_val: false")
    val_sets = [OODSet(r.name, "far", bench.build_ood(r, root, skip_bad)) for r in bench.ood_val] if (search or score_ood_val) else []
    cache, model_id = cache_dir or Path(out_dir) / "feature_cache", sha256_file(checkpoint)
    ev = Evaluator(
        model, pre, bench.id_train(root, skip_bad), bench.id_val(root, skip_bad), bench.id_test(root, skip_bad), ood,
        scores=list(scores or DEFAULT_SCORES), score_kwargs=score_kwargs, device=dev, batch_size=batch_size,
        cache_dir=cache, model_id=model_id,
        benchmark=benchmark, fit_limit=fit_limit, progress=progress, ood_val=val_sets if search else [], search=search,
    )
    results = ev.run()
    if score_ood_val:
        from ..scores import SCORES

        feature_scores = [s for s in ev.score_names if not SCORES.get(s).requires_model]
        val = Evaluator(
            # the ID splits the first evaluator already built (and subset): their features come from the cache
            model, pre, ev.splits["id_train"], ev.splits["id_val"], ev.splits["id_test"], val_sets,
            scores=feature_scores, score_kwargs={k: v for k, v in (score_kwargs or {}).items() if k in feature_scores},
            device=dev, batch_size=batch_size, cache_dir=cache, model_id=model_id, benchmark=benchmark,
            fit_limit=fit_limit, progress=progress,
        ).run()
        results["ood_val"] = {"scores": {k: {"all": v["all"], "datasets": v["datasets"]} for k, v in val["scores"].items()},
                              "ood_sets": val["ood_sets"]}
    results["checkpoint"] = str(checkpoint)
    results["checkpoint_meta"] = {k: v for k, v in meta.items() if k != "config"}
    write_report(out_dir, results, ev.raw_scores, plots=plots)
    return results
