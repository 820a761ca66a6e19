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


@pytest.mark.parametrize("tf32", [False, True])
def test_sketch_on_the_gpu_selects_the_exact_top_k(tf32, monkeypatch):
    """Decoding through the int8 sketch (CUDA, host landmarks in pinned memory, 300K chunks of the tiny preset's
    width, TF32 and bf16 autocast as a training script may leave them) picks the float64 top-K. (The streaming
    path is no reference under TF32: its float32 scores then carry ~1e-3 relative error.)"""
    from ramba.ops.retrieval.sketch import LandmarkSketch

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    g = torch.Generator().manual_seed(6)
    B, R, Dr, K, S, C = 1, 1, 256, 8, 64, 300_000
    lm = torch.randn(B, C, R, Dr, generator=g).bfloat16().pin_memory()
    sketch = LandmarkSketch(B, R, Dr, lm.dtype, "cuda")
    sketch.append(lm[:, : C // 3])
    sketch.append(lm[:, C // 3 :])
    answered = []
    real = LandmarkSketch.topk
    monkeypatch.setattr(LandmarkSketch, "topk", lambda self, *a: answered.append(real(self, *a)) or answered[-1])
    for trial in range(4):
        q = torch.randn(B, 1 + trial % 2, R, Dr, generator=g)
        positions = torch.full((q.shape[1],), C * S - trial * 1000)
        want_idx, want_w = select_chunks(q.double(), lm.double(), S, K, positions)
        autocast = trial >= 2
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            idx, w = select_chunks(q.cuda(), lm, S, K, positions.cuda(), sketch=sketch)
        assert torch.equal(idx.cpu(), want_idx)
        tol = 2e-2 if autocast else 1e-5  # autocast runs the selected scores' einsum in bf16
        torch.testing.assert_close(w.cpu().double(), want_w, atol=tol, rtol=0)
    assert len(answered) == 4 and all(a is not None for a in answered)
