"""Serving RAMba: segmented prefill (exact or fast), decoding, chunk memory offloaded to CPU."""
from ramba.inference.generation import PREFILL_MODES, generate, prefill, prefill_progress
from ramba.model.cache import ChunkMemoryStore, RambaCache

__all__ = ["prefill", "prefill_progress", "generate", "RambaCache", "ChunkMemoryStore", "PREFILL_MODES"]
