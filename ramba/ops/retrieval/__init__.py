"""Chunk selection (docs/design.md §2): ``from ramba.ops.retrieval import select_chunks``.

``select_chunks`` runs the streaming implementation (memory O(T·K), any device);
``select_chunks_naive`` is its readable reference, ``chunk_scores`` the scores it ranks,
``retrieval_target_loss`` the training loss on them (docs/design.md §6), ``scores_target_loss`` the same loss
from any chunk scores.
``stick_breaking_weights`` and ``softmax_weights`` are the slot-weight normalisers, shared with the
model's layers.
"""

from ramba.ops.retrieval.naive import (
    NORMS,
    chunk_scores,
    retrieval_target_loss,
    scores_target_loss,
    select_chunks_naive,
    softmax_weights,
    stick_breaking_weights,
)
from ramba.ops.retrieval.streaming import select_chunks_streaming as select_chunks

__all__ = [
    "select_chunks",
    "select_chunks_naive",
    "chunk_scores",
    "retrieval_target_loss",
    "scores_target_loss",
    "stick_breaking_weights",
    "softmax_weights",
    "NORMS",
]
