"""Causal (optionally sliding-window) softmax attention through SDPA, with memory O(T·window)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sdpa(q, k, v, mask, scale):
    """q ``[N, HQ, L, D]``, k/v ``[N, H, Lk, D]``, boolean mask broadcastable to ``[N, HQ, L, Lk]``."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None, scale: float | None = None
) -> torch.Tensor:
    """Causal attention where the T queries are the last T of the Tk keys.

    Query ``i`` sits at position ``Tk - T + i`` and sees keys ``j`` with ``0 <= pos_i - j < window``
    (``window=None``: every earlier key). Long inputs are processed in query blocks of ``window``
    so memory stays O(T·window).

    Args:
        q: ``[B, T, HQ, D]``; k, v: ``[B, Tk, H, D]`` with ``Tk >= T`` and ``HQ % H == 0``.
    Returns:
        ``[B, T, HQ, D]``.
    """
    B, T, HQ, D = q.shape
    Tk = k.shape[1]
    if Tk < T:
        raise ValueError(f"causal_attention: k must hold at least the T={T} query positions, got Tk={Tk}")
    if window is not None and window < 1:
        raise ValueError(f"causal_attention: window must be >= 1 or None, got {window}")
    offset = Tk - T
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if window is None and offset == 0:
        return F.scaled_dot_product_attention(
            qt, kt, vt, is_causal=True, scale=scale, enable_gqa=HQ != k.shape[2]
        ).transpose(1, 2)
    if window is None or Tk <= 2 * window:
        diff = (offset + torch.arange(T, device=q.device))[:, None] - torch.arange(Tk, device=q.device)
        mask = diff >= 0
        if window is not None:
            mask &= diff < window
        return _sdpa(qt, kt, vt, mask, scale).transpose(1, 2)
    W = window
    nb = -(-T // W)
    pad_q = nb * W - T
    # Block b holds queries at positions ps..ps+W-1 (ps = offset + b*W); they see keys ps-W+1..ps+W-1,
    # i.e. the slice [ps, ps + 2W) of k padded with W slots in front.
    qb = F.pad(q, (0, 0, 0, 0, 0, pad_q)).view(B, nb, W, HQ, D)
    kp = F.pad(k, (0, 0, 0, 0, W, pad_q))[:, offset:]
    vp = F.pad(v, (0, 0, 0, 0, W, pad_q))[:, offset:]
    kb = kp.unfold(1, 2 * W, W).permute(0, 1, 4, 2, 3)  # [B, nb, 2W, H, D]
    vb = vp.unfold(1, 2 * W, W).permute(0, 1, 4, 2, 3)
    r = torch.arange(W, device=q.device)[:, None]
    j = torch.arange(2 * W, device=q.device)[None, :]
    diff = r + W - j
    key_pos = (offset + torch.arange(nb, device=q.device) * W)[:, None, None] - W + j  # [nb, 1, 2W]
    mask = (diff >= 0) & (diff < W) & (key_pos >= 0)  # [nb, W, 2W]
    mask = mask[None, :, None].expand(B, nb, 1, W, 2 * W).reshape(B * nb, 1, W, 2 * W)
    o = _sdpa(
        qb.reshape(B * nb, W, HQ, D).transpose(1, 2),
        kb.reshape(B * nb, 2 * W, -1, D).transpose(1, 2),
        vb.reshape(B * nb, 2 * W, -1, D).transpose(1, 2),
        mask,
        scale,
    )
    return o.transpose(1, 2).reshape(B, nb * W, HQ, D)[:, :T]
