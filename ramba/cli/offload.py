"""Chunk-memory placement options shared by `ramba eval` and `ramba generate`, and the memory check they run
before any work (see ramba.inference.planner)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--offload", action="store_true", help="keep the chunk memory in CPU pinned memory")
    p.add_argument(
        "--offload-dir",
        default=None,
        metavar="PATH",
        help="disk tier: chunk-memory pages beyond --host-budget in a memory-mapped file under PATH "
        "(implies --offload)",
    )
    p.add_argument(
        "--host-budget",
        default=None,
        metavar="SIZE",
        help="with --offload-dir: host memory for chunk pages, e.g. 8g (default: half the available memory)",
    )


def offload(args: argparse.Namespace):
    """``False``, ``True`` or an :class:`~ramba.model.chunk_store.Offload` for the disk tier."""
    from ramba.errors import InputError
    from ramba.model.chunk_store import Offload

    if args.offload_dir is None:
        if args.host_budget is not None:
            raise InputError("--host-budget: only with --offload-dir (the disk tier)")
        return args.offload
    return Offload("disk", args.offload_dir, None if args.host_budget is None else parse_size(args.host_budget))


def parse_size(text: str) -> int:
    """``"8g"`` -> 8 GiB in bytes (k, m, g are powers of 1024); ``"0"`` -> 0."""
    from ramba.errors import InputError
    from ramba.eval.results import parse_lengths

    try:
        return 0 if text.strip() == "0" else parse_lengths(text)[0]
    except (ValueError, IndexError):
        raise InputError(f"--host-budget: expected a size such as 8g or 512m, got {text!r}") from None


def check_memory(model, args: argparse.Namespace, tokens: int, batch: int) -> dict:
    """Plan the longest prefill of this command, print the plan, refuse (MemoryPlanError, OffloadError: one-line
    user errors) when it would not fit."""
    from ramba.inference.planner import check_plan, plan_memory

    spec = offload(args)
    plan = plan_memory(model, batch, tokens, args.segment_len, spec)
    print(plan.summary())
    check_plan(model, plan, spec)
    return plan.to_dict()
