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
from collections.abc import Iterator
from contextlib import contextmanager

COMMANDS = ["demo", "prepare", "train", "eval", "bench", "generate", "export"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ramba", description="RAMba: Mamba-2 with Hierarchical Sparse Attention.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"ramba.cli.{name}").add_parser(sub)
    return parser


def _one_line(e: BaseException) -> str | None:
    """The one-line message for an error that means bad input or a bad environment; None for a bug."""
    from ramba.errors import RambaUserError
    from ramba.files import WRITE_ERRNOS, describe_os_error

    if isinstance(e, (RambaUserError, FileNotFoundError, FileExistsError)):
        return str(e)
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
        return describe_os_error(e, e.filename or "output")
    return None


@contextmanager
def console_logging(verbose: bool = False, rank: int = 0) -> Iterator[None]:
    """Log records (ours, transformers' and Python warnings) go to stderr through `tqdm.write`, which lifts
    any progress bar off the line first, so a log line never lands on a bar's line."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
    from transformers.utils import logging as hf_logging

    logging.basicConfig(
        level=logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    hf_logging.disable_default_handler()  # transformers' records then reach the root handler below
    hf_logging.enable_propagation()
    logging.captureWarnings(True)
    try:
        with logging_redirect_tqdm(tqdm_class=tqdm):
            yield
    finally:
        logging.captureWarnings(False)
        hf_logging.disable_propagation()
        hf_logging.enable_default_handler()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    from ramba.inference import prefill_progress

    try:
        with console_logging(args.verbose, rank), prefill_progress(not getattr(args, "no_progress", False)):
            return int(args.func(args) or 0)
    except BrokenPipeError:  # the reader went away (`ramba train --fields | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        message = _one_line(e)
        if message is None or args.verbose:
            raise
        print(f"ramba {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ramba {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
