"""Functions on tensors: hierarchical sparse attention, chunk selection, the SSD scan."""
from ramba.ops.hsa import hsa

__all__ = ["hsa"]
