"""One optimizer step, the same for `ramba train` and `ramba bench train` (docs/design.md §6).

:class:`TrainStep` runs a step's micro-batches (forward under autocast, backward; DDP's ``no_sync`` on all
but the last; or forward and backward replayed from one CUDA graph), clips the global gradient norm, sets
the learning rate of the step and steps the optimizer, without a device-to-host sync: the loss and the
gradient norm come back as device tensors, read when the caller logs. :func:`make_optimizer` chooses AdamW's
implementation in one place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ramba.train.cuda_graph import GraphedLoss

__all__ = ["TrainStep", "make_optimizer", "sequence_mean_loss", "LOSS_AVERAGES"]

LOSS_AVERAGES = ("token", "sequence")


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW over two groups, matrices with ``weight_decay`` and vectors (norms, biases) without; the fused
    implementation when every parameter is a plain CUDA tensor, else foreach (CPU, FSDP's sharded tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = bool(params) and all(p.is_cuda and type(p) is nn.Parameter for p in params)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=lr, betas=tuple(betas), eps=eps, fused=fused, foreach=not fused
    )


def sequence_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged per sequence, then over the sequences that have labels.

    logits ``[B, T, V]``, labels ``[B, T]`` (-100: no loss; shifted inside, as the model's own loss).
    """
    targets = labels[:, 1:]
    per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
    counts = (targets != -100).sum(dim=1)
    per_sequence = per_token.sum(dim=1) / counts.clamp_min(1)
    return per_sequence.sum() / (counts > 0).sum().clamp_min(1)


class TrainStep:
    """``step(micro_batches, lr) -> (loss [], grad_norm [])``: one optimizer step over ``micro_batches``, an
    iterable of ``(input_ids [B, T], labels [B, T])``, or ``(input_ids, labels, retrieval_targets [B, T, 2])``
    with a ``retrieval_loss`` weight, already on the model's device.

    Args:
        model: the (possibly DDP- or FSDP-wrapped) model; its ``.grad`` are zero when a step starts and after it.
        optimizer: from :func:`make_optimizer`; every group's ``lr`` is set to the step's ``lr``.
        grad_accum: micro-batches a step; each loss is divided by it, so their gradients add up to the step's.
        grad_clip: clip the global gradient norm to this (0: no clipping; the norm is still returned).
        loss_average: ``"token"`` (the model's own loss, a mean over labelled tokens) or ``"sequence"``
            (:func:`sequence_mean_loss`).
        autocast_dtype: run the forward under ``torch.autocast`` in this dtype (None: no autocast).
        cuda_graph: replay each micro-batch's forward and backward from one CUDA graph (a single CUDA process;
            :class:`~ramba.train.cuda_graph.GraphedLoss`); eager PyTorch is its twin.
        retrieval_loss: the weight of the model's retrieval loss (docs/design.md §6) added to the LM loss; the
            micro-batches then carry ``retrieval_targets``.

    The returned loss is the sum of the scaled micro-batch losses (the step's mean loss), as a device tensor.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        grad_accum: int = 1,
        grad_clip: float = 0.0,
        loss_average: str = "token",
        autocast_dtype: torch.dtype | None = None,
        cuda_graph: bool = False,
        retrieval_loss: float = 0.0,
    ):
        if loss_average not in LOSS_AVERAGES:
            raise ValueError(f"loss_average: expected one of {LOSS_AVERAGES}, got {loss_average!r}")
        if not isinstance(grad_accum, int) or grad_accum < 1:
            raise ValueError(f"grad_accum: expected a positive int, got {grad_accum!r}")
        if cuda_graph and getattr(model, "loss_backend", None) == "liger":
            raise ValueError("cuda_graph: liger's fused loss synchronises with the host, so it cannot be captured")
        self.model, self.optimizer = model, optimizer
        self.grad_accum, self.grad_clip, self.loss_average = grad_accum, grad_clip, loss_average
        self.retrieval_loss = retrieval_loss
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        self.autocast_dtype = autocast_dtype
        # autocast's cast cache would live in the CUDA graph's memory: off when capturing
        self._autocast_cache = not cuda_graph
        self.graphed = GraphedLoss(self.micro_loss, self.params) if cuda_graph else None

    def micro_loss(
        self, ids: torch.Tensor, labels: torch.Tensor, retrieval_targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One micro-batch's loss divided by ``grad_accum`` ``[]``."""
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=self._autocast_cache)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        if (retrieval_targets is not None) != bool(self.retrieval_loss):
            raise ValueError(
                "TrainStep: micro-batches carry retrieval_targets exactly when the retrieval_loss weight is set"
            )
        with autocast:
            token = self.loss_average == "token"
            out = self.model(input_ids=ids, labels=labels if token else None, retrieval_targets=retrieval_targets)
            loss = out.loss if token else sequence_mean_loss(out.logits, labels)
            if retrieval_targets is not None:
                loss = loss + self.retrieval_loss * out.retrieval_loss
        return loss / self.grad_accum

    def __call__(
        self, micro_batches: Iterable[tuple[torch.Tensor, ...]], lr: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        loss_sum = torch.zeros((), device=self.device)
        n = 0
        for n, batch in enumerate(micro_batches, start=1):
            if self.graphed is not None:
                loss = self.graphed(*batch)
            else:
                last = n == self.grad_accum or not hasattr(self.model, "no_sync")
                with contextlib.nullcontext() if last else self.model.no_sync():
                    loss = self.micro_loss(*batch)
                loss.backward()
            loss_sum += loss.detach().float()
        if n != self.grad_accum:
            raise ValueError(f"TrainStep: expected {self.grad_accum} micro-batches, got {n}")
        grad_norm = self._clip()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        # a CUDA graph writes the .grad tensors it captured: zero them, keep them
        self.optimizer.zero_grad(set_to_none=self.graphed is None)
        return loss_sum, grad_norm

    def _clip(self) -> torch.Tensor:
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
