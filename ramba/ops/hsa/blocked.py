"""HSA "torch" backend: plain PyTorch, chunk-major, any device.

The gather formulation (``naive.py``) copies each selected chunk's keys and values once per
(token, slot): ``T · K · S · D`` values, and runs one tiny matmul per token. Here the work is
turned around: every (token, kv head, slot) *pair* is sorted by the chunk it selected, and the
pairs of one chunk are cut into groups of ``P`` pairs. A group is one dense matmul of its
``P · G`` query rows against the chunk's ``S`` keys, one softmax1 per row, one matmul with the
chunk's values; the rows' outputs are scattered back with ``index_add_``. Only queries are
gathered (``T · K · HQ · D``, ``S / G`` times less than the keys), no score is computed that
the reference does not compute except in the last, partly filled group of each chunk, and
duplicate slots stay separate pairs, so they count twice exactly as in the reference.
Groups are processed in blocks under a fixed element budget, so the extra memory is the
``O(T · K)`` plan plus ``O(budget)`` (never ``T × C``), whatever ``T`` and the number of chunks.
The backward recomputes each block's probabilities and scatters dk, dv per chunk the same way.
"""

from __future__ import annotations

import torch

from ramba.ops.precision import compute_dtype

# Elements of per-block work buffers (gathered queries, scores, outputs): ~2M (8 MB in fp32).
# Small enough to stay in cache and in the allocator's reused heap (fresh large buffers cost
# page faults), large enough that Python overhead is small; measured best on a 2-core CPU.
_BLOCK_ELEMS = 1 << 21
# Query rows (pairs × G) per group: enough rows for an efficient [rows, D] @ [D, S] matmul.
_GROUP_ROWS = 256


class _Plan:
    """Pairs grouped by chunk.

    Pair ``p`` is the flat index of ``indices`` ``[B, T, H, K]``; its query rows are row
    ``p // K`` of ``q`` viewed as ``[B·T·H, G, D]``. ``table`` ``[Ng, P]`` lists each group's
    pairs (``N = B·T·H·K`` pads: the dummy pair, whose row ``B·T·H`` is an all-zero row);
    ``chunk`` ``[Ng]`` is each group's flat chunk id ``(b·H + h)·C + c``.
    """

    def __init__(self, indices: torch.Tensor, n_chunks: int, G: int, group_rows: int):
        B, T, H, K = indices.shape
        dev = indices.device
        N = B * T * H * K
        b = torch.arange(B, device=dev)[:, None, None, None]
        h = torch.arange(H, device=dev)[None, None, :, None]
        chunk = ((b * H + h) * n_chunks + indices.long()).reshape(-1)  # [N]
        order = torch.argsort(chunk, stable=True)
        counts = torch.bincount(chunk, minlength=B * H * n_chunks)
        used = max(1, int((counts > 0).sum()))
        # P pairs per group; P <= N / used keeps the padding of the last groups at most ~N
        P = max(1, min(max(1, group_rows // G), N // used))
        per_chunk = (counts + P - 1) // P
        n_groups = int(per_chunk.sum())
        self.chunk = torch.repeat_interleave(torch.arange(B * H * n_chunks, device=dev), per_chunk)
        sorted_chunk = chunk[order]
        rank = torch.arange(N, device=dev) - (torch.cumsum(counts, 0) - counts)[sorted_chunk]
        slot = (torch.cumsum(per_chunk, 0) - per_chunk)[sorted_chunk] * P + rank
        table = torch.full((n_groups * P,), N, dtype=torch.long, device=dev)
        table[slot] = order
        self.table = table.view(n_groups, P)
        self.P, self.K, self.n_groups = P, K, n_groups

    def blocks(self, G: int, S: int, D: int):
        """Yield ``(pairs [ng, P], rows [ng·P], chunk [ng])`` for blocks of groups under the budget."""
        per_group = self.P * G * (3 * D + 3 * S) + 4 * S * D
        step = max(1, _BLOCK_ELEMS // per_group)
        for g0 in range(0, self.n_groups, step):
            pairs = self.table[g0 : g0 + step]
            yield pairs, (pairs // self.K).reshape(-1), self.chunk[g0 : g0 + step]


def _rows(x: torch.Tensor, G: int, acc: torch.dtype, mul: float = 1.0) -> torch.Tensor:
    """``[B, T, HQ, D]`` -> ``[B·T·H + 1, G, D]`` in ``acc``, times ``mul``, last row zero (the dummy pair)."""
    D = x.shape[-1]
    out = torch.zeros(x.numel() // (G * D) + 1, G, D, dtype=acc, device=x.device)
    out[:-1].copy_(x.reshape(-1, G, D))
    return out.mul_(mul) if mul != 1.0 else out


def _chunks(x: torch.Tensor, S: int, acc: torch.dtype) -> torch.Tensor:
    """``[B, Tk, H, D]`` -> ``[B·H·C, S, D]`` in ``acc``, row ``(b·H + h)·C + c``."""
    B, Tk, H, D = x.shape
    return x.to(acc).view(B, Tk // S, S, H, D).permute(0, 3, 1, 2, 4).reshape(-1, S, D)


def _unchunk(x: torch.Tensor, B: int, H: int, like: torch.Tensor) -> torch.Tensor:
    """``[B·H·C, S, D]`` -> ``[B, Tk, H, D]`` in ``like``'s dtype."""
    _, S, D = x.shape
    return x.view(B, H, -1, S, D).permute(0, 2, 3, 1, 4).reshape(like.shape).to(like.dtype)


def _probs(scores: torch.Tensor, sm_n: float) -> torch.Tensor:
    """softmax1 over the last dim (``naive.softmax1``), through the fused softmax kernel."""
    p = torch.softmax(scores, dim=-1)
    if sm_n:
        # softmax1 = softmax * Σe / (Σe + sm_n e^-m) with Σe = Σ exp(s - m), and softmax's largest
        # entry is exactly 1 / Σe; exp(-m) overflowing to inf correctly gives p = 0
        m = scores.amax(dim=-1, keepdim=True)
        p.mul_(torch.reciprocal(1 + sm_n * torch.exp(-m) * p.amax(dim=-1, keepdim=True)))
    return p


class _HSABlocked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, weights, indices, chunk_size, scale, sm_n):
        with torch.autocast(q.device.type, enabled=False):  # accumulates in acc, not autocast's dtype
            return _HSABlocked._forward(ctx, q, k, v, weights, indices, chunk_size, scale, sm_n)

    @staticmethod
    def backward(ctx, do):
        with torch.autocast(do.device.type, enabled=False):
            return _HSABlocked._backward(ctx, do)

    @staticmethod
    def _forward(ctx, q, k, v, weights, indices, chunk_size, scale, sm_n):
        B, T, HQ, D = q.shape
        H, S = k.shape[2], chunk_size
        G = HQ // H
        acc = compute_dtype(q)
        plan = _Plan(indices, k.shape[1] // S, G, _GROUP_ROWS)
        P = plan.P
        qr = _rows(q, G, acc, scale)  # scale folded into q once
        kc, vc = _chunks(k, S, acc), _chunks(v, S, acc)
        wp = torch.cat([weights.reshape(-1).to(acc), weights.new_zeros(1, dtype=acc)])  # [N + 1]
        o = torch.zeros_like(qr)
        for pairs, rows, cid in plan.blocks(G, S, D):
            ng = pairs.shape[0]
            qg = qr.index_select(0, rows).view(ng, P * G, D)
            p = _probs(torch.bmm(qg, kc.index_select(0, cid).transpose(1, 2)), sm_n)  # [ng, P·G, S]
            p.view(ng, P, G, S).mul_(wp.index_select(0, pairs.reshape(-1)).view(ng, P, 1, 1))
            oi = torch.bmm(p, vc.index_select(0, cid))  # weighted per-chunk outputs
            o.index_add_(0, rows, oi.view(-1, G, D))
        ctx.save_for_backward(q, k, v, weights)
        ctx.plan = plan  # an intermediate, neither input nor output
        ctx.hsa_args = (S, scale, sm_n)
        return o[:-1].view(B, T, HQ, D).to(q.dtype)

    @staticmethod
    def _backward(ctx, do):
        q, k, v, weights = ctx.saved_tensors
        S, scale, sm_n = ctx.hsa_args
        plan = ctx.plan
        B, T, HQ, D = q.shape
        H = k.shape[2]
        G, P = HQ // H, plan.P
        acc = compute_dtype(q)
        qr, dor = _rows(q, G, acc, scale), _rows(do, G, acc)
        kc, vc = _chunks(k, S, acc), _chunks(v, S, acc)
        N = weights.numel()
        wp = torch.cat([weights.reshape(-1).to(acc), weights.new_zeros(1, dtype=acc)])
        dq = torch.zeros_like(qr)
        dkc, dvc = torch.zeros_like(kc), torch.zeros_like(vc)
        dw = torch.zeros(N + 1, dtype=acc, device=q.device)
        for pairs, rows, cid in plan.blocks(G, S, D):
            ng = pairs.shape[0]
            flat = pairs.reshape(-1)
            qg, dog = qr.index_select(0, rows).view(ng, P * G, D), dor.index_select(0, rows).view(ng, P * G, D)
            kg, vg = kc.index_select(0, cid), vc.index_select(0, cid)
            p = _probs(torch.bmm(qg, kg.transpose(1, 2)), sm_n)  # [ng, P·G, S]
            dp = torch.bmm(dog, vg.transpose(1, 2))  # dO . v_s, before the weight
            rs = (p * dp).sum(-1, keepdim=True)  # dO . o_i per row
            dw.index_add_(0, flat, rs.view(ng, P, G).sum(-1).view(-1))
            pw = p.view(ng, P, G, S).mul_(wp.index_select(0, flat).view(ng, P, 1, 1)).view(ng, P * G, S)
            # softmax1 has softmax's Jacobian: dS = P * (dP - rowsum(P * dP)), times the weight
            ds = dp.sub_(rs).mul_(pw)
            dq.index_add_(0, rows, torch.bmm(ds, kg).view(-1, G, D))
            dkc.index_add_(0, cid, torch.bmm(ds.transpose(1, 2), qg))  # qg carries the scale
            dvc.index_add_(0, cid, torch.bmm(pw.transpose(1, 2), dog))
        dq = (dq[:-1] * scale).view(B, T, HQ, D).to(q.dtype)
        dw = dw[:-1].view(weights.shape).to(weights.dtype)
        return dq, _unchunk(dkc, B, H, k), _unchunk(dvc, B, H, v), dw, None, None, None, None


def hsa_blocked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    chunk_size: int,
    scale: float,
    sm_n: float = 0.0,
) -> torch.Tensor:
    """HSA grouped by chunk (docs/design.md §1), differentiable in q, k, v and weights.

    Args:
        q: ``[B, T, HQ, D]``; k, v: ``[B, Tk, H, D]``; weights: ``[B, T, H, K]`` float;
        indices: ``[B, T, H, K]`` chunk ids in ``[0, Tk // chunk_size)`` (checked by ``hsa``).
    Returns:
        ``[B, T, HQ, D]`` in q's dtype; accumulation in float32 (float64 stays float64).
    """
    return _HSABlocked.apply(q, k, v, weights, indices, chunk_size, scale, sm_n)
