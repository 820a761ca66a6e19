"""The LM head and next-token cross-entropy in one op (docs/design.md §4): ``from ramba.ops import
linear_cross_entropy``.

``"torch"`` builds the ``[N, V]`` logits and takes ``F.cross_entropy`` in float32 (the model's own loss, and the
twin of the fused path); ``"liger"`` is liger-kernel's fused linear cross-entropy, which computes the logits a
block of rows at a time and never holds them all (the memory of a 50K vocabulary's logits and their gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ramba.ops.backends import check_backend

__all__ = ["linear_cross_entropy", "LOSS_BACKENDS"]

LOSS_BACKENDS = ("torch", "liger")


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, backend: str | None = None
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels`` over the rows whose label is not -100.

    Args:
        hidden: ``[N, d]`` final hidden states (any float dtype).
        weight: ``[V, d]`` the LM head's weight.
        labels: ``[N]`` integer targets in ``[0, V)`` or -100 (no loss).
        backend: ``"torch"`` or ``"liger"`` (liger-kernel, CUDA or ``TRITON_INTERPRET=1``); None: ``"torch"``.
    Returns:
        ``[]`` float32 loss (NaN when no row has a label, as ``F.cross_entropy``).
    """
    check_backend("linear_cross_entropy", backend, LOSS_BACKENDS, hidden.device)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden [N, d] and weight [V, d] must share d, got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: labels must be [N={hidden.shape[0]}], got {tuple(labels.shape)}")
    if backend == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            raise ImportError(
                "linear_cross_entropy: backend 'liger' needs liger-kernel (pip install liger-kernel)"
            ) from None
        return LigerFusedLinearCrossEntropyLoss()(weight.to(hidden.dtype), hidden, labels).float()
    logits = hidden @ weight.to(hidden.dtype).T
    return F.cross_entropy(logits.float(), labels, ignore_index=-100)
