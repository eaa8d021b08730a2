"""Generator interface for deep outliers (D-OOD) and the driver that writes a D-OOD bank.

A :class:`Generator` maps a batch of C-OOD vectors ``(B, D)`` (with their class of origin) to
``(B, D_out)`` new outlier vectors. Two are registered in :data:`GENERATORS`:

* ``stable_diffusion`` (the paper's): the C-OOD vector conditions Stable Diffusion through a
  placeholder text token; the kept vector is a (pooled) latent.
* ``feature_diffusion`` (our offline default): SDEdit in the teacher's feature space with a
  small diffusion model trained on the ID features.

:func:`generate_bank` runs a generator over a C-OOD bank and writes a bank of kind ``"dood"``
whose labels are the class of origin of each C-OOD vector.

Determinism and resume
    Row ``i`` of the output comes from C-OOD row ``indices[i]`` and belongs to batch
    ``b = i // batch_size``; batch ``b`` is generated with the seed :func:`batch_seed`
    ``(seed, b)``. Shards hold a whole number of batches, so an interrupted run resumes at the
    first batch after the last whole shard and produces exactly the bank an uninterrupted run
    would (bit-identical on the same device and library versions).

Several processes (torchrun)
    Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set, or ``rank``/``world_size`` passed) the
    batches are split into ``world_size`` contiguous blocks (:func:`rank_batches`). Rank ``r``
    writes its block as a resumable part bank ``OUT.parts/rank-{r}-of-{W}``; rank 0 then waits
    for every part to be complete (polling the part manifests; no process group is needed, so
    ranks may also be separate jobs sharing a file system), concatenates them in rank order into
    ``OUT`` and deletes the parts. Because seeds depend only on the batch index, the merged bank
    equals a single-process run. Ranks other than 0 return their part bank.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from ...utils.progress import progress_bar

from ...errors import BankError, ConfigError, ShapeError
from ...registry import Registry
from ...utils.io import check_writable, read_json
from ..bank import MANIFEST, Bank, BankWriter

log = logging.getLogger(__name__)

GENERATORS: Registry = Registry("generator")

DOOD_KIND = "dood"


class Generator(ABC):
    """Maps C-OOD vectors to D-OOD vectors.

    Subclasses set ``name`` (the registry key) and implement :meth:`generate`,
    :meth:`output_dim` and :meth:`settings`. ``generate`` must be a deterministic function of
    ``(cood_vectors, labels, seed)``: :func:`generate_bank` relies on it for resume.
    """

    name: str = "generator"

    @abstractmethod
    def generate(self, cood_vectors: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.Tensor:
        """``cood_vectors`` (B, D) float, ``labels`` (B,) int64 class of origin -> (B, D_out) float32 on CPU."""

    @abstractmethod
    def output_dim(self, input_dim: int) -> int:
        """Width of the vectors :meth:`generate` returns for inputs of width ``input_dim``."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """JSON-able description of everything that determines the output (stored in bank meta)."""


def batch_seed(seed: int, batch_index: int) -> int:
    """Seed of batch ``batch_index``: a hash of ``(seed, batch_index)``, independent of rank and resume."""
    state = np.random.SeedSequence([int(seed), int(batch_index)]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | (int(state[1]) >> 1)  # < 2**63, accepted by torch.manual_seed


def select_rows(n_source: int, num_samples: int | None, seed: int) -> np.ndarray:
    """Which C-OOD rows feed the generator, in output order.

    ``None``: every row once, in bank order. ``num_samples <= n_source``: a seeded random subset
    (without replacement) kept in bank order. ``num_samples > n_source``: seeded permutations of
    all rows concatenated (each C-OOD vector used ``ceil(num_samples / n_source)`` times at most),
    useful with a stochastic generator.
    """
    if n_source <= 0:
        raise BankError("the C-OOD bank is empty; nothing to generate from")
    if num_samples is None:
        return np.arange(n_source, dtype=np.int64)
    if num_samples <= 0:
        raise ConfigError(f"num_samples must be positive, got {num_samples}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5E1EC7]))
    if num_samples <= n_source:
        return np.sort(rng.choice(n_source, size=num_samples, replace=False)).astype(np.int64)
    reps = -(-num_samples // n_source)
    return np.concatenate([rng.permutation(n_source) for _ in range(reps)])[:num_samples].astype(np.int64)


def rank_batches(n_batches: int, rank: int, world_size: int) -> range:
    """Contiguous block of batch indices handled by ``rank`` (sizes differ by at most one)."""
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ConfigError(f"invalid rank {rank} for world_size {world_size}")
    base, extra = divmod(n_batches, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def _dist_env(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
    if rank is None:
        rank = int(os.environ.get("RANK", 0)) if world_size > 1 else 0
    return int(rank), int(world_size)


def _parts_dir(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".parts")


def _is_complete_with(path: Path, meta: Mapping[str, Any]) -> bool:
    mpath = path / MANIFEST
    if not mpath.is_file():
        return False
    m = read_json(mpath)
    return bool(m.get("complete")) and m.get("kind") == DOOD_KIND and m.get("meta") == meta


def _run_batches(
    generator: Generator,
    cood: Bank,
    indices: np.ndarray,
    batches: range,
    writer: BankWriter,
    batch_size: int,
    seed: int,
    progress: bool,
    desc: str,
) -> None:
    first = batches.start
    done = writer.written // batch_size
    todo = range(first + done, batches.stop)
    if done:
        log.info("%s: resuming after %d whole batches (%d rows on disk)", desc, done, writer.written)
    labels_all = cood.labels
    for b in progress_bar(todo, desc=desc, unit="batch", disable=not progress, initial=done, total=len(batches)):
        rows = indices[b * batch_size : (b + 1) * batch_size]
        vecs = torch.from_numpy(cood.gather(rows))
        labs = torch.from_numpy(labels_all[rows].astype(np.int64))
        out = generator.generate(vecs, labs, seed=batch_seed(seed, b))
        if out.ndim != 2 or out.shape[0] != len(rows):
            raise ShapeError(f"generator {generator.name} returned shape {tuple(out.shape)} for a batch of {len(rows)}")
        writer.add(out, labs)


def generate_bank(
    generator: Generator,
    cood_bank: Bank | str | Path,
    out_path: str | Path,
    batch_size: int = 64,
    seed: int = 0,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    num_samples: int | None = None,
    batches_per_shard: int = 64,
    rank: int | None = None,
    world_size: int | None = None,
    poll_seconds: float = 10.0,
) -> Bank:
    """Run ``generator`` over the C-OOD bank and write a D-OOD bank at ``out_path``.

    Meta of the written bank: ``generator`` (name), ``generator_settings``, ``seed``,
    ``batch_size``, ``num_samples``, ``source`` (C-OOD bank path, kind, count and meta) and
    ``teacher``/``dataset`` copied from the C-OOD meta (for ``bank.require(teacher=...)``).
    Resuming requires the same meta; anything else is refused unless ``overwrite=True``. If
    the bank is already complete with the same meta it is returned as is. See the module
    docstring for determinism and for the multi-process split.
    """
    cood = cood_bank if isinstance(cood_bank, Bank) else Bank.open(cood_bank)
    if cood.kind != "cood":
        log.warning("source bank %s has kind %r, expected 'cood'", cood.path, cood.kind)
    if batch_size <= 0 or batches_per_shard <= 0:
        raise ConfigError("batch_size and batches_per_shard must be positive")
    out_path = Path(out_path)
    indices = select_rows(len(cood), num_samples, seed)
    n_batches = -(-len(indices) // batch_size)
    dim = generator.output_dim(cood.dim)
    meta = {
        "generator": generator.name,
        "generator_settings": generator.settings(),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "num_samples": None if num_samples is None else int(num_samples),
        "source": {"path": str(cood.path), "kind": cood.kind, "count": len(cood), "meta": cood.meta},
        "teacher": cood.meta.get("teacher"),
        "dataset": cood.meta.get("dataset"),
    }
    shard_size = batch_size * batches_per_shard
    rank, world_size = _dist_env(rank, world_size)
    parts = _parts_dir(out_path)

    if not overwrite and _is_complete_with(out_path, _normalised(meta)):
        log.info("D-OOD bank %s is already complete with these settings", out_path)
        return Bank.open(out_path)

    # before any generation: room for the bank (and, with several ranks, its parts)
    check_writable(out_path, need_bytes=len(indices) * (4 * dim + 8) * (1 if world_size == 1 else 2))
    if world_size == 1:
        writer = BankWriter(out_path, DOOD_KIND, dim, meta, shard_size=shard_size, resume=resume, overwrite=overwrite)
        _run_batches(generator, cood, indices, range(n_batches), writer, batch_size, seed, progress, f"D-OOD ({generator.name})")
        return writer.close()

    # --- several ranks: each writes its contiguous block of batches, rank 0 merges ------------
    part_meta = dict(meta, part={"rank": rank, "world_size": world_size})
    my_part = parts / f"rank-{rank}-of-{world_size}"
    mine = rank_batches(n_batches, rank, world_size)
    if _is_complete_with(my_part, _normalised(part_meta)) and not overwrite:
        part_bank = Bank.open(my_part)
    else:
        writer = BankWriter(my_part, DOOD_KIND, dim, part_meta, shard_size=shard_size, resume=resume, overwrite=overwrite)
        _run_batches(generator, cood, indices, mine, writer, batch_size, seed, progress and rank == 0,
                     f"D-OOD ({generator.name}) rank {rank}/{world_size}")
        part_bank = writer.close()
    if rank != 0:
        return part_bank

    banks = []
    for r in range(world_size):
        p = parts / f"rank-{r}-of-{world_size}"
        pm = _normalised(dict(meta, part={"rank": r, "world_size": world_size}))
        waited = 0.0
        while not _is_complete_with(p, pm):
            if waited == 0.0:
                log.info("rank 0 waits for part %s", p)
            time.sleep(poll_seconds)
            waited += poll_seconds
        banks.append(Bank.open(p))
    writer = BankWriter(out_path, DOOD_KIND, dim, meta, shard_size=shard_size, resume=False, overwrite=overwrite)
    for b in banks:
        for vecs, labs in b.iter_shards():
            writer.add(np.asarray(vecs), labs)
    final = writer.close()
    shutil.rmtree(parts)
    return final


def _normalised(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Meta as it reads back from a manifest (JSON round trip), for equality checks."""
    import json

    return json.loads(json.dumps(dict(meta), default=str))
