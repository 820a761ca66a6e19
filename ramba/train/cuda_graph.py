"""A training step's forward and backward captured once in a CUDA graph, then replayed.

At the sizes we train, one step launches thousands of kernels (Mamba-2's Triton SSD alone runs about twenty
per layer and direction), and launching them costs the host more time than the GPU spends running them.
Replaying a captured graph launches them all at once. Eager PyTorch is this path's twin: tests/gpu checks
that both give the same loss and gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def use_cuda_graph(
    option: bool | None,
    device: torch.device,
    world_size: int = 1,
    grad_checkpointing: bool = False,
    fused_loss: bool = False,
) -> bool:
    """The training option ``cuda_graph`` resolved: True or False as given; None (the default) turns the CUDA graph
    on for one CUDA process without gradient checkpointing (recomputation cannot be captured) and without liger's
    fused loss (it synchronises)."""
    if option is not None:
        return option
    return device.type == "cuda" and world_size == 1 and not (grad_checkpointing or fused_loss)


class GraphedLoss:
    """``loss_fn(*inputs)`` and its backward into the parameters' ``.grad``, as one CUDA graph.

    Args:
        loss_fn: ``(*inputs) -> loss []``. It must be capturable: no device-to-host syncs, no shapes that depend on
            the data, the same kernels on every call. Run autocast with ``cache_enabled=False`` inside it.
        params: the parameters to differentiate. Their ``.grad`` tensors must stay the ones captured: zero them
            with ``optimizer.zero_grad(set_to_none=False)``, never set them to None.
        warmup: eager calls on a side stream before the capture (Triton autotuning and torch.compile happen
            there). Their gradients are taken back out.

    The first call captures the graph for its inputs' shapes and dtypes; every call takes inputs of those
    shapes and dtypes, adds this batch's gradients to ``.grad`` (as ``loss.backward()`` would) and returns the
    loss: one tensor, overwritten by the next call (clone it to keep it).
    """

    def __init__(self, loss_fn: Callable[..., torch.Tensor], params: Iterable[torch.nn.Parameter], warmup: int = 2):
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(
                f"GraphedLoss: warmup must be a positive int (Triton and torch.compile must run before the "
                f"capture), got {warmup!r}"
            )
        self.loss_fn = loss_fn
        self.params = [p for p in params if p.requires_grad]
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: list[torch.Tensor] = []
        self.static_loss: torch.Tensor | None = None
        self.grads: list[torch.Tensor | None] = []

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """``inputs`` (tensors of the captured shapes and dtypes) -> ``loss []``; gradients added to ``.grad``."""
        if self.graph is None:
            self._capture(inputs)
        else:
            self._check(inputs)
            for static, x in zip(self.static_inputs, inputs):
                static.copy_(x)
        self.graph.replay()
        return self.static_loss

    def _check(self, inputs: tuple[torch.Tensor, ...]) -> None:
        got = [(tuple(x.shape), x.dtype, x.device) for x in inputs]
        want = [(tuple(x.shape), x.dtype, x.device) for x in self.static_inputs]
        if got != want:
            raise ValueError(
                f"GraphedLoss: the graph was captured for inputs {want}, got {got}; "
                "make a new GraphedLoss for other shapes"
            )
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:
                raise RuntimeError(
                    "GraphedLoss: a parameter's .grad was replaced since the capture (the graph writes the "
                    "captured tensors); zero gradients with optimizer.zero_grad(set_to_none=False)"
                )

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> None:
        if not inputs or not all(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs):
            raise ValueError(
                "GraphedLoss: CUDA graphs need CUDA tensors as inputs; on other devices run the step eagerly"
            )
        if not self.params:
            raise ValueError("GraphedLoss: no parameter requires grad")
        self.static_inputs = [x.detach().clone() for x in inputs]
        before = [None if p.grad is None else p.grad.clone() for p in self.params]
        device = self.static_inputs[0].device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.loss_fn(*self.static_inputs).backward()
        torch.cuda.current_stream(device).wait_stream(side)
        # the warmup's activations sit in the allocator's cache; the graph takes its own pool: hand them back
        torch.cuda.empty_cache()
        # parameters the loss does not reach keep grad None (the graph leaves them alone, as backward would);
        # the others keep their own .grad tensor, which the captured backward accumulates into
        for p, old in zip(self.params, before):
            if p.grad is not None and old is not None:
                p.grad.copy_(old)
            elif p.grad is not None:
                p.grad.zero_()
        self.grads = [p.grad for p in self.params]
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            loss = self.loss_fn(*self.static_inputs)
            loss.backward()
        self.static_loss = loss.detach()
