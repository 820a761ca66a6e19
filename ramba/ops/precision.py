"""The one rule for the dtype ops compute in: float64 stays float64 (exact tests on the CPU); every other
float dtype (bf16, fp16, fp32) accumulates in float32."""

from __future__ import annotations

import torch

__all__ = ["compute_dtype"]


def compute_dtype(*inputs: torch.Tensor | torch.dtype) -> torch.dtype:
    """float64 when any of ``inputs`` (tensors or dtypes) is float64, else float32."""
    dtypes = [x.dtype if isinstance(x, torch.Tensor) else x for x in inputs]
    return torch.float64 if torch.float64 in dtypes else torch.float32
