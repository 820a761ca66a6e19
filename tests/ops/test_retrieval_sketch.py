"""Decoding-time selection through the int8 landmark sketch (ramba.ops.retrieval.sketch) against the streaming
top-K and the reference: the same chunks and weights on fresh random inputs, exact ties, fallbacks; the bounds
hold; the store makes the sketch for decoding only."""

import math
import random

import pytest
import torch

import ramba.ops.retrieval.sketch as sketch_module
from ramba.inference import prefill
from ramba.layers.base import ChunkMemory
from ramba.model import chunk_store
from ramba.model.chunk_store import ChunkMemoryStore, Offload, OffloadError
from ramba.ops.retrieval import select_chunks, select_chunks_naive
from ramba.ops.retrieval.sketch import LandmarkSketch, _bounds, _integer_dots
from small_models import small_model

DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _sketch(landmarks, rng, block_chunks=None):
    """A sketch of ``landmarks`` appended in random pieces."""
    B, C, R, Dr = landmarks.shape
    sketch = LandmarkSketch(B, R, Dr, landmarks.dtype, "cpu", block_chunks or rng.choice([7, 64, None]))
    done = 0
    while done < C:
        n = rng.randint(1, 50)
        sketch.append(landmarks[:, done : done + n])
        done += n
    return sketch


def _case(seed, dyadic):
    rng = random.Random(seed)
    B, R, Dr, K = rng.randint(1, 3), rng.randint(1, 3), rng.choice([4, 16, 64]), rng.randint(1, 9)
    C, T, S = rng.randint(0, 300), rng.randint(1, 4), 4
    dtype = rng.choice(DTYPES)
    g = torch.Generator().manual_seed(seed)
    if dyadic:  # small multiples of 1/4: every score is exact in any order of summation, so ties are exact
        landmarks = (torch.randint(-3, 4, (B, C, R, Dr), generator=g) / 4).to(dtype)
        q = (torch.randint(-3, 4, (B, T, R, Dr), generator=g) / 2).to(dtype)
    else:
        landmarks = torch.randn(B, C, R, Dr, generator=g, dtype=torch.float64).to(dtype)
        q = torch.randn(B, T, R, Dr, generator=g, dtype=torch.float64).to(dtype)
    shape = rng.choice([(T,), (B, T)])  # one position per token, or per row and token
    positions = torch.randint(0, (C + 1) * S + 1, shape, generator=g)
    return q, landmarks, positions, S, K, rng


@pytest.fixture
def answered(monkeypatch):
    """The sketch's answers, None where it handed the selection back to streaming."""
    calls = []
    real = LandmarkSketch.topk

    def spy(self, *args):
        out = real(self, *args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(LandmarkSketch, "topk", spy)
    return calls


@pytest.mark.parametrize("dyadic", [False, True])
@pytest.mark.parametrize("seed", range(40))
def test_sketch_selects_what_streaming_selects(seed, dyadic, answered):
    q, landmarks, positions, S, K, rng = _case(seed, dyadic)
    want_idx, want_w = select_chunks(q, landmarks, S, K, positions)
    idx, w = select_chunks(q, landmarks, S, K, positions, sketch=_sketch(landmarks, rng))
    assert torch.equal(idx, want_idx) and torch.equal(w, want_w)
    if dyadic:  # exact ties go to the more recent chunk, as in the reference
        assert torch.equal(idx, select_chunks_naive(q, landmarks, S, K, positions)[0])
    if landmarks.shape[1] and not dyadic:
        assert all(answered)  # random scores leave few candidates: no fallback


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared", [0.0, 3.0])
def test_bounds_hold(dtype, shared):
    """The bounds hold for the centered scores ``q·(l - m)``; ``shared`` adds a common part to every landmark."""
    g = torch.Generator().manual_seed(1)
    for Dr in (8, 256):
        common = shared * torch.randn(2, 1, 2, Dr, generator=g, dtype=dtype)
        landmarks = torch.randn(2, 500, 2, Dr, generator=g, dtype=dtype) * torch.rand(2, 500, 2, 1, generator=g) * 10
        landmarks = landmarks + common * 10
        q = torch.randn(2, 3, 2, Dr, generator=g, dtype=dtype)
        sketch = _sketch(landmarks, random.Random(0))
        approx, err = _bounds(q, sketch)
        exact = torch.einsum("btrd,bcrd->btrc", q.double(), (landmarks - sketch.center[:, None]).double())
        assert ((exact - approx.double()).abs() <= err.double()).all()
        assert err.mean() < 0.15 * exact.std()  # tight enough to leave few candidates, however large the shared part


@pytest.mark.parametrize("int8_gemm", [False, True])
def test_a_shared_part_leaves_few_candidates(int8_gemm, monkeypatch):
    """Landmarks at cosine ~0.9 to their mean (as a random model's are): the centered bounds leave few candidates
    among 20K chunks, and the selection is the streaming one (with the products through torch._int_mm, as on CUDA,
    or float products)."""
    monkeypatch.setattr(sketch_module, "_int8_gemm_applies", lambda d, rows, Dr: int8_gemm and rows > 16)
    g = torch.Generator().manual_seed(5)
    B, C, R, Dr, K = 1, 20_000, 1, 256, 8
    landmarks = 2.0 * torch.randn(1, 1, 1, Dr, generator=g) + torch.randn(B, C, R, Dr, generator=g)
    cosine = torch.nn.functional.cosine_similarity(landmarks, landmarks.mean(1, keepdim=True), dim=-1)
    assert 0.85 < cosine.mean() < 0.95
    sketch = _sketch(landmarks, random.Random(0), block_chunks=4096)
    q = torch.randn(B, 2, R, Dr, generator=g)
    positions = torch.tensor([C * 4, C * 4 - 1000])
    got = select_chunks(q, landmarks, 4, K, positions, sketch=sketch)
    assert sketch.candidates is not None and sketch.candidates < 60
    want = select_chunks(q, landmarks, 4, K, positions)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("int8_gemm", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_integer_dots_are_exact(seed, int8_gemm, monkeypatch):
    """The int8 products (torch._int_mm, as on CUDA where its shapes allow, here on the CPU; or float products of the
    codes) equal the float64 products, over one to three blocks with a partial last one, several rows and heads,
    and the largest codes."""
    applies = sketch_module._int8_gemm_applies
    monkeypatch.setattr(
        sketch_module, "_int8_gemm_applies", lambda d, rows, Dr: applies(torch.device("cuda"), rows, Dr)
    )
    if not int8_gemm:
        monkeypatch.setattr(sketch_module, "_int8_gemm_applies", lambda d, rows, Dr: False)
    rng = random.Random(seed)
    B, R, t, Dr = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 4), rng.choice([8, 12, 64, 256])
    block_chunks, n_blocks = rng.choice([16, 40, 300]), rng.randint(1, 3)
    n = (n_blocks - 1) * block_chunks + rng.randint(1, block_chunks)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (B, R, n_blocks * block_chunks, Dr), generator=g, dtype=torch.int8)
    codes[..., 0] = rng.choice([127, -127])
    q = torch.randint(-127, 128, (B, t, R, 2, Dr), generator=g).to(torch.int8)
    want = torch.einsum("btrld,brnd->btrln", q.double(), codes[:, :, :n].double())
    assert torch.equal(_integer_dots(q, list(codes.split(block_chunks, dim=2)), n).double(), want)
    assert sketch_module._int8_gemm_applies(codes.device, block_chunks, Dr) == (
        int8_gemm and block_chunks > 16 and Dr % 8 == 0
    )


def test_fallbacks_give_the_streaming_answer(monkeypatch, answered):
    g = torch.Generator().manual_seed(2)
    landmarks = torch.randn(1, 200, 1, 16, generator=g)
    q = torch.randn(1, 2, 1, 16, generator=g)
    positions = torch.tensor([3200, 1000])
    want = select_chunks(q, landmarks, 16, 4, positions)
    monkeypatch.setattr(sketch_module, "MAX_CANDIDATES", 3)  # more candidates than allowed
    assert torch.equal(
        select_chunks(q, landmarks, 16, 4, positions, sketch=_sketch(landmarks, random.Random(0)))[0], want[0]
    )
    monkeypatch.setattr(sketch_module, "MAX_CANDIDATES", 4096)
    inf = landmarks.clone()
    inf[0, 7, 0, 3] = math.inf  # a non-finite landmark
    zero = torch.zeros_like(q)  # every score ties at 0: all chunks are candidates, still few here
    for lm, query in ((inf, q), (landmarks, zero)):
        got = select_chunks(query, lm, 16, 4, positions, sketch=_sketch(lm, random.Random(0)))
        assert torch.equal(got[0], select_chunks(query, lm, 16, 4, positions)[0])
    assert answered == [False, False, True]


def test_sketch_refuses_other_landmarks():
    landmarks = torch.randn(1, 10, 1, 8)
    sketch = _sketch(landmarks[:, :9], random.Random(0))
    with pytest.raises(ValueError, match="sketch holds 9 chunks"):
        select_chunks(torch.randn(1, 1, 1, 8), landmarks, 4, 2, sketch=sketch)


def test_appending_never_moves_a_block(monkeypatch):
    g = torch.Generator().manual_seed(3)
    landmarks = torch.randn(2, 100, 1, 8, generator=g)
    one = LandmarkSketch(2, 1, 8, torch.float32, "cpu", block_chunks=16)
    monkeypatch.setattr(sketch_module, "APPEND_ELEMENTS", 5 * 2 * 8)  # one call, quantised 5 chunks at a time
    one.append(landmarks)
    monkeypatch.undo()
    pieces = _sketch(landmarks[:, :5], random.Random(0), block_chunks=16)
    first = pieces.blocks[0][0].data_ptr()
    pieces.append(landmarks[:, 5:])
    assert pieces.blocks[0][0].data_ptr() == first and pieces.n_chunks == 100 == one.n_chunks
    for (a, sa), (b, sb) in zip(one.blocks, pieces.blocks, strict=True):
        assert torch.equal(a[:, :, : 100 % 16 or 16], b[:, :, : 100 % 16 or 16])
        assert torch.equal(sa[:, :, :4], sb[:, :, :4])
    assert one.nbytes() == 7 * 2 * 16 * (8 + 3 * 4) + 2 * 1 * 8 * 4  # blocks and the center


def test_selection_through_a_sketch_under_bf16_autocast():
    q, landmarks, positions, S, K, rng = _case(5, False)
    want = select_chunks(q, landmarks, S, K, positions)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(select_chunks(q, landmarks, S, K, positions, sketch=_sketch(landmarks, rng))[0], want)


def _store(landmarks="sketch"):
    return ChunkMemoryStore(1, 4, 1, 8, 1, 8, torch.float32, "cpu", offload=Offload("host", landmarks=landmarks))


def test_the_store_sketches_for_decoding_only(monkeypatch):
    monkeypatch.setattr(chunk_store, "SKETCH_MIN_BYTES", 10 * 8 * 4)  # ten chunks' landmarks
    store = _store()
    memory = ChunkMemory(torch.randn(1, 40, 1, 8), torch.randn(1, 40, 1, 8), torch.randn(1, 10, 1, 8))
    store.append(ChunkMemory(memory.k[:, :36], memory.v[:, :36], memory.landmarks[:, :9]))
    assert store.landmark_sketch(1) is None  # too few landmarks to be worth a sketch
    store = _store()
    store.append(memory)
    sketch = store.landmark_sketch(1)
    assert sketch is not None and sketch.n_chunks == 10
    assert store.nbytes()["device"] == sketch.nbytes()
    store.append(memory)
    assert store.landmark_sketch(4) is sketch and sketch.n_chunks == 20  # brought up to date
    assert store.landmark_sketch(5) is None and store.nbytes()["device"] == 0  # a longer input frees it
    assert _store("host").landmark_sketch(1) is None
    with pytest.raises(OffloadError, match="landmarks must be one of"):
        Offload("host", landmarks="gpu")


def test_cached_decoding_with_offload_selects_through_the_sketch(answered, monkeypatch):
    """Offloaded decoding (the default landmark placement) goes through the sketch and still gives the logits of
    one full forward (tests/inference/test_chunk_store.py checks every tier)."""
    monkeypatch.setattr(chunk_store, "SKETCH_MIN_BYTES", 0)
    model = small_model()
    ids = torch.randint(3, 64, (2, 110), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        _, cache = prefill(model, ids[:, :100], segment_len=40, offload=True)
        assert not answered  # prefill segments stream
        for t in range(100, 110):
            step = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
            torch.testing.assert_close(step, full[:, t], atol=2e-5, rtol=2e-5)
    assert len(answered) == 10 * model.config.retrieval_groups and all(answered)
