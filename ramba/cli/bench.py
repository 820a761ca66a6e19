"""`ramba bench kernels|train|inference [ARGS...]`: run the benchmark scripts of `benchmarks/`.

Each compares RAMba with its baselines in the same run and writes JSON + PNG:
- `kernels`:   benchmarks/bench_hsa.py (HSA Triton kernels vs SDPA flash attention and NSA; needs CUDA);
- `train`:     benchmarks/bench_train.py (training tokens/s: RAMba vs Mamba-2 vs Transformer);
- `inference`: benchmarks/bench_inference.py (prefill tokens/s, decode ms/token, GPU and host memory).
Arguments after the benchmark's name go to its script; `ramba bench train -h` lists them.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = {"kernels": "bench_hsa.py", "train": "bench_train.py", "inference": "bench_inference.py"}


def benchmarks_dir() -> Path:
    """`$RAMBA_BENCHMARKS`, else the `benchmarks/` folder of the source checkout holding this package."""
    from ramba.eval.results import EvalError

    env = os.environ.get("RAMBA_BENCHMARKS")
    folder = Path(env) if env else Path(__file__).resolve().parents[2] / "benchmarks"
    if not (folder / SCRIPTS["train"]).is_file():
        raise EvalError(f"benchmarks: no benchmark scripts in {folder}; run from a source checkout of ramba "
                        "or point RAMBA_BENCHMARKS at its benchmarks/ folder")
    return folder


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks against the baselines (kernels, train, inference)",
                              description=__doc__.split("\n\n")[0] + " See docs/evaluation.md.")
    p.add_argument("which", choices=sorted(SCRIPTS), help="the benchmark")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    p.set_defaults(func=run)


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"ramba_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args: argparse.Namespace) -> int:
    from ramba.eval.results import EvalError

    script = benchmarks_dir() / SCRIPTS[args.which]
    if args.which == "kernels":
        # bench_hsa.py takes one optional argument, the output folder, and needs a CUDA GPU.
        import torch

        rest = list(args.script_args)
        if rest[:1] == ["--out"]:
            rest = rest[1:]
        asked = rest[:1] in (["-h"], ["--help"])
        if asked or len(rest) > 1 or (rest and rest[0].startswith("-")):
            print(f"usage: ramba bench kernels [--out] [OUT_DIR]   (runs {script}; needs a CUDA GPU)",
                  file=sys.stdout if asked else sys.stderr)
            return 0 if asked else 2
        if not torch.cuda.is_available():
            raise EvalError("bench kernels: the HSA kernel benchmark needs a CUDA GPU (none found)")
        return subprocess.call([sys.executable, str(script), *rest])
    return int(_load_script(script).main(args.script_args, prog=f"ramba bench {args.which}") or 0)
