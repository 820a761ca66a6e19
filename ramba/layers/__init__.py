"""Modules built from the ops: Mamba-2, attention, the chunk encoder, retrieval and HSA layers."""
from ramba.layers.attention import Attention, AttentionBlock, KVCache
from ramba.layers.hsa import ChunkEncoder, ChunkMemory, ChunkSelection, HSALayer, RetrievalLayer
from ramba.layers.mamba2 import Mamba2Block, Mamba2Mixer, Mamba2State
from ramba.layers.mlp import SwiGLU
from ramba.layers.norm import GatedRMSNorm, RMSNorm

__all__ = [
    "Attention", "AttentionBlock", "KVCache", "ChunkEncoder", "ChunkMemory", "ChunkSelection", "HSALayer",
    "RetrievalLayer", "Mamba2Block", "Mamba2Mixer", "Mamba2State", "SwiGLU", "GatedRMSNorm", "RMSNorm",
]
