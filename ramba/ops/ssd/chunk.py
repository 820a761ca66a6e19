"""Chunked SSD in plain PyTorch (Mamba-2's state-space duality, after ``ssd_minimal``).

The core, :func:`scan_chunk`, is the scalar-decay linear-attention scan that SSD is an instance of.

Within a chunk of ``S`` tokens the scan is a masked quadratic form (like causal attention with a
decay mask); across chunks only the ``[H, P, N]`` state is passed on, one step per chunk.
Exact (same function as the recurrence), differentiable by plain autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ramba.ops.precision import compute_dtype


def segment_sum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = a[..., j+1] + ... + a[..., i]`` for ``i >= j``, ``-inf`` above the diagonal.

    Summing the masked terms (not differencing a cumsum) keeps it exact for long chunks.
    Args: a ``[..., S]``. Returns ``[..., S, S]``.
    """
    S = a.shape[-1]
    ones = torch.ones(S, S, dtype=torch.bool, device=a.device)
    terms = a[..., :, None].expand(*a.shape, S).masked_fill(~ones.tril(-1), 0.0)  # [..., k, j] = a_k if k > j
    return terms.cumsum(dim=-2).masked_fill(~ones.tril(), float("-inf"))


def scan_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Scalar-decay linear-attention scan (simple GLA), chunked: ``S_t = exp(g_t) S_{t-1} + v_t k_t^T``,
    ``o_t = S_t q_t``. Any ``T`` (padded internally to a multiple of ``chunk_size``).

    Args:
        q, k: ``[B, T, G, K]`` (head ``h`` reads group ``h // (H // G)``); v: ``[B, T, H, V]``;
        g: ``[B, T, H]`` log-decays (<= 0); initial_state: ``[B, H, V, K]`` or None (zeros).
    Returns:
        o ``[B, T, H, V]`` in v's dtype, and the final state ``[B, H, V, K]`` (float32, or
        float64 for float64 inputs) when ``return_final_state``.
    """
    Bsz, T, H, V = v.shape
    G, K = k.shape[2], k.shape[3]
    R = H // G
    S = chunk_size
    acc = compute_dtype(v)
    # Padded tokens get g = 0 and v = 0: decay 1 and no input, so they leave the state unchanged.
    pad = (-T) % S
    nc = (T + pad) // S
    vc = F.pad(v.to(acc), (0, 0, 0, 0, 0, pad)).view(Bsz, nc, S, G, R, V)
    a = F.pad(g.to(acc), (0, 0, 0, pad)).view(Bsz, nc, S, G, R).permute(0, 1, 3, 4, 2)  # [B, c, G, R, S]
    kc = F.pad(k.to(acc), (0, 0, 0, 0, 0, pad)).view(Bsz, nc, S, G, K)
    qc = F.pad(q.to(acc), (0, 0, 0, 0, 0, pad)).view(Bsz, nc, S, G, K)
    a_cum = a.cumsum(dim=-1)  # [B, c, G, R, S]

    # 1. Inside each chunk: o_l = sum_{s<=l} (q_l . k_s) exp(g_{s+1} + ... + g_l) v_s
    decay_ls = torch.exp(segment_sum(a))  # [B, c, G, R, l, s]
    scores = torch.einsum("bclgn,bcsgn->bcgls", qc, kc)
    o = torch.einsum("bcgrls,bcsgrp->bclgrp", scores[:, :, :, None] * decay_ls, vc)

    # 2. Each chunk's own contribution to the state at its end.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [B, c, G, R, S]
    chunk_states = torch.einsum("bcsgn,bcgrs,bcsgrp->bcgrpn", kc, decay_to_end, vc)

    # 3. Pass the state across chunks (sequential over chunks: linear in T).
    chunk_decay = torch.exp(a_cum[..., -1])  # [B, c, G, R]
    h = (
        v.new_zeros(Bsz, G, R, V, K, dtype=acc)
        if initial_state is None
        else initial_state.to(acc).reshape(Bsz, G, R, V, K)
    )
    starts = []
    for c in range(nc):
        starts.append(h)
        h = h * chunk_decay[:, c, :, :, None, None] + chunk_states[:, c]
    start_states = torch.stack(starts, dim=1)  # [B, c, G, R, V, K] state entering each chunk

    # 4. The entering state's contribution: o_l += exp(g_1 + ... + g_l) S_start q_l
    o = o + torch.einsum("bclgn,bcgrpn,bcgrl->bclgrp", qc, start_states, torch.exp(a_cum))
    o = o.reshape(Bsz, nc * S, H, V)[:, :T].to(v.dtype)
    if return_final_state:
        return o, h.reshape(Bsz, H, V, K)
    return o


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
    """SSD scan, chunked: :func:`scan_chunk` with ``q = C``, ``k = B``, ``v = dt x``, ``g = dt A``.

    Args:
        x: ``[B, T, H, P]``; dt: ``[B, T, H]``; A: ``[H]``; B, C: ``[B, T, G, N]`` (head ``h``
        reads group ``h // (H // G)``); initial_state: ``[B, H, P, N]`` or None (zeros).
    Returns:
        y ``[B, T, H, P]`` in x's dtype, and the final state ``[B, H, P, N]`` (float32, or
        float64 for float64 inputs) when ``return_final_state``.
    """
    acc = compute_dtype(x)
    v = x.to(acc) * dt.to(acc)[..., None]
    g = dt.to(acc) * A.to(acc)
    out = scan_chunk(C, B, v, g, chunk_size, initial_state, return_final_state)
    if return_final_state:
        return out[0].to(x.dtype), out[1]
    return out.to(x.dtype)
