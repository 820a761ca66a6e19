"""Functions on tensors: hierarchical sparse attention, chunk selection, causal attention, the SSD scan, the LM head's
cross-entropy."""

from ramba.ops.attention import causal_attention
from ramba.ops.hsa import hsa
from ramba.ops.loss import linear_cross_entropy
from ramba.ops.retrieval import select_chunks
from ramba.ops.ssd import ssd, ssd_step

__all__ = ["hsa", "select_chunks", "causal_attention", "ssd", "ssd_step", "linear_cross_entropy"]
