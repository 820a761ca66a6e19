"""Modules built from the ops: Mamba-2, attention, the chunk encoder, retrieval and HSA layers.

Every model layer is a :class:`RambaLayer` registered under its kind (docs/design.md §3). Each module of this
package is imported here, so a layer kind in a new module registers itself without any other edit.
"""

import importlib
import pkgutil

from ramba.layers.attention import (
    Attention,
    AttentionBlock,
    KVCache,
    NativeSparseAttention,
    NativeSparseAttentionBlock,
    SlidingWindowBlock,
)
from ramba.layers.base import LAYER_CLASSES, ChunkMemory, ChunkSelection, LayerContext, RambaLayer, build_layer
from ramba.layers.hsa import ChunkEncoder, ChunkEncoderState, HSALayer, RetrievalLayer
from ramba.layers.mamba2 import Mamba2Block, Mamba2Mixer, Mamba2State
from ramba.layers.mlp import SwiGLU
from ramba.layers.norm import GatedRMSNorm, RMSNorm

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Attention",
    "AttentionBlock",
    "KVCache",
    "NativeSparseAttention",
    "NativeSparseAttentionBlock",
    "SlidingWindowBlock",
    "LAYER_CLASSES",
    "ChunkMemory",
    "ChunkSelection",
    "LayerContext",
    "RambaLayer",
    "build_layer",
    "ChunkEncoder",
    "ChunkEncoderState",
    "HSALayer",
    "RetrievalLayer",
    "Mamba2Block",
    "Mamba2Mixer",
    "Mamba2State",
    "SwiGLU",
    "GatedRMSNorm",
    "RMSNorm",
]
