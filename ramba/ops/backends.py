"""The one vocabulary of the ops' ``backend=`` argument, and its one check (docs/design.md §1-§3).

- ``"reference"``: the readable plain-PyTorch definition, the test oracle (any device, float64-able);
- ``"torch"``: the fast plain-PyTorch path (blocked, chunked or streaming; any device);
- ``"triton"``: ramba's own Triton kernels (CUDA);
- ``"fla"``: fla-core's Triton kernels (CUDA);
- ``"mamba_ssm"``: mamba_ssm's Triton kernels (CUDA);
- ``"liger"``: liger-kernel's Triton kernels (CUDA).

Each op supports a subset (``hsa``: reference, torch, triton; ``ssd``: reference, torch, fla, mamba_ssm;
``nsa``: torch, fla; ``linear_cross_entropy``: torch, liger); ``None`` lets the op pick the fastest one for its inputs.
"""

from __future__ import annotations

import os

import torch

__all__ = ["BACKENDS", "CUDA_BACKENDS", "check_backend"]

BACKENDS = ("reference", "torch", "triton", "fla", "mamba_ssm", "liger")
CUDA_BACKENDS = ("triton", "fla", "mamba_ssm", "liger")


def check_backend(op: str, backend: str | None, supported: tuple[str, ...], device: torch.device | None = None) -> None:
    """Raises ValueError unless ``backend`` is None or one of ``supported`` that runs on ``device`` (the CUDA-only
    ones run on CPU tensors under ``TRITON_INTERPRET=1``)."""
    if backend is None:
        return
    if backend not in supported:
        raise ValueError(f"{op}: backend must be one of {supported} or None, got {backend!r}")
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"  # Triton's interpreter runs on CPU tensors
    if device is not None and backend in CUDA_BACKENDS and device.type != "cuda" and not interpreted:
        raise ValueError(
            f"{op}: backend {backend!r} needs CUDA tensors, got device {device}; use backend='torch' or None"
        )
