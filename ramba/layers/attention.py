"""Softmax attention layers: causal / sliding-window self-attention, native sparse attention (the NSA
baseline) and the transformer block."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ramba.layers.base import LayerContext, RambaLayer
from ramba.layers.mlp import SwiGLU
from ramba.layers.norm import RMSNorm
from ramba.layers.rotary import apply_rotary, rotary_cos_sin
from ramba.ops.attention import causal_attention
from ramba.ops.nsa import nsa


@dataclass
class KVCache:
    """Rotated keys and values of past positions for one attention layer (all, or the last ``window - 1``)."""

    k: torch.Tensor | None = None  # [B, L, H, D]
    v: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new ``k, v [B, T, H, D]``; return past + new, keep what later positions can still see."""
        if self.k is not None:
            k, v = torch.cat((self.k, k), dim=1), torch.cat((self.v, v), dim=1)
        keep = k.shape[1] if window is None else min(k.shape[1], window - 1)
        self.k, self.v = k[:, k.shape[1] - keep :], v[:, v.shape[1] - keep :]
        return k, v


class Attention(nn.Module):
    """Multi-head attention with rotary positions and grouped KV heads.

    ``causal=True``: causal attention, limited to the last ``window`` positions when ``window`` is set.
    ``causal=False``: bidirectional attention over the whole input (used inside a chunk).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        window: int | None = None,
        causal: bool = True,
        rope_theta: float = 10000.0,
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.window, self.causal, self.rope_theta = window, causal, rope_theta
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, T, d]``, ``positions [T]`` -> rotated q ``[B, T, HQ, D]``, k and v ``[B, T, H, D]``."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q ``[B, T, HQ, D]`` against k, v ``[B, Tk, H, D]`` (the last T keys are the queries' own) -> ``[B, T, d]``."""
        if self.causal:
            o = causal_attention(q, k, v, self.window)
        else:
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=self.n_heads != self.n_kv_heads
            ).transpose(1, 2)
        return self.o_proj(o.reshape(*q.shape[:2], self.n_heads * self.head_dim))

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """``x [B, T, d]`` -> ``[B, T, d]``; positions ``[T]`` default ``arange(T)``; ``cache`` holds the
        past positions' keys and values and is extended in place."""
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)
        q, k, v = self.project(x, positions)
        if cache is not None:
            k, v = cache.extend(k, v, self.window)
        return self.attend(q, k, v)


class NativeSparseAttention(Attention):
    """NSA (Yuan et al., 2025): compressed, selected and sliding-window branches mixed by per-head sigmoid gates,
    the ``mamba2-nsa`` baseline's layer in place of HSA (see :mod:`ramba.ops.nsa`; fla's kernels on CUDA).

    Blocks of ``block_size`` tokens, ``topk`` selected per token, a sliding window of ``window`` tokens.
    Full forwards only: there is no cache for decoding.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        block_size: int,
        topk: int,
        window: int,
        rope_theta: float = 10000.0,
    ):
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, window=window, causal=True, rope_theta=rope_theta)
        self.block_size, self.topk = block_size, topk
        self.g_proj = nn.Linear(d_model, 3 * n_heads, bias=False)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """``x [B, T, d]`` -> ``[B, T, d]``; ``positions [T]`` must be ``0 .. T-1`` (the default)."""
        if cache is not None:
            raise ValueError(
                "NativeSparseAttention: the NSA baseline has no cache; run full forwards (use_cache=False)"
            )
        B, T, _ = x.shape
        q, k, v = self.project(x, torch.arange(T, device=x.device) if positions is None else positions)
        g_cmp, g_slc, g_swa = torch.sigmoid(self.g_proj(x)).view(B, T, self.n_heads, 3).unbind(-1)
        o = nsa(q, k, v, g_cmp, g_slc, self.topk, self.block_size)
        o = o + g_swa[..., None] * causal_attention(q, k, v, self.window)
        return self.o_proj(o.reshape(B, T, self.n_heads * self.head_dim))


class AttentionBlock(RambaLayer):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

    Layer kind ``"attention"`` (full causal attention, the transformer baseline; docs/design.md §3); also the
    bidirectional block inside the chunk encoder. Its cache state is a :class:`KVCache` of the rotated keys and
    values ``[B, L, H, D]`` of all past positions (the last ``window - 1`` for sliding windows).
    """

    kind = "attention"
    sliding = False  # from_config: a window of config.window positions

    def __init__(
        self, d_model: int, attention: Attention, mlp_hidden: int, eps: float = 1e-5, layer_idx: int | None = None
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(d_model, eps=eps)
        self.attn = attention
        self.mlp_norm = RMSNorm(d_model, eps=eps)
        self.mlp = SwiGLU(d_model, mlp_hidden)

    @classmethod
    def from_config(cls, config, layer_idx: int) -> AttentionBlock:
        c = config
        attention = Attention(
            c.d_model,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            window=c.window if cls.sliding else None,
            rope_theta=c.rope_theta,
        )
        return cls(
            d_model=c.d_model, attention=attention, mlp_hidden=c.mlp_hidden, eps=c.rms_norm_eps, layer_idx=layer_idx
        )

    def init_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype, chunk_store=None) -> KVCache:
        return KVCache()

    def forward(self, hidden: torch.Tensor, ctx: LayerContext) -> tuple[torch.Tensor, LayerContext]:
        """``hidden [B, T, d]`` at ``ctx.positions [T]`` -> ``[B, T, d]``; extends this layer's KV cache."""
        hidden = hidden + self.attn(self.attn_norm(hidden), ctx.positions, ctx.state(self.layer_idx))
        return hidden + self.mlp(self.mlp_norm(hidden)), ctx


class SlidingWindowBlock(AttentionBlock):
    """Layer kind ``"swa"``: :class:`AttentionBlock` with causal attention over the last ``config.window`` positions
    (the SWA local mixer and the ``mamba2-swa`` baseline)."""

    kind = "swa"
    sliding = True


class NativeSparseAttentionBlock(AttentionBlock):
    """Layer kind ``"nsa"``: :class:`AttentionBlock` with :class:`NativeSparseAttention` (the ``mamba2-nsa``
    baseline: blocks of ``chunk_size``, ``topk`` of them, a window of ``window`` tokens). No cached decoding."""

    kind = "nsa"

    @classmethod
    def from_config(cls, config, layer_idx: int) -> NativeSparseAttentionBlock:
        c = config
        attention = NativeSparseAttention(
            c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.chunk_size, c.topk, c.window, c.rope_theta
        )
        return cls(
            d_model=c.d_model, attention=attention, mlp_hidden=c.mlp_hidden, eps=c.rms_norm_eps, layer_idx=layer_idx
        )

    def init_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype, chunk_store=None):
        raise ValueError(
            "RambaCache: the NSA baseline (architecture 'mamba2-nsa') has no cached decoding; "
            "call the model on whole sequences without use_cache or a cache"
        )
