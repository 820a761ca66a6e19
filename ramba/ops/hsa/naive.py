"""Reference HSA: gather + einsum. The spec of docs/design.md §1 in code; memory O(T·K·S·D)."""

from __future__ import annotations

import torch

from ramba.ops.precision import compute_dtype


def softmax1(scores: torch.Tensor, sm_n: float) -> torch.Tensor:
    """Softmax over the last dim whose denominator gets an extra ``sm_n`` (``exp(0)`` terms).

    ``sm_n = 0`` is the plain softmax; ``sm_n = 1`` lets a row attend to nothing.
    """
    m = scores.amax(dim=-1, keepdim=True)
    if sm_n:
        m = m.clamp_min(0.0)  # the extra term is exp(0 - m); keep it from overflowing
    e = torch.exp(scores - m)
    return e / (e.sum(dim=-1, keepdim=True) + sm_n * torch.exp(-m))


def hsa_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    chunk_size: int,
    scale: float,
    sm_n: float = 0.0,
) -> torch.Tensor:
    """Hierarchical sparse attention, computed directly.

    Args:
        q: ``[B, T, HQ, D]``; k, v: ``[B, Tk, H, D]``; weights: ``[B, T, H, K]`` float;
        indices: ``[B, T, H, K]`` chunk ids into ``k``/``v``.
    Returns:
        ``[B, T, HQ, D]`` in q's dtype; accumulation in float32 (float64 stays float64).
    """
    B, T, HQ, D = q.shape
    H = k.shape[2]
    G = HQ // H
    S = chunk_size
    C = k.shape[1] // S
    acc = compute_dtype(q)
    kc = k.to(acc).view(B, C, S, H, D).permute(0, 3, 1, 2, 4)  # [B, H, C, S, D]
    vc = v.to(acc).view(B, C, S, H, D).permute(0, 3, 1, 2, 4)
    idx = indices.long().permute(0, 2, 1, 3)  # [B, H, T, K]
    b = torch.arange(B, device=q.device)[:, None, None, None]
    h = torch.arange(H, device=q.device)[None, :, None, None]
    kg = kc[b, h, idx]  # [B, H, T, K, S, D]
    vg = vc[b, h, idx]
    qg = q.to(acc).view(B, T, H, G, D).permute(0, 2, 1, 3, 4)  # [B, H, T, G, D]
    scores = torch.einsum("bhtgd,bhtksd->bhtgks", qg, kg) * scale
    probs = softmax1(scores, sm_n)
    per_chunk = torch.einsum("bhtgks,bhtksd->bhtgkd", probs, vg)  # o_i
    w = weights.to(acc).permute(0, 2, 1, 3)  # [B, H, T, K]
    o = torch.einsum("bhtk,bhtgkd->bhtgd", w, per_chunk)
    return o.permute(0, 2, 1, 3, 4).reshape(B, T, HQ, D).to(q.dtype)
