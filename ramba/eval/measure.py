"""Measuring helpers shared by the benchmark scripts: wall clock synchronised with the GPU, host
memory, config overrides from the command line."""

from __future__ import annotations

import gc
import os
import resource
import sys
import time

import torch

from ramba.overrides import parse_overrides  # the one KEY=VALUE syntax, re-exported for the benchmark scripts

__all__ = ["synchronized_time", "free_memory", "rss_bytes", "peak_rss_bytes", "parse_overrides"]


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
