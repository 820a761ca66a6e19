"""Results files: every JSON written by `ramba eval` / `ramba bench` carries where, when and how it was made.

`write_results(path, body, config=..., seed=...)` adds a `meta` block: the machine (host, OS, CPU,
memory, GPUs), the UTC date, the versions of python / torch / triton / transformers / numpy / ramba,
the git commit of the checkout when there is one, the command line, the config and the seed.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ramba.errors import EvalError
from ramba.files import atomic_write

__all__ = [
    "EvalError",
    "environment",
    "write_results",
    "read_results",
    "parse_lengths",
    "parse_depths",
    "format_length",
    "format_table",
    "format_grid",
]

_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_lengths(text: str) -> list[int]:
    """`"4k,64k,1m,300"` -> `[4096, 65536, 1048576, 300]`; k, m, g are powers of 1024 (as in "a 4K context")."""
    out = []
    for item in str(text).split(","):
        item = item.strip().lower()
        if not item:
            continue
        mult = _SUFFIX.get(item[-1], 1)
        number = item[:-1] if item[-1] in _SUFFIX else item
        try:
            value = float(number) * mult
        except ValueError:
            raise EvalError(
                f"lengths: cannot read {item!r}; use integers with an optional k/m/g suffix, e.g. 4k,64k,1m"
            ) from None
        if value != int(value) or value < 1:
            raise EvalError(f"lengths: {item!r} is not a positive whole number of tokens")
        out.append(int(value))
    if not out:
        raise EvalError(f"lengths: no length given in {text!r}")
    return out


def parse_depths(text: str) -> list[float]:
    """`"0,0.25,0.5"` -> `[0.0, 0.25, 0.5]`; every depth in [0, 1]."""
    try:
        out = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise EvalError(f"depths: cannot read {text!r}; expected comma-separated numbers in [0, 1]") from None
    if not out or any(not 0.0 <= d <= 1.0 for d in out):
        raise EvalError(f"depths: expected comma-separated numbers in [0, 1], got {text!r}")
    return out


def format_length(n: int) -> str:
    """`4096` -> `"4K"`, `1048576` -> `"1M"`, `300` -> `"300"`."""
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _git(*args: str) -> str | None:
    """Output of ``git ARGS`` in this checkout, or None (not a git checkout, no git, or it failed)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # an optional package that is missing or broken is recorded as absent
        return None


def environment() -> dict:
    """Machine, date, software versions and command line of this process."""
    import torch

    import ramba

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(
                {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 2), "sms": p.multi_processor_count}
            )
    mem = _memory_bytes()
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "host": platform.node(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "memory_gib": round(mem / 2**30, 2) if mem else None,
            "gpus": gpus,
            "cuda": torch.version.cuda,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "transformers": _version("transformers"),
            "numpy": np.__version__,
            "ramba": ramba.__version__,
            "git_commit": _git("rev-parse", "HEAD") or None,
            # tracked files differ from that commit (uncommitted edits, a working tree copied over an older
            # checkout): the code that ran is not the commit's
            "git_dirty": None if status is None else bool(status),
        },
        "command": shlex.join(sys.argv),
    }


def _to_json(x):
    """numpy scalars/arrays, paths and non-finite floats as plain JSON values (NaN/inf -> null)."""
    if isinstance(x, dict):
        return {str(k): _to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_json(v) for v in x]
    if isinstance(x, np.ndarray):
        return _to_json(x.tolist())
    if isinstance(x, np.generic):
        return _to_json(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def write_results(path: str | os.PathLike, body: dict, config: dict | None = None, seed: int | None = None) -> Path:
    """Writes `{"meta": {...environment(), config, seed}, **body}` to `path` as JSON, atomically.

    `config` is the model config (e.g. `model.config.to_dict()`) or the benchmark's settings.
    """
    data = {"meta": {**environment(), "config": config, "seed": seed}, **body}
    with atomic_write(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(_to_json(data), f, indent=1, allow_nan=False)
            f.write("\n")
    return Path(path)


def read_results(path: str | os.PathLike) -> dict:
    """The JSON written by `write_results`."""
    with open(path) as f:
        return json.load(f)


def format_table(matrix: np.ndarray, rows: Sequence[str], columns: Sequence[str], corner: str = "") -> str:
    """A text table of `matrix [len(rows), len(columns)]` with the row labels, the column labels and the row mean."""
    matrix = np.asarray(matrix, dtype=np.float64)
    width = max(8, *(len(r) for r in rows))
    head = f"{corner:>{width}} | " + " ".join(f"{c:>7}" for c in columns) + " |   mean"
    lines = [head, "-" * len(head)]
    for label, row in zip(rows, matrix):
        cells = " ".join(f"{x:>7.3f}" if math.isfinite(x) else f"{'-':>7}" for x in row)
        mean = np.nanmean(row) if np.isfinite(row).any() else math.nan
        lines.append(f"{label:>{width}} | {cells} | {mean:>6.3f}")
    return "\n".join(lines)


def format_grid(matrix: np.ndarray, lengths, depths, corner: str = "length") -> str:
    """A text table of `matrix [len(lengths), len(depths)]`: a row per length, a column per depth, and the row mean."""
    return format_table(matrix, [format_length(int(n)) for n in lengths], [f"{100 * d:>6.4g}%" for d in depths], corner)
