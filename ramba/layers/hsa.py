"""The layers around HSA: the chunk encoder, the retrieval layer and the HSA layer (DESIGN §3)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ramba.layers.attention import Attention, AttentionBlock
from ramba.layers.mlp import SwiGLU
from ramba.layers.norm import RMSNorm
from ramba.ops.hsa import hsa
from ramba.ops.retrieval import select_chunks


class ChunkMemory(NamedTuple):
    """What the chunk encoder writes for the HSA layers above it."""

    k: torch.Tensor  # [B, C*S, H, D]
    v: torch.Tensor  # [B, C*S, H, D]
    landmarks: torch.Tensor  # [B, C, R, Dr]


class ChunkSelection(NamedTuple):
    """What a retrieval layer writes for the HSA layers of its group."""

    indices: torch.Tensor  # [B, T, R, K] int64
    weights: torch.Tensor  # [B, T, R, K] float32


class ChunkEncoder(nn.Module):
    """Encodes each complete chunk of hidden states into its memory ``k, v`` and its landmark.

    A small bidirectional transformer runs inside every chunk (rotary positions 0..S-1, a learned CLS
    vector appended at position S); the token outputs give ``k, v`` and the CLS output gives the landmark.
    """

    def __init__(
        self,
        d_model: int,
        chunk_size: int,
        n_layers: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        retrieval_heads: int,
        retrieval_dim: int,
        mlp_hidden: int,
        eps: float = 1e-5,
        rope_theta: float = 10000.0,
    ):
        super().__init__()
        self.chunk_size, self.n_kv_heads, self.head_dim = chunk_size, n_kv_heads, head_dim
        self.retrieval_heads, self.retrieval_dim = retrieval_heads, retrieval_dim
        enc_heads = max(1, d_model // 64)
        self.cls = nn.Parameter(torch.zeros(d_model))
        self.layers = nn.ModuleList(
            AttentionBlock(
                d_model,
                Attention(d_model, enc_heads, enc_heads, d_model // enc_heads, causal=False, rope_theta=rope_theta),
                mlp_hidden,
                eps,
            )
            for _ in range(n_layers)
        )
        self.norm = RMSNorm(d_model, eps=eps)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.landmark_proj = nn.Linear(d_model, retrieval_heads * retrieval_dim, bias=False)

    def encode(self, chunks: torch.Tensor) -> ChunkMemory:
        """``chunks [B, C, S, d]`` (complete chunks) -> their :class:`ChunkMemory`."""
        B, C, S, d = chunks.shape
        x = chunks.reshape(B * C, S, d)
        x = torch.cat((x, self.cls.to(x.dtype).expand(B * C, 1, d)), dim=1)
        positions = torch.arange(S + 1, device=x.device)
        for layer in self.layers:
            x = layer(x, positions)
        x = self.norm(x)
        k = self.k_proj(x[:, :S]).reshape(B, C * S, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x[:, :S]).reshape(B, C * S, self.n_kv_heads, self.head_dim)
        landmarks = self.landmark_proj(x[:, S]).reshape(B, C, self.retrieval_heads, self.retrieval_dim)
        return ChunkMemory(k, v, landmarks)

    def forward(self, hidden: torch.Tensor) -> ChunkMemory:
        """``hidden [B, T, d]`` -> memory of its ``T // S`` complete chunks (the tail is left to the local mixer)."""
        B, T, d = hidden.shape
        C = T // self.chunk_size
        return self.encode(hidden[:, : C * self.chunk_size].reshape(B, C, self.chunk_size, d))


class RetrievalLayer(nn.Module):
    """``q_r = Linear(RMSNorm(x))``, then the top-K chunks and their weights (shared by an HSA group)."""

    def __init__(self, d_model: int, retrieval_heads: int, retrieval_dim: int, chunk_size: int, topk: int,
                 weight_norm: str = "stick_breaking", eps: float = 1e-5):
        super().__init__()
        self.retrieval_heads, self.retrieval_dim = retrieval_heads, retrieval_dim
        self.chunk_size, self.topk, self.weight_norm = chunk_size, topk, weight_norm
        self.norm = RMSNorm(d_model, eps=eps)
        self.q_proj = nn.Linear(d_model, retrieval_heads * retrieval_dim, bias=False)

    def queries(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [B, T, d]`` -> the retrieval queries ``q_r [B, T, R, Dr]``."""
        B, T, _ = hidden.shape
        return self.q_proj(self.norm(hidden)).view(B, T, self.retrieval_heads, self.retrieval_dim)

    def forward(self, hidden: torch.Tensor, landmarks: torch.Tensor, positions: torch.Tensor | None = None) -> ChunkSelection:
        """``hidden [B, T, d]``, ``landmarks [B, C, R, Dr]``, ``positions [T]`` -> :class:`ChunkSelection`."""
        q_r = self.queries(hidden)
        indices, weights = select_chunks(q_r, landmarks, self.chunk_size, self.topk, positions, self.weight_norm)
        return ChunkSelection(indices, weights)


class HSALayer(nn.Module):
    """``x + o_proj(hsa(q_proj(RMSNorm(x)), k, v, weights, indices))``, optionally followed by an MLP sub-block."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, chunk_size: int,
                 sm_n: float = 0.0, mlp_hidden: int | None = None, eps: float = 1e-5):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.chunk_size, self.sm_n = chunk_size, sm_n
        self.norm = RMSNorm(d_model, eps=eps)
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.mlp_norm = RMSNorm(d_model, eps=eps) if mlp_hidden else None
        self.mlp = SwiGLU(d_model, mlp_hidden) if mlp_hidden else None

    def forward(self, hidden: torch.Tensor, memory: ChunkMemory | None, selection: ChunkSelection | None) -> torch.Tensor:
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
