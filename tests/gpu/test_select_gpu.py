"""Chunk selection with landmarks in pinned host memory and the query on the GPU (the offloaded decode path)
against the CPU reference: the same chunks (tests/ops/test_retrieval_topk.py covers the CPU paths)."""

import pytest
import torch

from ramba.ops.retrieval import select_chunks, select_chunks_naive

pytestmark = pytest.mark.gpu


def test_host_landmarks_with_device_query():
    g = torch.Generator().manual_seed(5)
    B, T, R, Dr, K, S, C = 1, 3, 1, 32, 8, 16, 5000
    lm = torch.randn(B, C, R, Dr, generator=g).bfloat16().pin_memory()
    q = torch.randn(B, T, R, Dr, generator=g)
    positions = torch.tensor([C * S - 1, C * S, C * S + 1])
    kw = dict(chunk_size=S, topk=K)
    ref_idx, ref_w = select_chunks_naive(q, lm, positions=positions, **kw)
    for block_chunks in (333, None):
        idx, w = select_chunks(q.cuda(), lm, positions=positions.cuda(), block_chunks=block_chunks, **kw)
        assert torch.equal(idx.cpu(), ref_idx)
        torch.testing.assert_close(w.cpu(), ref_w, atol=1e-5, rtol=1e-4)
