"""RMS normalisations (weights named ``weight``, as in Hugging Face's Mamba-2 / LLaMA)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ramba.ops.precision import compute_dtype


@functools.cache
def compiled(fn):
    """``fn`` through ``torch.compile`` (dynamic shapes): a few fused kernels instead of dozens, and only the inputs
    kept for the backward instead of float32 intermediates (Mamba-2's glue tail, measured on the CPU: 12 KB instead
    of 49 KB per token for the 370m layout's widths)."""
    return torch.compile(fn, dynamic=True)


def glue(fn, x: torch.Tensor, enabled: bool | None):
    """``fn`` itself or :func:`compiled` ``(fn)``: ``enabled`` True or False, or None: compiled when training on
    CUDA (``x`` on a GPU and gradients on)."""
    on = enabled if enabled is not None else x.is_cuda and torch.is_grad_enabled()
    return compiled(fn) if on else fn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim in float32 (float64 for float64 x), then x's dtype
    times weight. x ``[..., dim]``, weight ``[dim]``."""
    h = x.to(compute_dtype(x))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """``weight * RMSNorm(x * silu(z))`` with the RMS per group of ``group_size`` channels, in float32
    (float64 for float64 x). x, z ``[..., dim]``; weight ``[dim]``; returns ``[..., dim]`` in x's dtype times weight."""
    acc = compute_dtype(x)
    h = x.to(acc) * F.silu(z.to(acc))
    hg = h.unflatten(-1, (-1, group_size))
    hg = hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hg.flatten(-2).to(x.dtype)


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim, computed in float32
    (float64 for float64 input).

    Input ``[..., dim]``; output in the input dtype, times ``weight`` (so promoted to weight's
    dtype when they differ, as in Hugging Face's RMSNorm). ``compile_glue``: through ``torch.compile`` (one fused
    kernel each way) when True, eager when False, when training on CUDA when None (see :func:`glue`).
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.compile_glue: bool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"RMSNorm: input must be [..., {self.weight.shape[0]}], got {tuple(x.shape)}")
        return glue(rms_norm, x, self.compile_glue)(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: ``RMSNorm(x * silu(z))`` with the RMS taken per group of ``group_size``
    channels (``n_groups`` groups of the ``dim`` channels), computed in float32 (float64 for float64 input).

    Input x, z ``[..., dim]``; output in x's dtype times ``weight``.
    """

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        if group_size <= 0 or dim % group_size != 0:
            raise ValueError(f"GatedRMSNorm: dim={dim} must be a positive multiple of group_size={group_size}")
        self.eps = eps
        self.group_size = group_size
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if x.shape != z.shape or x.shape[-1] != self.weight.shape[0]:
            raise ValueError(
                f"GatedRMSNorm: x and z must both be [..., {self.weight.shape[0]}], got {tuple(x.shape)} and {tuple(z.shape)}"
            )
        return gated_rms_norm(x, z, self.weight, self.group_size, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, group_size={self.group_size}, eps={self.eps}"
