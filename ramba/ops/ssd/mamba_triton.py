"""SSD on CUDA through mamba_ssm's Triton kernels (``mamba_chunk_scan_combined``, the Mamba-2 authors' own).

The kernels compute exactly :func:`ramba.ops.ssd.ssd`'s recurrence in the same layout (x ``[B, T, H, P]``,
B/C ``[B, T, G, N]``, states ``[B, H, P, N]``), forward and backward fused per chunk, in float32 inside.
They are pure Triton: a ``mamba_ssm`` built without its CUDA extensions (``MAMBA_SKIP_CUDA_BUILD=TRUE``,
a pure-Python wheel) serves, although its package ``__init__`` then fails on the missing
``selective_scan_cuda``; :func:`chunk_scan_combined` imports the Triton module without running it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys

import torch


@functools.cache
def chunk_scan_combined():
    """mamba_ssm's ``mamba_chunk_scan_combined``, or None where it cannot be imported."""
    name = "mamba_ssm.ops.triton.ssd_combined"
    try:
        return importlib.import_module(name).mamba_chunk_scan_combined
    except ImportError:
        pass
    spec = importlib.util.find_spec("mamba_ssm") if "mamba_ssm" not in sys.modules else None
    if spec is None or spec.submodule_search_locations is None:
        return None
    # the package without its __init__ (which imports the CUDA extensions): only the Triton modules are used
    sys.modules["mamba_ssm"] = importlib.util.module_from_spec(spec)
    try:
        return importlib.import_module(name).mamba_chunk_scan_combined
    except Exception:  # Triton or driver mismatch: the backend is unavailable
        del sys.modules["mamba_ssm"]
        return None


def supports_chunk_size(chunk_size: int) -> bool:
    """Whether the kernels take this block length: a power of two >= 16."""
    return chunk_size >= 16 and chunk_size & (chunk_size - 1) == 0


def ssd_mamba_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """SSD scan with mamba_ssm's Triton kernels. CUDA tensors only.

    Args:
        x: ``[B, T, H, P]``; dt: ``[B, T, H]`` (softplus'ed, clamped); A: ``[H]``; B, C: ``[B, T, G, N]``;
        chunk_size: the kernels' block length (a power of two >= 16); initial_state: ``[B, H, P, N]`` or None.
    Returns:
        y ``[B, T, H, P]`` in x's dtype, and the final state ``[B, H, P, N]`` in float32 when
        ``return_final_state``. Differentiable in every input.
    """
    scan = chunk_scan_combined()
    if scan is None:
        raise RuntimeError("ssd: backend 'mamba_ssm' needs mamba_ssm's Triton kernels (pip install mamba-ssm)")
    if not supports_chunk_size(chunk_size):
        raise ValueError(f"ssd: backend 'mamba_ssm' needs a power-of-two chunk_size >= 16, got {chunk_size}")
    h0 = None if initial_state is None else initial_state.float()
    out = scan(
        x,
        dt.float(),
        A.float(),
        B.to(x.dtype),
        C.to(x.dtype),
        chunk_size,
        initial_states=h0,
        return_final_states=return_final_state,
    )
    if not return_final_state:
        return out
    y, hT = out
    return y, hT.float()
