"""select_chunks (streaming) against select_chunks_naive, and both against hand-computed cases."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ramba.ops.retrieval import select_chunks, select_chunks_naive, softmax_weights, stick_breaking_weights


def _inputs(B, T, C, R, Dr, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, R, Dr, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    lm = torch.randn(B, C, R, Dr, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return q, lm


def _run(fn, q, lm, seed=1, **kw):
    """indices, weights, and the grads of a random projection of the weights w.r.t. q and lm."""
    indices, weights = fn(q, lm, **kw)
    proj = torch.randn(weights.shape, generator=torch.Generator().manual_seed(seed), dtype=weights.dtype)
    dq, dlm = torch.autograd.grad((weights * proj).sum(), [q, lm])
    return indices, weights.detach(), dq, dlm


def _assert_same(a, b, atol=1e-12, rtol=1e-10):
    ia, wa, dqa, dla = a
    ib, wb, dqb, dlb = b
    assert ia.dtype == torch.int64 and ia.shape == ib.shape
    assert torch.equal(ia, ib)
    torch.testing.assert_close(wa, wb, atol=atol, rtol=rtol)
    torch.testing.assert_close(dqa, dqb, atol=atol, rtol=rtol)
    torch.testing.assert_close(dla, dlb, atol=atol, rtol=rtol)


@pytest.mark.parametrize("norm", ["stick_breaking", "softmax"])
@pytest.mark.parametrize("S", [4, 16])
@pytest.mark.parametrize("K", [1, 3, 8])
@pytest.mark.parametrize("R", [1, 2])
@pytest.mark.parametrize("B", [1, 2])
def test_streaming_matches_reference_grid(B, R, K, S, norm):
    T = 5 * S + 3  # C = 5 complete chunks: K = 8 exceeds every visible count, early tokens see none
    C = T // S
    q, lm = _inputs(B, T, C, R, Dr=8, seed=B * 100 + R * 10 + K + S)
    kw = dict(chunk_size=S, topk=K, norm=norm)
    ref = _run(select_chunks_naive, q, lm, **kw)
    out = _run(select_chunks, q, lm, block_chunks=2, block_tokens=7, **kw)
    _assert_same(out, ref)
    valid_count = (ref[1] > 0).sum(-1)  # every valid slot has a positive weight
    expected = (torch.arange(T) // S).clamp(max=min(K, C))
    assert torch.equal(valid_count, expected[None, :, None].expand(B, T, R))


@pytest.mark.parametrize("norm", ["stick_breaking", "softmax"])
def test_streaming_matches_reference_extra_landmarks_and_default_blocks(norm):
    # more landmarks than complete chunks of q's span: the tail is never visible
    q, lm = _inputs(2, 30, 12, 2, 5, seed=3)
    kw = dict(chunk_size=4, topk=4, norm=norm)
    ref = _run(select_chunks_naive, q, lm, **kw)
    _assert_same(_run(select_chunks, q, lm, **kw), ref)
    _assert_same(_run(select_chunks, q, lm, block_chunks=1, block_tokens=1, **kw), ref)
    assert int(ref[0].max()) <= 29 // 4 - 1


@pytest.mark.parametrize("per_batch", [False, True])
def test_explicit_positions(per_batch):
    B, T, C, S, K = 2, 9, 40, 4, 3
    q, lm = _inputs(B, T, C, 2, 6, seed=5)
    g = torch.Generator().manual_seed(6)
    shape = (B, T) if per_batch else (T,)
    positions = torch.randint(-5, C * S + 20, shape, generator=g)
    positions[..., 0] = 2  # inside the first chunk: nothing visible
    kw = dict(chunk_size=S, topk=K, positions=positions)
    ref = _run(select_chunks_naive, q, lm, **kw)
    _assert_same(_run(select_chunks, q, lm, block_chunks=6, block_tokens=4, **kw), ref)
    assert torch.all(ref[1][..., 0, :, :] == 0)
    n_vis = (positions.expand(B, T) // S).clamp(0, C)
    assert torch.all(ref[0] < n_vis[:, :, None, None].clamp_min(1))


def test_decode_single_token_at_large_position():
    B, C, S, K = 2, 300, 16, 8
    q, lm = _inputs(B, 1, C, 1, 16, seed=7)
    positions = torch.tensor([[C * S + 5], [100 * S]])  # sees all 300 chunks / chunks 0..99
    kw = dict(chunk_size=S, topk=K, positions=positions)
    ref = _run(select_chunks_naive, q, lm, **kw)
    _assert_same(_run(select_chunks, q, lm, block_chunks=32, **kw), ref)
    # default blocks: a decoding token scores its 300 chunks in one tile (and 5000 in one, too)
    _assert_same(_run(select_chunks, q, lm, **kw), ref)
    q5, lm5 = _inputs(1, 2, 5000, 1, 8, seed=8)
    far = dict(chunk_size=S, topk=K, positions=torch.tensor([5000 * S, 1234 * S + 3]))
    _assert_same(_run(select_chunks, q5, lm5, **far), _run(select_chunks_naive, q5, lm5, **far))
    idx = ref[0][:, 0, 0]
    assert torch.all(idx[:, :-1] > idx[:, 1:])  # distinct, most recent first
    assert int(idx[1].max()) < 100
    # the selection is the true top-K of the visible scores
    scores = torch.einsum("bd,bcd->bc", q[:, 0, 0], lm[:, :, 0]).detach()
    for b, n in ((0, C), (1, 100)):
        top = torch.topk(scores[b, :n], K).indices
        assert set(top.tolist()) == set(idx[b].tolist())


@pytest.mark.parametrize("norm", ["stick_breaking", "softmax"])
@pytest.mark.parametrize("block_chunks", [1, 2, 3, 64])
def test_ties_go_to_the_most_recent_chunk(norm, block_chunks):
    # small integers: every score is exact, so repeated landmark rows tie exactly
    g = torch.Generator().manual_seed(8)
    B, T, R, Dr, S, K = 2, 40, 2, 3, 2, 4
    C = T // S
    base = torch.randint(-2, 3, (B, 3, R, Dr), generator=g).double()
    lm = base[:, torch.randint(0, 3, (C,), generator=g)].requires_grad_()
    q = torch.randint(-2, 3, (B, T, R, Dr), generator=g).double().requires_grad_()
    kw = dict(chunk_size=S, topk=K, norm=norm)
    ref = _run(select_chunks_naive, q, lm, **kw)
    _assert_same(_run(select_chunks, q, lm, block_chunks=block_chunks, block_tokens=5, **kw), ref)
    # hand check: landmark scores [2, 2, 2, 1, 2], K=2 -> chunks 4 and 2
    lm1 = torch.tensor([2.0, 2.0, 2.0, 1.0, 2.0]).view(1, 5, 1, 1)
    q1 = torch.ones(1, 1, 1, 1)
    for fn in (select_chunks_naive, select_chunks):
        idx, _ = fn(q1, lm1, chunk_size=1, topk=2, positions=torch.tensor([5]))
        assert idx.flatten().tolist() == [4, 2]


def test_visibility_ordering_and_empty_slots_by_hand():
    # S=4, 3 landmarks: token t sees chunk c iff 4(c+1) <= t; chunk 2 would need t >= 12
    q = torch.ones(1, 12, 1, 1)
    lm = torch.tensor([1.0, 5.0, 9.0]).view(1, 3, 1, 1)
    for fn in (select_chunks_naive, lambda *a, **k: select_chunks(*a, block_chunks=1, **k)):
        idx, w = fn(q, lm, chunk_size=4, topk=3)
        idx, w = idx[0, :, 0], w[0, :, 0]
        assert idx.tolist() == [[0, 0, 0]] * 8 + [[1, 0, 0]] * 4
        assert torch.all(w[:4] == 0)
        assert torch.all(w[4:8, 0] > 0) and torch.all(w[4:8, 1:] == 0)
        assert torch.all(w[8:, :2] > 0) and torch.all(w[8:, 2] == 0)
        s5, s1 = torch.sigmoid(torch.tensor(5.0)), torch.sigmoid(torch.tensor(1.0))
        torch.testing.assert_close(w[10], torch.stack([s5, s1 * (1 - s5), torch.tensor(0.0)]))


def test_top_k_then_recent_first_and_weight_formulas_by_hand():
    # Dr=1, q=1: score of chunk c is its landmark value; all 5 visible at position 5 (S=1)
    vals = [0.5, 3.0, -1.0, 2.0, 1.0]
    q = torch.ones(1, 1, 1, 1)
    lm = torch.tensor(vals).view(1, 5, 1, 1)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected_sb = [sig(1.0), sig(2.0) * (1 - sig(1.0)), sig(3.0) * (1 - sig(1.0)) * (1 - sig(2.0))]
    z = math.exp(1.0) + math.exp(2.0) + math.exp(3.0)
    expected_sm = [math.exp(1.0) / z, math.exp(2.0) / z, math.exp(3.0) / z]
    for fn in (select_chunks_naive, lambda *a, **k: select_chunks(*a, block_chunks=2, **k)):
        for norm, expected in (("stick_breaking", expected_sb), ("softmax", expected_sm)):
            idx, w = fn(q, lm, chunk_size=1, topk=3, positions=torch.tensor([5]), norm=norm)
            assert idx.flatten().tolist() == [4, 3, 1]  # chunks 1, 3, 4 by score; recent first
            assert w.dtype == torch.float32
            torch.testing.assert_close(w.flatten(), torch.tensor(expected))


def test_stick_breaking_weights_by_hand():
    s = torch.zeros(3, dtype=torch.float64)
    w = stick_breaking_weights(s, torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(w, torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64))
    # an invalid slot breaks nothing off the stick
    w = stick_breaking_weights(s, torch.tensor([True, False, True]))
    torch.testing.assert_close(w, torch.tensor([0.5, 0.0, 0.25], dtype=torch.float64))
    g = torch.Generator().manual_seed(9)
    s = torch.randn(4, 6, generator=g, dtype=torch.float64) * 3
    w = stick_breaking_weights(s, torch.ones_like(s, dtype=torch.bool))
    rest = torch.cumprod(torch.cat([torch.ones(4, 1, dtype=s.dtype), 1 - torch.sigmoid(s[:, :-1])], 1), 1)
    expected = torch.sigmoid(s) * rest
    torch.testing.assert_close(w, expected)
    assert torch.all(w.sum(-1) <= 1)


def test_normalisers_stable_and_empty_rows():
    s = torch.tensor([[1e4, -1e4, 60.0, -60.0], [-1e4, 1e4, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0]], requires_grad=True)
    valid = torch.tensor([[True] * 4, [True] * 4, [False] * 4])
    for fn in (stick_breaking_weights, softmax_weights):
        w = fn(s, valid)
        assert w.dtype == torch.float32 and torch.isfinite(w).all()
        assert torch.all(w[2] == 0)  # no valid slot: all zero, no NaN
        (dw,) = torch.autograd.grad((w * torch.arange(4.0)).sum(), s)
        assert torch.isfinite(dw).all() and torch.all(dw[2] == 0)
    torch.testing.assert_close(stick_breaking_weights(s, valid)[0, 0], torch.tensor(1.0))
    torch.testing.assert_close(stick_breaking_weights(s, valid)[1, :2], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(softmax_weights(s, valid)[1], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    w = softmax_weights(torch.tensor([1.0, 2.0, 7.0]), torch.tensor([True, True, False]))
    torch.testing.assert_close(w, torch.softmax(torch.tensor([1.0, 2.0, -math.inf]), 0))


def test_no_complete_chunk():
    # C = 0 landmarks (prompt shorter than a chunk): empty selection, gradients still defined
    q, lm = _inputs(2, 3, 0, 1, 4)
    for fn in (select_chunks_naive, select_chunks):
        idx, w, dq, dlm = _run(fn, q, lm, chunk_size=4, topk=2)
        assert idx.shape == (2, 3, 1, 2) and torch.all(idx == 0) and torch.all(w == 0)
        assert torch.all(dq == 0) and dlm.shape == lm.shape


def test_gradcheck_streaming():
    q, lm = _inputs(1, 11, 4, 2, 3, seed=10)
    kw = dict(chunk_size=2, topk=3, block_chunks=2, block_tokens=4)
    for norm in ("stick_breaking", "softmax"):
        assert torch.autograd.gradcheck(lambda a, b, norm=norm: select_chunks(a, b, norm=norm, **kw)[1], (q, lm))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs_score_in_float32(dtype):
    q, lm = _inputs(2, 37, 9, 2, 16, dtype=dtype, seed=11)
    kw = dict(chunk_size=4, topk=3)
    ref = _run(select_chunks_naive, q, lm, **kw)
    out = _run(select_chunks, q, lm, block_chunks=4, block_tokens=8, **kw)
    assert out[1].dtype == torch.float32 and out[2].dtype == dtype and out[3].dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    _assert_same(out, ref, atol=tol, rtol=tol)


class _LargestOutput(TorchDispatchMode):
    """Records the element count of the largest tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_streaming_memory_is_bounded_and_exact_on_long_input():
    B, T, C, R, Dr, S, K, blk = 1, 4096, 4096, 1, 8, 1, 8, 256
    q, lm = _inputs(B, T, C, R, Dr, seed=12)
    with _LargestOutput() as probe:
        out = _run(select_chunks, q, lm, chunk_size=S, topk=K, block_chunks=blk, block_tokens=blk)
    # largest tensor: the candidate tile (block scores + running top-K) of one token block
    tile = B * blk * R * (blk + K)
    assert probe.largest <= max(tile, B * T * R * K, B * C * R * Dr)
    assert probe.largest * 200 < B * T * R * C  # the full score matrix is never built
    with _LargestOutput() as probe_ref:
        ref = _run(select_chunks_naive, q, lm, chunk_size=S, topk=K)
    assert probe_ref.largest >= B * T * R * C  # the probe does see a full score matrix
    _assert_same(out, ref)


@pytest.mark.parametrize("fn", [select_chunks, select_chunks_naive])
def test_bad_inputs_raise(fn):
    q, lm = torch.randn(2, 8, 1, 4), torch.randn(2, 2, 1, 4)
    ok = dict(chunk_size=4, topk=2)
    cases = [
        (TypeError, "q_r", (q.long(), lm), ok),
        (TypeError, "landmarks", (q, lm.int()), ok),
        (TypeError, "q_r", (q.numpy(), lm), ok),
        (ValueError, "q_r", (q[0], lm), ok),
        (ValueError, "landmarks", (q, lm[0]), ok),
        (ValueError, "landmarks", (q, torch.randn(1, 2, 1, 4)), ok),
        (ValueError, "landmarks", (q, torch.randn(2, 2, 2, 4)), ok),
        (ValueError, "landmarks", (q, torch.randn(2, 2, 1, 5)), ok),
        (ValueError, "topk", (q, lm), dict(chunk_size=4, topk=0)),
        (ValueError, "topk", (q, lm), dict(chunk_size=4, topk=2.0)),
        (ValueError, "chunk_size", (q, lm), dict(chunk_size=0, topk=2)),
        (ValueError, "norm", (q, lm), dict(ok, norm="sparsemax")),
        (ValueError, "positions", (q, lm), dict(ok, positions=torch.arange(7))),
        (ValueError, "positions", (q, lm), dict(ok, positions=torch.zeros(3, 8, dtype=torch.long))),
        (TypeError, "positions", (q, lm), dict(ok, positions=torch.arange(8.0))),
    ]
    for exc, name, args, kw in cases:
        with pytest.raises(exc, match=name):
            fn(*args, **kw)
    if fn is select_chunks:
        with pytest.raises(ValueError, match="block_chunks"):
            fn(q, lm, block_chunks=0, **ok)
    for norm_fn in (stick_breaking_weights, softmax_weights):
        with pytest.raises(ValueError, match="valid"):
            norm_fn(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))
        with pytest.raises(TypeError, match="valid"):
            norm_fn(torch.zeros(3), torch.ones(3))


@pytest.mark.parametrize("C", [3, 7, 11])
def test_default_positions_need_no_device_sync(C, monkeypatch):
    """With default positions the chunk loop's bound comes from the shapes, not from ``n_vis.max()`` (a
    device-to-host sync on GPUs); fewer, exactly as many and more landmarks than complete chunks."""
    q, lm = _inputs(2, 30, C, 1, 5, seed=C)
    kw = dict(chunk_size=4, topk=3)
    ref = _run(select_chunks_naive, q, lm, **kw)

    def no_sync(*args, **kwargs):
        raise AssertionError("Tensor.max called: a device sync")

    monkeypatch.setattr(torch.Tensor, "max", no_sync)
    _assert_same(_run(select_chunks, q, lm, block_chunks=2, block_tokens=7, **kw), ref)
