"""Learning-rate schedule: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math

import torch

__all__ = ["WarmupCosine", "make_scheduler"]


class WarmupCosine:
    """Multiplier of the peak lr at step `s` (callable object, so LambdaLR can save its state).

    `s < warmup`: `(s + 1) / (warmup + 1)`; afterwards cosine from 1 to `min_ratio` at `total`, then flat.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float):
        if warmup < 0 or total < 1:
            raise ValueError(f"warmup, total: need warmup >= 0 and total >= 1, got {warmup}, {total}")
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        span = max(self.total - self.warmup, 1)
        progress = min((step - self.warmup) / span, 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, lr: float, min_lr: float, warmup: int, total: int):
    """LambdaLR over `optimizer` (whose groups hold the peak `lr`) following WarmupCosine."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total, min_lr / lr if lr > 0 else 0.0))
