"""``RambaCache``: everything a RAMba model needs to continue a sequence (docs/design.md §5)."""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache

from ramba.layers.base import RambaLayer, build_layer
from ramba.layers.hsa import ChunkEncoderState, ChunkMemory, ChunkSelection

# The most chunk-memory bytes one offloaded fetch may copy to the device, were every selected chunk distinct:
# a long segment attends block by block (see ChunkMemoryStore.fetch_tokens), so the GPU memory a prefill
# needs does not grow with the number of chunks its tokens can choose from.
FETCH_BYTES = 64 * 2**20


class ChunkMemoryStore:
    """The chunk memory of all complete chunks, grown with amortised doubling (no per-step concatenation).

    ``k, v`` live as ``[B, capacity, S, H, D]`` on the compute device, or in CPU pinned memory when
    ``offload`` (then only the chunks a block of tokens selects are copied in, see :meth:`fetch`); the
    landmarks ``[B, capacity, R, Dr]`` always stay on the compute device.
    """

    def __init__(self, batch: int, chunk_size: int, n_kv_heads: int, head_dim: int, retrieval_heads: int,
                 retrieval_dim: int, dtype: torch.dtype, device: torch.device, offload: bool = False):
        self.chunk_size, self.dtype, self.device, self.offload = chunk_size, dtype, torch.device(device), offload
        self.n_chunks = 0
        self.kv_device = torch.device("cpu") if offload else self.device
        pin = offload and torch.cuda.is_available()
        kv_shape = (batch, 0, chunk_size, n_kv_heads, head_dim)
        self._k = torch.empty(kv_shape, dtype=dtype, device=self.kv_device, pin_memory=pin)
        self._v = torch.empty(kv_shape, dtype=dtype, device=self.kv_device, pin_memory=pin)
        self._landmarks = torch.empty(batch, 0, retrieval_heads, retrieval_dim, dtype=dtype, device=self.device)

    @property
    def landmarks(self) -> torch.Tensor:
        """``[B, C, R, Dr]`` of the complete chunks so far."""
        return self._landmarks[:, : self.n_chunks]

    def _grow(self, needed: int) -> None:
        capacity = self._k.shape[1]
        if needed <= capacity:
            return
        new_capacity = max(needed, 2 * capacity, 16)
        pin = self.offload and torch.cuda.is_available()

        def grown(old: torch.Tensor, pin_memory: bool) -> torch.Tensor:
            new = torch.empty((old.shape[0], new_capacity, *old.shape[2:]), dtype=old.dtype, device=old.device,
                              pin_memory=pin_memory)
            new[:, : self.n_chunks] = old[:, : self.n_chunks]
            return new

        self._k, self._v = grown(self._k, pin), grown(self._v, pin)
        self._landmarks = grown(self._landmarks, False)

    def append(self, memory: ChunkMemory) -> None:
        """Add the memory of newly completed chunks: k, v ``[B, c*S, H, D]``, landmarks ``[B, c, R, Dr]``."""
        c = memory.landmarks.shape[1]
        if c == 0:
            return
        self._grow(self.n_chunks + c)
        B, _, H, D = memory.k.shape
        sl = slice(self.n_chunks, self.n_chunks + c)
        # a blocking copy: a non-blocking device-to-host copy could still be in flight when fetch() reads it
        self._k[:, sl].copy_(memory.k.reshape(B, c, self.chunk_size, H, D))
        self._v[:, sl].copy_(memory.v.reshape(B, c, self.chunk_size, H, D))
        self._landmarks[:, sl] = memory.landmarks.to(self.dtype)
        self.n_chunks += c

    def resident(self) -> ChunkMemory:
        """All chunks as a :class:`ChunkMemory` on the compute device (views; not for offloaded stores)."""
        B, C = self._k.shape[0], self.n_chunks
        k = self._k[:, :C].reshape(B, C * self.chunk_size, *self._k.shape[3:])
        v = self._v[:, :C].reshape(B, C * self.chunk_size, *self._v.shape[3:])
        return ChunkMemory(k, v, self.landmarks)

    def fetch_tokens(self, selection: ChunkSelection) -> int:
        """Tokens per :meth:`fetch` for this ``selection`` (indices ``[B, T, R, K]``): all ``T`` when the
        memory is resident, else as many as copy at most ``FETCH_BYTES`` with every selected chunk distinct."""
        B, T, R, K = selection.indices.shape
        if not self.offload:
            return T
        S, H, D = self._k.shape[2:]
        chunk_bytes = 2 * S * H * D * self._k.element_size()  # k and v of one chunk, one batch row
        return max(1, FETCH_BYTES // (B * R * K * chunk_bytes))

    def fetch(self, selection: ChunkSelection) -> tuple[ChunkMemory, ChunkSelection]:
        """The selected chunks only, copied to the compute device, and the selection re-indexed into them.

        The chunk ids are deduplicated across tokens, heads and batch rows: each step moves
        ``B * U * S * H * D`` values for ``U`` distinct selected chunks, whatever the context length.
        """
        if not self.offload or self.n_chunks == 0:
            return self.resident(), selection
        indices, weights = selection
        used = torch.unique(indices.masked_fill(weights == 0, 0))  # sorted distinct chunk ids, [U]
        picked_k = self._k.index_select(1, used.to(self.kv_device))
        picked_v = self._v.index_select(1, used.to(self.kv_device))
        if torch.cuda.is_available() and self.device.type == "cuda":
            picked_k, picked_v = picked_k.pin_memory(), picked_v.pin_memory()
        B, U = picked_k.shape[:2]
        k = picked_k.to(self.device, non_blocking=True).reshape(B, U * self.chunk_size, *picked_k.shape[3:])
        v = picked_v.to(self.device, non_blocking=True).reshape(B, U * self.chunk_size, *picked_v.shape[3:])
        remapped = torch.searchsorted(used, indices.masked_fill(weights == 0, 0).contiguous())
        return ChunkMemory(k, v, self.landmarks), ChunkSelection(remapped, weights)


class RambaCache(Cache):
    """Everything a RAMba model needs to continue a batch of sequences (docs/design.md §5): a
    ``transformers.Cache`` whose ``layers`` hold, per model layer, the state that layer's ``init_cache`` made
    (Mamba-2 conv/SSM states, attention keys/values, the chunk encoder's pending tail and chunk memory store;
    None for layers that keep nothing).

    Made by the model on ``model(input_ids, use_cache=True)`` (or here, for a model of ``config``: ``layers``
    default to the config's layer plan, built on the meta device only to ask each for its state) and passed
    back as ``cache`` (``past_key_values`` in older transformers).
    """

    def __init__(self, config, batch_size: int, device: torch.device, dtype: torch.dtype, offload: bool = False,
                 layers: Sequence[RambaLayer] | None = None):
        if layers is None:
            with torch.device("meta"):
                layers = [build_layer(kind, config, i) for i, kind in enumerate(config.layer_plan())]
        chunk_store = functools.partial(ChunkMemoryStore, offload=offload)
        super().__init__(layers=[layer.init_cache(batch_size, device, dtype, chunk_store=chunk_store) for layer in layers])
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
        raise NotImplementedError("RambaCache: reordering, cropping, resetting or resizing a cache is not supported "
                                  "(beam search, assisted decoding); use greedy or sampled decoding")

    reorder_cache = crop = reset = batch_repeat_interleave = batch_select_indices = _unsupported
