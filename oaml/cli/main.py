"""``oaml`` console script: ``oaml <command> [options]``; ``oaml --help`` lists the commands."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading
from typing import Iterator, Sequence, Tuple

from .. import __version__
from ..errors import OamlError
from . import COMMAND_MODULES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oaml",
        description="Outlier Aware Metric Learning for OOD detection: data, teacher, outliers, "
        "training, post-hoc scores and evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"oaml {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"oaml.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"oaml.cli.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def iter_parsers(parser: argparse.ArgumentParser | None = None, path: Tuple[str, ...] = ("oaml",)
                 ) -> Iterator[Tuple[Tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command's parser with its path, e.g. (("oaml", "bank", "info"), parser)."""
    parser = parser or build_parser()
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from iter_parsers(sub, path + (name,))


class Terminated(BaseException):
    """SIGTERM raised as an exception (not an Exception: nothing catches it by accident), so that the
    command unwinds like on Ctrl-C: staging folders are removed, locks released, finished work kept."""


def _raise_terminated(signum, frame):  # noqa: ARG001
    raise Terminated(signum)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` in the main thread (where signals are
    delivered) instead of killing the process on the spot; a handler someone else installed is left
    alone, and the previous handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from ..utils.progress import set_enabled

    set_enabled(getattr(args, "progress", None) is not False)  # --no-progress
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with sigterm_unwinds():
            return int(args.func(args) or 0)
    except OamlError as exc:
        print(f"oaml {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk or a folder that became unwritable during the run
        if args.verbose:
            raise
        import errno

        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            again = " with --resume" if args.command == "train" else ""
            hint = f"; free some space, then rerun{again} (finished shards and checkpoints are kept)"
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = "; fix the permissions or choose another folder"
        else:
            hint = ""
        print(f"oaml {args.command}: error: {exc.strerror or exc}:{where}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"oaml {args.command}: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    except Terminated:
        print(f"oaml {args.command}: terminated (SIGTERM); finished stages are kept, rerun to continue", file=sys.stderr)
        return 143


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
