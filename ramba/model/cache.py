"""``RambaCache``: everything a RAMba model needs to continue a sequence (docs/design.md §5)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache

from ramba.layers.base import RambaLayer, build_layer
from ramba.layers.hsa import ChunkEncoderState
from ramba.model.chunk_store import ChunkMemoryStore, Offload


class RambaCache(Cache):
    """Everything a RAMba model needs to continue a batch of sequences (docs/design.md §5): a
    ``transformers.Cache`` whose ``layers`` hold, per model layer, the state that layer's ``init_cache`` made
    (Mamba-2 conv/SSM states, attention keys/values, the chunk encoder's pending tail and chunk memory store;
    None for layers that keep nothing).

    Made by the model on ``model(input_ids, use_cache=True)`` (or here, for a model of ``config``: ``layers``
    default to the config's layer plan, built on the meta device only to ask each for its state) and passed
    back as ``cache`` (``past_key_values`` in older transformers). ``offload``: where the chunk memory lives,
    see :class:`ramba.model.chunk_store.Offload`.
    """

    def __init__(
        self,
        config,
        batch_size: int,
        device: torch.device,
        dtype: torch.dtype,
        offload: bool | str | Offload = False,
        layers: Sequence[RambaLayer] | None = None,
    ):
        if layers is None:
            with torch.device("meta"):
                layers = [build_layer(kind, config, i) for i, kind in enumerate(config.layer_plan())]
        chunk_store = functools.partial(ChunkMemoryStore, offload=offload)
        super().__init__(
            layers=[layer.init_cache(batch_size, device, dtype, chunk_store=chunk_store) for layer in layers]
        )
        self.config = config
        self.config_key = config.to_json_string(use_diff=False)
        self._batch_size, self.device, self.dtype, self.offload = batch_size, torch.device(device), dtype, offload
        self.seen_tokens = 0
        self.rows: list[RambaCache | None] | None = None  # one-row caches, for left-padded batches

    @property
    def memory(self) -> ChunkMemoryStore | None:
        """The chunk memory store (the chunk encoder's), or None for models without one."""
        return next((state.store for state in self.layers if isinstance(state, ChunkEncoderState)), None)

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def check(self, config, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        """Raise a clear error when this cache cannot continue a forward of ``config`` with these inputs."""
        if config is not self.config and config.to_json_string(use_diff=False) != self.config_key:
            raise ValueError("RambaCache: this cache was made by a model with a different configuration")
        if batch_size != self.batch_size:
            raise ValueError(f"RambaCache: made for batch size {self.batch_size}, got input of batch size {batch_size}")
        if torch.device(device) != self.device:
            raise ValueError(f"RambaCache: lives on {self.device}, got input on {device}")
        if dtype != self.dtype:
            raise ValueError(f"RambaCache: made for dtype {self.dtype}, the model now computes in {dtype}")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    # The states are continued in place by the layers; transformers' whole-cache edits do not apply to them.
    is_compileable = False
    is_croppable = False

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError(
            "RambaCache: reordering, cropping, resetting or resizing a cache is not supported "
            "(beam search, assisted decoding); use greedy or sampled decoding"
        )

    reorder_cache = crop = reset = batch_repeat_interleave = batch_select_indices = _unsupported
