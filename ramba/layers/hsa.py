"""The layers around HSA: the chunk encoder, the retrieval layer and the HSA layer (docs/design.md §3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ramba.layers.attention import Attention, AttentionBlock
from ramba.layers.base import ChunkMemory, ChunkSelection, LayerContext, RambaLayer
from ramba.layers.mlp import SwiGLU
from ramba.layers.norm import RMSNorm
from ramba.ops.hsa import hsa
from ramba.ops.retrieval import retrieval_target_loss, select_chunks

__all__ = ["ChunkMemory", "ChunkSelection", "ChunkEncoderState", "ChunkEncoder", "RetrievalLayer", "HSALayer"]


@dataclass
class ChunkEncoderState:
    """The chunk encoder's cache state: the hidden states ``[B, P < S, d]`` of the unfinished chunk (None before
    the first forward) and the store of every complete chunk's memory."""

    pending: torch.Tensor | None
    store: Any


class ChunkEncoder(RambaLayer):
    """Encodes each complete chunk of hidden states into its memory ``k, v`` and its landmark.

    A small bidirectional transformer runs inside every chunk (``encoder_heads`` heads of ``d_model //
    encoder_heads`` dims, rotary positions 0..S-1, a learned CLS vector appended at position S); the token
    outputs give ``k, v`` (``n_kv_heads`` heads of ``head_dim``) and the CLS output gives the landmark.

    Layer kind ``"chunk_encoder"``. Without a cache it shares the input's own :class:`ChunkMemory` (``ctx.memory``);
    with one, its state is a :class:`ChunkEncoderState`: complete chunks go to the store (``ctx.store``), the
    tail waits in ``pending`` for the tokens that complete it.
    """

    kind = "chunk_encoder"

    def __init__(
        self,
        d_model: int,
        chunk_size: int,
        n_layers: int,
        encoder_heads: int,
        n_kv_heads: int,
        head_dim: int,
        retrieval_heads: int,
        retrieval_dim: int,
        mlp_hidden: int,
        eps: float = 1e-5,
        rope_theta: float = 10000.0,
        layer_idx: int | None = None,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.chunk_size, self.n_kv_heads, self.head_dim = chunk_size, n_kv_heads, head_dim
        self.retrieval_heads, self.retrieval_dim = retrieval_heads, retrieval_dim
        self.cls = nn.Parameter(torch.zeros(d_model))
        enc_dim = d_model // encoder_heads
        self.layers = nn.ModuleList(
            AttentionBlock(
                d_model,
                Attention(d_model, encoder_heads, encoder_heads, enc_dim, causal=False, rope_theta=rope_theta),
                mlp_hidden,
                eps,
            )
            for _ in range(n_layers)
        )
        self.norm = RMSNorm(d_model, eps=eps)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.landmark_proj = nn.Linear(d_model, retrieval_heads * retrieval_dim, bias=False)

    @classmethod
    def from_config(cls, config, layer_idx: int) -> ChunkEncoder:
        c = config
        return cls(
            d_model=c.d_model,
            chunk_size=c.chunk_size,
            n_layers=c.encoder_layers,
            encoder_heads=c.encoder_heads,
            n_kv_heads=c.n_kv_heads,
            head_dim=c.head_dim,
            retrieval_heads=c.retrieval_heads,
            retrieval_dim=c.retrieval_dim,
            mlp_hidden=c.mlp_hidden,
            eps=c.rms_norm_eps,
            rope_theta=c.rope_theta,
            layer_idx=layer_idx,
        )

    def init_cache(
        self, batch_size: int, device: torch.device, dtype: torch.dtype, chunk_store=None
    ) -> ChunkEncoderState:
        if chunk_store is None:
            raise ValueError("ChunkEncoder.init_cache: needs chunk_store, the maker of the chunk memory store")
        store = chunk_store(
            batch_size,
            self.chunk_size,
            self.n_kv_heads,
            self.head_dim,
            self.retrieval_heads,
            self.retrieval_dim,
            dtype,
            device,
        )
        return ChunkEncoderState(pending=None, store=store)

    def encode(self, chunks: torch.Tensor) -> ChunkMemory:
        """``chunks [B, C, S, d]`` (complete chunks) -> their :class:`ChunkMemory`."""
        B, C, S, d = chunks.shape
        x = chunks.reshape(B * C, S, d)
        x = torch.cat((x, self.cls.to(x.dtype).expand(B * C, 1, d)), dim=1)
        inside = LayerContext(positions=torch.arange(S + 1, device=x.device))
        for layer in self.layers:
            x, _ = layer(x, inside)
        x = self.norm(x)
        k = self.k_proj(x[:, :S]).reshape(B, C * S, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x[:, :S]).reshape(B, C * S, self.n_kv_heads, self.head_dim)
        landmarks = self.landmark_proj(x[:, S]).reshape(B, C, self.retrieval_heads, self.retrieval_dim)
        return ChunkMemory(k, v, landmarks)

    def complete_chunks(self, hidden: torch.Tensor) -> ChunkMemory:
        """``hidden [B, T, d]`` -> memory of its ``T // S`` complete chunks (the tail is left to the local mixer)."""
        B, T, d = hidden.shape
        C = T // self.chunk_size
        return self.encode(hidden[:, : C * self.chunk_size].reshape(B, C, self.chunk_size, d))

    def forward(self, hidden: torch.Tensor, ctx: LayerContext) -> tuple[torch.Tensor, LayerContext]:
        """Leaves ``hidden [B, T, d]`` as it is; shares the chunk memory (see the class docstring)."""
        state = ctx.state(self.layer_idx)
        if state is None:
            return hidden, ctx.replace(memory=self.complete_chunks(hidden))
        # complete chunks from the pending tail plus the new tokens go to the memory store
        full = hidden if state.pending is None else torch.cat((state.pending, hidden), dim=1)
        n = full.shape[1] // self.chunk_size * self.chunk_size
        if n:  # CUDA's SDPA returns None, not an empty tensor, for an empty batch of chunks
            state.store.append(self.complete_chunks(full[:, :n]))
        state.pending = full[:, n:]
        return hidden, ctx.replace(store=state.store)


class RetrievalLayer(RambaLayer):
    """``q_r = Linear(RMSNorm(x))``, then the top-K chunks and their weights (shared by an HSA group).

    Layer kind ``"retrieval"``; no cache state of its own. It shares its :class:`ChunkSelection` as
    ``ctx.selection`` and, with a cache, the selected chunks fetched from the store as ``ctx.memory`` (when one
    fetch serves the whole input; else ``ctx.memory`` is None and the HSA layers fetch block by block). With
    ``ctx.retrieval_targets`` (training, no cache) it adds its retrieval loss to ``ctx.retrieval_losses``.
    """

    kind = "retrieval"

    def __init__(
        self,
        d_model: int,
        retrieval_heads: int,
        retrieval_dim: int,
        chunk_size: int,
        topk: int,
        weight_norm: str = "stick_breaking",
        eps: float = 1e-5,
        layer_idx: int | None = None,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.retrieval_heads, self.retrieval_dim = retrieval_heads, retrieval_dim
        self.chunk_size, self.topk, self.weight_norm = chunk_size, topk, weight_norm
        self.norm = RMSNorm(d_model, eps=eps)
        self.q_proj = nn.Linear(d_model, retrieval_heads * retrieval_dim, bias=False)

    @classmethod
    def from_config(cls, config, layer_idx: int) -> RetrievalLayer:
        c = config
        return cls(
            d_model=c.d_model,
            retrieval_heads=c.retrieval_heads,
            retrieval_dim=c.retrieval_dim,
            chunk_size=c.chunk_size,
            topk=c.topk,
            weight_norm=c.weight_norm,
            eps=c.rms_norm_eps,
            layer_idx=layer_idx,
        )

    def queries(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [B, T, d]`` -> the retrieval queries ``q_r [B, T, R, Dr]``."""
        B, T, _ = hidden.shape
        return self.q_proj(self.norm(hidden)).view(B, T, self.retrieval_heads, self.retrieval_dim)

    def select(
        self, q_r: torch.Tensor, landmarks: torch.Tensor, positions: torch.Tensor | None = None, sketch=None
    ) -> ChunkSelection:
        """``q_r [B, T, R, Dr]`` (:meth:`queries`), ``landmarks [B, C, R, Dr]``, ``positions [T]`` (None: 0 .. T-1)
        -> :class:`ChunkSelection` (``sketch``: the store's landmark sketch for decoding, see ``select_chunks``)."""
        indices, weights = select_chunks(
            q_r, landmarks, self.chunk_size, self.topk, positions, self.weight_norm, sketch=sketch
        )
        return ChunkSelection(indices, weights)

    def forward(self, hidden: torch.Tensor, ctx: LayerContext) -> tuple[torch.Tensor, LayerContext]:
        """Leaves ``hidden [B, T, d]`` as it is; shares the selection (see the class docstring)."""
        if ctx.skip_hsa:
            return hidden, ctx
        store = ctx.store
        if store is None:
            # without a cache the positions are 0 .. T-1, select_chunks' default, which it bounds without a sync
            q_r, landmarks = self.queries(hidden), ctx.memory.landmarks
            ctx = ctx.replace(selection=self.select(q_r, landmarks))
            if ctx.retrieval_targets is not None:
                loss = retrieval_target_loss(q_r, landmarks, ctx.retrieval_targets, self.chunk_size)
                ctx = ctx.replace(retrieval_losses=(*ctx.retrieval_losses, loss))
            return hidden, ctx
        sketch = store.landmark_sketch(hidden.shape[1])
        selection = self.select(self.queries(hidden), store.landmarks, ctx.positions, sketch)
        if store.fetch_tokens(selection) >= hidden.shape[1]:  # one fetch serves every HSA layer of the group
            memory, selection = store.fetch(selection)
            return hidden, ctx.replace(memory=memory, selection=selection)
        return hidden, ctx.replace(memory=None, selection=selection)


class HSALayer(RambaLayer):
    """``x + o_proj(hsa(q_proj(RMSNorm(x)), k, v, weights, indices))``, optionally followed by an MLP sub-block.

    Layer kind ``"hsa"``; no cache state of its own: it reads ``ctx.memory`` and ``ctx.selection`` (or, when the
    retrieval layer left ``ctx.memory`` None, fetches from ``ctx.store`` block by block).
    """

    kind = "hsa"

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        chunk_size: int,
        sm_n: float = 0.0,
        mlp_hidden: int | None = None,
        eps: float = 1e-5,
        layer_idx: int | None = None,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.chunk_size, self.sm_n = chunk_size, sm_n
        self.norm = RMSNorm(d_model, eps=eps)
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.mlp_norm = RMSNorm(d_model, eps=eps) if mlp_hidden else None
        self.mlp = SwiGLU(d_model, mlp_hidden) if mlp_hidden else None

    @classmethod
    def from_config(cls, config, layer_idx: int) -> HSALayer:
        c = config
        return cls(
            d_model=c.d_model,
            n_heads=c.n_heads,
            n_kv_heads=c.n_kv_heads,
            head_dim=c.head_dim,
            chunk_size=c.chunk_size,
            sm_n=c.sm_n,
            mlp_hidden=c.mlp_hidden if c.hsa_mlp else None,
            eps=c.rms_norm_eps,
            layer_idx=layer_idx,
        )

    def attend(
        self, hidden: torch.Tensor, memory: ChunkMemory | None, selection: ChunkSelection | None
    ) -> torch.Tensor:
        """``hidden [B, T, d]`` -> ``[B, T, d]``. A token with no visible chunk gets only the residual (and MLP);
        ``memory=None`` skips the attention term for every token (fast prefill)."""
        B, T, _ = hidden.shape
        if memory is not None and memory.k.shape[1] > 0:
            q = self.q_proj(self.norm(hidden)).view(B, T, self.n_heads, self.head_dim)
            indices, weights = selection
            if indices.shape[2] != self.n_kv_heads:  # one retrieval head shared by every kv head
                indices = indices.expand(-1, -1, self.n_kv_heads, -1)
                weights = weights.expand(-1, -1, self.n_kv_heads, -1)
            o = hsa(q, memory.k.to(q.dtype), memory.v.to(q.dtype), weights, indices, self.chunk_size, sm_n=self.sm_n)
            hidden = hidden + self.o_proj(o.reshape(B, T, -1))
        if self.mlp is not None:
            hidden = hidden + self.mlp(self.mlp_norm(hidden))
        return hidden

    def forward(self, hidden: torch.Tensor, ctx: LayerContext) -> tuple[torch.Tensor, LayerContext]:
        """``hidden [B, T, d]`` -> ``[B, T, d]`` (see :meth:`attend`)."""
        if ctx.skip_hsa:
            return self.attend(hidden, None, None), ctx
        if ctx.memory is None and ctx.store is not None:
            return self.attend_over_store(hidden, ctx.store, ctx.selection), ctx
        return self.attend(hidden, ctx.memory, ctx.selection), ctx

    def attend_over_store(self, hidden: torch.Tensor, store, selection: ChunkSelection) -> torch.Tensor:
        """:meth:`attend` over a cache's chunk memory store, one block of ``store.fetch_tokens`` tokens at a time:
        each block gathers only the chunks it selected (the next one prefetched meanwhile, see
        ``ChunkMemoryStore.fetch_blocks``). HSA acts on each token alone, so the blocks give exactly the output of
        one call."""
        blocks = store.fetch_blocks(selection)
        outputs = [self.attend(hidden[:, t0:t1], memory, block) for t0, t1, memory, block in blocks]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
