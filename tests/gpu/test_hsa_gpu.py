"""HSA triton backend on CUDA at real sizes: against the reference and the torch backend.

Few kernel compiles: the long and memory tests reuse the first CASES shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ramba.ops.hsa import hsa

SELECTION = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "selection_tiny_passkey.pt"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-5}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(B, T, HQ, H, D, S, K, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    Tk = max(S, (T // S) * S)
    C = Tk // S
    q = torch.randn(B, T, HQ, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(B, Tk, H, D, device="cuda", generator=g).to(dtype)
    v = torch.randn(B, Tk, H, D, device="cuda", generator=g).to(dtype)
    idx = torch.randint(0, C, (B, T, H, K), device="cuda", generator=g)
    # duplicates and zero-weight slots on purpose
    idx[..., -1] = idx[..., 0]
    w = torch.rand(B, T, H, K, device="cuda", generator=g)
    w = torch.where(torch.rand(B, T, H, K, device="cuda", generator=g) < 0.2, 0.0, w)
    do = torch.randn(B, T, HQ, D, device="cuda", generator=g).to(dtype)
    return q, k, v, w, idx, do


def run(backend, q, k, v, w, idx, do, S, sm_n, acc=None):
    ins = [x.detach().to(acc or x.dtype).requires_grad_(True) for x in (q, k, v, w)]
    o = hsa(*ins[:3], ins[3], idx, S, sm_n=sm_n, backend=backend)
    grads = torch.autograd.grad(o, ins, do.to(o.dtype))
    return (o, *grads)


CASES = [  # (HQ, H, D, S, K, sm_n, dtype)
    (16, 1, 64, 64, 8, 0.0, torch.bfloat16),
    (16, 1, 64, 64, 8, 1.0, torch.float16),
    (8, 2, 128, 64, 4, 0.0, torch.bfloat16),
    (4, 4, 32, 128, 16, 1.0, torch.bfloat16),
    (2, 1, 64, 32, 32, 0.0, torch.bfloat16),
    (12, 4, 64, 64, 8, 0.0, torch.bfloat16),
    (16, 16, 64, 64, 1, 0.0, torch.bfloat16),
    (16, 2, 64, 64, 8, 1.0, torch.float32),
]


@pytest.mark.parametrize("HQ,H,D,S,K,sm_n,dtype", CASES)
def test_triton_matches_reference(HQ, H, D, S, K, sm_n, dtype):
    B, T = 2, 1000
    q, k, v, w, idx, do = make(B, T, HQ, H, D, S, K, dtype, seed=HQ * 100 + D + S + K)
    ref = run("reference", q, k, v, w, idx, do, S, sm_n, acc=torch.float64)
    got = run("triton", q, k, v, w, idx, do, S, sm_n)
    for name, a, b in zip(("o", "dq", "dk", "dv", "dw"), got, ref):
        assert a.dtype == (torch.float32 if name == "dw" else dtype)
        assert rel(a, b) < TOL[dtype], f"{name}: {rel(a, b):.2e}"


def causal_selection(pattern: str, B: int, T: int, S: int, K: int, seed: int):
    """Indices and weights ``[B, T, 1, K]`` of a selection pattern at chunk size S (slots may repeat a chunk).

    uniform: visible chunks (c + 1) * S <= t drawn uniformly; recency: distance d = floor((n + 1) ** u) chunks back,
    u uniform, n the visible count (density ~ 1 / d); trained: the shipped model's choices on 64K tokens of
    the Python docs (benchmarks/dump_selection.py). Tokens that see no chunk get index 0 and weight 0.
    """
    g = torch.Generator(device="cuda").manual_seed(seed)
    if pattern == "trained":
        dump = torch.load(SELECTION)
        assert (dump["chunk_size"], dump["topk"]) == (S, K) and dump["indices"].shape[0] >= T
        sel = dump["indices"][:T].to("cuda").long()[None, :, None, :].expand(B, T, 1, K)
    else:
        n = (torch.arange(T, device="cuda") // S)[None, :, None, None].expand(B, T, 1, K)
        u = torch.rand(B, T, 1, K, device="cuda", generator=g)
        d = (n * u).floor() + 1 if pattern == "uniform" else ((n + 1).double() ** u).floor()
        sel = torch.where(n > 0, n - torch.minimum(d.long().clamp_min(1), n), -1)
    w = torch.rand(B, T, 1, K, device="cuda", generator=g) * (sel >= 0)
    return sel.clamp_min(0).contiguous(), w


@pytest.mark.parametrize("pattern,B,T", [("uniform", 1, 131072), ("recency", 2, 65536), ("trained", 1, 65536)])
def test_triton_matches_torch_backend_long(pattern, B, T):
    """Real sizes, selection patterns like those of ramba/bench/hsa.py, against the fp32 torch backend."""
    HQ, H, D, S, K = 16, 1, 64, 64, 8  # the first CASES shape: its kernels are compiled already
    q, k, v, _, _, do = make(B, T, HQ, H, D, S, K, torch.bfloat16, seed=T + K)
    idx, w = causal_selection(pattern, B, T, S, K, seed=T)
    ref = run("torch", q, k, v, w, idx, do, S, 0.0, acc=torch.float32)
    got = run("triton", q, k, v, w, idx, do, S, 0.0)
    for name, a, b in zip(("o", "dq", "dk", "dv", "dw"), got, ref):
        assert rel(a, b) < TOL[torch.bfloat16], f"{name}: {rel(a, b):.2e}"


def test_triton_memory_linear_in_t():
    """fwd+bwd extra memory per token stays flat from T=16K to T=64K (no T x C buffers)."""
    per_token = []
    for T in (16384, 65536):
        q, k, v, w, idx, do = make(1, T, 16, 1, 64, 64, 8, torch.bfloat16, seed=1)
        ins = [x.requires_grad_(True) for x in (q, k, v, w)]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        hsa(*ins, idx, 64, backend="triton").backward(do)
        torch.cuda.synchronize()
        per_token.append((torch.cuda.max_memory_allocated() - base) / T)
    assert per_token[1] < 1.2 * per_token[0], per_token
