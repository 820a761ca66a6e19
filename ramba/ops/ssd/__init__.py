"""The Mamba-2 SSD scan (state-space duality): ``from ramba.ops.ssd import ssd, ssd_step``.

Per head ``h`` (group ``g = h // (H // G)``) and token ``t``, with state ``h_t`` of ``[P, N]``::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T
    y_t = h_t C_t

The D skip (``y += D * x``) belongs to the layer, not to this op.
"""

from __future__ import annotations

import functools

import torch

from ramba.ops.backends import check_backend
from ramba.ops.precision import compute_dtype
from ramba.ops.ssd.chunk import ssd_chunk
from ramba.ops.ssd.mamba_triton import chunk_scan_combined, ssd_mamba_triton, supports_chunk_size
from ramba.ops.ssd.naive import ssd_naive, ssd_step_naive

BACKENDS = ("reference", "torch", "fla", "mamba_ssm")


@functools.cache
def fla_available() -> bool:
    """Whether fla-core's simple-GLA kernels import (needs Triton and a CUDA build of PyTorch)."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla  # noqa: F401
    except Exception:  # any import-time failure (missing package, Triton/driver mismatch) means unusable
        return False
    return True


def default_backend(device: torch.device, chunk_size: int = 64) -> str:
    """The backend ``ssd(backend=None)`` uses on ``device``: on CUDA mamba_ssm's kernels when they import
    (fused forward and backward; power-of-two ``chunk_size`` only), else fla's; else the chunked PyTorch path."""
    if device.type == "cuda":
        if chunk_scan_combined() is not None and supports_chunk_size(chunk_size):
            return "mamba_ssm"
        if fla_available():
            return "fla"
    return "torch"


def _check_tensor(name: str, t, rank: int, shape_doc: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"ssd: {name} must be a torch.Tensor {shape_doc}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"ssd: {name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() != rank:
        raise ValueError(f"ssd: {name} must be {shape_doc}, got shape {tuple(t.shape)}")


def _check_inputs(x, dt, A, B, C, state, state_name: str, step: bool) -> None:
    lead = "[B, H" if step else "[B, T, H"
    _check_tensor("x", x, 3 if step else 4, lead + ", P]")
    _check_tensor("dt", dt, 2 if step else 3, lead + "]")
    _check_tensor("A", A, 1, "[H]")
    _check_tensor("B", B, 3 if step else 4, ("[B, G, N]" if step else "[B, T, G, N]"))
    _check_tensor("C", C, 3 if step else 4, ("[B, G, N]" if step else "[B, T, G, N]"))
    head = x.shape[:-1]  # (B, H) or (B, T, H)
    H, P = x.shape[-2], x.shape[-1]
    G, N = B.shape[-2], B.shape[-1]
    if dt.shape != head:
        raise ValueError(f"ssd: dt must be {lead}] = {tuple(head)} to match x {tuple(x.shape)}, got {tuple(dt.shape)}")
    if A.shape != (H,):
        raise ValueError(f"ssd: A must be [H] = ({H},), got {tuple(A.shape)}")
    if B.shape[:-2] != head[:-1] or G == 0 or H % G != 0:
        raise ValueError(
            f"ssd: B must be {'[B, G, N]' if step else '[B, T, G, N]'} with B, T as in x {tuple(x.shape)} "
            f"and H={H} a multiple of G, got {tuple(B.shape)}"
        )
    if C.shape != B.shape:
        raise ValueError(f"ssd: C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    if state is not None:
        _check_tensor(state_name, state, 4, "[B, H, P, N]")
        want = (x.shape[0], H, P, N)
        if tuple(state.shape) != want:
            raise ValueError(f"ssd: {state_name} must be [B, H, P, N] = {want}, got {tuple(state.shape)}")
    tensors = [x, dt, A, B, C] + ([state] if state is not None else [])
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"ssd: all inputs must be on one device, got {sorted(map(str, devices))}")


def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    backend: str | None = None,
):
    """Mamba-2 SSD scan over a sequence.

    Args:
        x: ``[B, T, H, P]`` inputs.
        dt: ``[B, T, H]`` step sizes, already softplus'ed and clamped.
        A: ``[H]`` negative decay rates (``-exp(A_log)``).
        B, C: ``[B, T, G, N]`` input/output projections; ``H % G == 0``.
        chunk_size: block length of the chunked algorithms (does not change the result).
        initial_state: ``[B, H, P, N]`` state before the first token, or None (zeros).
        return_final_state: also return the state after the last token.
        backend: ``"reference"`` (per-token loop), ``"torch"`` (chunked PyTorch), ``"mamba_ssm"``
            (mamba_ssm's Triton kernels, CUDA) or ``"fla"`` (fla-core's Triton kernels, CUDA);
            ``None``: :func:`default_backend`.
    Returns:
        y ``[B, T, H, P]`` in x's dtype; with ``return_final_state`` also the final state
        ``[B, H, P, N]`` in float32 (float64 for float64 inputs on CPU backends).
        Differentiable in x, dt, A, B, C and initial_state.
    """
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"ssd: chunk_size must be a positive int, got {chunk_size!r}")
    _check_inputs(x, dt, A, B, C, initial_state, "initial_state", step=False)
    check_backend("ssd", backend, BACKENDS, x.device)
    if backend is None:
        backend = default_backend(x.device, chunk_size)
    if x.shape[1] == 0:
        Bsz, _, H, P = x.shape
        y = x.new_zeros(x.shape)
        if not return_final_state:
            return y
        acc = compute_dtype(x)
        h = x.new_zeros(Bsz, H, P, B.shape[-1], dtype=acc) if initial_state is None else initial_state.to(acc)
        return y, h
    if backend == "reference":
        return ssd_naive(x, dt, A, B, C, initial_state, return_final_state)
    if backend == "torch":
        return ssd_chunk(x, dt, A, B, C, chunk_size, initial_state, return_final_state)
    if backend == "mamba_ssm":
        return ssd_mamba_triton(x, dt, A, B, C, chunk_size, initial_state, return_final_state)
    from ramba.ops.ssd.fla import ssd_fla

    return ssd_fla(x, dt, A, B, C, initial_state, return_final_state)


def ssd_step(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the SSD recurrence (decoding).

    Args:
        x: ``[B, H, P]``; dt: ``[B, H]`` (softplus'ed, clamped); A: ``[H]``; B, C: ``[B, G, N]``;
        state: ``[B, H, P, N]``.
    Returns:
        y ``[B, H, P]`` in x's dtype and the new state ``[B, H, P, N]`` (float32, or float64
        for float64 inputs). The input state is not modified.
    """
    _check_inputs(x, dt, A, B, C, state, "state", step=True)
    return ssd_step_naive(x, dt, A, B, C, state)


__all__ = ["BACKENDS", "default_backend", "fla_available", "ssd", "ssd_chunk", "ssd_naive", "ssd_step"]
