"""What bounds the HSA triton backward (issue 18)? Times the backward of ``ramba.ops.hsa.triton`` beside variants of
its own source with one part of the work removed (their gradients are wrong: timing only), on the benchmark's
selections at 262,144 tokens (``ramba.bench.hsa``: HQ=16, H=1, D=64, S=64, K=8, bf16).

Variants: ``no_dq`` drops the dq product and its fp32 atomics; ``store_dq`` writes dq with plain stores instead of
atomics (the same traffic without the read-modify-write); ``no_dkdv`` drops the per-item dk, dv atomics. Also times
the inverse index (``chunk_work_items``) alone. Needs a GPU. Usage:
    python benchmarks/hsa_bwd_bound.py OUT_DIR      # writes OUT_DIR/hsa_bwd_bound.json
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

from ramba.bench import hsa as bench_hsa
from ramba.ops.hsa import triton as hsa_module

DQ_ATOMIC = 'tl.atomic_add(dq + offs, dq_part, mask=ok[:, None], sem="relaxed")'
DQ_PRODUCT = "dq_part = tl.dot(ds.to(kc.dtype), kc, input_precision=PREC) * scale"
DKDV = ('tl.atomic_add(dk + kv, dk_acc * scale, sem="relaxed")', 'tl.atomic_add(dv + kv, dv_acc, sem="relaxed")')
VARIANTS = {
    "no_dq": [(DQ_ATOMIC, "pass"), (DQ_PRODUCT, "pass")],
    "store_dq": [(DQ_ATOMIC, "tl.store(dq + offs, dq_part, mask=ok[:, None])")],
    "no_dkdv": [(DKDV[0], "pass"), (DKDV[1], "pass")],
}
SHAPES = [("trained", 4, 65536), ("uniform", 4, 65536), ("trained", 64, 4096), ("uniform", 64, 4096)]


def variant(name: str, edits: list[tuple[str, str]], folder: Path):
    """``hsa_triton`` of the module source with ``edits`` (old, new) applied."""
    source = Path(hsa_module.__file__).read_text()
    for old, new in edits:
        if old not in source:
            raise ValueError(f"hsa_bwd_bound: {name}: the kernel source no longer contains {old!r}")
        source = source.replace(old, new)
    path = folder / f"hsa_triton_{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"hsa_triton_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.hsa_triton


def time_shape(fns: dict, pattern: str, B: int, T: int, dev) -> dict:
    """One row: the inverse index alone and each variant's forward, forward+backward and backward, ms."""
    gen = torch.Generator(device=dev).manual_seed(0)
    idx, w = bench_hsa.selection(pattern, B, T, dev, gen)
    q = torch.randn(B, T, bench_hsa.HQ, bench_hsa.D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, T, bench_hsa.H, bench_hsa.D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    w = w.requires_grad_(True)
    do = torch.randn_like(q)
    scale = bench_hsa.D**-0.5
    row = {"pattern": pattern, "B": B, "T": T}
    pairs = hsa_module.work_item_pairs(bench_hsa.HQ // bench_hsa.H)
    row["work_items_ms"] = bench_hsa.bench(lambda: hsa_module.chunk_work_items(idx, T // bench_hsa.S, pairs))
    for name, fn in fns.items():
        bench_hsa.time_fwd_bwd(row, name, lambda fn=fn: fn(q, k, v, w, idx, bench_hsa.S, scale, 0.0), do, [q, k, v, w])
        if f"{name}_fwdbwd_ms" in row:
            row[f"{name}_bwd_ms"] = row[f"{name}_fwdbwd_ms"] - row[f"{name}_fwd_ms"]
    return row


def main(out_dir: str) -> None:
    dev = torch.device("cuda")
    folder = Path(tempfile.mkdtemp())
    fns = {"v3": hsa_module.hsa_triton} | {n: variant(n, e, folder) for n, e in VARIANTS.items()}
    rows = []
    for pattern, B, T in SHAPES:
        rows.append(time_shape(fns, pattern, B, T, dev))
        print(json.dumps(rows[-1]), flush=True)
    result = bench_hsa.machine_info() | {
        "variants": {n: [new for _, new in e] for n, e in VARIANTS.items()},
        "runs": rows,
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    bench_hsa.write_json(result, str(Path(out_dir) / "hsa_bwd_bound.json"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
