"""HSA "triton" backend: fused forward and backward kernels, linear in T.

Work is organised around *token tiles*: ``BT`` consecutive tokens of one (batch, kv head), whose
``BT × G`` query rows (``G = HQ // H`` query heads per kv head) form one matrix tile. A tile's
``BT × K`` (token, slot) pairs are reduced to the sorted list of the distinct chunks they select
(the *plan*, built with a per-tile sort in PyTorch), with a dense ``[BT]`` weight column per
distinct chunk (0 for tokens that did not select it; duplicate slots add their weights). Each
distinct chunk's ``k, v`` are then loaded once per tile and multiplied against all ``BT × G``
rows, so neighbouring tokens that select the same chunks share the chunk loads and the matrix
products have ``BT × G`` rows instead of ``G``. The whole chunk (``S`` keys) sits in one tile, so
each per-chunk softmax is computed exactly, without an online rescaling.

Kernels:
- forward, one program per (token tile, batch × kv head): ``o += (w · softmax1(q kᵀ)) v``.
- backward dq/dw, same grid: recompute ``P``, ``dP = dO vᵀ``; ``dw = Σ_g rowsum(P ⊙ dP)`` per
  (distinct chunk, token), ``dS = w P ⊙ (dP − rowsum(P ⊙ dP))``, ``dq += dS k · scale``.
- backward dk/dv, chunk-major: the plan entries are sorted by chunk (one argsort, no scan over
  (query, chunk) pairs); each program takes a fixed-size run of that sorted list (so a popular
  chunk is split over several programs), keeps ``dk_c, dv_c`` in registers while the chunk stays
  the same and adds them into fp32 buffers with one atomic add per (program, chunk).

Buffers: the plan is O(T · K · BT) (distinct-chunk ids and weight columns), the sort keys O(T · K);
nothing grows like T × (number of chunks).

Checks: ``hsa(..., backend="triton")`` checks shapes, dtypes and devices but, for speed, not the
index range: ids outside ``[0, Tk // chunk_size)`` read out of bounds (undefined results). This
module assumes checked inputs. Works under ``TRITON_INTERPRET=1`` on CPU tensors (fixed launch
configuration there; the autotuner needs a GPU). The interpreter has no bf16: use fp16/fp32 there.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:
    from triton import knobs as _knobs

    _INTERPRET = bool(_knobs.runtime.interpret)
except ImportError:  # older triton without knobs
    _INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_LOG2E = 1.4426950408889634
# plan entries handled by one dk/dv program
_DKV_ENTRIES = 16


@triton.jit
def _tile_rows(b, h, j, T, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr):
    """Offsets ``[R, D]`` of tile j's rows (token-major, then query head) into a [B, T, HQ, D] tensor, and the row mask."""
    r = tl.arange(0, BT * GP)
    tok = r // GP
    g = r % GP
    t = j * BT + tok
    ok = (g < G) & (t < T)
    row = ((b * T + t).to(tl.int64) * (H * G) + h * G + g) * D
    offs = row[:, None] + tl.arange(0, D)[None, :]
    return offs, ok[:, None], tok


@triton.jit
def _chunk_offsets(b, h, c, Tk, H: tl.constexpr, S: tl.constexpr, D: tl.constexpr):
    """Offsets ``[S, D]`` of chunk c of kv head h into a [B, Tk, H, D] tensor."""
    s = tl.arange(0, S)
    row = ((b * Tk + c * S + s).to(tl.int64) * H + h) * D
    return row[:, None] + tl.arange(0, D)[None, :]


@triton.jit
def _probs(qt, kc, qk_scale, sm_n, HAS_SM_N: tl.constexpr, PREC: tl.constexpr):
    """softmax1 over the chunk's S keys: ``[R, D] × [S, D] -> [R, S]`` (scores in log2 units)."""
    s = tl.dot(qt, tl.trans(kc), input_precision=PREC) * qk_scale
    m = tl.max(s, 1)
    if HAS_SM_N:
        m = tl.maximum(m, 0.0)  # as softmax1: the extra exp(0 - m) term must not overflow
    e = tl.exp2(s - m[:, None])
    den = tl.sum(e, 1)
    if HAS_SM_N:
        den += sm_n * tl.exp2(-m)
    return e / den[:, None]


@triton.jit
def _hsa_fwd_kernel(
    q, k, v, o, uniq, cnt, wt, qk_scale, sm_n, T, Tk, NT,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, L: tl.constexpr,
    S: tl.constexpr, D: tl.constexpr, HAS_SM_N: tl.constexpr, PREC: tl.constexpr,
):
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs, ok, tok = _tile_rows(b, h, j, T, H, G, GP, BT, D)
    qt = tl.load(q + offs, mask=ok, other=0.0)
    tile = (bh * NT + j).to(tl.int64)
    n = tl.load(cnt + tile)
    acc = tl.zeros([BT * GP, D], dtype=tl.float32)
    for u in range(n):
        c = tl.load(uniq + tile * L + u)
        w = tl.load(wt + (tile * L + u) * BT + tok)
        kv = _chunk_offsets(b, h, c, Tk, H, S, D)
        kc = tl.load(k + kv)
        vc = tl.load(v + kv)
        p = _probs(qt, kc, qk_scale, sm_n, HAS_SM_N, PREC) * w[:, None]
        acc += tl.dot(p.to(vc.dtype), vc, input_precision=PREC)
    tl.store(o + offs, acc.to(o.dtype.element_ty), mask=ok)


@triton.jit
def _hsa_bwd_dq_kernel(
    q, k, v, do, dq, dwu, uniq, cnt, wt, qk_scale, scale, sm_n, T, Tk, NT,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, L: tl.constexpr,
    S: tl.constexpr, D: tl.constexpr, HAS_SM_N: tl.constexpr, PREC: tl.constexpr,
):
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs, ok, tok = _tile_rows(b, h, j, T, H, G, GP, BT, D)
    qt = tl.load(q + offs, mask=ok, other=0.0)
    dot_ = tl.load(do + offs, mask=ok, other=0.0)
    tile = (bh * NT + j).to(tl.int64)
    n = tl.load(cnt + tile)
    acc = tl.zeros([BT * GP, D], dtype=tl.float32)
    for u in range(n):
        c = tl.load(uniq + tile * L + u)
        w = tl.load(wt + (tile * L + u) * BT + tok)
        kv = _chunk_offsets(b, h, c, Tk, H, S, D)
        kc = tl.load(k + kv)
        vc = tl.load(v + kv)
        p = _probs(qt, kc, qk_scale, sm_n, HAS_SM_N, PREC)
        dp = tl.dot(dot_, tl.trans(vc), input_precision=PREC)
        rs = tl.sum(p * dp, 1)  # dO . o_chunk per row; masked rows have dO = 0
        tl.store(dwu + (tile * L + u) * BT + tl.arange(0, BT), tl.sum(tl.reshape(rs, [BT, GP]), 1))
        ds = p * (dp - rs[:, None]) * w[:, None]
        acc += tl.dot(ds.to(kc.dtype), kc, input_precision=PREC)
    tl.store(dq + offs, (acc * scale).to(dq.dtype.element_ty), mask=ok)


@triton.jit
def _hsa_bwd_dkv_kernel(
    q, k, v, do, dk, dv, order, skey, n_valid, wt, qk_scale, scale, sm_n, T, Tk, NT, C,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, L: tl.constexpr,
    S: tl.constexpr, D: tl.constexpr, HAS_SM_N: tl.constexpr, PREC: tl.constexpr, E: tl.constexpr,
):
    start = tl.program_id(0) * E
    end = tl.minimum(start + E, tl.load(n_valid))
    if start < end:
        cur = tl.load(skey + start)
        kv = _chunk_offsets((cur // C) // H, (cur // C) % H, cur % C, Tk, H, S, D)
        kc = tl.load(k + kv)
        vc = tl.load(v + kv)
        dk_acc = tl.zeros([S, D], dtype=tl.float32)
        dv_acc = tl.zeros([S, D], dtype=tl.float32)
        for i in range(start, end):
            key = tl.load(skey + i)
            if key != cur:
                tl.atomic_add(dk + kv, dk_acc * scale)
                tl.atomic_add(dv + kv, dv_acc)
                cur = key
                kv = _chunk_offsets((cur // C) // H, (cur // C) % H, cur % C, Tk, H, S, D)
                kc = tl.load(k + kv)
                vc = tl.load(v + kv)
                dk_acc = tl.zeros([S, D], dtype=tl.float32)
                dv_acc = tl.zeros([S, D], dtype=tl.float32)
            e = tl.load(order + i)  # plan entry (bh * NT + j) * L + u
            tile = e // L
            bh = tile // NT
            offs, ok, tok = _tile_rows(bh // H, bh % H, tile % NT, T, H, G, GP, BT, D)
            qt = tl.load(q + offs, mask=ok, other=0.0)
            dot_ = tl.load(do + offs, mask=ok, other=0.0)
            w = tl.load(wt + e * BT + tok)
            p = _probs(qt, kc, qk_scale, sm_n, HAS_SM_N, PREC)
            dp = tl.dot(dot_, tl.trans(vc), input_precision=PREC)
            rs = tl.sum(p * dp, 1)
            pw = p * w[:, None]
            ds = pw * (dp - rs[:, None])
            dv_acc += tl.dot(tl.trans(pw.to(vc.dtype)), dot_, input_precision=PREC)
            dk_acc += tl.dot(tl.trans(ds.to(kc.dtype)), qt, input_precision=PREC)
        tl.atomic_add(dk + kv, dk_acc * scale)
        tl.atomic_add(dv + kv, dv_acc)


def _configs(rows: int):
    warps = (4, 8) if rows >= 64 else (2, 4)
    return [triton.Config({}, num_warps=w, num_stages=s) for w in warps for s in (1, 2)]


_KEY = ["G", "BT", "S", "D", "HAS_SM_N", "PREC"]
if _INTERPRET:
    _fwd, _bwd_dq, _bwd_dkv = _hsa_fwd_kernel, _hsa_bwd_dq_kernel, _hsa_bwd_dkv_kernel
else:
    _fwd = triton.autotune(_configs(64), key=_KEY)(_hsa_fwd_kernel)
    _bwd_dq = triton.autotune(_configs(64), key=_KEY)(_hsa_bwd_dq_kernel)
    # the tuner reruns the kernel: the atomically accumulated buffers must restart from zero
    _bwd_dkv = triton.autotune(_configs(64), key=_KEY, reset_to_zero=["dk", "dv"])(_hsa_bwd_dkv_kernel)


def _launch(kernel, grid, *args, **meta):
    if _INTERPRET:
        meta["num_warps"] = 4
    kernel[grid](*args, **meta)


def default_block_tokens(group: int) -> int:
    """Tokens per tile for ``group = HQ // H``: ≥ 4 tokens and ≥ 16 rows (the minimum dot size)."""
    return max(4, 16 // triton.next_power_of_2(group))


def build_plan(indices: torch.Tensor, weights: torch.Tensor, n_chunks: int, block_tokens: int):
    """Distinct chunks of each token tile.

    Args:
        indices, weights: ``[B, T, H, K]``.
    Returns:
        uniq ``[B, H, NT, L]`` int32 distinct chunk ids, ascending, valid for ``u < cnt``
        (``L = block_tokens · K``, ``NT = ceil(T / block_tokens)``); cnt ``[B, H, NT]`` int32;
        wt ``[B, H, NT, L, block_tokens]`` float32 weight of each distinct chunk for each token
        of the tile; pos ``[B, H, NT, L]`` int64, the distinct-chunk slot of each (token, slot) pair.
    """
    B, T, H, K = indices.shape
    BT = block_tokens
    NT = -(-T // BT)
    L = BT * K
    idx = indices.permute(0, 2, 1, 3).to(torch.int32)
    w = weights.permute(0, 2, 1, 3).to(torch.float32)
    if NT * BT != T:  # padding tokens select the sentinel chunk n_chunks with weight 0
        idx = torch.nn.functional.pad(idx, (0, 0, 0, NT * BT - T), value=n_chunks)
        w = torch.nn.functional.pad(w, (0, 0, 0, NT * BT - T))
    key, perm = idx.reshape(B, H, NT, L).sort(dim=-1)
    new = key < n_chunks
    new[..., 1:] &= key[..., 1:] != key[..., :-1]
    rank = new.cumsum(-1) - 1
    cnt = new.sum(-1, dtype=torch.int32)
    uniq = torch.full((B, H, NT, L + 1), n_chunks, dtype=torch.int32, device=idx.device)
    uniq.scatter_(-1, torch.where(new, rank, L), key)  # repeats land in the spare column L
    pos = torch.empty_like(rank).scatter_(-1, perm, rank.clamp_min(0))
    tok = torch.arange(L, device=idx.device) // K
    wt = torch.zeros(B, H, NT, L * BT, dtype=torch.float32, device=idx.device)
    wt.scatter_add_(-1, pos * BT + tok, w.reshape(B, H, NT, L))
    return uniq[..., :L].contiguous(), cnt, wt.view(B, H, NT, L, BT), pos


class _HSATriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, weights, indices, chunk_size, scale, sm_n, block_tokens):
        B, T, HQ, D = q.shape
        Tk, H = k.shape[1], k.shape[2]
        G, S = HQ // H, chunk_size
        GP = triton.next_power_of_2(G)
        BT = block_tokens or default_block_tokens(G)
        if BT * GP < 16 or BT & (BT - 1):
            raise ValueError(f"hsa_triton: block_tokens must be a power of 2 with block_tokens * {GP} >= 16, got {BT}")
        q = q.contiguous()
        k = k.to(q.dtype).contiguous()
        v = v.to(q.dtype).contiguous()
        uniq, cnt, wt, pos = build_plan(indices, weights, Tk // S, BT)
        NT, L = uniq.shape[2], uniq.shape[3]
        o = torch.empty_like(q)
        meta = dict(H=H, G=G, GP=GP, BT=BT, L=L, S=S, D=D, HAS_SM_N=bool(sm_n),
                    PREC="ieee" if q.dtype == torch.float32 else "tf32")
        if o.numel():
            _launch(_fwd, (NT, B * H), q, k, v, o, uniq, cnt, wt, scale * _LOG2E, float(sm_n), T, Tk, NT, **meta)
        ctx.save_for_backward(q, k, v, uniq, cnt, wt, pos)
        ctx.meta = meta
        ctx.hsa_args = (scale, float(sm_n), S, indices.shape[-1], weights.dtype, k.dtype, v.dtype)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, uniq, cnt, wt, pos = ctx.saved_tensors
        scale, sm_n, S, K, w_dtype, k_dtype, v_dtype = ctx.hsa_args
        meta = ctx.meta
        B, T, HQ, D = q.shape
        Tk, H = k.shape[1], k.shape[2]
        NT, L, BT, C = uniq.shape[2], uniq.shape[3], meta["BT"], Tk // S
        do = do.to(q.dtype).contiguous()
        need_q, need_k, need_v, need_w = ctx.needs_input_grad[:4]
        dq = dk = dv = dw = None
        if need_q or need_w:
            dq = torch.empty_like(q)
            dwu = torch.zeros(B, H, NT, L, BT, dtype=torch.float32, device=q.device)
            if q.numel():
                _launch(_bwd_dq, (NT, B * H), q, k, v, do, dq, dwu, uniq, cnt, wt,
                        scale * _LOG2E, scale, sm_n, T, Tk, NT, **meta)
            # the (token, slot) pair's dw is its distinct chunk's dw for that token
            tok = torch.arange(L, device=q.device) // K
            dw = dwu.view(B, H, NT, L * BT).gather(-1, pos * BT + tok)
            dw = dw.view(B, H, NT * BT, K)[:, :, :T].permute(0, 2, 1, 3).to(w_dtype)
        if need_k or need_v:
            bh = torch.arange(B * H, device=q.device).view(B, H, 1, 1)
            valid = torch.arange(L, device=q.device) < cnt[..., None]
            key = torch.where(valid, bh * C + uniq, B * H * C).view(-1)
            skey, order = key.sort()
            n_valid = cnt.sum(dtype=torch.int32).view(1)
            dk32 = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
            dv32 = torch.zeros_like(dk32)
            grid = (max(1, triton.cdiv(key.numel(), _DKV_ENTRIES)),)
            if q.numel():
                _launch(_bwd_dkv, grid, q, k, v, do, dk32, dv32, order, skey, n_valid, wt,
                        scale * _LOG2E, scale, sm_n, T, Tk, NT, C, E=_DKV_ENTRIES, **meta)
            dk, dv = dk32.to(k_dtype), dv32.to(v_dtype)
        if dq is not None:
            dq = dq if need_q else None
            dw = dw if need_w else None
        return dq, dk, dv, dw, None, None, None, None, None


def hsa_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    chunk_size: int,
    scale: float,
    sm_n: float = 0.0,
    *,
    block_tokens: int | None = None,
) -> torch.Tensor:
    """HSA with fused Triton kernels (DESIGN §1), differentiable in q, k, v and weights.

    Args:
        q: ``[B, T, HQ, D]`` (bf16, fp16 or fp32; fp32 dots run in full fp32, not tf32);
        k, v: ``[B, Tk, H, D]`` (cast to q's dtype); weights: ``[B, T, H, K]`` float;
        indices: ``[B, T, H, K]`` integer chunk ids, **not range-checked here**.
        D and chunk_size must be powers of 2, at least 16.
        block_tokens: tokens per tile (power of 2); default ``default_block_tokens(HQ // H)``.
    Returns:
        ``[B, T, HQ, D]`` in q's dtype, accumulated in fp32.
    """
    D = q.shape[-1]
    for name, n in (("head dim D", D), ("chunk_size", chunk_size)):
        if n < 16 or n & (n - 1):
            raise ValueError(f"hsa_triton: {name} must be a power of 2 >= 16, got {n}")
    return _HSATriton.apply(q, k, v, weights, indices, chunk_size, scale, sm_n, block_tokens)


__all__ = ["hsa_triton", "build_plan", "default_block_tokens"]
