"""select_chunks' running top-K (integer keys, topk merges) against select_chunks_naive: random shapes, ties,
special scores, host landmarks."""

import math
import random

import pytest
import torch

from ramba.ops.retrieval import select_chunks, select_chunks_naive
from ramba.ops.retrieval.streaming import _order_bits


def _same(q, lm, block_chunks=None, block_tokens=None, **kw):
    """Streaming and reference selections: equal indices, close weights (NaN where the other has NaN)."""
    idx, w = select_chunks(q, lm, block_chunks=block_chunks, block_tokens=block_tokens, **kw)
    ref_idx, ref_w = select_chunks_naive(q, lm, **kw)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=1e-5, equal_nan=True)
    return idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(12))
def test_random_shapes_small_blocks_match_reference(dtype, seed):
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B, R, K, S = rnd.randint(1, 2), rnd.randint(1, 2), rnd.randint(1, 9), rnd.choice([4, 16, 64])
    T, C, Dr = rnd.randint(1, 300), rnd.choice([0, 1, 7, rnd.randint(1, 5000)]), rnd.choice([8, 32, 64])
    q = torch.randn(B, T, R, Dr, generator=g, dtype=dtype)
    lm = torch.randn(B, C, R, Dr, generator=g, dtype=dtype)
    kw = dict(chunk_size=S, topk=K)
    if seed % 2:  # decoding-like: a few tokens far into the context, per batch row
        kw["positions"] = torch.randint(-5, C * S + 20, (B, T), generator=g)
    for block_chunks, block_tokens in ((rnd.randint(1, 40), rnd.randint(1, 50)), (None, None)):
        _same(q, lm, block_chunks, block_tokens, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block_chunks", [1, 3, 16, None])
def test_ties_match_reference(dtype, block_chunks):
    g = torch.Generator().manual_seed(1)
    B, T, R, Dr, S, K, C = 2, 70, 2, 4, 2, 5, 35
    # three distinct rows repeated: exact small-integer scores, many ties
    base = torch.randint(-2, 3, (B, 3, R, Dr), generator=g).to(dtype)
    lm = base[:, torch.randint(0, 3, (C,), generator=g)]
    q = torch.randint(-2, 3, (B, T, R, Dr), generator=g).to(dtype)
    _same(q, lm, block_chunks, 9, chunk_size=S, topk=K)
    # all scores equal: the K most recent visible chunks
    idx = _same(
        torch.ones(B, T, R, Dr, dtype=dtype),
        torch.ones(B, C, R, Dr, dtype=dtype),
        block_chunks,
        9,
        chunk_size=S,
        topk=K,
    )
    n_vis = torch.arange(T) // S
    expected = (n_vis[:, None] - 1 - torch.arange(K)).clamp_min(0)
    assert torch.equal(idx, expected[None, :, None, :].expand(B, T, R, K))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_signed_zero_scores_tie(dtype):
    # q = 0: scores are +0.0 or -0.0 by the landmark's sign; equal scores, so the most recent chunks win
    g = torch.Generator().manual_seed(2)
    lm = torch.randn(1, 50, 1, 1, generator=g, dtype=dtype)
    q = torch.zeros(1, 1, 1, 1, dtype=dtype)
    scores = (q * lm).flatten()
    assert torch.signbit(scores).any() and not torch.signbit(scores).all()
    idx = _same(q, lm, 7, None, chunk_size=1, topk=4, positions=torch.tensor([50]))
    assert idx.flatten().tolist() == [49, 48, 47, 46]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_and_infinite_scores(dtype):
    # NaN ranks above +inf (as torch.sort ranks it), NaNs tie among themselves; a visible -inf still beats
    # every invisible chunk
    vals = [1.0, math.nan, -math.inf, math.inf, -math.nan, 2.0, -math.inf, -math.inf, 5.0, math.nan]
    lm = torch.tensor(vals, dtype=dtype).view(1, 10, 1, 1)
    q = torch.ones(1, 1, 1, 1, dtype=dtype)
    for pos, expected in ((10, [9, 4, 3, 1]), (8, [7, 6, 5, 4, 3, 1, 0]), (3, [2, 1, 0])):
        for block_chunks in (1, 2, 4, None):
            idx = _same(q, lm, block_chunks, None, chunk_size=1, topk=len(expected), positions=torch.tensor([pos]))
            assert idx.flatten().tolist() == expected
    # NaN payloads other than the default NaN still tie
    payload = torch.tensor([1.0, 1.0, 1.0], dtype=dtype)
    bits = payload.view(torch.int32 if dtype == torch.float32 else torch.int64)
    bits[:] = torch.tensor(
        [0x7FC00001, 0x7FC00000, 0x7FC00003]
        if dtype == torch.float32
        else [0x7FF8000000000003, 0x7FF8000000000001, 0x7FF8000000000000]
    )
    assert torch.isnan(payload).all()
    idx = _same(q, payload.view(1, 3, 1, 1), 1, None, chunk_size=1, topk=2, positions=torch.tensor([3]))
    assert idx.flatten().tolist() == [2, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_order_bits_rank_like_a_stable_sort(dtype):
    g = torch.Generator().manual_seed(3)
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 1e-45, -1e-45, 1e-310, -1e-310])
    s = torch.cat([torch.randn(200, generator=g) * 10.0 ** torch.randint(-40, 40, (200,), generator=g), special])
    s = s.to(dtype)[torch.randperm(210, generator=g)]
    s = torch.cat([s, s[:50]])  # duplicates
    key = _order_bits(s)
    assert key.dtype == (torch.int32 if dtype == torch.float32 else torch.int64)
    # same strict order and same ties as the float comparison torch.sort uses (NaN largest)
    rank = torch.where(torch.isnan(s), math.inf, s)
    nan = torch.isnan(s)
    greater = (rank[:, None] > rank[None, :]) | (nan[:, None] & ~nan[None, :])
    equal = (rank[:, None] == rank[None, :]) & (nan[:, None] == nan[None, :])
    assert torch.equal(key[:, None] > key[None, :], greater)
    assert torch.equal(key[:, None] == key[None, :], equal)
    assert int(key.min()) > torch.iinfo(key.dtype).min


@pytest.mark.parametrize("lm_dtype", [torch.bfloat16, torch.float32])
def test_host_landmarks_decode(lm_dtype):
    # decoding: a float32 query on the CPU, low-precision host landmarks converted block by block
    g = torch.Generator().manual_seed(4)
    B, R, Dr, K, S, C = 2, 2, 64, 8, 16, 3000
    lm = torch.randn(B, C, R, Dr, generator=g).to(lm_dtype)
    q = torch.randn(B, 1, R, Dr, generator=g)
    positions = torch.tensor([[C * S + 3], [1234 * S]])
    for block_chunks in (97, None):
        _same(q, lm, block_chunks, None, chunk_size=S, topk=K, positions=positions)


def test_selection_under_bf16_autocast_matches_no_autocast():
    """Autocast (bf16 on a GPU, here on the CPU) must not reach the top-K keys: same chunks, weights to bf16 rounding."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 300, 2, 16, generator=g).bfloat16()
    landmarks = torch.randn(2, 300 // 32, 2, 16, generator=g).bfloat16()
    want_idx, want_w = select_chunks(q, landmarks, 32, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx, w = select_chunks(q, landmarks, 32, 4)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(w.float(), want_w.float(), atol=1e-2, rtol=0)
