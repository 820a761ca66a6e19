"""HSA operator: reference vs explicit loops, torch backend vs reference (float64, forward and
backward), triton backend vs reference under TRITON_INTERPRET=1, input checks and dispatch."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.utils._python_dispatch

from ramba.ops.hsa import hsa, hsa_naive, softmax1

ROOT = Path(__file__).resolve().parents[2]


def make_inputs(B, T, HQ, H, D, S, K, C, dtype=torch.float64, seed=0, zero_frac=0.25):
    """Random inputs with duplicate indices and zero-weight slots."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, HQ, D, generator=g, dtype=dtype)
    k = torch.randn(B, C * S, H, D, generator=g, dtype=dtype)
    v = torch.randn(B, C * S, H, D, generator=g, dtype=dtype)
    idx = torch.randint(0, C, (B, T, H, K), generator=g)
    if K > 1:
        idx[:, ::2, :, 1] = idx[:, ::2, :, 0]  # duplicate chunk in one token's slots
    w_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # weights stay float
    w = torch.rand(B, T, H, K, generator=g, dtype=w_dtype)
    w = torch.where(torch.rand(B, T, H, K, generator=g) < zero_frac, 0.0, w)
    do = torch.randn(B, T, HQ, D, generator=g, dtype=dtype)
    return q, k, v, w, idx, do


def forward_backward(backend, q, k, v, w, idx, do, S, sm_n, scale=None):
    ins = [x.detach().clone().requires_grad_(True) for x in (q, k, v, w)]
    o = hsa(*ins, idx, S, scale=scale, sm_n=sm_n, backend=backend)
    return (o, *torch.autograd.grad(o, ins, do))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("sm_n", [0.0, 1.0])
def test_reference_matches_explicit_loops(sm_n):
    B, T, HQ, H, D, S, K, C = 1, 3, 4, 2, 3, 4, 3, 3
    q, k, v, w, idx, _ = make_inputs(B, T, HQ, H, D, S, K, C, seed=7)
    scale = 0.7
    out = torch.zeros(B, T, HQ, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for j in range(HQ):
                h = j // (HQ // H)
                for i in range(K):
                    c = int(idx[b, t, h, i])
                    e = [torch.exp(scale * (q[b, t, j] @ k[b, c * S + s, h])) for s in range(S)]
                    den = sum(e) + sm_n
                    for s in range(S):
                        out[b, t, j] += w[b, t, h, i] * e[s] / den * v[b, c * S + s, h]
    got = hsa_naive(q, k, v, w, idx, S, scale, sm_n)
    torch.testing.assert_close(got, out, rtol=1e-12, atol=1e-12)


def test_softmax1_extra_term_and_large_scores():
    x = torch.tensor([[1000.0, 999.0], [-5.0, -6.0]], dtype=torch.float64)
    p = softmax1(x, 1.0)
    ref = torch.exp(x) / (torch.exp(x).sum(-1, keepdim=True) + 1.0)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p[1], ref[1])
    torch.testing.assert_close(p[0], torch.softmax(x[0], -1))  # exp(-1000) vanishes next to the sum


GRID = [  # (B, T, HQ, H, D, S, K, C, sm_n)
    (1, 5, 1, 1, 16, 16, 1, 2, 0.0),
    (2, 7, 2, 1, 16, 16, 3, 4, 1.0),
    (1, 9, 16, 1, 16, 16, 8, 5, 0.0),
    (2, 6, 16, 1, 64, 16, 3, 3, 1.0),
    (1, 4, 4, 2, 64, 64, 8, 2, 0.0),
    (2, 3, 2, 2, 16, 64, 3, 2, 1.0),
    (1, 11, 32, 2, 16, 16, 8, 6, 1.0),
    (2, 5, 4, 4, 16, 16, 1, 3, 0.0),
]


@pytest.mark.parametrize("B,T,HQ,H,D,S,K,C,sm_n", GRID)
def test_torch_backend_matches_reference(B, T, HQ, H, D, S, K, C, sm_n):
    inputs = make_inputs(B, T, HQ, H, D, S, K, C, seed=B + T + HQ + D + S + K)
    ref = forward_backward("reference", *inputs, S, sm_n)
    got = forward_backward("torch", *inputs, S, sm_n)
    for name, a, b in zip(("o", "dq", "dk", "dv", "dw"), got, ref):
        assert a.dtype == b.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_torch_backend_small_blocks_and_fp32(monkeypatch):
    """Several token blocks (the block loop and the index_add_ scatter), fp32 inputs."""
    blocked = importlib.import_module("ramba.ops.hsa.blocked")

    monkeypatch.setattr(blocked, "_BLOCK_ELEMS", 1)  # one group of pairs per block
    inputs = make_inputs(2, 9, 4, 2, 16, 16, 3, 4, dtype=torch.float32, seed=3)
    ref = forward_backward("reference", *inputs, 16, 1.0)
    got = forward_backward("torch", *inputs, 16, 1.0)
    for name, a, b in zip(("o", "dq", "dk", "dv", "dw"), got, ref):
        assert a.dtype == torch.float32
        assert rel(a, b) < 1e-5, name


@pytest.mark.parametrize("group_rows,block_elems", [(1, 1), (8, 1), (64, 1 << 12), (1 << 12, 1 << 30)])
@pytest.mark.parametrize("sm_n", [0.0, 1.0])
def test_torch_backend_groups_and_blocks(monkeypatch, group_rows, block_elems, sm_n):
    """Chunk groups of one pair up to all of a chunk's pairs, partly filled (padded) groups, one to
    many groups per block; duplicate indices and zero-weight slots (make_inputs), float64."""
    blocked = importlib.import_module("ramba.ops.hsa.blocked")

    monkeypatch.setattr(blocked, "_GROUP_ROWS", group_rows)
    monkeypatch.setattr(blocked, "_BLOCK_ELEMS", block_elems)
    inputs = make_inputs(2, 13, 4, 2, 8, 4, 3, 5, seed=11)
    plan = blocked._Plan(inputs[4], 5, 2, group_rows)
    pads = int((plan.table == inputs[4].numel()).sum())
    assert sorted(plan.table[plan.table < inputs[4].numel()].tolist()) == list(range(inputs[4].numel()))
    assert pads <= inputs[4].numel() and (group_rows < 4 or pads > 0)
    ref = forward_backward("reference", *inputs, 4, sm_n)
    got = forward_backward("torch", *inputs, 4, sm_n)
    for name, a, b in zip(("o", "dq", "dk", "dv", "dw"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("sm_n", [0.0, 1.0])
def test_torch_backend_one_chunk_all_duplicates_and_zero_weights(sm_n):
    """Every slot of every token picks chunk 0; all weights zero gives o = 0 but dw != 0."""
    q, k, v, w, idx, do = make_inputs(2, 6, 4, 1, 8, 4, 4, 2, seed=5)
    idx = torch.zeros_like(idx)
    for weights in (w, torch.zeros_like(w)):
        ref = forward_backward("reference", q, k, v, weights, idx, do, 4, sm_n)
        got = forward_backward("torch", q, k, v, weights, idx, do, 4, sm_n)
        for name, a, b in zip(("o", "dq", "dk", "dv", "dw"), got, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    assert got[0].abs().max() == 0 and got[4].abs().min() > 0


@pytest.mark.parametrize("sm_n", [0.0, 1.0])
def test_torch_backend_extreme_scores(sm_n):
    """Scores of several hundred either sign: softmax1's extra term must neither overflow nor vanish wrongly."""
    q, k, v, w, idx, do = make_inputs(1, 7, 2, 1, 16, 4, 3, 4, seed=9)
    k = k * torch.tensor([40.0, -40.0, 1e-3, 3.0]).repeat_interleave(4)[None, :, None, None]
    ref = forward_backward("reference", q, k, v, w, idx, do, 4, sm_n, scale=1.0)
    got = forward_backward("torch", q, k, v, w, idx, do, 4, sm_n, scale=1.0)
    for name, a, b in zip(("o", "dq", "dk", "dv", "dw"), got, ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def test_torch_backend_bf16_close_to_fp32_reference():
    inputs = make_inputs(1, 9, 4, 1, 16, 16, 3, 3, dtype=torch.float32, seed=2)
    low = [x.to(torch.bfloat16) if x.is_floating_point() and i != 3 else x for i, x in enumerate(inputs)]
    got = forward_backward("torch", *low, 16, 0.0)
    ref = forward_backward("reference", *[x.float() if x.is_floating_point() else x for x in low], 16, 0.0)
    assert [a.dtype for a in got] == [torch.bfloat16] * 4 + [torch.float32]
    for name, a, b in zip(("o", "dq", "dk", "dv", "dw"), got, ref):
        assert rel(a, b) < 2e-2, name


def test_torch_backend_under_cpu_autocast_computes_as_without():
    """bf16 autocast (CPU training) changes nothing inside the op: it accumulates in its own dtype."""
    inputs = make_inputs(2, 11, 4, 2, 16, 16, 3, 4, dtype=torch.float32, seed=3)
    plain = forward_backward("torch", *inputs, 16, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = forward_backward("torch", *inputs, 16, 1.0)
    for name, a, b in zip(("o", "dq", "dk", "dv", "dw"), auto, plain):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_sorted_tile_chunks():
    pytest.importorskip("triton", reason="these helpers live in the triton backend")
    from ramba.ops.hsa.triton import sorted_tile_chunks

    _, _, _, _, idx, _ = make_inputs(2, 13, 4, 2, 16, 16, 5, 6, dtype=torch.float32, seed=5)
    BT, C = 4, 6
    skey = sorted_tile_chunks(idx, C, BT)
    B, H, NT, L = skey.shape
    assert (NT, L) == (4, BT * 5)
    for b in range(B):
        for h in range(H):
            for j in range(NT):
                ids = sorted(int(c) for t in range(j * BT, min(13, (j + 1) * BT)) for c in idx[b, t, h])
                assert skey[b, h, j].tolist() == ids + [C] * (L - len(ids))


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("item_pairs", [1, 3, 64])
def test_chunk_work_items(item_pairs):
    """Every pair in exactly one item; an item holds at most item_pairs pairs, all of its chunk, in token order;
    the item count fits the shape-only bound; built without a host sync."""
    pytest.importorskip("triton", reason="these helpers live in the triton backend")
    from ramba.ops.hsa.triton import chunk_work_items

    _, _, _, _, idx, _ = make_inputs(2, 13, 4, 2, 16, 16, 5, 9, dtype=torch.float32, seed=5)
    idx = idx % 7  # chunks 7 and 8 selected by no token
    B, T, H, K = idx.shape
    C = 9
    with _RecordOps() as rec:
        order, start, end, key = chunk_work_items(idx, C, item_pairs)
    aten = torch.ops.aten
    assert not rec.ops & {aten._local_scalar_dense, aten.nonzero, aten.masked_select}, rec.ops
    assert start.numel() == idx.numel() // item_pairs + min(idx.numel(), B * H * C)
    flat_key = ((torch.arange(B)[:, None, None, None] * H + torch.arange(H)[None, None, :, None]) * C + idx).view(-1)
    order, flat_key = order.tolist(), flat_key.tolist()
    seen = []
    for s, e, kk in zip(start.tolist(), end.tolist(), key.tolist()):
        assert 0 <= e - s <= item_pairs
        pairs = order[s:e]
        assert all(flat_key[p] == kk for p in pairs) and pairs == sorted(pairs)
        seen += pairs
    assert sorted(seen) == list(range(idx.numel()))


_INTERPRET_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    from tests.ops.test_hsa import make_inputs, forward_backward, rel
    from ramba.ops.hsa import triton as hsa_triton_module
    cases = json.loads(sys.argv[2])
    out = []
    for B, T, HQ, H, D, S, K, C, sm_n, dtype, item_rows, block_rows, tiles in cases:
        hsa_triton_module._ITEM_ROWS = item_rows
        hsa_triton_module._BWD_ROWS_INTERPRETED = block_rows
        q, k, v, w, idx, do = make_inputs(B, T, HQ, H, D, S, K, C, dtype=getattr(torch, dtype), seed=B * 7 + T + HQ + K)
        idx = idx % (C - 2)  # the last two chunks: selected by no token
        idx[:, 1::2, :, -1] = 0  # empty slots: index 0, weight 0
        w[:, 1::2, :, -1] = 0.0
        w[:, 1] = 0.0  # token 1 selects nothing
        inputs = q, k, v, w, idx, do
        ref = forward_backward("reference", *[x.double() if x.is_floating_point() else x for x in inputs], S, sm_n)
        got = forward_backward("triton", *inputs, S, sm_n)
        unselected = torch.cat([got[2][:, (C - 2) * S:], got[3][:, (C - 2) * S:]])
        tiled = [hsa_triton_module.hsa_triton(q, k, v, w, idx, S, D**-0.5, sm_n, block_tokens=bt) for bt in tiles]
        out.append({"rel": [rel(a, b) for a, b in zip(got, ref)],
                    "tiles_rel": [rel(o, ref[0]) for o in tiled],
                    "dtypes": [str(a.dtype) for a in got],
                    "finite": all(bool(torch.isfinite(a).all()) for a in got),
                    "unselected_zero": bool((unselected == 0).all()),
                    "silent_token": float(got[0][:, 1].abs().max())})
    print("RESULT" + json.dumps({"interpret": hsa_triton_module._INTERPRET, "cases": out}))
    """
)

# (B, T, HQ, H, D, S, K, C, sm_n, dtype, work-item rows, block rows, other forward tiles): GQA ratios 1-16, D and
# S 16-128, K 1-32, tiny grids; work items of 16 rows split a chunk's pairs over several programs (dk, dv added
# atomically); blocks of 32 to 128 rows, as the GPU autotuner tries; the forward also with other tokens per tile
# (block_tokens, as `ramba bench kernels --block-tokens` times them)
INTERPRET_CASES = [
    (1, 9, 4, 2, 16, 16, 3, 5, 0.0, "float32", 4096, 32, [8]),
    (2, 7, 2, 2, 16, 16, 2, 6, 1.0, "float32", 16, 64, []),
    (1, 5, 16, 1, 32, 16, 2, 4, 1.0, "float32", 16, 128, [1, 2, 8]),
    (1, 6, 3, 3, 16, 32, 4, 4, 0.0, "float32", 4096, 64, []),
    (1, 5, 12, 4, 16, 16, 1, 3, 1.0, "float32", 4096, 32, []),
    (1, 4, 8, 1, 64, 16, 5, 4, 0.0, "float32", 16, 128, [2]),
    (1, 3, 4, 1, 16, 64, 2, 3, 1.0, "float32", 4096, 64, []),
    (1, 3, 2, 1, 16, 128, 2, 3, 0.0, "float32", 4096, 64, []),
    (1, 3, 2, 1, 128, 16, 2, 3, 1.0, "float32", 16, 32, []),
    (1, 4, 2, 1, 16, 16, 32, 12, 1.0, "float32", 4096, 128, []),
    (1, 6, 4, 1, 16, 16, 3, 4, 0.0, "float16", 16, 64, []),  # numpy has no bf16: bf16 runs in tests/gpu
    (1, 5, 16, 2, 32, 32, 4, 4, 1.0, "float16", 4096, 64, [2]),
]


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton", reason="the triton backend needs triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRET_SCRIPT, str(ROOT), json.dumps(INTERPRET_CASES)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


@pytest.mark.parametrize("case", range(len(INTERPRET_CASES)), ids=[str(c) for c in INTERPRET_CASES])
def test_triton_interpreted_matches_reference(interpreted, case):
    """Forward and the four gradients against float64, with duplicate indices, zero-weight and empty slots,
    a token that selects nothing and chunks no token selects (their dk, dv exactly 0)."""
    assert interpreted["interpret"] is True
    res = interpreted["cases"][case]
    dtype = INTERPRET_CASES[case][9]
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert res["finite"] and res["unselected_zero"] and res["silent_token"] == 0.0
    assert res["dtypes"] == [f"torch.{dtype}"] * 4 + ["torch.float32"]
    for name, r in zip(("o", "dq", "dk", "dv", "dw"), res["rel"]):
        assert r < tol, f"{name}: {r:.2e}"
    for bt, r in zip(INTERPRET_CASES[case][12], res["tiles_rel"], strict=True):
        assert r < tol, f"o with block_tokens={bt}: {r:.2e}"


def _good(**over):
    q, k, v, w, idx, _ = make_inputs(1, 4, 4, 2, 8, 4, 2, 3, dtype=torch.float32)
    args = dict(q=q, k=k, v=v, weights=w, indices=idx, chunk_size=4)
    args.update(over)
    return args


BAD = [
    ("q rank", dict(q=torch.randn(4, 4, 8)), ValueError, "rank 4"),
    ("k/v shape", dict(v=torch.randn(1, 8, 2, 8)), ValueError, "same shape"),
    ("k batch", dict(k=torch.randn(2, 12, 2, 8), v=torch.randn(2, 12, 2, 8)), ValueError, "k must be"),
    ("head dim", dict(k=torch.randn(1, 12, 2, 4), v=torch.randn(1, 12, 2, 4)), ValueError, "k must be"),
    ("HQ % H", dict(k=torch.randn(1, 12, 3, 8), v=torch.randn(1, 12, 3, 8)), ValueError, "multiple"),
    ("Tk % S", dict(k=torch.randn(1, 10, 2, 8), v=torch.randn(1, 10, 2, 8)), ValueError, "chunk_size"),
    ("chunk_size", dict(chunk_size=0), ValueError, "chunk_size"),
    ("indices shape", dict(indices=torch.zeros(1, 4, 1, 2, dtype=torch.long)), ValueError, "indices must be"),
    ("weights shape", dict(weights=torch.rand(1, 4, 2, 3)), ValueError, "weights must have"),
    ("weights dtype", dict(weights=torch.ones(1, 4, 2, 2, dtype=torch.long)), TypeError, "weights"),
    ("q dtype", dict(q=torch.ones(1, 4, 4, 8, dtype=torch.long)), TypeError, "q must be"),
    ("indices float", dict(indices=torch.zeros(1, 4, 2, 2)), TypeError, "indices must be an integer"),
    ("indices bool", dict(indices=torch.zeros(1, 4, 2, 2, dtype=torch.bool)), TypeError, "integer"),
    ("index high", dict(indices=torch.full((1, 4, 2, 2), 3)), ValueError, r"\[0, Tk/chunk_size"),
    ("index low", dict(indices=torch.full((1, 4, 2, 2), -1)), ValueError, r"\[0, Tk/chunk_size"),
    ("not a tensor", dict(v=[1.0]), TypeError, "v must be a torch.Tensor"),
    ("device", dict(weights=torch.rand(1, 4, 2, 2, device="meta")), ValueError, "one device"),
]


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("what,over,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise(what, over, exc, match, backend):
    with pytest.raises(exc, match=match):
        hsa(**_good(**over), backend=backend)


def test_triton_rejects_unsupported_sizes():
    pytest.importorskip("triton", reason="the triton backend needs triton")
    from ramba.ops.hsa.triton import hsa_triton

    args = _good()
    with pytest.raises(ValueError, match="head dim"):
        hsa_triton(args["q"], args["k"], args["v"], args["weights"], args["indices"], 4, 1.0)


def test_dispatch_picks_torch_on_cpu(monkeypatch):
    blocked = importlib.import_module("ramba.ops.hsa.blocked")

    calls = []
    real = blocked.hsa_blocked
    monkeypatch.setattr(blocked, "hsa_blocked", lambda *a: calls.append(1) or real(*a))
    args = _good()
    o = hsa(**args)
    assert calls == [1]
    torch.testing.assert_close(o, hsa(**args, backend="reference"))


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend"):
        hsa(**_good(), backend="cuda")


def test_default_scale_and_dtype():
    args = _good()
    o = hsa(**args, backend="torch")
    ref = hsa_naive(args["q"], args["k"], args["v"], args["weights"], args["indices"], 4, 8**-0.5)
    assert o.dtype == torch.float32
    torch.testing.assert_close(o, ref)
    args["q"] = args["q"].to(torch.bfloat16)
    assert hsa(**args, backend="torch").dtype == torch.bfloat16
