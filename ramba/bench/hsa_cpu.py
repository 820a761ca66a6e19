"""Time the HSA "torch" backend against the reference on the CPU (forward, forward+backward).

Usage: ramba bench hsa-cpu OUT.json [--reps N] [--shapes train,long]   (or python -m ramba.bench.hsa_cpu)

Shapes (float32, H=1, k/v memory as long as the queries; D=64, S=64 unless said):
  train: B=8, T=1024, HQ=2, K=4   (one HSA layer of the small CPU training run)
  long:  B=1, T=16384, HQ=16, K=8 (long context)
  tiny:  B=1, T=256, HQ=2, K=2, D=16, S=16 (a smoke run of seconds; not in the default --shapes)
Indices: token t sees the complete chunks c < t // S and picks up to K distinct ones with
probability ∝ 1 / (t // S − c) (Gumbel top-K: biased to recent chunks, heavy tail of far ones);
slots ordered by chunk id descending, unfilled slots get index 0 and weight 0; weights are a
softmax of Gaussian scores over the filled slots. Each (shape, backend) runs in its own process
so its peak RSS is measured alone; times are medians of --reps runs after one warm-up, in ms.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

SHAPES = {  # name: (B, T, HQ, H, D, S, K)
    "train": (8, 1024, 2, 1, 64, 64, 4),
    "long": (1, 16384, 16, 1, 64, 64, 8),
    "tiny": (1, 256, 2, 1, 16, 16, 2),
}
BACKENDS = ("reference", "torch")


def draw_indices(B: int, T: int, H: int, S: int, K: int, gen: torch.Generator):
    """Causal, recency-biased ``indices`` and ``weights`` ``[B, T, H, K]`` (module docstring)."""
    C = T // S
    t = torch.arange(T)
    dist = ((t // S)[:, None] - torch.arange(C)[None, :]).double()
    logp = torch.where(dist > 0, -torch.log(dist.clamp_min(1.0)), -math.inf)  # [T, C]
    u = torch.rand(B, T, H, C, generator=gen, dtype=torch.float64).clamp_(1e-300, 1.0)
    top = (logp[None, :, None, :] - torch.log(-torch.log(u))).topk(min(K, C), dim=-1)
    filled = top.values > -math.inf
    sel = torch.where(filled, top.indices, -1).sort(dim=-1, descending=True).values
    filled = sel >= 0
    z = torch.randn(sel.shape, generator=gen)
    w = torch.softmax(torch.where(filled, z, -math.inf), dim=-1).nan_to_num(0.0)
    idx = torch.zeros(B, T, H, K, dtype=torch.long)
    wt = torch.zeros(B, T, H, K)
    idx[..., : sel.shape[-1]] = torch.where(filled, sel, 0)
    wt[..., : sel.shape[-1]] = torch.where(filled, w, 0.0)
    return idx, wt


def run_case(shape: str, backend: str, reps: int) -> dict:
    from ramba.ops.hsa import hsa

    B, T, HQ, H, D, S, K = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, HQ, D, generator=gen)
    k = torch.randn(B, T, H, D, generator=gen)
    v = torch.randn(B, T, H, D, generator=gen)
    idx, w = draw_indices(B, T, H, S, K, gen)
    do = torch.randn(B, T, HQ, D, generator=gen)
    leaves = [x.requires_grad_(True) for x in (q, k, v, w)]

    def fwd():
        with torch.no_grad():
            hsa(q, k, v, w, idx, S, backend=backend)

    def fwdbwd():
        torch.autograd.grad(hsa(q, k, v, w, idx, S, backend=backend), leaves, do)

    row = {"shape": shape, "backend": backend, "B": B, "T": T, "HQ": HQ, "H": H, "D": D, "S": S, "K": K}
    for name, fn in (("fwd_ms", fwd), ("fwdbwd_ms", fwdbwd)):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        row[name] = statistics.median(times)
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the JSON file to write")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per case (default 3)")
    ap.add_argument("--case", nargs=2, metavar=("SHAPE", "BACKEND"), help=argparse.SUPPRESS)
    ap.add_argument(
        "--shapes", default="train,long", help=f"comma-separated, of {', '.join(SHAPES)} (default train,long)"
    )
    args = ap.parse_args(argv)
    if args.case:
        print("RESULT" + json.dumps(run_case(*args.case, args.reps)))
        return 0
    runs = []
    for shape in args.shapes.split(","):
        for backend in BACKENDS:
            proc = subprocess.run(
                [sys.executable, "-m", __spec__.name, args.out, "--reps", str(args.reps), "--case", shape, backend],
                capture_output=True,
                text=True,
            )
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
            row = (
                json.loads(lines[0][6:])
                if lines
                else {"shape": shape, "backend": backend, "error": proc.stderr[-2000:]}
            )
            runs.append(row)
            print(json.dumps(row))
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": {
            "host": platform.node(),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "torch": torch.__version__,
        "dtype": "float32",
        "indices": __doc__.split("Indices:")[1].split("Each (shape")[0].strip(),
        "runs": runs,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
