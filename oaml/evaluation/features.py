"""Feature cache: logits and penultimate features, extracted once per (checkpoint, dataset split).

Every feature-based score fits and predicts from these; only the input-gradient / feature-map
scores (ODIN, Gram) need the model again. Entries are safetensors files whose metadata records
the checkpoint's sha256, the dataset, the split, the preprocessing and the count, so a stale
entry (other checkpoint, other preprocessing) is never reused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from ..errors import NonFiniteError
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
    model: nn.Module, preprocess: nn.Module, dataset: Dataset, batch_size: int = 512, device: str | torch.device = "cpu", progress: bool = False, desc: str = "features"
):
    """Run ``model.forward_features`` over ``dataset``; returns a :class:`~oaml.scores.base.FeatureSet`."""
    from tqdm.auto import tqdm

    from ..scores.base import FeatureSet

    model.eval()
    logits, feats, labels = [], [], []
    n_batches = (len(dataset) + batch_size - 1) // batch_size  # type: ignore[arg-type]
    for raw, y in tqdm(_batches(dataset, batch_size), total=n_batches, desc=desc, disable=not progress, mininterval=2.0, leave=False):
        lo, fe = model.forward_features(preprocess(raw.to(device)))
        logits.append(lo.float().cpu())
        feats.append(fe.float().cpu())
        labels.append(torch.as_tensor(y).long())
    fs = FeatureSet(logits=torch.cat(logits), features=torch.cat(feats), labels=torch.cat(labels))
    bad = int((~torch.isfinite(fs.logits)).sum() + (~torch.isfinite(fs.features)).sum())
    if bad:
        raise NonFiniteError(f"the model produced {bad} non-finite logits/features on {desc}; the checkpoint is broken")
    return fs


class FeatureCache:
    """On-disk cache of :class:`FeatureSet` per (model identity, dataset, split, preprocessing)."""

    def __init__(self, root: str | Path, model_id: str):
        self.root = Path(root)
        self.model_id = model_id

    def _path(self, key: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
        return self.root / self.model_id[:16] / f"{safe}.safetensors"

    def get_or_compute(self, key: str, meta: Dict[str, Any], compute) -> Any:
        from ..scores.base import FeatureSet

        path = self._path(key)
        want = {"model_id": self.model_id, "key": key, **{k: json.dumps(v, sort_keys=True) for k, v in meta.items()}}
        if path.is_file():
            try:
                from safetensors import safe_open

                with safe_open(str(path), "pt") as fh:
                    have = fh.metadata() or {}
                if all(have.get(k) == v for k, v in want.items()):
                    t = load_file(str(path))
                    log.debug("feature cache hit %s", path)
                    return FeatureSet(logits=t["logits"], features=t["features"], labels=t["labels"])
                log.info("feature cache entry %s was made with other settings; recomputing", path)
            except Exception as exc:  # corrupt entry: recompute, never trust it
                log.warning("feature cache entry %s is unreadable (%s); recomputing", path, exc)
        fs = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file(
                {"logits": fs.logits.contiguous(), "features": fs.features.contiguous(), "labels": fs.labels.contiguous()},
                str(tmp),
                metadata={**want, "count": str(len(fs.labels))},
            )
        return fs
