"""`ramba bench kernels|hsa-cpu|train|inference [ARGS...]`: run a benchmark of `ramba.bench`.

Each compares RAMba with its baselines in the same run and writes JSON + PNG:
- `kernels`:   ramba.bench.hsa (HSA Triton kernels vs SDPA flash attention and NSA; needs CUDA);
- `hsa-cpu`:   ramba.bench.hsa_cpu (the HSA torch backend vs the reference on the CPU; JSON only);
- `train`:     ramba.bench.train (training tokens/s: RAMba vs Mamba-2 vs Transformer);
- `inference`: ramba.bench.inference (prefill tokens/s, decode ms/token, GPU and host memory).
Arguments after the benchmark's name go to it; `ramba bench train -h` lists them.
"""

from __future__ import annotations

import argparse
import importlib

MODULES = {
    "kernels": "ramba.bench.hsa",
    "hsa-cpu": "ramba.bench.hsa_cpu",
    "train": "ramba.bench.train",
    "inference": "ramba.bench.inference",
}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmarks against the baselines (kernels, hsa-cpu, train, inference)",
        description=__doc__.split("\n\n")[0] + " See docs/evaluation.md.",
    )
    p.add_argument("which", choices=sorted(MODULES), help="the benchmark")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(MODULES[args.which])
    return int(module.main(args.script_args, prog=f"ramba bench {args.which}") or 0)
