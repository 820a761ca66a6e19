"""Benchmark the HSA Triton kernels against SDPA flash attention and fla's NSA selection kernel.

Usage: ramba bench kernels [[--out] OUT_DIR] [--baseline FILE] [--sweep]
(or python -m ramba.bench.hsa, from the source checkout's root; default OUT_DIR benchmarks/results/; needs a CUDA GPU)

Shapes: HQ=16 query heads, H=1 kv head, D=64, S=64, K=8, bf16, B×T in 64×4K, 16×16K, 4×64K, 1×128K,
each with three selection patterns (below). Writes bench_hsa.json (machine, date, versions, every number)
and bench_hsa.png, and prints a table last. Times are medians of triton.testing.do_bench (ms).
``--baseline FILE``: also time the ``hsa_triton`` of that module file (an earlier version of
ramba/ops/hsa/triton.py, e.g. ``git show 9efe38d:ramba/ops/hsa/triton.py``) in the same run.
``--sweep``: instead, time the other supported shapes (SWEEP, recency pattern) against the baseline:
bench_hsa_sweep.json.

Selection patterns (chunk c is complete, so selectable, for token t iff (c + 1) * S <= t):
- uniform: K distinct visible chunks drawn uniformly, independently per token.
- recency: K distinct visible chunks drawn without replacement with probability ∝ 1 / (t // S − c)
  (Gumbel top-K): biased toward recent chunks with a heavy tail of far ones, independently per token.
- trained: what the model shipped before 2026-12-01 (tiny-passkey) selected on 64K tokens of the Python docs
  (benchmarks/dump_selection.py -> benchmarks/results/selection_tiny_passkey.pt, the same chunk size and
  K); every batch row uses it, and tokens past 64K repeat it shifted by 64K / S chunks.
Slots a token cannot fill get index 0 and weight 0. The K slots are ordered by chunk id descending;
weights are a softmax of Gaussian scores over the filled slots. q, k, v are Gaussian.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import sys
import traceback

import torch
import torch.nn.functional as F

HQ, H, D, S, K = 16, 1, 64, 64, 8
SHAPES = [(64, 4096), (16, 16384), (4, 65536), (1, 131072)]
CALL_TOKENS = 262_144  # B × T of every shape but the last (the plot scales that one to it)
PATTERNS = ("uniform", "recency", "trained")
# the "trained" pattern's selection, written by benchmarks/dump_selection.py (relative to the working directory)
SELECTION = os.path.join("benchmarks", "results", "selection_tiny_passkey.pt")
# the other supported shapes, recency pattern, B×T = 4×8K: (HQ, H, D, S, K, sm_n, dtype)
SWEEP = [
    (16, 1, 64, 64, 8, 1.0, "float16"),
    (8, 2, 128, 64, 4, 0.0, "bfloat16"),
    (4, 4, 32, 128, 16, 1.0, "bfloat16"),
    (2, 1, 64, 32, 32, 0.0, "bfloat16"),
    (12, 4, 64, 64, 8, 0.0, "bfloat16"),
    (16, 16, 64, 64, 1, 0.0, "bfloat16"),
    (16, 2, 64, 64, 8, 1.0, "float32"),
    (1, 1, 128, 128, 8, 0.0, "bfloat16"),
]


def _weights(filled: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Softmax of Gaussian scores over the filled slots, 0 elsewhere."""
    z = torch.randn(filled.shape, device=filled.device, generator=gen)
    return torch.softmax(torch.where(filled, z, -math.inf), dim=-1).nan_to_num(0.0)


def draw_indices(
    B: int, T: int, device, gen: torch.Generator, pattern: str = "recency", h: int = H, k: int = K, s: int = S
):
    """Causally valid indices and weights ``[B, T, h, k]`` of a random pattern (see the module docstring)."""
    C = T // s
    idx = torch.zeros(B, T, h, k, dtype=torch.int32, device=device)
    w = torch.zeros(B, T, h, k, dtype=torch.float32, device=device)
    c = torch.arange(C, device=device)
    step = max(1, (1 << 24) // (B * h * max(C, 1)))
    for t0 in range(0, T, step):
        t = torch.arange(t0, min(T, t0 + step), device=device)
        nvis = (t // s)[:, None]
        dist = (nvis - c[None, :]).float()
        bias = -torch.log(dist.clamp_min(1.0)) if pattern == "recency" else torch.zeros_like(dist)
        logp = torch.where(dist > 0, bias, -math.inf)
        u = torch.rand(B, t.numel(), h, C, device=device, generator=gen).clamp_(1e-20, 1.0)
        score = logp[None, :, None, :] - torch.log(-torch.log(u))
        kk = min(k, C)
        top = score.topk(kk, dim=-1)
        sel = torch.where(top.values > -math.inf, top.indices, -1).sort(dim=-1, descending=True).values
        idx[:, t0 : t0 + t.numel(), :, :kk] = sel.clamp_min(0).int()
        w[:, t0 : t0 + t.numel(), :, :kk] = _weights(sel >= 0, gen)
    return idx, w


def trained_indices(B: int, T: int, device, gen: torch.Generator):
    """The shipped model's selection ``[T0, K]`` tiled to ``[B, T, H, K]`` (see the module docstring)."""
    dump = torch.load(SELECTION)
    base = dump["indices"].to(device=device, dtype=torch.int32)
    if (dump["chunk_size"], dump["topk"]) != (S, K):
        raise ValueError(f"bench_hsa: {SELECTION} is for S={dump['chunk_size']}, K={dump['topk']}, not S={S}, K={K}")
    T0 = base.shape[0]
    t = torch.arange(T, device=device)
    sel = base[t % T0] + torch.where(base[t % T0] >= 0, (t // T0)[:, None] * (T0 // S), 0).int()
    sel = sel.sort(dim=-1, descending=True).values  # empty slots (-1) last
    idx = sel.clamp_min(0)[None, :, None, :].expand(B, T, H, K).contiguous()
    return idx, _weights((sel >= 0)[None, :, None, :].expand(B, T, H, K), gen)


def selection(pattern: str, B: int, T: int, device, gen: torch.Generator):
    if pattern == "trained":
        return trained_indices(B, T, device, gen)
    return draw_indices(B, T, device, gen, pattern)


def bench(fn, grad_to_none=None):
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=50, grad_to_none=grad_to_none, return_mode="median"))


def load_baseline(path: str):
    """``hsa_triton`` of an earlier version's module file."""
    spec = importlib.util.spec_from_file_location("hsa_triton_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.hsa_triton


def distinct_chunks_per_tile(idx: torch.Tensor, n_chunks: int, tokens: int) -> float:
    """Mean number of distinct chunks the tiles of ``tokens`` consecutive tokens select."""
    from ramba.ops.hsa.triton import sorted_tile_chunks

    skey = sorted_tile_chunks(idx, n_chunks, tokens)
    first = skey < n_chunks
    first[..., 1:] &= skey[..., 1:] != skey[..., :-1]
    return first.sum().item() / skey[..., 0].numel()


def machine_info() -> dict:
    import triton

    try:
        import fla

        fla_version = fla.__version__
    except Exception as exc:  # fla is optional: record why it is missing
        fla_version = f"missing: {exc!r}"
    props = torch.cuda.get_device_properties(0)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": {
            "gpu": props.name,
            "sms": props.multi_processor_count,
            "host": platform.node(),
            "python": platform.python_version(),
        },
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "fla": fla_version},
    }


def time_fwd_bwd(row: dict, name: str, fwd, do, grads) -> None:
    """``row[name_fwd_ms]``, ``row[name_fwdbwd_ms]``, or ``row[name_error]``."""
    try:
        row[f"{name}_fwd_ms"] = bench(fwd)
        row[f"{name}_fwdbwd_ms"] = bench(lambda: fwd().backward(do), grad_to_none=grads)
        torch.cuda.synchronize()
    except Exception as exc:
        row[f"{name}_error"] = repr(exc)
        traceback.print_exc()


def main_table(out_dir: str, baseline, block_tokens: list[int]) -> None:
    from ramba.ops.hsa import hsa
    from ramba.ops.hsa.triton import chunk_work_items, hsa_triton, sorted_tile_chunks, work_item_pairs

    try:
        from fla.ops.nsa import parallel_nsa
    except Exception:
        parallel_nsa = None
    dev = torch.device("cuda")
    result = {
        **machine_info(),
        "config": {"HQ": HQ, "H": H, "D": D, "S": S, "K": K, "dtype": "bfloat16"},
        "patterns": __doc__.split("Selection patterns")[1].strip(),
        "runs": [],
    }
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    scale = D**-0.5
    for B, T in SHAPES:
        q = torch.randn(B, T, HQ, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn_like(q)
        for pattern in PATTERNS:
            row = {"pattern": pattern, "B": B, "T": T, "tokens": B * T, "useful_fwd_flop": 4 * S * D * K * HQ * B * T}
            idx, w = selection(pattern, B, T, dev, gen)
            w.requires_grad_(True)
            for bt in (4, 16, 64):
                row[f"distinct_chunks_per_tile_{bt}"] = distinct_chunks_per_tile(idx, T // S, bt)
            row["tile_sort_ms"] = bench(lambda: sorted_tile_chunks(idx, T // S, 4))
            row["work_items_ms"] = bench(lambda: chunk_work_items(idx, T // S, work_item_pairs(HQ // H)))
            time_fwd_bwd(row, "hsa", lambda: hsa(q, k, v, w, idx, S, backend="triton"), do, [q, k, v, w])
            for bt in block_tokens:  # the forward with other token tiles (the backward does not tile tokens)
                try:
                    row[f"hsa_bt{bt}_fwd_ms"] = bench(lambda: hsa_triton(q, k, v, w, idx, S, scale, block_tokens=bt))
                except Exception as exc:
                    row[f"hsa_bt{bt}_error"] = repr(exc)
                    traceback.print_exc()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            hsa(q, k, v, w, idx, S, backend="triton").backward(do)
            torch.cuda.synchronize()
            row["hsa_fwdbwd_peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
            q.grad = k.grad = v.grad = w.grad = None
            if baseline is not None:
                time_fwd_bwd(row, "baseline", lambda: baseline(q, k, v, w, idx, S, scale, 0.0), do, [q, k, v, w])
            if parallel_nsa is not None:
                g_slc = torch.ones(B, T, HQ, device=dev, dtype=torch.bfloat16)
                bidx = idx.long()
                time_fwd_bwd(
                    row,
                    "fla_nsa",
                    lambda: parallel_nsa(
                        q, k, v, g_slc=g_slc, block_indices=bidx, block_counts=K, block_size=S, scale=scale
                    ),
                    do,
                    [q, k, v],
                )
            if pattern == PATTERNS[0]:  # dense causal attention: the same for every pattern
                qt = q.detach().transpose(1, 2).requires_grad_(True)
                kt = k.detach().transpose(1, 2).expand(B, HQ, T, D).contiguous().requires_grad_(True)
                vt = v.detach().transpose(1, 2).expand(B, HQ, T, D).contiguous().requires_grad_(True)

                def sdpa():
                    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

                time_fwd_bwd(row, "sdpa_flash", sdpa, do.transpose(1, 2), [qt, kt, vt])
                del qt, kt, vt
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
            write_json(result, os.path.join(out_dir, "bench_hsa.json"))  # after every row: a timeout keeps the rest
            del idx, w
        del q, k, v, do
        torch.cuda.empty_cache()
    plot(result, os.path.join(out_dir, "bench_hsa.png"))
    print_table(result["runs"], ["pattern", "B", "T"], ["hsa", "baseline", "fla_nsa", "sdpa_flash"])


def sweep(out_dir: str, baseline) -> None:
    from ramba.ops.hsa import hsa

    dev = torch.device("cuda")
    B, T = 4, 8192
    result = {**machine_info(), "B": B, "T": T, "pattern": "recency", "runs": []}
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    for hq, h, d, s, kk, sm_n, dtype in SWEEP:
        row = {"HQ": hq, "H": h, "D": d, "S": s, "K": kk, "sm_n": sm_n, "dtype": dtype}
        dt = getattr(torch, dtype)
        q = torch.randn(B, T, hq, d, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(B, T, h, d, device=dev, dtype=dt, requires_grad=True)
        v = torch.randn(B, T, h, d, device=dev, dtype=dt, requires_grad=True)
        do = torch.randn_like(q)
        idx, w = draw_indices(B, T, dev, gen, "recency", h=h, k=kk, s=s)
        w.requires_grad_(True)
        time_fwd_bwd(row, "hsa", lambda: hsa(q, k, v, w, idx, s, sm_n=sm_n, backend="triton"), do, [q, k, v, w])
        if baseline is not None:
            time_fwd_bwd(row, "baseline", lambda: baseline(q, k, v, w, idx, s, d**-0.5, sm_n), do, [q, k, v, w])
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
        write_json(result, os.path.join(out_dir, "bench_hsa_sweep.json"))
        del q, k, v, do, idx, w
        torch.cuda.empty_cache()
    print_table(result["runs"], ["HQ", "H", "D", "S", "K", "sm_n", "dtype"], ["hsa", "baseline"])


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def print_table(runs, keys, names) -> None:
    names = [n for n in names if any(f"{n}_fwd_ms" in r for r in runs)]
    print(" ".join(f"{k:>8}" for k in keys) + " " + " ".join(f"{n + ' fwd':>14} {n + ' f+b':>14}" for n in names))
    for r in runs:
        cells = [f"{r.get(f'{n}_{p}_ms', math.nan):14.3f}" for n in names for p in ("fwd", "fwdbwd")]
        print(" ".join(f"{str(r[k]):>8}" for k in keys) + " " + " ".join(cells))


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from ramba.eval.results import EvalError

    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", nargs="?", help="output folder (default benchmarks/results)")
    ap.add_argument("--out", help="output folder, the same as OUT_DIR")
    ap.add_argument("--baseline", help="module file of an earlier ramba/ops/hsa/triton.py to time beside")
    ap.add_argument("--sweep", action="store_true", help="time the other supported shapes (SWEEP) instead")
    ap.add_argument(
        "--block-tokens",
        default="",
        metavar="LIST",
        help="also time the forward with these tokens per tile (comma-separated powers of 2, e.g. 1,2,8)",
    )
    args = ap.parse_args(argv)
    try:
        block_tokens = [int(x) for x in args.block_tokens.split(",") if x.strip()]
    except ValueError:
        raise EvalError(
            f"bench kernels: --block-tokens takes comma-separated integers, got {args.block_tokens!r}"
        ) from None
    if any(bt < 1 or bt & (bt - 1) for bt in block_tokens):
        raise EvalError(f"bench kernels: --block-tokens takes powers of 2, got {args.block_tokens!r}")
    if not torch.cuda.is_available():
        raise EvalError("bench kernels: the HSA kernel benchmark needs a CUDA GPU (none found)")
    if not args.sweep and not os.path.isfile(SELECTION):
        raise EvalError(
            f"bench kernels: no {SELECTION} (the trained pattern's selection) under {os.getcwd()}; run from "
            "the source checkout's root or write it with benchmarks/dump_selection.py"
        )
    out_dir = args.out or args.out_dir or os.path.join("benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    baseline = load_baseline(args.baseline) if args.baseline else None
    if args.sweep:
        sweep(out_dir, baseline)
    else:
        main_table(out_dir, baseline, block_tokens)
    return 0


def per_call(row: dict, ms: float) -> float:
    """`ms`, a time of `row`'s call, scaled to a call of 262,144 tokens (the 1×128K rows have half as many)."""
    return ms * CALL_TOKENS / row["tokens"]


def tile_sizes(row: dict) -> list[tuple[int, float]]:
    """`(tokens per tile, forward ms)` of one row: the default tile (`default_block_tokens`) and every
    `hsa_bt{N}_fwd_ms` that `--block-tokens` added, by tile size."""
    from ramba.ops.hsa.triton import default_block_tokens

    pts = {default_block_tokens(HQ // H): row["hsa_fwd_ms"]} if "hsa_fwd_ms" in row else {}
    for key, value in row.items():
        if key.startswith("hsa_bt") and key.endswith("_fwd_ms"):
            pts[int(key[len("hsa_bt") : -len("_fwd_ms")])] = value
    return sorted(pts.items())


def plot(result, path) -> None:
    """Forward and forward+backward by T (ms per 262,144 tokens), and, where `--block-tokens` timed other
    tiles, the forward by tokens per tile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    tiles = any(len(tile_sizes(r)) > 1 for r in runs)
    fig, axes = plt.subplots(1, 3 if tiles else 2, figsize=(18 if tiles else 12, 4.5))
    styles = {"hsa": ("-", "HSA triton"), "baseline": (":", "HSA baseline"), "fla_nsa": ("--", "fla NSA")}
    title = f"{result['machine']['gpu']}, {result['date'][:10]}"
    for ax, phase in zip(axes, ("fwd", "fwdbwd")):
        for i, pattern in enumerate(PATTERNS):
            rows = [r for r in runs if r["pattern"] == pattern]
            for name, (ls, label) in styles.items():
                pts = [(r["T"], per_call(r, r[f"{name}_{phase}_ms"])) for r in rows if f"{name}_{phase}_ms" in r]
                if pts:
                    ax.plot(*zip(*pts), ls, color=f"C{i}", marker="o", label=f"{label}, {pattern}")
        pts = [(r["T"], per_call(r, r[f"sdpa_flash_{phase}_ms"])) for r in runs if f"sdpa_flash_{phase}_ms" in r]
        if pts:
            ax.plot(*zip(*pts), "-", color="k", marker="s", label="SDPA flash causal")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (B x T = 262,144; 131,072 at T = 128K, scaled to 262,144)")
        ax.set_ylabel(f"median ms per {CALL_TOKENS:,} tokens")
        ax.set_title(f"{phase}, {title}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    if tiles:
        ax = axes[2]
        for i, pattern in enumerate(PATTERNS):
            for r, ls in zip([r for r in runs if r["pattern"] == pattern], ("-", "--", "-.", ":")):
                pts = [(bt, per_call(r, ms)) for bt, ms in tile_sizes(r)]
                ax.plot(*zip(*pts), ls, color=f"C{i}", marker="o", label=f"{pattern}, {r['B']}x{r['T'] // 1024}K")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per forward tile (4 = the default for 16 query heads a kv head)")
        ax.set_ylabel(f"HSA forward, median ms per {CALL_TOKENS:,} tokens")
        ax.set_title(f"forward by tile size, {title}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
