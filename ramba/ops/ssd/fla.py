"""SSD on CUDA through flash-linear-attention's chunked GLA kernels (``fla-core``).

Simple GLA is the same recurrence with a per-head scalar decay:
``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t`` with ``S`` as ``[K, V]``.
Mamba-2's SSD is it with ``q = C``, ``k = B``, ``v = dt * x``, ``g = dt * A`` (per-token
log-decay; fla takes the chunk-local cumsum itself) and ``scale = 1``; fla's state
``[B, H, N, P]`` is the transpose of ours ``[B, H, P, N]``.

fla-core 0.6.0 refuses the backward of ``chunk_simple_gla`` on Hopper GPUs with Triton in
[3.4, 3.7.1) (its issue #640: wrong gradients). There, when gradients are needed, the same
function runs through ``chunk_gla`` with the scalar decay broadcast over the key dim.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def simple_gla_backward_ok() -> bool:
    """False where fla's own guard rejects the gated simple-GLA backward (Hopper, Triton 3.4 - 3.7.0)."""
    from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1

    return not (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1)


def ssd_fla(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    kernel: str | None = None,
):
    """SSD scan with fla's Triton kernels (forward and backward). CUDA tensors only.

    Args:
        x: ``[B, T, H, P]``; dt: ``[B, T, H]``; A: ``[H]``; B, C: ``[B, T, G, N]``;
        initial_state: ``[B, H, P, N]`` or None.
        kernel: ``"simple_gla"`` or ``"gla"``; None picks simple_gla unless gradients are needed
            where its backward is unusable (see the module docstring).
    Returns:
        y ``[B, T, H, P]`` in x's dtype (q, k, v run in x's dtype, the decay in float32), and
        the final state ``[B, H, P, N]`` in float32 when ``return_final_state``.
    """
    H, G = x.shape[2], B.shape[2]
    q = C.to(x.dtype).repeat_interleave(H // G, dim=2)  # [B, T, H, N]
    k = B.to(x.dtype).repeat_interleave(H // G, dim=2)
    v = (x.float() * dt.float()[..., None]).to(x.dtype)  # [B, T, H, P]
    g = dt.float() * A.float()  # [B, T, H]
    h0 = None if initial_state is None else initial_state.float().transpose(-1, -2).contiguous()
    if kernel is None:
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, dt, A, B, C, initial_state)
        )
        kernel = "gla" if needs_grad and not simple_gla_backward_ok() else "simple_gla"
    if kernel == "simple_gla":
        from fla.ops.simple_gla import chunk_simple_gla

        y, ht = chunk_simple_gla(q, k, v, g=g, scale=1.0, initial_state=h0, output_final_state=return_final_state)
    elif kernel == "gla":
        from fla.ops.gla import chunk_gla

        gk = g[..., None].expand(*g.shape, q.shape[-1])  # [B, T, H, N]: one decay for every key channel
        y, ht = chunk_gla(q, k, v, gk, scale=1.0, initial_state=h0, output_final_state=return_final_state)
    else:
        raise ValueError(f"ssd_fla: kernel must be 'simple_gla', 'gla' or None, got {kernel!r}")
    if return_final_state:
        return y, ht.transpose(-1, -2)
    return y
