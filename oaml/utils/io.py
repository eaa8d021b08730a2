"""Atomic file writes and small JSON helpers: nothing half-written is ever left under a final name."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def _new_file(folder: Path, prefix: str, suffix: str = ".tmp") -> Path:
    """Create an empty file of a fresh name in ``folder`` with mode 0666 less the umask (the
    kernel applies it; ``tempfile.mkstemp`` would make every output 0600)."""
    while True:
        path = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.
    The file gets the permissions the umask gives a new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_file(path.parent, f".{path.name}.")
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


#: Every output folder needs at least this much free space (a full disk is refused even when the
#: caller gives no estimate).
MIN_FREE_BYTES = 1 << 20


def free_bytes(folder: str | Path) -> int:
    """Bytes an unprivileged writer can still use in the file system holding ``folder``."""
    st = os.statvfs(folder)
    return int(st.f_bavail) * int(st.f_frsize)


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} bytes"


def check_writable(folder: str | Path, need_bytes: int = 0, create: bool = True) -> Path:
    """Fail early, before long work, if ``folder`` cannot be written or lacks ``need_bytes`` free.

    Compares the free space of the file system that will hold ``folder`` with ``need_bytes`` (an
    estimate of what the job will write; at least :data:`MIN_FREE_BYTES`) before creating
    anything, then creates ``folder`` and writes and deletes a probe file in it. With
    ``create=False`` nothing is created: the probe goes to the deepest folder that exists on the
    way to ``folder``. Raises :class:`~oaml.errors.OamlError` naming the folder and the problem.
    """
    from ..errors import OamlError

    folder = Path(folder)
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not existing.is_dir():
        raise OamlError(
            f"output folder {folder} cannot be created: {existing} is a file, not a folder; choose another --out"
        )
    need_bytes = max(int(need_bytes), MIN_FREE_BYTES)
    free = free_bytes(existing)  # before creating anything
    if free < need_bytes:
        raise OamlError(
            f"output folder {folder} has {_fmt_bytes(free)} free but this job writes about "
            f"{_fmt_bytes(need_bytes)}; free some space or choose another --out"
        )
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder if create else existing, prefix=".oaml-write-test"):
            pass
    except OSError as exc:
        raise OamlError(
            f"output folder {folder} is not writable ({exc.strerror or exc}); fix its permissions or choose another --out"
        ) from None
    return folder


#: In a folder oaml writes a report into: the files (relative paths) the last report wrote there.
OUTPUTS_MANIFEST = ".oaml-outputs.json"


@contextlib.contextmanager
def replace_outputs(out: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder for a job's outputs; publish them into ``out`` at the end.

    When the block succeeds, every file written under the staging folder is moved onto the same
    relative path under ``out`` (``os.replace``, each atomic; ``results.json`` last), the files
    the previous report listed in ``out/.oaml-outputs.json`` and did not write again are deleted,
    and the list is updated. Files oaml did not write are never touched. When the block fails,
    the staging folder goes, and so does ``out`` if this call created it (it then holds only
    what this job wrote).
    """
    out = Path(out)
    created = next((p for p in [*reversed(out.parents), out] if not p.exists()), None)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".oaml-staging-", dir=out))
    try:
        yield stage
        new = sorted((p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file()),
                     key=lambda rel: rel == "results.json")
        for rel in new:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, out / rel)
        manifest = out / OUTPUTS_MANIFEST
        old = read_json(manifest) if manifest.is_file() else []
        write_json(manifest, new)
        for rel in set(old) - set(new):
            if not Path(rel).is_absolute() and ".." not in Path(rel).parts:
                (out / rel).unlink(missing_ok=True)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
