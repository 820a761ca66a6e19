"""`ramba` command line: `ramba <command> ...`; `python -m ramba` is the same.

Each command is a module `ramba.cli.<name>` with `add_parser(subparsers)`, which registers its
parser and sets `func(args) -> int`. Add a command by adding its module name to COMMANDS.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

COMMANDS = ["demo", "prepare", "train", "eval", "bench", "generate", "export"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ramba", description="RAMba: Mamba-2 with Hierarchical Sparse Attention.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"ramba.cli.{name}").add_parser(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, printed as one line instead of a traceback."""
    from ramba.data.tokens import DataError
    from ramba.eval.results import EvalError
    from ramba.inference.planner import MemoryPlanError
    from ramba.model.chunk_store import OffloadError
    from ramba.train.checkpoint import CheckpointError
    from ramba.train.config import ConfigError

    return (ConfigError, DataError, CheckpointError, EvalError, MemoryPlanError, OffloadError, FileNotFoundError,
            FileExistsError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else (logging.INFO if rank == 0 else logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except _user_errors() as e:
        if args.verbose:
            raise
        print(f"ramba {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ramba {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
