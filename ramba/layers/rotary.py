"""Rotary position embeddings."""

from __future__ import annotations

import torch


def rotary_cos_sin(positions: torch.Tensor, dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos/sin tables for integer positions ``[..., T]`` -> two ``[..., T, 1, dim]`` float32 tensors."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [..., T, dim/2]
    angles = torch.cat((angles, angles), dim=-1)[..., None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, T, H, D]`` by tables from :func:`rotary_cos_sin` (half-split convention)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)
