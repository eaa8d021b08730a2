"""Progress for long jobs: ``progress_bar`` for loops and ``Stages`` for a job of N known stages.

On a terminal ``progress_bar`` is tqdm's bar. When stderr is not a terminal (a log file, a
batch job) a carriage-return bar would pile up into one endless line, so the bar writes a plain
line at most every ``LINE_INTERVAL_S`` seconds instead, and a last one when it ends::

    12:03:04 vanilla epoch 3/100: 120/266 (45%), 2m10s elapsed, ETA ~2m40s, loss=0.412

``Stages`` logs ``stage 3/8: train oaml (elapsed 2m10s, ETA ~5m)`` as each stage starts; the ETA
is the mean time of the stages run so far times the stages left (stages skipped because their
results exist already do not count).

``set_enabled(False)`` (what ``--no-progress`` does) silences every bar and stage line.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Iterable, Optional

from tqdm.autonotebook import tqdm as _auto_tqdm
from tqdm.std import tqdm as _std_tqdm

log = logging.getLogger(__name__)

__all__ = ["LINE_INTERVAL_S", "Stages", "format_seconds", "progress_bar", "set_enabled"]

LINE_INTERVAL_S = 30.0
_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn every progress bar and stage line of this process on or off (``--no-progress``)."""
    global _enabled
    _enabled = bool(enabled)


def format_seconds(s: float) -> str:
    """``45s``, ``2m10s``, ``1h05m``."""
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_bar(iterable_or_total: Iterable[Any] | int | None = None, desc: Optional[str] = None, enabled: bool = True,
                 **kwargs: Any):
    """``tqdm(...)`` that becomes periodic plain lines when its stream is not a terminal.

    ``iterable_or_total``: what to iterate, or the total of a bar driven by ``update``; every
    other tqdm keyword (``total``, ``disable``, ``leave``, ``unit``, ...) is passed on."""
    if isinstance(iterable_or_total, int):
        kwargs.setdefault("total", iterable_or_total)
        iterable_or_total = None
    kwargs["disable"] = kwargs.get("disable", False) or not enabled or not _enabled
    stream = kwargs.get("file") or sys.stderr
    if _auto_tqdm is not _std_tqdm or getattr(stream, "isatty", lambda: False)():  # a notebook or a terminal
        return _auto_tqdm(iterable_or_total, desc=desc, **kwargs)
    return _LineBar(iterable_or_total, desc=desc, **kwargs)


class _LineBar(_std_tqdm):
    """tqdm whose display is a whole line every ``LINE_INTERVAL_S`` seconds (and one at the end
    when it printed before or ``leave`` keeps it), never a carriage return."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._line_at = time.monotonic()
        self._lines = 0
        super().__init__(*args, **kwargs)

    def display(self, msg: Optional[str] = None, pos: Optional[int] = None) -> bool:
        if msg is None and time.monotonic() - self._line_at >= LINE_INTERVAL_S:
            self._write_line()
        return False  # tells close() there is nothing on screen to clear

    def clear(self, nolock: bool = False) -> None:  # tqdm.write() clears bars with a carriage return
        pass

    def close(self) -> None:
        if not self.disable and (self._lines or self.leave) and not getattr(self, "_closed_line", False):
            self._closed_line = True
            self._write_line()
        self.leave = False  # the line above is the final state; tqdm adds no newline or carriage return
        super().close()

    def _write_line(self) -> None:
        d = self.format_dict
        n, total, elapsed = d["n"], d["total"], d["elapsed"]
        line = f"{d['prefix'] or 'progress'}: {n:g}"
        if total:
            line += f"/{total:g} ({100 * n / total:.0f}%)"
        line += f", {format_seconds(elapsed)} elapsed"
        done = n - (d.get("initial") or 0)
        if total and 0 < done and n < total:
            line += f", ETA ~{format_seconds(elapsed / done * (total - n))}"
        if d.get("postfix"):
            line += f", {d['postfix']}"
        self.fp.write(f"{time.strftime('%H:%M:%S')} {line}\n")
        self.fp.flush()
        self._line_at = time.monotonic()
        self._lines += 1


class Stages:
    """``stage k/N: NAME (elapsed 2m10s, ETA ~5m)`` log lines for a job of ``total`` stages.

        stages = Stages(8, enabled=cfg.progress)
        stages.start("teacher fine-tune")   # a stage that runs
        stages.skip("ID feature bank")      # a stage whose results exist already
        ...
        stages.finish()                     # "8 stages done in 1h02m"
    """

    def __init__(self, total: int, enabled: bool = True, logger: Optional[logging.Logger] = None):
        self.total = total
        self.enabled = enabled
        self.log = logger or log
        self.k = 0
        self.t0 = time.monotonic()
        self._run_s = 0.0  # time spent in stages that ran (not skipped)
        self._ran = 0
        self._current: Optional[float] = None  # start time of the running stage

    def _end_current(self) -> None:
        if self._current is not None:
            self._run_s += time.monotonic() - self._current
            self._ran += 1
            self._current = None

    def start(self, name: str) -> None:
        self._end_current()
        self.k += 1
        left = max(self.total - self.k + 1, 0)
        eta = f", ETA ~{format_seconds(self._run_s / self._ran * left)}" if self._ran else ""
        self._say(f"stage {self.k}/{self.total}: {name} (elapsed {format_seconds(time.monotonic() - self.t0)}{eta})")
        self._current = time.monotonic()

    def skip(self, name: str, why: str = "done earlier") -> None:
        self._end_current()
        self.k += 1
        self._say(f"stage {self.k}/{self.total}: {name} ({why}, skipped)")

    def finish(self) -> None:
        self._end_current()
        self._say(f"{self.k} stages done in {format_seconds(time.monotonic() - self.t0)}")

    def _say(self, line: str) -> None:
        if self.enabled and _enabled:
            self.log.info(line)
