"""The ID feature bank (OAML step 1) and the teacher-output cache.

:func:`extract_feature_bank` runs a teacher over a labelled dataset and writes its penultimate
features to a :mod:`bank <oaml.outliers.bank>` (kind ``"id_features"``), grouped by class (rows
sorted by class, then dataset index; ``order="index"`` keeps dataset order). Memory is bounded
by one shard plus one batch. The selection of samples is deterministic (``per_class_limit``
draws a seeded subset per class), so an interrupted extraction resumes after the last whole
shard on disk: the rows already written are skipped, not recomputed. The bank's meta records
the teacher's :meth:`~oaml.models.teachers.Teacher.identity`, the dataset, split, selection and
per-class counts; ``dataset_indices.npy`` in the bank folder maps each row to its dataset index.
With ``with_logits=True`` the teacher's logits go to a sibling bank ``<out>/logits`` with the
same rows.

:class:`TeacherOutputCache` is that pair of banks for a whole training set in dataset order:
training without augmentation looks up ``(logits, features)`` by sample index instead of
running the teacher every step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BankError, ConfigError
from ..models.teachers import Teacher, dataset_labels, iter_batches
from ..utils.io import atomic_path, check_writable, read_json
from .bank import MANIFEST, Bank, BankWriter

log = logging.getLogger(__name__)

ID_FEATURES = "id_features"
TEACHER_LOGITS = "teacher_logits"
INDEX_FILE = "dataset_indices.npy"


def select_indices(labels: np.ndarray, per_class_limit: int | None, order: str, seed: int) -> np.ndarray:
    """The dataset indices a bank holds, in bank-row order (deterministic for fixed inputs)."""
    if order not in ("class", "index"):
        raise ConfigError(f"order must be 'class' or 'index', got {order!r}")
    if per_class_limit is not None and per_class_limit <= 0:
        raise ConfigError(f"per_class_limit must be positive, got {per_class_limit}")
    idx = np.arange(labels.shape[0])
    if per_class_limit is not None:
        rng = np.random.default_rng(seed)
        keep = []
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            if members.size > per_class_limit:
                members = np.sort(rng.choice(members, size=per_class_limit, replace=False))
            keep.append(members)
        idx = np.sort(np.concatenate(keep)) if keep else idx[:0]
    if order == "class":
        idx = idx[np.argsort(labels[idx], kind="stable")]
    return idx


def _normalised(meta: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(meta, default=str))


def extract_feature_bank(
    teacher: Teacher,
    dataset,
    out_path: str | Path,
    batch_size: int = 256,
    per_class_limit: int | None = None,
    shard_size: int = 65536,
    resume: bool = True,
    overwrite: bool = False,
    with_logits: bool = False,
    *,
    dataset_name: str | None = None,
    split: str | None = None,
    order: str = "class",
    seed: int = 0,
    num_workers: int = 0,
    progress: bool = True,
    kind: str = ID_FEATURES,
) -> Bank:
    """Write ``teacher``'s features of ``dataset`` to a bank at ``out_path`` and open it.

    ``resume=True`` continues an interrupted extraction with the same settings (and returns a
    finished one as is); ``overwrite=True`` rebuilds whatever is there. A bank at ``out_path``
    made with other settings (another teacher, dataset, selection) is refused.
    """
    out_path = Path(out_path)
    labels = dataset_labels(dataset)
    if labels.size and labels.min() < 0:
        raise ConfigError("the ID feature bank needs labelled ID data; this dataset has label -1 (an OOD set?)")
    indices = select_indices(labels, per_class_limit, order, seed)
    classes, counts = np.unique(labels[indices], return_counts=True)
    meta = _normalised(
        {
            "teacher": teacher.identity(),
            "dataset": dataset_name or getattr(dataset, "name", None) or type(dataset).__name__,
            "split": split,
            "dataset_size": int(labels.shape[0]),
            "per_class_limit": per_class_limit,
            "order": order,
            "seed": seed,
            "selection_sha256": hashlib.sha256(indices.astype(np.int64).tobytes()).hexdigest(),
            "selected_per_class": {str(int(c)): int(n) for c, n in zip(classes, counts)},
            "with_logits": with_logits,
            "feature": "penultimate (teacher.model.features, eval mode)",
        }
    )
    dim = teacher.feature_dim
    manifest = out_path / MANIFEST
    if manifest.is_file() and resume and not overwrite:
        old = read_json(manifest)
        if old.get("complete") and old.get("kind") == kind and old.get("dim") == dim and old.get("meta") == meta:
            log.info("bank %s is already complete with these settings; opening it", out_path)
            return Bank.open(out_path)

    # vectors + labels (+ logits), before any work
    row_bytes = 4 * dim + 8 + ((4 * teacher.num_classes + 8) if with_logits else 0)
    check_writable(out_path, need_bytes=int(indices.size) * row_bytes + 8 * int(indices.size))
    fw = BankWriter(out_path, kind, dim, meta, shard_size=shard_size, resume=resume, overwrite=overwrite)
    lw = None
    if with_logits:
        lmeta = {**meta, "rows_match": str(out_path)}
        lw = BankWriter(out_path / "logits", TEACHER_LOGITS, teacher.num_classes, lmeta, shard_size=shard_size, resume=resume, overwrite=overwrite)
    with atomic_path(out_path / INDEX_FILE) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, indices.astype(np.int64))
    writers = [w for w in (fw, lw) if w is not None]
    done = [w.written for w in writers]
    start = min(done)
    if start:
        log.info("resuming %s after %d of %d rows", out_path, start, indices.size)
    todo = indices[start:]
    teacher.eval()
    t0 = time.perf_counter()
    pos = start
    n_batches = math.ceil(todo.size / batch_size)
    it = iter_batches(dataset, todo, batch_size, num_workers)
    if progress:
        from ..utils.progress import progress_bar

        it = progress_bar(it, total=n_batches, desc=f"features -> {out_path.name}", dynamic_ncols=True)
    for x, y, _ in it:
        logits, feats = teacher.outputs(x)
        n = len(y)
        for w, already, vec in zip(writers, done, (feats, logits)):
            skip = max(0, already - pos)
            if skip < n:
                w.add(vec[skip:], y[skip:])
        pos += n
    bank = fw.close()
    if lw is not None:
        lw.close()
    log.info("feature bank %s: %d rows x %d in %.1fs", out_path, len(bank), dim, time.perf_counter() - t0)
    return bank


def bank_indices(bank: Bank) -> np.ndarray:
    """Dataset index of each row of a bank written by :func:`extract_feature_bank`."""
    path = bank.path / INDEX_FILE
    if not path.is_file():
        raise BankError(f"{bank.path} has no {INDEX_FILE}; it was not written by extract_feature_bank")
    idx = np.load(path)
    if idx.shape[0] != len(bank):
        raise BankError(f"{path} has {idx.shape[0]} entries for {len(bank)} bank rows; rebuild the bank with --overwrite")
    return idx


def open_feature_bank(path: str | Path, teacher: Teacher | None = None, **expected: Any) -> Bank:
    """Open an ID feature bank, checking it was made by ``teacher`` (and any other meta given)."""
    bank = Bank.open(path)
    if bank.kind != ID_FEATURES:
        raise BankError(f"{bank.path} is a {bank.kind!r} bank, not an ID feature bank ({ID_FEATURES!r})")
    if teacher is not None:
        expected["teacher"] = _normalised({"t": teacher.identity()})["t"]
    if expected:
        bank.require(**expected)
    return bank


class TeacherOutputCache:
    """Teacher ``(logits, features)`` for every sample of a dataset, looked up by dataset index.

    Valid only while the teacher sees exactly the cached images: training WITHOUT augmentation
    (with augmentation the teacher must run on the augmented batch). Build with
    :meth:`build`; :meth:`require` checks the teacher identity.
    """

    def __init__(self, path: str | Path, in_memory: bool = False):
        self.path = Path(path)
        self.features_bank = Bank.open(self.path)
        self.logits_bank = Bank.open(self.path / "logits")
        meta = self.features_bank.meta
        if meta.get("order") != "index" or meta.get("per_class_limit") is not None:
            raise BankError(f"{self.path} is not a teacher-output cache (rows are not the whole dataset in index order)")
        if len(self.logits_bank) != len(self.features_bank):
            raise BankError(f"{self.path}: {len(self.features_bank)} feature rows but {len(self.logits_bank)} logit rows; rebuild it")
        self.size = len(self.features_bank)
        self._mem: tuple[np.ndarray, np.ndarray] | None = None
        if in_memory:
            self._mem = (self.logits_bank.to_numpy()[0], self.features_bank.to_numpy()[0])

    @classmethod
    def build(cls, teacher: Teacher, dataset, path: str | Path, in_memory: bool = False, **kwargs: Any) -> "TeacherOutputCache":
        kwargs.setdefault("kind", "teacher_outputs")
        extract_feature_bank(teacher, dataset, path, order="index", with_logits=True, per_class_limit=None, **kwargs)
        return cls(path, in_memory=in_memory)

    @property
    def teacher(self) -> dict[str, Any]:
        return self.features_bank.meta["teacher"]

    def require(self, teacher: Teacher) -> None:
        self.features_bank.require(teacher=_normalised({"t": teacher.identity()})["t"])

    def lookup(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, C), features (B, D))`` float32 tensors for dataset ``indices``."""
        idx = np.asarray(indices.cpu() if hasattr(indices, "cpu") else indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.size):
            raise IndexError(f"teacher-output cache {self.path} holds {self.size} samples; index out of range")
        if self._mem is not None:
            return torch.from_numpy(self._mem[0][idx]), torch.from_numpy(self._mem[1][idx])
        return torch.from_numpy(self.logits_bank.gather(idx)), torch.from_numpy(self.features_bank.gather(idx))

    def __len__(self) -> int:
        return self.size
