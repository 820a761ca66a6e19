"""SSD on CUDA through flash-linear-attention's chunked GLA kernels (``fla-core``).

Simple GLA is the same recurrence with a per-head scalar decay:
``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t`` with ``S`` as ``[K, V]``.
Mamba-2's SSD is it with ``q = C``, ``k = B``, ``v = dt * x``, ``g = dt * A`` (per-token
log-decay; fla takes the chunk-local cumsum itself) and ``scale = 1``; fla's state
``[B, H, N, P]`` is the transpose of ours ``[B, H, P, N]``.

fla-core 0.6.0 refuses the backward of ``chunk_simple_gla`` on Hopper GPUs with Triton in
[3.4, 3.7.1) (its issue #640: wrong gradients). There, when gradients are needed, the backward
runs as three more simple-GLA *forward* scans (:mod:`ramba.ops.ssd.adjoint`).
"""

from __future__ import annotations

import functools

import torch

from ramba.ops.ssd.adjoint import adjoint_scan


@functools.cache
def simple_gla_backward_ok() -> bool:
    """False where fla's own guard rejects the gated simple-GLA backward (Hopper, Triton 3.4 - 3.7.0)."""
    from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1

    return not (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1)


def simple_gla_scan(q, k, v, g, initial_state=None):
    """fla's ``chunk_simple_gla`` forward in the layout of :func:`ramba.ops.ssd.chunk.scan_chunk`.

    Args: q, k ``[B, T, G, K]``; v ``[B, T, H, V]``; g ``[B, T, H]`` (float32);
    initial_state ``[B, H, V, K]`` or None. Returns o ``[B, T, H, V]`` in v's dtype and the final
    state ``[B, H, V, K]`` in float32.
    """
    from fla.ops.simple_gla import chunk_simple_gla

    R = v.shape[2] // q.shape[2]
    q = q.to(v.dtype).repeat_interleave(R, dim=2) if R > 1 else q.to(v.dtype)
    k = k.to(v.dtype).repeat_interleave(R, dim=2) if R > 1 else k.to(v.dtype)
    h0 = None if initial_state is None else initial_state.float().transpose(-1, -2).contiguous()
    o, ht = chunk_simple_gla(q, k, v, g=g.float(), scale=1.0, initial_state=h0, output_final_state=True)
    return o, ht.transpose(-1, -2)


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
        kernel: ``"simple_gla"`` (fla forward and backward) or ``"adjoint"`` (fla forward kernels,
            backward by adjoint scans); None picks simple_gla, or adjoint where gradients are
            needed and fla refuses the simple-GLA backward (see the module docstring).
    Returns:
        y ``[B, T, H, P]`` in x's dtype (q, k, v run in x's dtype, the decay in float32), and
        the final state ``[B, H, P, N]`` in float32 when ``return_final_state``.
    """
    v = (x.float() * dt.float()[..., None]).to(x.dtype)  # [B, T, H, P]
    g = dt.float() * A.float()  # [B, T, H]
    if kernel is None:
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, dt, A, B, C, initial_state)
        )
        kernel = "adjoint" if needs_grad and not simple_gla_backward_ok() else "simple_gla"
    if kernel == "adjoint":
        y, hT = adjoint_scan(simple_gla_scan, C, B, v, g, initial_state)
    elif kernel == "simple_gla":
        y, hT = simple_gla_scan(C, B, v, g, initial_state)
    else:
        raise ValueError(f"ssd_fla: kernel must be 'adjoint', 'simple_gla' or None, got {kernel!r}")
    return (y, hT) if return_final_state else y
