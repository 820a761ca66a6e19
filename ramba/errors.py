"""The errors ``ramba`` raises for bad input (docs/design.md §8).

Every one derives from :class:`RambaUserError`; its message is one line naming the problem and the
fix. The command line prints it as ``ramba <command>: error: <message>`` and exits with status 2
(``-v`` shows the traceback). Each class also derives from the built-in exception a caller would
expect (``ValueError`` for a bad value, ``OSError`` for a bad path), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "RambaUserError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "ModelLoadError",
    "OutputPathError",
    "EvalError",
    "InputError",
]


class RambaUserError(Exception):
    """Bad input or a bad environment, reported as one line; never a bug in ramba."""


class ConfigError(RambaUserError, ValueError):
    """A bad model or training configuration (unknown field, bad value, unreadable file, bad ``--set``)."""


class DataError(RambaUserError, ValueError):
    """Bad data: a missing, empty, corrupt or mismatched token file, or an empty corpus."""


class CheckpointError(RambaUserError, RuntimeError):
    """A checkpoint that cannot be written or read (corrupt, truncated, missing, disk full), or a run folder
    locked by another run."""


class ModelLoadError(RambaUserError, ValueError):
    """A model that cannot be found or loaded, or whose weights fail verification (checksum, non-finite values)."""


class OutputPathError(RambaUserError, OSError):
    """An output path that cannot be written: it exists (without ``--overwrite``), its folder is read-only or
    not a folder, or the disk is too full."""


class EvalError(RambaUserError, ValueError):
    """Bad input to an evaluation or benchmark (a length too short for a task, an unknown task, ...)."""


class InputError(RambaUserError, ValueError):
    """Any other bad argument: a device that is not there, a sampling option out of range, a prompt that is
    not text, a tensor of the wrong kind."""
