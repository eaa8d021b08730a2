"""``oaml`` console script: ``oaml <command> [options]``; ``oaml --help`` lists the commands."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
