"""Native Sparse Attention's compressed and selected branches (Yuan et al., 2025), the baseline beside HSA.

As in ``fla-core`` 0.6.0's ``parallel_nsa`` (the CUDA fast path, where it is installed), with ``S`` the block size:

- compressed: block ``c``'s key and value are the means of its tokens (the last block's of those it has); the
  query at ``t`` attends (one softmax) over the blocks with ``(c + 1) * S - 1 <= t``; zero where none is visible;
- selection: per kv head, the compressed-attention probabilities averaged over the group's query heads rank the
  blocks; blocks ``0``, ``t // S - 1`` and ``t // S`` always count as selected; the top ``topk`` visible or forced
  blocks are kept, and the query attends (one softmax) over their tokens at positions ``<= t``;
- output: ``g_slc * selected + g_cmp * compressed``.

Unlike HSA, the selection is not differentiable: it comes from the compressed scores, not from a retrieval loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ramba.ops.backends import check_backend
from ramba.ops.precision import compute_dtype

BACKENDS = ("torch", "fla")


def _fla_supports(q: torch.Tensor, k: torch.Tensor) -> bool:
    """fla's kernels need CUDA and a query group HQ / H that is a power of 2 of at least 16."""
    group = q.shape[2] // k.shape[2]
    if not q.is_cuda or group < 16 or group & (group - 1):
        return False
    try:
        import fla.ops.nsa  # noqa: F401
    except ImportError:
        return False
    return True


def mean_pool(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x [B, T, H, D]`` -> ``[B, ceil(T / S), H, D]``, each block's mean over the tokens it has (float32 or float64)."""
    B, T, H, D = x.shape
    n = -(-T // block_size)
    acc = compute_dtype(x)
    sums = F.pad(x.to(acc), (0, 0, 0, 0, 0, n * block_size - T)).view(B, n, block_size, H, D).sum(dim=2)
    counts = (T - torch.arange(n, device=x.device) * block_size).clamp(max=block_size)
    return sums / counts.to(acc)[None, :, None, None]


def nsa_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_cmp: torch.Tensor,
    g_slc: torch.Tensor,
    topk: int,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """The plain-PyTorch NSA (module docstring); memory O(T · topk · block_size · HQ). Arguments as :func:`nsa`."""
    B, T, HQ, D = q.shape
    H = k.shape[2]
    G, S = HQ // H, block_size
    acc = compute_dtype(q)
    qg = q.to(acc).view(B, T, H, G, D) * scale
    n = -(-T // S)
    t = torch.arange(T, device=q.device)
    c = torch.arange(n, device=q.device)
    visible = (c + 1) * S - 1 <= t[:, None]  # [T, n]
    scores = torch.einsum("bthgd,bchd->bthgc", qg, mean_pool(k, S).to(acc))
    probs = torch.softmax(scores.masked_fill(~visible[:, None, None, :], -math.inf), dim=-1).nan_to_num(0.0)
    o_cmp = torch.einsum("bthgc,bchd->bthgd", probs, mean_pool(v, S).to(acc))

    block = t[:, None] // S
    forced = (c == block) | (c == block - 1) | (c == 0)  # [T, n]
    rank = torch.where(forced[:, None, :], 1.0, probs.mean(dim=3))  # [B, T, H, n]
    top = rank.topk(min(topk, n), dim=-1).indices  # [B, T, H, K]
    keep = (visible | forced).expand(B, T, n)[:, :, None, :].expand(B, T, H, n).gather(-1, top)
    tokens = (top[..., None] * S + torch.arange(S, device=q.device)).flatten(-2)  # [B, T, H, K * S]
    valid = keep.repeat_interleave(S, dim=-1) & (tokens <= t[:, None, None])
    idx = tokens.clamp(max=T - 1).permute(0, 2, 1, 3).reshape(B, H, -1)  # [B, H, T * K * S]
    k_sel = k.to(acc).transpose(1, 2).gather(2, idx[..., None].expand(-1, -1, -1, D)).view(B, H, T, -1, D)
    v_sel = v.to(acc).transpose(1, 2).gather(2, idx[..., None].expand(-1, -1, -1, D)).view(B, H, T, -1, D)
    s = torch.einsum("bthgd,bhtld->bthgl", qg, k_sel).masked_fill(~valid[:, :, :, None, :], -math.inf)
    o_slc = torch.einsum("bthgl,bhtld->bthgd", torch.softmax(s, dim=-1), v_sel)
    out = g_slc.to(acc)[..., None] * o_slc.reshape(B, T, HQ, D) + g_cmp.to(acc)[..., None] * o_cmp.reshape(B, T, HQ, D)
    return out.to(q.dtype)


def nsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_cmp: torch.Tensor,
    g_slc: torch.Tensor,
    topk: int,
    block_size: int,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """NSA's compressed and selected branches, gated.

    Args:
        q: ``[B, T, HQ, D]``; k, v: ``[B, T, H, D]`` (the same positions; ``HQ % H == 0``).
        g_cmp, g_slc: ``[B, T, HQ]`` gates of the compressed and the selected branch.
        topk: blocks selected per token; block_size: tokens per block ``S``.
        scale: score scale, ``D ** -0.5`` by default.
        backend: ``"torch"`` or ``"fla"`` (fla-core's Triton kernels; CUDA, HQ / H a power of 2 >= 16);
            None picks ``"fla"`` where it can run, else ``"torch"``.
    Returns:
        ``[B, T, HQ, D]`` in q's dtype; differentiable in q, k, v and the gates (not through the selection).
    """
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"nsa: q must be [B, T, HQ, D] and k, v [B, T, H, D], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"nsa: q's head count {q.shape[2]} must be a multiple of k's {k.shape[2]}")
    if g_cmp.shape != q.shape[:3] or g_slc.shape != q.shape[:3]:
        raise ValueError(
            f"nsa: g_cmp and g_slc must be [B, T, HQ] = {tuple(q.shape[:3])}, "
            f"got {tuple(g_cmp.shape)} and {tuple(g_slc.shape)}"
        )
    for name, value in (("topk", topk), ("block_size", block_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"nsa: {name} must be a positive int, got {value!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    check_backend("nsa", backend, BACKENDS)
    fla_ok = backend != "torch" and _fla_supports(q, k)
    if backend == "torch" or (backend is None and not fla_ok):
        return nsa_torch(q, k, v, g_cmp, g_slc, topk, block_size, scale)
    if not fla_ok:
        raise ValueError(
            "nsa: backend 'fla' needs fla-core installed, CUDA tensors and HQ / H a power of 2 >= 16, "
            f"got device {q.device}, HQ={q.shape[2]}, H={k.shape[2]}"
        )
    from fla.ops.nsa import parallel_nsa

    return parallel_nsa(
        q,
        k.to(q.dtype),
        v.to(q.dtype),
        g_cmp=g_cmp.to(q.dtype),
        g_slc=g_slc.to(q.dtype),
        block_counts=topk,
        block_size=block_size,
        scale=scale,
    )


__all__ = ["nsa", "nsa_torch", "mean_pool", "BACKENDS"]
