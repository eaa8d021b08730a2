"""Banks: sets of vectors with class labels, stored as sharded ``.npy`` files plus a manifest.

The same format holds every vector set of the pipeline: the teacher's ID feature bank, the
C-OOD bank (k-NN boundary outliers) and the D-OOD bank (diffusion outliers). Layout::

    BANK/
      manifest.json                 what made it, counts, shards with sha256, ``complete`` flag
      shard-00000.npy               (n, D) float32 vectors
      shard-00000.labels.npy        (n,) int64 class of each vector (class of origin for outliers)
      ...

Writing is shard by shard: each shard is written under a temporary name and renamed, then the
manifest is rewritten atomically. A killed job therefore leaves only whole shards, and the
manifest says ``"complete": false`` until :meth:`BankWriter.close`; reopening the writer with
``resume=True`` continues after the last whole shard. Reading takes only the rows asked for from
the shard files (``pread`` per run of consecutive rows; :meth:`Bank.iter_shards` memory-maps), so
peak memory is bounded by what is gathered, not by the bank size.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ..errors import BankError, ShapeError
from ..utils.io import atomic_path, read_json, sha256_file, write_json

FORMAT = "oaml-bank/1"
MANIFEST = "manifest.json"


def _to_numpy(x: Any, dtype: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=dtype)


class BankWriter:
    """Append vectors and labels to a bank, one shard at a time.

    ``meta`` records what made the bank (teacher, dataset, sampler settings, seed, versions).
    With ``resume=True`` an incomplete bank with the *same* kind, dim and meta is continued;
    ``written`` tells the caller how many rows are already on disk so it can skip them. An
    existing bank made with other settings is refused unless ``overwrite=True``.
    """

    def __init__(
        self,
        path: str | Path,
        kind: str,
        dim: int,
        meta: Mapping[str, Any] | None = None,
        shard_size: int = 65536,
        resume: bool = True,
        overwrite: bool = False,
    ):
        if dim <= 0:
            raise ShapeError(f"bank dim must be positive, got {dim}")
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.path = Path(path)
        self.kind = kind
        self.dim = int(dim)
        self.meta = json.loads(json.dumps(dict(meta or {}), default=str))
        self.shard_size = int(shard_size)
        self._buf_v: list[np.ndarray] = []
        self._buf_l: list[np.ndarray] = []
        self._buffered = 0
        self.shards: list[dict[str, Any]] = []
        self._closed = False
        manifest_path = self.path / MANIFEST
        if manifest_path.exists():
            old = read_json(manifest_path)
            same = old.get("kind") == kind and old.get("dim") == self.dim and old.get("meta") == self.meta
            if overwrite:
                shutil.rmtree(self.path)
            elif old.get("complete") and same:
                raise BankError(
                    f"bank {self.path} is already complete with these settings; open it with "
                    "Bank.open() or pass overwrite=True (--overwrite) to rebuild it"
                )
            elif not same:
                raise BankError(
                    f"{self.path} holds a bank made with other settings (kind={old.get('kind')}, "
                    f"dim={old.get('dim')}); refusing to mix them. Choose another output folder "
                    "or pass overwrite=True (--overwrite)"
                )
            elif resume:
                self.shards = list(old.get("shards", []))
                self._drop_partial_files()
            else:
                shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._write_manifest(complete=False)

    @property
    def written(self) -> int:
        """Rows safely on disk (whole shards)."""
        return sum(int(s["count"]) for s in self.shards)

    @property
    def count(self) -> int:
        return self.written + self._buffered

    def _drop_partial_files(self) -> None:
        keep = {s["file"] for s in self.shards} | {s["labels"] for s in self.shards} | {MANIFEST}
        for f in self.path.iterdir():
            if f.is_file() and f.name not in keep:
                f.unlink()

    def add(self, vectors: Any, labels: Any) -> None:
        if self._closed:
            raise BankError("this BankWriter is closed")
        v = _to_numpy(vectors, np.float32)
        lab = _to_numpy(labels, np.int64).reshape(-1)
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise ShapeError(f"bank {self.path} stores vectors of shape (n, {self.dim}); got {tuple(v.shape)}")
        if lab.shape[0] != v.shape[0]:
            raise ShapeError(f"{v.shape[0]} vectors but {lab.shape[0]} labels")
        if not np.isfinite(v).all():
            raise BankError(f"refusing to write {int((~np.isfinite(v)).sum())} non-finite values into {self.path}")
        self._buf_v.append(v)
        self._buf_l.append(lab)
        self._buffered += v.shape[0]
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        v = np.concatenate(self._buf_v) if len(self._buf_v) > 1 else self._buf_v[0]
        lab = np.concatenate(self._buf_l) if len(self._buf_l) > 1 else self._buf_l[0]
        idx = len(self.shards)
        vf, lf = f"shard-{idx:05d}.npy", f"shard-{idx:05d}.labels.npy"
        with atomic_path(self.path / vf) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, v[:n])
        with atomic_path(self.path / lf) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, lab[:n])
        self.shards.append({"file": vf, "labels": lf, "count": int(n), "sha256": sha256_file(self.path / vf)})
        rest_v, rest_l = v[n:], lab[n:]
        self._buf_v = [rest_v] if len(rest_v) else []
        self._buf_l = [rest_l] if len(rest_l) else []
        self._buffered = len(rest_v)
        self._write_manifest(complete=False)

    def _write_manifest(self, complete: bool, extra: Mapping[str, Any] | None = None) -> None:
        data = {
            "format": FORMAT,
            "kind": self.kind,
            "dim": self.dim,
            "dtype": "float32",
            "count": self.written,
            "complete": complete,
            "shards": self.shards,
            "meta": self.meta,
        }
        if extra:
            data.update(extra)
        write_json(self.path / MANIFEST, data)

    def close(self) -> "Bank":
        """Flush the last shard, record class counts and mark the bank complete."""
        if not self._closed:
            if self._buffered:
                self._flush(self._buffered)
            counts: dict[str, int] = {}
            for s in self.shards:
                lab = np.load(self.path / s["labels"])
                u, c = np.unique(lab, return_counts=True)
                for k, n in zip(u.tolist(), c.tolist()):
                    counts[str(k)] = counts.get(str(k), 0) + n
            self._write_manifest(complete=True, extra={"class_counts": counts})
            self._closed = True
        return Bank.open(self.path)

    def __enter__(self) -> "BankWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


@dataclass
class Bank:
    """Read side of a bank: labels in memory, vectors memory-mapped per shard."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path, allow_incomplete: bool = False, verify: bool = False) -> "Bank":
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise BankError(f"no bank at {path} (missing {MANIFEST}); build it first (for example `oaml bank features` or `oaml sample`)")
        manifest = read_json(mpath)
        if manifest.get("format") != FORMAT:
            raise BankError(f"{path} is not an oaml bank (format {manifest.get('format')!r}, expected {FORMAT!r})")
        if not manifest.get("complete") and not allow_incomplete:
            raise BankError(
                f"bank {path} is incomplete ({manifest.get('count')} rows written); the job that writes it was "
                "interrupted: rerun it with --resume to finish"
            )
        bank = cls(path, manifest)
        for s in manifest["shards"]:
            for key in ("file", "labels"):
                if not (path / s[key]).is_file():
                    raise BankError(f"bank {path} is missing shard file {s[key]}; rebuild it with --overwrite")
        if verify:
            bank.verify()
        return bank

    # --- metadata -----------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest.get("meta", {})

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def require(self, **expected: Any) -> None:
        """Raise BankError if ``meta[key] != value`` for any given key (e.g. ``teacher=...``)."""
        for key, value in expected.items():
            have = self.meta.get(key)
            if have != value:
                raise BankError(
                    f"bank {self.path} was made with {key}={have!r}, but this run uses {key}={value!r}; "
                    "rebuild the bank for this setting or point the config at the matching bank"
                )

    def verify(self) -> None:
        for s in self.manifest["shards"]:
            got = sha256_file(self.path / s["file"])
            if got != s["sha256"]:
                raise BankError(f"shard {s['file']} of bank {self.path} is corrupt (sha256 mismatch); rebuild the bank")

    # --- data ---------------------------------------------------------------------------
    def _shard(self, i: int) -> np.ndarray:
        return np.load(self.path / self.manifest["shards"][i]["file"], mmap_mode="r")

    @property
    def labels(self) -> np.ndarray:
        if not hasattr(self, "_labels"):
            parts = [np.load(self.path / s["labels"]) for s in self.manifest["shards"]]
            self._labels = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return self._labels

    @property
    def classes(self) -> np.ndarray:
        return np.unique(self.labels)

    def _offsets(self) -> np.ndarray:
        return np.cumsum([0] + [int(s["count"]) for s in self.manifest["shards"]])

    def gather(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Vectors at global row ``indices`` (in that order), reading only the needed rows."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((idx.size, self.dim), np.float32)
        if idx.size == 0:
            return out
        if idx.min() < 0 or idx.max() >= len(self):
            raise IndexError(f"bank {self.path} has {len(self)} rows; index out of range")
        offsets = self._offsets()
        shard_of = np.searchsorted(offsets, idx, side="right") - 1
        for s in np.unique(shard_of):
            sel = shard_of == s
            local = idx[sel] - offsets[s]
            order = np.argsort(local, kind="stable")
            out[np.flatnonzero(sel)[order]] = self._read_rows(int(s), local[order])
        return out

    def _layout(self, i: int) -> tuple[int, int] | None:
        """(byte offset of the data, rows) of shard ``i`` if it is a plain C-order float32 .npy."""
        cache = self.__dict__.setdefault("_layouts", {})
        if i not in cache:
            fmt = np.lib.format
            with open(self.path / self.manifest["shards"][i]["file"], "rb") as fh:
                version = fmt.read_magic(fh)
                read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, fortran, dtype = read(fh)
                plain = (not fortran and len(shape) == 2 and shape[1] == self.dim
                         and np.dtype(dtype) == np.dtype("<f4"))
                cache[i] = (fh.tell(), int(shape[0])) if plain else None
        return cache[i]

    def _read_rows(self, i: int, local: np.ndarray) -> np.ndarray:
        """Rows ``local`` (sorted) of shard ``i``: read with ``pread`` run by run of consecutive
        rows, so memory holds only the rows asked for (a memory map would also map the pages the
        kernel reads around each row); the memory map is the fallback."""
        layout = self._layout(i)
        if layout is None or not hasattr(os, "preadv"):
            return np.asarray(self._shard(i)[local])
        start, n_rows = layout
        if local.size and (local[0] < 0 or local[-1] >= n_rows):
            raise BankError(f"shard {i} of bank {self.path} has {n_rows} rows, fewer than its manifest says; rebuild it")
        row = 4 * self.dim
        out = np.empty((local.size, self.dim), np.float32)
        flat = memoryview(out).cast("B")
        breaks = np.flatnonzero(np.diff(local) != 1) + 1
        with open(self.path / self.manifest["shards"][i]["file"], "rb", buffering=0) as fh:
            fd = fh.fileno()
            for a, b in zip(np.concatenate([[0], breaks]).tolist(), np.concatenate([breaks, [local.size]]).tolist()):
                pos, end, off = a * row, b * row, start + int(local[a]) * row
                while pos < end:
                    got = os.preadv(fd, [flat[pos:end]], off)
                    if got <= 0:
                        raise BankError(f"shard {i} of bank {self.path} is truncated; rebuild the bank")
                    pos, off = pos + got, off + got
        return out

    def class_indices(self, c: int) -> np.ndarray:
        return np.flatnonzero(self.labels == c)

    def class_vectors(self, c: int, limit: int | None = None, seed: int | None = None) -> np.ndarray:
        """Vectors of class ``c``; ``limit`` keeps a seeded random subset of that size."""
        idx = self.class_indices(c)
        if limit is not None and idx.size > limit:
            rng = np.random.default_rng(seed)
            idx = np.sort(rng.choice(idx, size=limit, replace=False))
        return self.gather(idx)

    def iter_shards(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(vectors_memmap, labels)`` one shard at a time."""
        for i, s in enumerate(self.manifest["shards"]):
            yield self._shard(i), np.load(self.path / s["labels"])

    def to_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole bank in memory; only for banks known to be small."""
        return self.gather(np.arange(len(self))), self.labels.copy()


def write_bank(
    path: str | Path,
    vectors: Any,
    labels: Any,
    kind: str,
    meta: Mapping[str, Any] | None = None,
    shard_size: int = 65536,
    overwrite: bool = False,
) -> Bank:
    """Write in-memory ``vectors``/``labels`` as a complete bank in one call."""
    v = _to_numpy(vectors, np.float32)
    if v.ndim != 2:
        raise ShapeError(f"vectors must be 2-D (n, dim), got shape {v.shape}")
    writer = BankWriter(path, kind, v.shape[1], meta, shard_size=shard_size, resume=False, overwrite=overwrite)
    writer.add(v, labels)
    return writer.close()
