"""Learning-rate schedule: linear warmup, then cosine decay to a floor; a pure function of the step, so a
resumed run needs no scheduler state (docs/design.md §6)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["WarmupCosine"]


@dataclass(frozen=True)
class WarmupCosine:
    """``lr(step)``: ``lr * (step + 1) / (warmup + 1)`` for ``step < warmup``, then cosine from ``lr`` to ``min_lr`` at
    ``total``, then flat at ``min_lr``."""

    lr: float
    min_lr: float
    warmup: int
    total: int

    def __post_init__(self):
        if self.warmup < 0 or self.total < 1:
            raise ValueError(f"warmup, total: need warmup >= 0 and total >= 1, got {self.warmup}, {self.total}")

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / (self.warmup + 1)
        progress = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
