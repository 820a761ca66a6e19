"""HSA "triton" backend: fused forward and backward kernels, linear in T (docs/design.md §1).

Forward, token-major: one program per *token tile* (``BT`` consecutive tokens of one batch × kv head,
whose ``BT × G`` query rows, ``G = HQ // H``, form one matrix tile). Each tile's ``BT × K`` chunk ids
are sorted once (one PyTorch sort, ``sorted_tile_chunks``); the kernel finds the runs of equal ids and
handles each *distinct* chunk once: its ``k, v`` are loaded once and multiplied against all ``BT × G``
rows, each row weighted by its token's weight for that chunk (0 for tokens that did not select it, the
sum for duplicate slots), so neighbouring tokens that select the same chunks share the loads. The whole
chunk (``S`` keys) sits in one tile, so each per-chunk softmax is exact (no online rescaling);
normalisation and weights are applied per row after the products: ``o += w · softmax1(q kᵀ) v``.

Backward, chunk-major, one kernel: the selection's inverse index (``chunk_work_items``: every
(batch, token, kv head, slot) *pair* sorted by its chunk, CSR offsets per chunk, all by PyTorch ops on
the device) is cut into work items of at most ``work_item_pairs`` pairs of one chunk. A program loads
its chunk's ``k, v`` once and walks its pairs in blocks of ``R`` query rows, each row a real
(token, query head) that selected the chunk: it recomputes ``P`` and ``dP = dO vᵀ``, stores
``dw = Σ_g rowsum(P ⊙ dP)`` per pair, ``dS = w P ⊙ (dP − rowsum(P ⊙ dP))``, keeps ``dv_c += (wP)ᵀ dO``,
``dk_c += dSᵀ q`` in registers and adds ``dS k`` to the pair's dq rows (fp32 atomics: a token's K slots
sit in different items). Five matrix products per row block, none on rows that did not select the chunk;
``dk_c, dv_c`` are added once per work item (atomically: a popular chunk is split over several items).

Buffers: sorted ids, the pair order and the work items O(T · K); fp32 dq, dk, dv, dw; nothing grows like
T × (number of chunks), and no host sync (the item count is bounded from the shapes).

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
# query rows handled by one backward program (one work item): its dk, dv are added once per item
_ITEM_ROWS = 4096


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
    return offs, ok[:, None]


@triton.jit
def _tile_slots(indices, weights, b, h, j, T, H: tl.constexpr, BT: tl.constexpr, K: tl.constexpr, KP: tl.constexpr):
    """Tile j's chunk ids and weights ``[BT, KP]`` (padding: id -1, weight 0), their offsets and mask."""
    t = j * BT + tl.arange(0, BT)[:, None]
    s = tl.arange(0, KP)[None, :]
    ok = (t < T) & (s < K)
    offs = ((b * T + t).to(tl.int64) * H + h) * K + s
    ids = tl.load(indices + offs, mask=ok, other=-1)
    ws = tl.load(weights + offs, mask=ok, other=0.0)
    return ids, ws, offs, ok


@triton.jit
def _row_weights(ids, ws, c, BT: tl.constexpr, GP: tl.constexpr):
    """Weight of chunk c for each token ``[BT]`` (duplicate slots add up) and for each row ``[BT * GP]``."""
    wtok = tl.sum(tl.where(ids == c, ws, 0.0), 1)
    return wtok, tl.reshape(tl.broadcast_to(wtok[:, None], [BT, GP]), [BT * GP])


@triton.jit
def _chunk_offsets(b, h, c, Tk, H: tl.constexpr, S: tl.constexpr, D: tl.constexpr):
    """Offsets ``[S, D]`` of chunk c of kv head h into a [B, Tk, H, D] tensor."""
    s = tl.arange(0, S)
    row = ((b * Tk + c * S + s).to(tl.int64) * H + h) * D
    return row[:, None] + tl.arange(0, D)[None, :]


@triton.jit
def _exp_scores(qt, kc, qk_scale, sm_n, HAS_SM_N: tl.constexpr, PREC: tl.constexpr):
    """Unnormalised softmax1 over the chunk's S keys: ``e [R, S]`` and ``1 / denominator [R]``.

    Normalising after the matrix products (per row) saves an elementwise division per score.
    """
    s = tl.dot(qt, tl.trans(kc), input_precision=PREC)
    m = tl.max(s, 1)
    if HAS_SM_N:
        m = tl.maximum(m, 0.0)  # as softmax1: the extra exp(0 - m) term must not overflow
    ms = m * qk_scale
    e = tl.exp2(s * qk_scale - ms[:, None])
    den = tl.sum(e, 1)
    if HAS_SM_N:
        den += sm_n * tl.exp2(-ms)
    return e, 1.0 / den


@triton.jit
def _distinct_chunks(skey, tile, C, L: tl.constexpr, LP: tl.constexpr):
    """Tile's sorted chunk ids ``[LP]``, which of them start a run of equal ids, their run index, and the run count."""
    i = tl.arange(0, LP)
    keys = tl.load(skey + tile * L + i, mask=i < L, other=C)
    prev = tl.load(skey + tile * L + i - 1, mask=(i > 0) & (i < L), other=-1)
    first = (keys != prev) & (keys < C)
    rank = tl.cumsum(first.to(tl.int32), 0) - 1
    return keys, first, rank, tl.sum(first.to(tl.int32), 0)


@triton.jit
def _hsa_fwd_kernel(
    q,
    k,
    v,
    o,
    indices,
    weights,
    skey,
    qk_scale,
    sm_n,
    T,
    Tk,
    NT,
    C,
    H: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    BT: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    LP: tl.constexpr,
    S: tl.constexpr,
    D: tl.constexpr,
    HAS_SM_N: tl.constexpr,
    PREC: tl.constexpr,
):
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs, ok = _tile_rows(b, h, j, T, H, G, GP, BT, D)
    qt = tl.load(q + offs, mask=ok, other=0.0)
    ids, ws, _, _ = _tile_slots(indices, weights, b, h, j, T, H, BT, K, KP)
    keys, first, rank, n = _distinct_chunks(skey, (bh * NT + j).to(tl.int64), C, BT * K, LP)
    acc = tl.zeros([BT * GP, D], dtype=tl.float32)
    # (names bound inside the loop must not reuse `_` above: Triton types loop-carried names)
    for u in range(n):  # each distinct chunk once
        c = tl.sum(tl.where(first & (rank == u), keys, 0), 0)
        wtok, w = _row_weights(ids, ws, c, BT, GP)
        kv = _chunk_offsets(b, h, c, Tk, H, S, D)
        kc = tl.load(k + kv)
        vc = tl.load(v + kv)
        e, inv = _exp_scores(qt, kc, qk_scale, sm_n, HAS_SM_N, PREC)
        acc += tl.dot(e.to(vc.dtype), vc, input_precision=PREC) * (w * inv)[:, None]
    tl.store(o + offs, acc.to(o.dtype.element_ty), mask=ok)


@triton.jit
def _hsa_bwd_kernel(
    q,
    k,
    v,
    do,
    dq,
    dk,
    dv,
    dw,
    weights,
    order,
    item_start,
    item_end,
    item_key,
    qk_scale,
    scale,
    sm_n,
    Tk,
    C,
    H: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    K: tl.constexpr,
    S: tl.constexpr,
    D: tl.constexpr,
    HAS_SM_N: tl.constexpr,
    PREC: tl.constexpr,
    R: tl.constexpr,
):
    """One work item: pairs ``[start, end)`` of the chunk-sorted list, all of one chunk, in blocks of ``R`` rows."""
    BP: tl.constexpr = triton.cdiv(R, GP)  # pairs per block
    item = tl.program_id(0)
    start = tl.load(item_start + item)
    end = tl.load(item_end + item)
    if start < end:
        key = tl.load(item_key + item)  # (b * H + h) * C + chunk
        kv = _chunk_offsets((key // C) // H, (key // C) % H, key % C, Tk, H, S, D)
        kc = tl.load(k + kv)
        vc = tl.load(v + kv)
        dk_acc = tl.zeros([S, D], dtype=tl.float32)
        dv_acc = tl.zeros([S, D], dtype=tl.float32)
        r = tl.arange(0, BP * GP)
        g = r % GP
        for p0 in range(start, end, BP):
            pos = p0 + r // GP
            ok = (pos < end) & (g < G)
            pair = tl.load(order + pos, mask=ok, other=0)  # flat index into [B, T, H, K]
            w = tl.load(weights + pair, mask=ok, other=0.0)
            # the pair's query rows: token row pair // K of [B·T·H], query head g of its kv head
            offs = ((pair // K) * G + g).to(tl.int64)[:, None] * D + tl.arange(0, D)[None, :]
            qt = tl.load(q + offs, mask=ok[:, None], other=0.0)
            dot_ = tl.load(do + offs, mask=ok[:, None], other=0.0)
            e, inv = _exp_scores(qt, kc, qk_scale, sm_n, HAS_SM_N, PREC)
            dp = tl.dot(dot_, tl.trans(vc), input_precision=PREC)
            rs = tl.sum(e * dp, 1) * inv  # dO . o_chunk per row; masked rows have dO = 0
            # d o / d w of the slot = dO . o_chunk summed over the pair's G rows; each pair is stored once
            ppos = p0 + tl.arange(0, BP)
            pmask = ppos < end
            tl.store(dw + tl.load(order + ppos, mask=pmask, other=0), tl.sum(tl.reshape(rs, [BP, GP]), 1), mask=pmask)
            pw = e * (w * inv)[:, None]  # weighted probabilities
            ds = pw * (dp - rs[:, None])
            dv_acc += tl.dot(tl.trans(pw.to(vc.dtype)), dot_, input_precision=PREC)
            dk_acc += tl.dot(tl.trans(ds.to(kc.dtype)), qt, input_precision=PREC)
            dq_part = tl.dot(ds.to(kc.dtype), kc, input_precision=PREC) * scale
            tl.atomic_add(dq + offs, dq_part, mask=ok[:, None], sem="relaxed")
        tl.atomic_add(dk + kv, dk_acc * scale, sem="relaxed")
        tl.atomic_add(dv + kv, dv_acc, sem="relaxed")


# (num_warps, num_stages) tried for the forward; the backward also tries 32 to 128 query rows per block
_FWD_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 1), (4, 2), (8, 2))]
_BWD_CONFIGS = [
    triton.Config({"R": r}, num_warps=w, num_stages=s) for r, w, s in ((32, 4, 2), (64, 4, 2), (64, 8, 2), (128, 8, 2))
]
_BWD_ROWS_INTERPRETED = 64
_KEY = ["G", "K", "S", "D", "HAS_SM_N", "PREC"]

if _INTERPRET:
    _fwd, _bwd = _hsa_fwd_kernel, _hsa_bwd_kernel
else:
    _fwd = triton.autotune(_FWD_CONFIGS, key=_KEY + ["BT"])(_hsa_fwd_kernel)
    # the tuner reruns the kernel: the atomically accumulated buffers must restart from zero
    _bwd = triton.autotune(_BWD_CONFIGS, key=_KEY, reset_to_zero=["dq", "dk", "dv"])(_hsa_bwd_kernel)


def _launch(kernel, grid, *args, **meta):
    if _INTERPRET:  # one fixed configuration (the autotuner needs a GPU)
        meta["num_warps"] = 4
        if kernel is _bwd:
            meta["R"] = _BWD_ROWS_INTERPRETED
    kernel[grid](*args, **meta)


def default_block_tokens(group: int) -> int:
    """Tokens per forward tile for ``group = HQ // H``: ≥ 4 tokens and ≥ 16 rows (the minimum dot size)."""
    return max(4, 16 // triton.next_power_of_2(group))


def work_item_pairs(group: int) -> int:
    """(token, kv head, slot) pairs per backward work item for ``group = HQ // H``: ``_ITEM_ROWS`` query rows."""
    return max(1, _ITEM_ROWS // triton.next_power_of_2(group))


def sorted_tile_chunks(indices: torch.Tensor, n_chunks: int, block_tokens: int) -> torch.Tensor:
    """Chunk ids of each token tile, ascending: ``[B, T, H, K]`` -> ``[B, H, NT, block_tokens · K]`` int32.

    ``NT = ceil(T / block_tokens)``; the padding tokens of the last tile select ``n_chunks``.
    """
    B, T, H, K = indices.shape
    NT = -(-T // block_tokens)
    idx = indices.permute(0, 2, 1, 3).to(torch.int32)
    if NT * block_tokens != T:
        idx = torch.nn.functional.pad(idx, (0, 0, 0, NT * block_tokens - T), value=n_chunks)
    return idx.reshape(B, H, NT, block_tokens * K).sort(dim=-1).values.contiguous()


def chunk_work_items(indices: torch.Tensor, n_chunks: int, item_pairs: int):
    """The inverse index of the selection, cut into work items of at most ``item_pairs`` pairs of one chunk.

    A pair is one (batch, token, kv head, slot), its flat index into ``indices`` ``[B, T, H, K]``.
    Returns ``order`` ``[N]`` (the pairs sorted by chunk key ``(b·H + h)·C + c``, token order kept) and,
    per work item, ``start, end, key`` ``[n_max]`` int64: the item's range in ``order`` and its chunk key;
    ``n_max = N // item_pairs + min(N, B·H·C)`` bounds the number of items from the shapes (no host sync),
    unused items have ``start = end = 0``.
    """
    B, T, H, K = indices.shape
    dev = indices.device
    N, n_keys = indices.numel(), B * H * n_chunks
    bh = torch.arange(B, device=dev)[:, None, None, None] * H + torch.arange(H, device=dev)[None, None, :, None]
    skey, order = torch.sort((bh * n_chunks + indices.long()).view(-1), stable=True)
    bounds = torch.searchsorted(skey, torch.arange(n_keys + 1, device=dev))  # CSR offsets of each chunk key
    items = (bounds[1:] - bounds[:-1] + item_pairs - 1) // item_pairs
    last = torch.cumsum(items, 0)  # one past each key's last item
    n_max = N // item_pairs + min(N, n_keys)
    p = torch.arange(n_max, device=dev)
    key = torch.searchsorted(last, p, right=True)
    used = key < n_keys
    key = key.clamp_max(n_keys - 1)
    start = bounds[key] + (p - (last[key] - items[key])) * item_pairs
    end = torch.minimum(start + item_pairs, bounds[key + 1])
    zero = torch.zeros((), dtype=start.dtype, device=dev)
    return order, torch.where(used, start, zero), torch.where(used, end, zero), key


class _HSATriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, weights, indices, chunk_size, scale, sm_n, block_tokens):
        B, T, HQ, D = q.shape
        Tk, H, K = k.shape[1], k.shape[2], indices.shape[-1]
        G, S = HQ // H, chunk_size
        GP = triton.next_power_of_2(G)
        BT = block_tokens or default_block_tokens(G)
        if BT * GP < 16 or BT & (BT - 1):
            raise ValueError(f"hsa_triton: block_tokens must be a power of 2 with block_tokens * {GP} >= 16, got {BT}")
        q = q.contiguous()
        k = k.to(q.dtype).contiguous()
        v = v.to(q.dtype).contiguous()
        w32 = weights.to(torch.float32).contiguous()
        indices = indices.contiguous()
        C = Tk // S
        skey = sorted_tile_chunks(indices, C, BT)
        NT = skey.shape[2]
        o = torch.empty_like(q)
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        meta = dict(H=H, G=G, GP=GP, K=K, S=S, D=D, HAS_SM_N=bool(sm_n), PREC=prec)
        if o.numel():
            _launch(
                _fwd,
                (NT, B * H),
                q,
                k,
                v,
                o,
                indices,
                w32,
                skey,
                scale * _LOG2E,
                float(sm_n),
                T,
                Tk,
                NT,
                C,
                BT=BT,
                KP=triton.next_power_of_2(K),
                LP=triton.next_power_of_2(BT * K),
                **meta,
            )
        ctx.save_for_backward(q, k, v, w32, indices)
        ctx.meta = meta
        ctx.hsa_args = (scale, float(sm_n), S, weights.dtype, k.dtype, v.dtype)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, w32, indices = ctx.saved_tensors
        scale, sm_n, S, w_dtype, k_dtype, v_dtype = ctx.hsa_args
        meta = ctx.meta
        Tk = k.shape[1]
        C = Tk // S
        do = do.to(q.dtype).contiguous()
        dq32 = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk32 = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv32 = torch.zeros_like(dk32)
        dw = torch.zeros(w32.shape, dtype=torch.float32, device=q.device)
        if q.numel() and indices.numel():
            order, start, end, key = chunk_work_items(indices, C, work_item_pairs(meta["G"]))
            _launch(
                _bwd,
                (start.numel(),),
                q,
                k,
                v,
                do,
                dq32,
                dk32,
                dv32,
                dw,
                w32,
                order,
                start,
                end,
                key,
                scale * _LOG2E,
                scale,
                sm_n,
                Tk,
                C,
                **meta,
            )
        need_q, need_k, need_v, need_w = ctx.needs_input_grad[:4]
        return (
            dq32.to(q.dtype) if need_q else None,
            dk32.to(k_dtype) if need_k else None,
            dv32.to(v_dtype) if need_v else None,
            dw.to(w_dtype) if need_w else None,
            None,
            None,
            None,
            None,
            None,
        )


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
    """HSA with fused Triton kernels (docs/design.md §1), differentiable in q, k, v and weights.

    Args:
        q: ``[B, T, HQ, D]`` (bf16, fp16 or fp32; fp32 dots run in full fp32, not tf32);
        k, v: ``[B, Tk, H, D]`` (cast to q's dtype); weights: ``[B, T, H, K]`` float;
        indices: ``[B, T, H, K]`` integer chunk ids, **not range-checked here**.
        D and chunk_size must be powers of 2, at least 16.
        block_tokens: tokens per forward tile (power of 2); default ``default_block_tokens(HQ // H)``.
    Returns:
        ``[B, T, HQ, D]`` in q's dtype, accumulated in fp32.
    """
    D = q.shape[-1]
    for name, n in (("head dim D", D), ("chunk_size", chunk_size)):
        if n < 16 or n & (n - 1):
            raise ValueError(f"hsa_triton: {name} must be a power of 2 >= 16, got {n}")
    return _HSATriton.apply(q, k, v, weights, indices, chunk_size, scale, sm_n, block_tokens)


__all__ = ["hsa_triton", "sorted_tile_chunks", "chunk_work_items", "default_block_tokens", "work_item_pairs"]
