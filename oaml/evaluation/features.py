"""Feature cache: logits and penultimate features (and, on request, pooled activations of named
inner layers), extracted once per (checkpoint, dataset split).

Every feature-based score fits and predicts from these (multi-layer ones from the pooled inner
activations, ``FeatureSet.layers``); only the input-gradient / feature-map scores (ODIN, Gram,
MDS-ODIN, RankFeat, VRA, NAC, GradUncertainty) need the model again. Entries are safetensors files named and stamped by the
checkpoint's sha256, the split, the preprocessing, the count and the dataset's content
(:func:`dataset_fingerprint`: file paths, sizes and mtimes, or the bytes of in-memory images),
so a stale entry (other checkpoint, other preprocessing, other images under the same name) is
never reused, and one cache folder can serve any number of runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from ..data.fingerprint import _parts, dataset_fingerprint  # noqa: F401  (dataset_fingerprint: the cache keys)
from ..errors import DataError, NonFiniteError
from ..utils.io import atomic_path

log = logging.getLogger(__name__)


def _batches(dataset: Dataset, batch_size: int, num_workers: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    from ..training.trainer import BatchFetcher

    yield from BatchFetcher(dataset, num_workers).in_order(batch_size)


class PreprocessedLoader:
    """Iterate ``(preprocessed inputs, labels)`` batches of a raw-uint8 dataset (for ODIN, Gram)."""

    def __init__(self, dataset: Dataset, preprocess: nn.Module, batch_size: int = 256, device: str | torch.device = "cpu"):
        self.dataset, self.preprocess, self.batch_size, self.device = dataset, preprocess, batch_size, torch.device(device)

    def __iter__(self):
        for raw, labels in _batches(self.dataset, self.batch_size):
            yield self.preprocess(raw.to(self.device)), labels

    def __len__(self) -> int:
        return (len(self.dataset) + self.batch_size - 1) // self.batch_size  # type: ignore[arg-type]


@torch.no_grad()
def extract_features(
    model: nn.Module, preprocess: nn.Module, dataset: Dataset, batch_size: int = 512, device: str | torch.device = "cpu", progress: bool = False, desc: str = "features",
    layers: Optional[Sequence[str]] = None,
):
    """Run ``model.forward_features`` over ``dataset``; returns a :class:`~oaml.scores.base.FeatureSet`.

    ``layers``: names of ``model.named_modules()`` (e.g. ``score.needed_layers(model)``) whose
    outputs are recorded by forward hooks during the same pass, globally average-pooled to
    (N, C_l) (:func:`~oaml.scores.base.pool_activation`), into ``FeatureSet.layers``. An unknown
    name is a ConfigError listing valid ones; each module must run exactly once per forward.
    """
    from ..utils.progress import progress_bar

    from ..scores.base import FeatureSet, check_ran_once, pool_activation, tap_layers

    model.eval()
    names = list(dict.fromkeys(layers or ()))
    logits, feats, labels = [], [], []
    acts: Dict[str, List[torch.Tensor]] = {n: [] for n in names}

    def record(name: str, out: torch.Tensor) -> None:
        # pooled at once: the model may change the output in place afterwards (``out += identity``)
        acts[name].append(pool_activation(out, f"output of module {name!r}").float().cpu())

    n_batches = (len(dataset) + batch_size - 1) // batch_size  # type: ignore[arg-type]
    with tap_layers(model, names, record) as counts:
        for raw, y in progress_bar(_batches(dataset, batch_size), total=n_batches, desc=desc, disable=not progress, mininterval=2.0, leave=False):
            lo, fe = model.forward_features(preprocess(raw.to(device)))
            check_ran_once(counts)
            logits.append(lo.float().cpu())
            feats.append(fe.float().cpu())
            labels.append(torch.as_tensor(y).long())
    layer_acts = {n: torch.cat(v) for n, v in acts.items()} if names else None
    fs = FeatureSet(logits=torch.cat(logits), features=torch.cat(feats), labels=torch.cat(labels), layers=layer_acts)
    bad = int((~torch.isfinite(fs.logits)).sum() + (~torch.isfinite(fs.features)).sum())
    bad += sum(int((~torch.isfinite(v)).sum()) for v in (layer_acts or {}).values())
    if bad:
        raise NonFiniteError(f"the model produced {bad} non-finite logits/features on {desc}; the checkpoint is broken")
    return fs


def image_files(datasets: Iterable[Dataset]) -> List[Path]:
    """Every image file the datasets read (each once, in order)."""
    seen: Dict[Path, None] = {}
    for ds in datasets:
        for part in _parts(ds):
            if part[0] == "files":
                seen.update((Path(p), None) for p, _ in part[2])
    return list(seen)


def skipped_files(dataset: Dataset) -> List[str]:
    """The unreadable files a ``skip_bad`` dataset dropped (through conversions and subsets)."""
    return [str(p) for part in _parts(dataset) if part[0] == "files" for p in part[3]]


def check_image_files(datasets: Iterable[Dataset], progress: bool = False) -> None:
    """Open every image file of ``datasets`` (header and structure, no full decode) before any
    work; a DataError names every one that fails, and each is logged."""
    from PIL import Image
    from ..utils.progress import progress_bar

    files, bad = image_files(datasets), []
    for path in progress_bar(files, desc="checking image files", disable=not progress or len(files) < 2000, leave=False):
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as exc:  # PIL raises many types for broken files
            bad.append(path)
            log.warning("unreadable image file %s: %s: %s", path, type(exc).__name__, exc)
    if bad:
        shown = ", ".join(str(p) for p in bad[:20]) + (f" and {len(bad) - 20} more (all logged above)" if len(bad) > 20 else "")
        raise DataError(
            f"{len(bad)} of {len(files)} image files cannot be read: {shown}. "
            "Replace or delete them, or pass skip_bad=True (CLI: --skip-bad) to drop unreadable files"
        )


LAYER_PREFIX = "layer."  # safetensors key of FeatureSet.layers[name]


class FeatureCache:
    """On-disk cache of :class:`FeatureSet` per (model identity, split, everything in ``meta``:
    preprocessing, count, the dataset's content fingerprint, and the inner layer names when
    ``FeatureSet.layers`` is requested: the evaluator puts them in ``meta``); the file name holds
    a digest of all of it, so entries of other content (or without the requested layers) never
    share a file."""

    def __init__(self, root: str | Path, model_id: str):
        self.root = Path(root)
        self.model_id = model_id

    def _path(self, key: str, want: Dict[str, str]) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
        digest = hashlib.sha256(json.dumps(want, sort_keys=True).encode()).hexdigest()[:16]
        return self.root / self.model_id[:16] / f"{safe}-{digest}.safetensors"

    def get_or_compute(self, key: str, meta: Dict[str, Any], compute) -> Any:
        from ..scores.base import FeatureSet

        want = {"model_id": self.model_id, "key": key, **{k: json.dumps(v, sort_keys=True) for k, v in meta.items()}}
        path = self._path(key, want)
        if path.is_file():
            try:
                from safetensors import safe_open

                with safe_open(str(path), "pt") as fh:
                    have = fh.metadata() or {}
                if all(have.get(k) == v for k, v in want.items()):
                    t = load_file(str(path))
                    log.debug("feature cache hit %s", path)
                    names = json.loads(have.get("layer_names", "[]"))
                    layers = {n: t[LAYER_PREFIX + n] for n in names} if names else None
                    return FeatureSet(logits=t["logits"], features=t["features"], labels=t["labels"], layers=layers)
                log.info("feature cache entry %s was made with other settings; recomputing", path)
            except Exception as exc:  # corrupt entry: recompute, never trust it
                log.warning("feature cache entry %s is unreadable (%s); recomputing", path, exc)
        fs = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        layers = fs.layers or {}
        tensors = {"logits": fs.logits.contiguous(), "features": fs.features.contiguous(), "labels": fs.labels.contiguous()}
        tensors.update({LAYER_PREFIX + n: v.contiguous() for n, v in layers.items()})
        extra = {"layer_names": json.dumps(list(layers))} if layers else {}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={**want, "count": str(len(fs.labels)), **extra})
        return fs
