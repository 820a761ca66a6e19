"""HSA "torch" backend: plain PyTorch, blocked over tokens, any device.

Forward and backward walk the tokens in blocks, gathering only that block's chunks, so the
peak extra memory is O(block · K · S · D) instead of the reference's O(T · K · S · D).
"""
from __future__ import annotations

import torch

from ramba.ops.hsa.naive import softmax1

# Gathered k (and v) elements per block: ~16M floats (64 MB in fp32) keeps the einsums large
# enough to be efficient while the peak memory stays bounded for any T.
_BLOCK_ELEMS = 1 << 24


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_tokens(B: int, H: int, G: int, K: int, S: int, D: int) -> int:
    return max(1, _BLOCK_ELEMS // max(1, B * H * K * (S + G) * D))


def _chunks(x: torch.Tensor, S: int, acc: torch.dtype) -> torch.Tensor:
    """``[B, Tk, H, D]`` -> ``[B, H, C, S, D]`` in the accumulation dtype."""
    B, Tk, H, D = x.shape
    return x.to(acc).view(B, Tk // S, S, H, D).permute(0, 3, 1, 2, 4)


def _block_probs(qb, kc, idx_b, scale, sm_n):
    """Recompute one block's gathered keys and probabilities.

    qb: ``[B, H, tb, G, D]``; kc: ``[B, H, C, S, D]``; idx_b: ``[B, H, tb, K]``.
    Returns kg ``[B, H, tb, K, S, D]`` and probs ``[B, H, tb, G, K, S]``.
    """
    B, H = kc.shape[:2]
    b = torch.arange(B, device=kc.device)[:, None, None, None]
    h = torch.arange(H, device=kc.device)[None, :, None, None]
    kg = kc[b, h, idx_b]
    probs = softmax1(torch.einsum("bhtgd,bhtksd->bhtgks", qb, kg) * scale, sm_n)
    return kg, probs


class _HSABlocked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, weights, indices, chunk_size, scale, sm_n):
        B, T, HQ, D = q.shape
        H = k.shape[2]
        G, S, K = HQ // H, chunk_size, indices.shape[-1]
        acc = _acc_dtype(q.dtype)
        kc, vc = _chunks(k, S, acc), _chunks(v, S, acc)
        idx = indices.long().permute(0, 2, 1, 3)  # [B, H, T, K]
        w = weights.to(acc).permute(0, 2, 1, 3)
        qh = q.reshape(B, T, H, G, D).permute(0, 2, 1, 3, 4)  # [B, H, T, G, D]
        b = torch.arange(B, device=q.device)[:, None, None, None]
        h = torch.arange(H, device=q.device)[None, :, None, None]
        o = torch.empty(B, H, T, G, D, dtype=q.dtype, device=q.device)
        tb = _block_tokens(B, H, G, K, S, D)
        for t0 in range(0, T, tb):
            sl = slice(t0, t0 + tb)
            kg, probs = _block_probs(qh[:, :, sl].to(acc), kc, idx[:, :, sl], scale, sm_n)
            per_chunk = torch.einsum("bhtgks,bhtksd->bhtgkd", probs, vc[b, h, idx[:, :, sl]])
            o[:, :, sl] = torch.einsum("bhtk,bhtgkd->bhtgd", w[:, :, sl], per_chunk).to(q.dtype)
        ctx.save_for_backward(q, k, v, weights, indices)
        ctx.hsa_args = (chunk_size, scale, sm_n)
        return o.permute(0, 2, 1, 3, 4).reshape(B, T, HQ, D)

    @staticmethod
    def backward(ctx, do):
        q, k, v, weights, indices = ctx.saved_tensors
        S, scale, sm_n = ctx.hsa_args
        B, T, HQ, D = q.shape
        Tk, H = k.shape[1], k.shape[2]
        G, K, C = HQ // H, indices.shape[-1], Tk // S
        acc = _acc_dtype(q.dtype)
        kc, vc = _chunks(k, S, acc), _chunks(v, S, acc)
        idx = indices.long().permute(0, 2, 1, 3)
        w = weights.to(acc).permute(0, 2, 1, 3)
        qh = q.reshape(B, T, H, G, D).permute(0, 2, 1, 3, 4)
        doh = do.reshape(B, T, H, G, D).permute(0, 2, 1, 3, 4)
        b = torch.arange(B, device=q.device)[:, None, None, None]
        h = torch.arange(H, device=q.device)[None, :, None, None]
        # flat row of chunk (b, h, c) in the [B*H*C, S, D] gradient buffers
        flat = (b * H + h) * C + idx  # [B, H, T, K]
        dq = torch.empty(B, H, T, G, D, dtype=acc, device=q.device)
        dkc = torch.zeros(B * H * C, S, D, dtype=acc, device=q.device)
        dvc = torch.zeros_like(dkc)
        dw = torch.empty(B, H, T, K, dtype=acc, device=q.device)
        tb = _block_tokens(B, H, G, K, S, D)
        for t0 in range(0, T, tb):
            sl = slice(t0, t0 + tb)
            qb, dob, wb = qh[:, :, sl].to(acc), doh[:, :, sl].to(acc), w[:, :, sl]
            kg, probs = _block_probs(qb, kc, idx[:, :, sl], scale, sm_n)
            vg = vc[b, h, idx[:, :, sl]]
            dp = torch.einsum("bhtgd,bhtksd->bhtgks", dob, vg)  # dO . v_s, before the weight
            rs = (probs * dp).sum(-1)  # [B, H, tb, G, K] = dO . o_i
            dw[:, :, sl] = rs.sum(3)
            # softmax1 has softmax's Jacobian: dS = P * (dP - rowsum(P * dP)), times the weight
            ds = probs * (dp - rs[..., None]) * wb[:, :, :, None, :, None]
            dq[:, :, sl] = torch.einsum("bhtgks,bhtksd->bhtgd", ds, kg) * scale
            wp = probs * wb[:, :, :, None, :, None]
            dvg = torch.einsum("bhtgks,bhtgd->bhtksd", wp, dob)
            dkg = torch.einsum("bhtgks,bhtgd->bhtksd", ds, qb) * scale
            rows = flat[:, :, sl].reshape(-1)
            dvc.index_add_(0, rows, dvg.reshape(-1, S, D))
            dkc.index_add_(0, rows, dkg.reshape(-1, S, D))

        def unchunk(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            return x.view(B, H, C, S, D).permute(0, 2, 3, 1, 4).reshape(B, Tk, H, D).to(like.dtype)

        dq = dq.permute(0, 2, 1, 3, 4).reshape(B, T, HQ, D).to(q.dtype)
        dw = dw.permute(0, 2, 1, 3).to(weights.dtype)
        return dq, unchunk(dkc, k), unchunk(dvc, v), dw, None, None, None, None


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
    """HSA blocked over tokens (DESIGN §1), differentiable in q, k, v and weights.

    Args:
        q: ``[B, T, HQ, D]``; k, v: ``[B, Tk, H, D]``; weights: ``[B, T, H, K]`` float;
        indices: ``[B, T, H, K]`` chunk ids in ``[0, Tk // chunk_size)`` (checked by ``hsa``).
    Returns:
        ``[B, T, HQ, D]`` in q's dtype; accumulation in float32 (float64 stays float64).
    """
    return _HSABlocked.apply(q, k, v, weights, indices, chunk_size, scale, sm_n)
