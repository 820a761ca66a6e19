"""Measuring helpers shared by the benchmark scripts: wall clock synchronised with the GPU, host
memory, a profiler table, config overrides from the command line."""

from __future__ import annotations

import gc
import os
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ramba.overrides import parse_overrides  # the one KEY=VALUE syntax, re-exported for the benchmark scripts

__all__ = ["synchronized_time", "free_memory", "rss_bytes", "peak_rss_bytes", "profiled", "parse_overrides"]


def synchronized_time(device: torch.device) -> float:
    """`time.perf_counter()` after the queued GPU work of `device` has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def free_memory(device: torch.device) -> None:
    """Collects garbage and returns cached GPU blocks, so the next measurement starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rss_bytes() -> int:
    """Resident set size of this process now (bytes)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Largest resident set size of this process so far (bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@contextmanager
def profiled(device: torch.device, path: Path | None):
    """torch.profiler around the block when `path` is given; writes the top 40 ops by self device time and by
    self host time there."""
    if path is None:
        yield
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        yield
    keys = ["self_cuda_time_total", "self_cpu_time_total"] if device.type == "cuda" else ["self_cpu_time_total"]
    path.parent.mkdir(parents=True, exist_ok=True)
    table = prof.key_averages()
    path.write_text(
        "\n".join(
            f"top 40 by {key}\n" + table.table(sort_by=key, row_limit=40, max_name_column_width=80) for key in keys
        )
    )
