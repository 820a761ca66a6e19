"""Serving RAMba: segmented prefill (exact or fast), decoding, chunk memory offloaded to CPU."""

from ramba.inference.generation import PREFILL_MODES, generate, prefill, prefill_progress
from ramba.inference.planner import MemoryPlan, MemoryPlanError, plan_memory
from ramba.model.cache import RambaCache
from ramba.model.chunk_store import ChunkMemoryStore, Offload, OffloadError

__all__ = [
    "prefill",
    "prefill_progress",
    "generate",
    "RambaCache",
    "ChunkMemoryStore",
    "Offload",
    "OffloadError",
    "PREFILL_MODES",
    "plan_memory",
    "MemoryPlan",
    "MemoryPlanError",
]
