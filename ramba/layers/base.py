"""The protocol every model layer speaks (docs/design.md §3): ``forward(hidden, ctx) -> (hidden, ctx)``,
``init_cache(...)`` for the state it keeps while decoding, ``from_config(config, layer_idx)`` built from keyword
arguments, and a ``kind`` (a :class:`ramba.model.config.LayerKind` value) under which it registers itself.

A new layer kind is one class in its own module of ``ramba.layers`` (imported, so registered, with the package)
and its place in ``RambaConfig.layer_plan``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

# kind -> layer class, filled by RambaLayer.__init_subclass__
LAYER_CLASSES: dict[str, type[RambaLayer]] = {}


class ChunkMemory(NamedTuple):
    """What the chunk encoder writes for the HSA layers above it."""

    k: torch.Tensor  # [B, C*S, H, D]
    v: torch.Tensor  # [B, C*S, H, D]
    landmarks: torch.Tensor  # [B, C, R, Dr]


class ChunkSelection(NamedTuple):
    """What a retrieval layer writes for the HSA layers of its group."""

    indices: torch.Tensor  # [B, T, R, K] int64
    weights: torch.Tensor  # [B, T, R, K] float32


@dataclass(frozen=True)
class LayerContext:
    """What flows beside the hidden states ``[B, T, d]`` through one forward, shared by the layers.

    Frozen: a layer that shares something returns a new context (``ctx.replace(...)``), so that a checkpointed
    layer recomputed in the backward sees the context it saw in the forward.

    positions: ``[T]`` absolute positions of the input tokens (int64).
    states: the cache's per-layer states (``RambaCache.layers``, indexed by ``layer_idx``), or None without a cache.
    skip_hsa: leave out retrieval and the HSA attention term for these tokens (fast prefill).
    memory: the chunk memory the HSA layers attend to: of the input's own chunks without a cache, else the chunks
        the current retrieval group fetched from ``store`` (None: the HSA layers fetch block by block).
    selection: the current retrieval group's chunk indices and weights ``[B, T, R, K]``.
    store: the cache's chunk memory store (public methods ``append``, ``landmarks``, ``fetch_tokens``, ``fetch``),
        set by the chunk encoder when there is a cache.
    retrieval_targets: ``[B, T, 2]`` int64 target chunks of the retrieval loss (training only, docs/design.md §6),
        or None.
    retrieval_losses: each retrieval layer's retrieval loss ``[]`` so far (when ``retrieval_targets`` is set).
    """

    positions: torch.Tensor
    states: list | None = None
    skip_hsa: bool = False
    memory: ChunkMemory | None = None
    selection: ChunkSelection | None = None
    store: Any = None
    retrieval_targets: torch.Tensor | None = None
    retrieval_losses: tuple[torch.Tensor, ...] = ()

    def state(self, layer_idx: int):
        """The cache state of layer ``layer_idx`` (None without a cache)."""
        return None if self.states is None else self.states[layer_idx]

    def replace(self, **changes) -> LayerContext:
        return dataclasses.replace(self, **changes)


class RambaLayer(GradientCheckpointingLayer):
    """Base of every layer of the model's layer plan (see the module docstring).

    Gradient checkpointing comes from transformers' ``GradientCheckpointingLayer``: ``model.gradient_checkpointing_enable()``
    (``activation_checkpointing_enable()`` in newer transformers) recomputes each layer's ``forward`` in the backward.
    """

    kind: ClassVar[str]
    layer_idx: int | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            LAYER_CLASSES[cls.kind] = cls

    @classmethod
    def from_config(cls, config, layer_idx: int) -> RambaLayer:
        """The layer at ``layer_idx`` of a model with this ``RambaConfig`` (its fields passed by keyword)."""
        raise NotImplementedError

    def init_cache(
        self, batch_size: int, device: torch.device, dtype: torch.dtype, chunk_store: Callable | None = None
    ):
        """The state this layer keeps between forwards of one batch while decoding (None: nothing).
        ``chunk_store(batch, S, H, D, R, Dr, dtype, device)`` makes a chunk memory store (for the chunk encoder)."""
        return None

    def forward(self, hidden: torch.Tensor, ctx: LayerContext) -> tuple[torch.Tensor, LayerContext]:
        """``hidden [B, T, d]`` -> ``[B, T, d]`` and the context for the next layer; cache states in
        ``ctx.states`` are updated in place."""
        raise NotImplementedError


def build_layer(kind: str, config, layer_idx: int) -> RambaLayer:
    """The module for entry ``layer_idx`` (of kind ``kind``) of ``config.layer_plan()``."""
    if kind not in LAYER_CLASSES:
        raise ValueError(f"no layer class registered for layer kind {kind!r}; known kinds: {sorted(LAYER_CLASSES)}")
    return LAYER_CLASSES[kind].from_config(config, layer_idx)
