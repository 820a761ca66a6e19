"""Benchmark the HSA Triton kernels against SDPA flash attention and fla's NSA selection kernel.

Usage: python benchmarks/bench_hsa.py [OUT_DIR]   (default benchmarks/results/; needs a CUDA GPU)

Shapes: HQ=16 query heads, H=1 kv head, D=64, S=64, K=8, bf16, B×T in
64×4K, 16×16K, 4×64K, 1×128K. Writes bench_hsa.json (machine, date, versions, every number) and
bench_hsa.png, and prints a table last. Times are medians of triton.testing.do_bench (ms).

Indices: token t sees the complete chunks c < t // S. It picks K distinct ones without
replacement with probability ∝ 1 / (t // S − c) (Gumbel top-K): biased toward recent chunks with a
heavy tail of far ones, drawn independently per token (no sharing is forced between neighbours).
Slots a token cannot fill (fewer than K visible chunks) get index 0 and weight 0. The K slots are
ordered by chunk id descending; weights are a softmax of Gaussian scores over the filled slots.
"""
from __future__ import annotations

import datetime
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
# tokens per HSA tile to time (hsa_triton's block_tokens); a list of several for sweeps
BLOCK_TOKENS = [int(x) for x in os.environ.get("HSA_BENCH_BLOCK_TOKENS", "4").split(",")]


def draw_indices(B: int, T: int, device, gen: torch.Generator):
    """Causally valid, recency-biased indices and weights ``[B, T, H, K]`` (see the module docstring)."""
    C = T // S
    idx = torch.zeros(B, T, H, K, dtype=torch.int32, device=device)
    w = torch.zeros(B, T, H, K, dtype=torch.float32, device=device)
    c = torch.arange(C, device=device)
    step = max(1, (1 << 24) // (B * H * max(C, 1)))
    for t0 in range(0, T, step):
        t = torch.arange(t0, min(T, t0 + step), device=device)
        nvis = (t // S)[:, None]  # chunk c is complete for token t iff (c + 1) * S <= t
        dist = (nvis - c[None, :]).float()
        logp = torch.where(dist > 0, -torch.log(dist.clamp_min(1.0)), -math.inf)
        u = torch.rand(B, t.numel(), H, C, device=device, generator=gen).clamp_(1e-20, 1.0)
        score = logp[None, :, None, :] - torch.log(-torch.log(u))
        kk = min(K, C)
        top = score.topk(kk, dim=-1)
        ok = top.values > -math.inf
        sel = torch.where(ok, top.indices, -1).sort(dim=-1, descending=True).values
        filled = sel >= 0
        z = torch.randn(B, t.numel(), H, kk, device=device, generator=gen)
        wz = torch.softmax(torch.where(filled, z, -math.inf), dim=-1).nan_to_num(0.0)
        idx[:, t0:t0 + t.numel(), :, :kk] = torch.where(filled, sel, 0).int()
        w[:, t0:t0 + t.numel(), :, :kk] = torch.where(filled, wz, 0.0)
    return idx, w


def bench(fn, grad_to_none=None):
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))


def main() -> None:
    import triton

    from ramba.ops.hsa import hsa
    from ramba.ops.hsa.triton import _chunk_entries, hsa_triton, sorted_tile_chunks

    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    dev = torch.device("cuda")
    try:
        from fla.ops.nsa import parallel_nsa
        import fla

        fla_version, fla_error = fla.__version__, None
    except Exception as exc:  # fla is optional: record why it is missing
        parallel_nsa, fla_version, fla_error = None, None, repr(exc)
    props = torch.cuda.get_device_properties(dev)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": {"gpu": props.name, "sms": props.multi_processor_count, "host": platform.node(),
                    "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "fla": fla_version},
        "fla_error": fla_error,
        "config": {"HQ": HQ, "H": H, "D": D, "S": S, "K": K, "dtype": "bfloat16"},
        "indices": __doc__.split("Indices:")[1].strip(),
        "runs": [],
    }
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    for B, T in SHAPES:
        row = {"B": B, "T": T, "tokens": B * T}
        row["useful_fwd_flop"] = 4 * S * D * K * HQ * B * T
        q = torch.randn(B, T, HQ, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        idx, w = draw_indices(B, T, dev, gen)
        w.requires_grad_(True)
        do = torch.randn_like(q)
        for bt in (4, 8):
            skey = sorted_tile_chunks(idx, T // S, bt)
            row[f"distinct_chunks_per_tile_bt{bt}"] = _chunk_entries(skey, T // S)[2].item() / skey[..., 0].numel()
        skey4 = sorted_tile_chunks(idx, T // S, 4)
        row["tile_sort_ms_bt4"] = bench(lambda: sorted_tile_chunks(idx, T // S, 4))
        row["entry_sort_ms_bt4"] = bench(lambda: _chunk_entries(skey4, T // S))
        scale = D ** -0.5

        def run(name, fwd, grads):
            try:
                row[f"{name}_fwd_ms"] = bench(fwd)

                def fb():
                    fwd().backward(do)

                row[f"{name}_fwdbwd_ms"] = bench(fb, grad_to_none=grads)
                torch.cuda.synchronize()
            except Exception as exc:
                row[f"{name}_error"] = repr(exc)
                traceback.print_exc()

        for bt in BLOCK_TOKENS:
            run(f"hsa_bt{bt}", lambda bt=bt: hsa_triton(q, k, v, w, idx, S, scale, 0.0, block_tokens=bt), [q, k, v, w])
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        hsa(q, k, v, w, idx, S, backend="triton").backward(do)
        torch.cuda.synchronize()
        row["hsa_fwdbwd_peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        q.grad = k.grad = v.grad = w.grad = None
        for p in ("fwd", "fwdbwd"):
            row[f"hsa_{p}_ms"] = min(row.get(f"hsa_bt{bt}_{p}_ms", math.inf) for bt in BLOCK_TOKENS)

        qt = q.detach().transpose(1, 2).requires_grad_(True)
        kt = k.detach().transpose(1, 2).expand(B, HQ, T, D).contiguous().requires_grad_(True)
        vt = v.detach().transpose(1, 2).expand(B, HQ, T, D).contiguous().requires_grad_(True)
        dot = do.transpose(1, 2)

        def sdpa():
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

        try:
            row["sdpa_flash_fwd_ms"] = bench(sdpa)
            row["sdpa_flash_fwdbwd_ms"] = bench(lambda: sdpa().backward(dot), grad_to_none=[qt, kt, vt])
        except Exception as exc:
            row["sdpa_error"] = repr(exc)
        del qt, kt, vt

        if parallel_nsa is not None:
            g_slc = torch.ones(B, T, HQ, device=dev, dtype=torch.bfloat16)
            bidx = idx.long()
            run("fla_nsa", lambda: parallel_nsa(q, k, v, g_slc=g_slc, block_indices=bidx, block_counts=K,
                                                block_size=S, scale=scale), [q, k, v])
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
        del q, k, v, idx, w, do
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "bench_hsa.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(out_dir, "bench_hsa.png"))
    names = [f"hsa_bt{bt}" for bt in BLOCK_TOKENS] + ["fla_nsa", "sdpa_flash"]
    print(f"{'B x T':>12} " + " ".join(f"{n + ' fwd':>14} {n + ' f+b':>14}" for n in names))
    for r in result["runs"]:
        cells = []
        for n in names:
            for p in ("fwd", "fwdbwd"):
                x = r.get(f"{n}_{p}_ms")
                cells.append(f"{x:14.3f}" if x is not None else f"{'-':>14}")
        print(f"{r['B']:>4} x {r['T']:>6} " + " ".join(cells))


def plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    Ts = [r["T"] for r in result["runs"]]
    for ax, phase in zip(axes, ("fwd", "fwdbwd")):
        for name, label in (("hsa", "HSA triton (best tile)"), ("fla_nsa", "fla NSA selection"),
                            ("sdpa_flash", "SDPA flash causal")):
            ys = [r.get(f"{name}_{phase}_ms") for r in result["runs"]]
            pts = [(t, y) for t, y in zip(Ts, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (B x T = 262144, 131072 at T=128K)")
        ax.set_ylabel("median ms")
        ax.set_title(f"{phase}, {result['machine']['gpu']}, {result['date'][:10]}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
