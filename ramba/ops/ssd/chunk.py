"""Chunked SSD in plain PyTorch (Mamba-2's state-space duality, after ``ssd_minimal``).

Within a chunk of ``S`` tokens the scan is a masked quadratic form (like causal attention with a
decay mask); across chunks only the ``[H, P, N]`` state is passed on, one step per chunk.
Exact (same function as the recurrence), differentiable by plain autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ramba.ops.ssd.naive import compute_dtype


def segment_sum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = a[..., j+1] + ... + a[..., i]`` for ``i >= j``, ``-inf`` above the diagonal.

    Summing the masked terms (not differencing a cumsum) keeps it exact for long chunks.
    Args: a ``[..., S]``. Returns ``[..., S, S]``.
    """
    S = a.shape[-1]
    ones = torch.ones(S, S, dtype=torch.bool, device=a.device)
    terms = a[..., :, None].expand(*a.shape, S).masked_fill(~ones.tril(-1), 0.0)  # [..., k, j] = a_k if k > j
    return terms.cumsum(dim=-2).masked_fill(~ones.tril(), float("-inf"))


def ssd_chunk(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """SSD scan, chunked. Any ``T`` (padded internally to a multiple of ``chunk_size``).

    Args:
        x: ``[B, T, H, P]``; dt: ``[B, T, H]``; A: ``[H]``; B, C: ``[B, T, G, N]`` (head ``h``
        reads group ``h // (H // G)``); initial_state: ``[B, H, P, N]`` or None (zeros).
    Returns:
        y ``[B, T, H, P]`` in x's dtype, and the final state ``[B, H, P, N]`` (float32, or
        float64 for float64 inputs) when ``return_final_state``.
    """
    Bsz, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G
    S = chunk_size
    acc = compute_dtype(x)
    # Padded tokens get dt = 0: decay exp(0) = 1 and input 0, so they leave the state unchanged.
    pad = (-T) % S
    nc = (T + pad) // S
    xdt = x.to(acc) * dt.to(acc)[..., None]
    a = dt.to(acc) * A.to(acc)  # [B, T, H] per-token log-decay
    xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad)).view(Bsz, nc, S, G, R, P)
    a = F.pad(a, (0, 0, 0, pad)).view(Bsz, nc, S, G, R).permute(0, 1, 3, 4, 2)  # [B, c, G, R, S]
    Bc = F.pad(B.to(acc), (0, 0, 0, 0, 0, pad)).view(Bsz, nc, S, G, N)
    Cc = F.pad(C.to(acc), (0, 0, 0, 0, 0, pad)).view(Bsz, nc, S, G, N)
    a_cum = a.cumsum(dim=-1)  # [B, c, G, R, S]

    # 1. Inside each chunk: y_l = sum_{s<=l} (C_l . B_s) exp(a_{s+1} + ... + a_l) xdt_s
    decay_ls = torch.exp(segment_sum(a))  # [B, c, G, R, l, s]
    scores = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc)
    y = torch.einsum("bcgrls,bcsgrp->bclgrp", scores[:, :, :, None] * decay_ls, xdt)

    # 2. Each chunk's own contribution to the state at its end.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [B, c, G, R, S]
    chunk_states = torch.einsum("bcsgn,bcgrs,bcsgrp->bcgrpn", Bc, decay_to_end, xdt)

    # 3. Pass the state across chunks (sequential over chunks: linear in T).
    chunk_decay = torch.exp(a_cum[..., -1])  # [B, c, G, R]
    h = x.new_zeros(Bsz, G, R, P, N, dtype=acc) if initial_state is None else initial_state.to(acc).reshape(Bsz, G, R, P, N)
    starts = []
    for c in range(nc):
        starts.append(h)
        h = h * chunk_decay[:, c, :, :, None, None] + chunk_states[:, c]
    start_states = torch.stack(starts, dim=1)  # [B, c, G, R, P, N] state entering each chunk

    # 4. The entering state's contribution: y_l += exp(a_1 + ... + a_l) C_l . h_start
    y = y + torch.einsum("bclgn,bcgrpn,bcgrl->bclgrp", Cc, start_states, torch.exp(a_cum))
    y = y.reshape(Bsz, nc * S, H, P)[:, :T].to(x.dtype)
    if return_final_state:
        return y, h.reshape(Bsz, H, P, N)
    return y
