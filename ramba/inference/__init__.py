"""Serving RAMba: segmented prefill (exact or fast), decoding, chunk memory offloaded to CPU."""
from ramba.inference.generation import PREFILL_MODES, generate, prefill
from ramba.model.cache import ChunkMemoryStore, RambaCache

__all__ = ["prefill", "generate", "RambaCache", "ChunkMemoryStore", "PREFILL_MODES"]
