"""Hierarchical Sparse Attention (docs/design.md §1): ``from ramba.ops import hsa``."""

from __future__ import annotations

import torch

from ramba.ops.backends import check_backend
from ramba.ops.hsa.naive import hsa_naive, softmax1

BACKENDS = ("reference", "torch", "triton")


def _check_inputs(q, k, v, weights, indices, chunk_size) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("weights", weights), ("indices", indices)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"hsa: {name} must be a torch.Tensor, got {type(t).__name__} (convert it with torch.as_tensor)"
            )
    for name, t in (("q", q), ("k", k), ("v", v), ("weights", weights), ("indices", indices)):
        if t.dim() != 4:
            raise ValueError(f"hsa: {name} must have rank 4, got shape {tuple(t.shape)}")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"hsa: chunk_size must be a positive int, got {chunk_size!r}")
    for name, t in (("q", q), ("k", k), ("v", v), ("weights", weights)):
        if not t.is_floating_point():
            raise TypeError(f"hsa: {name} must be a floating-point tensor, got {t.dtype}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"hsa: indices must be an integer tensor, got {indices.dtype}")
    B, T, HQ, D = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"hsa: k and v must have the same shape [B, Tk, H, D], got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    Bk, Tk, H, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"hsa: k must be [B={B}, Tk, H, D={D}] to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if H == 0 or HQ % H != 0:
        raise ValueError(f"hsa: q's head count HQ={HQ} must be a multiple of k's head count H={H}")
    if Tk % chunk_size != 0 or Tk == 0:
        raise ValueError(f"hsa: k's length Tk={Tk} must be a positive multiple of chunk_size={chunk_size}")
    if indices.shape[:3] != (B, T, H):
        raise ValueError(f"hsa: indices must be [B={B}, T={T}, H={H}, K], got {tuple(indices.shape)}")
    if weights.shape != indices.shape:
        raise ValueError(
            f"hsa: weights must have the shape of indices {tuple(indices.shape)}, got {tuple(weights.shape)}"
        )
    devices = {t.device for t in (q, k, v, weights, indices)}
    if len(devices) > 1:
        raise ValueError(f"hsa: q, k, v, weights and indices must be on one device, got {sorted(map(str, devices))}")


def _check_index_range(indices: torch.Tensor, n_chunks: int) -> None:
    """Indices in ``[0, n_chunks)``: a device sync, so checked off the Triton path (whose kernel masks them) and
    outside CUDA-graph capture."""
    if indices.numel() == 0 or (indices.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= n_chunks:
        raise ValueError(f"hsa: indices must lie in [0, Tk/chunk_size = {n_chunks}), got values in [{lo}, {hi}]")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_supports(head_dim: int, chunk_size: int) -> bool:
    """The Triton kernels tile D and S as powers of 2 of at least 16."""
    return all(n >= 16 and n & (n - 1) == 0 for n in (head_dim, chunk_size))


def hsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    chunk_size: int,
    scale: float | None = None,
    sm_n: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Hierarchical sparse attention.

    For token ``t``, query head ``j`` (kv head ``h = j // (HQ // H)``) and its ``K`` chosen chunks,
    attend inside each chunk separately (softmax with ``sm_n`` added to the denominator), then
    mix the per-chunk outputs by ``weights``.

    Args:
        q: ``[B, T, HQ, D]`` queries, any float dtype.
        k, v: ``[B, Tk, H, D]`` the chunk memory; ``Tk`` a multiple of ``chunk_size``.
        weights: ``[B, T, H, K]`` float chunk weights; a slot of weight 0 contributes nothing.
        indices: ``[B, T, H, K]`` integer chunk ids in ``[0, Tk // chunk_size)``.
        chunk_size: tokens per chunk ``S``.
        scale: score scale, ``D ** -0.5`` by default.
        sm_n: extra softmax denominator term (0 plain softmax, 1 softmax-off-by-one).
        backend: ``"reference"``, ``"torch"`` or ``"triton"``; ``None`` picks ``"triton"`` for
            CUDA tensors when Triton imports and D and chunk_size are powers of 2 >= 16, else ``"torch"``.
    Returns:
        ``[B, T, HQ, D]`` in q's dtype. Differentiable in q, k, v and weights.
    """
    _check_inputs(q, k, v, weights, indices, chunk_size)
    check_backend("hsa", backend, BACKENDS, q.device)
    if backend is None:
        use_triton = q.is_cuda and _triton_available() and _triton_supports(q.shape[-1], chunk_size)
        backend = "triton" if use_triton else "torch"
    if backend != "triton":
        _check_index_range(indices, k.shape[1] // chunk_size)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if backend == "reference":
        return hsa_naive(q, k, v, weights, indices, chunk_size, scale, sm_n)
    if backend == "torch":
        from ramba.ops.hsa.blocked import hsa_blocked

        return hsa_blocked(q, k, v, weights, indices, chunk_size, scale, sm_n)
    from ramba.ops.hsa.triton import hsa_triton

    return hsa_triton(q, k, v, weights, indices, chunk_size, scale, sm_n)


__all__ = ["hsa", "hsa_naive", "softmax1", "BACKENDS"]
