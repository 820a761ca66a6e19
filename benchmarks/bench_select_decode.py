"""Time ``select_chunks_streaming`` on the CPU: main's streaming.py (old) against the working tree's (new).

Usage: nice -n 10 python benchmarks/bench_select_decode.py [OUT.json] [--reps N] [--chunks 65536,1048576]
       [--threads N]

Cases: B=1, R=1, Dr=256, K=8, S=64, landmarks float32 or bf16 (q float32), host memory; T=1 (decode, the
token sees all C chunks) and T=64 (a prefill-like block of the last 64 positions). Each case checks that old
and new pick the same indices; times are medians and minima of --reps rounds after one warm-up, in ms, a round
running old then new. --threads 1 keeps a shared box's other load from stalling two-thread kernels.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's ramba, not an installed one

from ramba.ops.retrieval import streaming as new_streaming  # noqa: E402

B, R, DR, K, S = 1, 1, 256, 8, 64


def load_main() -> object:
    """``ramba/ops/retrieval/streaming.py`` as committed on branch ``main``, loaded as a module."""
    src = subprocess.run(
        ["git", "show", "main:ramba/ops/retrieval/streaming.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    path = os.path.join(tempfile.mkdtemp(), "streaming_main.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("streaming_main", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_ms(impls: dict, args: tuple, reps: int) -> tuple[dict, dict]:
    """``{name: (median ms, min ms)}`` of ``fn(*args)`` over ``reps`` rounds, each running every implementation
    once in turn (so load from other users of the box hits both alike), after one warm-up; and the indices."""
    indices = {name: fn(*args)[0] for name, fn in impls.items()}
    times = {name: [] for name in impls}
    for _ in range(reps):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn(*args)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}, indices


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="benchmarks/results/select_decode_cpu.json")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunks", default="65536,1048576")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    impls = {"old": load_main().select_chunks_streaming, "new": new_streaming.select_chunks_streaming}
    gen = torch.Generator().manual_seed(0)
    runs = []
    for C in map(int, args.chunks.split(",")):
        lm32 = torch.randn(B, C, R, DR, generator=gen)
        for lm_dtype in ("float32", "bfloat16"):
            lm = lm32 if lm_dtype == "float32" else lm32.bfloat16()
            for T in (1, 64):
                q = torch.randn(B, T, R, DR, generator=gen)
                positions = torch.arange(C * S - T + 1, C * S + 1)
                row = dict(C=C, T=T, landmarks=lm_dtype)
                times, indices = time_ms(impls, (q, lm, S, K, positions), args.reps)
                for name, (median, fastest) in times.items():
                    row[f"{name}_ms"], row[f"{name}_min_ms"] = round(median, 2), round(fastest, 2)
                row["speedup"] = round(row["old_ms"] / row["new_ms"], 2)
                row["same_indices"] = torch.equal(indices["old"], indices["new"])
                print(json.dumps(row), file=sys.stderr, flush=True)
                runs.append(row)
    result = dict(
        date=datetime.date.today().isoformat(),
        machine="2-core shared CPU box",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        old="main:ramba/ops/retrieval/streaming.py",
        new=subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        shape=dict(B=B, R=R, Dr=DR, K=K, chunk_size=S, q="float32"),
        reps=args.reps,
        runs=runs,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
