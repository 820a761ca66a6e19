"""Reference SSD: the Mamba-2 recurrence one token at a time. The test oracle (float64-able)."""

from __future__ import annotations

import torch

from ramba.ops.precision import compute_dtype


def ssd_step_naive(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence ``h = exp(dt A) h + dt x B^T ; y = h C``.

    Args:
        x: ``[B, H, P]``; dt: ``[B, H]``; A: ``[H]``; B, C: ``[B, G, N]`` (head ``h`` reads group
        ``h // (H // G)``); state: ``[B, H, P, N]``.
    Returns:
        y ``[B, H, P]`` in x's dtype, new state ``[B, H, P, N]`` in the compute dtype
        (float32, or float64 for float64 inputs).
    """
    acc = compute_dtype(x)
    H, G = x.shape[1], B.shape[1]
    Bh = B.to(acc).repeat_interleave(H // G, dim=1)  # [B, H, N]
    Ch = C.to(acc).repeat_interleave(H // G, dim=1)
    dt = dt.to(acc)
    decay = torch.exp(dt * A.to(acc))  # [B, H]
    xdt = x.to(acc) * dt[..., None]  # [B, H, P]
    h = state.to(acc) * decay[..., None, None] + xdt[..., :, None] * Bh[..., None, :]
    y = torch.einsum("bhpn,bhn->bhp", h, Ch)
    return y.to(x.dtype), h


def ssd_naive(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """SSD scan by the per-token recurrence (O(T) sequential steps).

    Args:
        x: ``[B, T, H, P]``; dt: ``[B, T, H]``; A: ``[H]``; B, C: ``[B, T, G, N]``;
        initial_state: ``[B, H, P, N]`` or None (zeros).
    Returns:
        y ``[B, T, H, P]`` in x's dtype, and the final state ``[B, H, P, N]`` (compute dtype)
        when ``return_final_state``.
    """
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    acc = compute_dtype(x)
    h = x.new_zeros(Bsz, H, P, N, dtype=acc) if initial_state is None else initial_state.to(acc)
    ys = []
    for t in range(T):
        y_t, h = ssd_step_naive(x[:, t], dt[:, t], A, B[:, t], C[:, t], h)
        ys.append(y_t)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(Bsz, 0, H, P)
    return (y, h) if return_final_state else y
