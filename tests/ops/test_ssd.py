"""Chunked SSD (torch) against the per-token recurrence, in float64: outputs, states, gradients."""

import itertools

import pytest
import torch

from ramba.ops.ssd import default_backend, ssd, ssd_step


def make_inputs(b, T, H, P, G, N, dtype=torch.float64, init=False, seed=0, dt_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, H, P, generator=g, dtype=dtype)
    dt = torch.rand(b, T, H, generator=g, dtype=dtype) * dt_scale
    A = -torch.rand(H, generator=g, dtype=dtype) * 2 - 0.1
    B = torch.randn(b, T, G, N, generator=g, dtype=dtype)
    C = torch.randn(b, T, G, N, generator=g, dtype=dtype)
    h0 = torch.randn(b, H, P, N, generator=g, dtype=dtype) if init else None
    return x, dt, A, B, C, h0


def run_with_grads(backend, inputs, chunk_size):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    x, dt, A, B, C, h0 = leaves
    y, hT = ssd(x, dt, A, B, C, chunk_size=chunk_size, initial_state=h0, return_final_state=True, backend=backend)
    g = torch.Generator().manual_seed(123)
    wy = torch.randn(y.shape, generator=g, dtype=y.dtype)
    wh = torch.randn(hT.shape, generator=g, dtype=hT.dtype)
    ((y * wy).sum() + (hT * wh).sum()).backward()
    return y.detach(), hT.detach(), [t.grad if t is not None else None for t in leaves]


GRID = list(itertools.product([1, 16, 21], [(1, 1), (4, 1), (4, 2)], [False, True]))


@pytest.mark.parametrize("T,HG,init", GRID)
def test_chunk_matches_naive_fwd_bwd(T, HG, init):
    H, G = HG
    inputs = make_inputs(2, T, H, 3, G, 5, init=init, seed=T * 7 + H + G)
    y_ref, h_ref, g_ref = run_with_grads("reference", inputs, 8)
    y, h, grads = run_with_grads("torch", inputs, 8)
    assert y.shape == (2, T, H, 3) and h.shape == (2, H, 3, 5)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)
    for name, a, b in zip("x dt A B C h0".split(), grads, g_ref):
        if b is None:
            assert a is None
            continue
        if not (name == "A" and T == 1 and not init):  # one token from a zero state never sees the decay
            assert a.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


def test_chunk_gradcheck():
    x, dt, A, B, C, h0 = make_inputs(1, 6, 2, 2, 1, 3, init=True, seed=3)
    args = [t.requires_grad_(True) for t in (x, dt, A, B, C, h0)]

    def f(x, dt, A, B, C, h0):
        return ssd(x, dt, A, B, C, chunk_size=4, initial_state=h0, return_final_state=True, backend="torch")

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64])
def test_result_independent_of_chunk_size(chunk_size):
    inputs = make_inputs(1, 19, 4, 2, 2, 3, init=True, seed=11)
    x, dt, A, B, C, h0 = inputs
    y_ref, h_ref = ssd(x, dt, A, B, C, initial_state=h0, return_final_state=True, backend="reference")
    y, h = ssd(x, dt, A, B, C, chunk_size=chunk_size, initial_state=h0, return_final_state=True, backend="torch")
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)


def test_strong_decay_stays_finite():
    # dt*A down to about -200 per token: exp underflows to 0 and must not produce inf/nan anywhere
    inputs = make_inputs(1, 20, 2, 2, 1, 3, init=True, seed=5, dt_scale=100.0)
    y_ref, h_ref, g_ref = run_with_grads("reference", inputs, 8)
    y, h, grads = run_with_grads("torch", inputs, 8)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(h, h_ref, rtol=1e-9, atol=1e-9)
    for a, b in zip(grads, g_ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_segments_chain_through_state():
    x, dt, A, B, C, _ = make_inputs(2, 23, 4, 3, 2, 4, seed=8)
    y_full, h_full = ssd(x, dt, A, B, C, chunk_size=8, return_final_state=True)
    y1, h1 = ssd(x[:, :10], dt[:, :10], A, B[:, :10], C[:, :10], chunk_size=8, return_final_state=True)
    y2, h2 = ssd(
        x[:, 10:], dt[:, 10:], A, B[:, 10:], C[:, 10:], chunk_size=8, initial_state=h1, return_final_state=True
    )
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h2, h_full, rtol=1e-10, atol=1e-10)


def test_step_loop_matches_scan():
    x, dt, A, B, C, h0 = make_inputs(2, 9, 4, 3, 2, 4, init=True, seed=9)
    y_ref, h_ref = ssd(x, dt, A, B, C, chunk_size=4, initial_state=h0, return_final_state=True, backend="torch")
    h = h0.clone()
    ys = []
    for t in range(9):
        y_t, h_new = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], h)
        assert y_t.shape == (2, 4, 3) and h_new.shape == h.shape
        ys.append(y_t)
        h = h_new
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h0, make_inputs(2, 9, 4, 3, 2, 4, init=True, seed=9)[5])  # input state untouched


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_inputs(dtype, tol):
    inputs64 = make_inputs(2, 21, 4, 8, 2, 16, init=True, seed=4)
    y_ref, h_ref = ssd(
        *inputs64[:5], chunk_size=8, initial_state=inputs64[5], return_final_state=True, backend="reference"
    )
    x, dt, A, B, C, h0 = [t.to(dtype) for t in inputs64]
    y, h = ssd(x, dt, A, B, C, chunk_size=8, initial_state=h0, return_final_state=True, backend="torch")
    assert y.dtype == dtype and h.dtype == torch.float32
    # reference from the rounded inputs, so only the computation's error is measured
    y_ref, h_ref = ssd(
        *[t.double() for t in (x, dt, A, B, C, h0)][:5],
        initial_state=h0.double(),
        return_final_state=True,
        backend="reference",
    )
    rel = (y.double() - y_ref).norm() / y_ref.norm()
    assert rel < tol, rel
    assert (h.double() - h_ref).norm() / h_ref.norm() < 1e-5


def test_empty_sequence_and_default_backend():
    x, dt, A, B, C, h0 = make_inputs(2, 0, 4, 3, 2, 4, init=True)
    y, h = ssd(x, dt, A, B, C, initial_state=h0, return_final_state=True)
    assert y.shape == (2, 0, 4, 3)
    torch.testing.assert_close(h, h0)
    x, dt, A, B, C, _ = make_inputs(1, 5, 4, 3, 2, 4)
    torch.testing.assert_close(ssd(x, dt, A, B, C), ssd(x, dt, A, B, C, backend="torch"), rtol=0, atol=0)
    assert default_backend(torch.device("cpu")) == "torch"
    from ramba.ops.ssd.mamba_triton import supports_chunk_size

    assert [c for c in (8, 16, 48, 64, 256) if supports_chunk_size(c)] == [16, 64, 256]


def test_bad_inputs():
    x, dt, A, B, C, h0 = make_inputs(2, 5, 4, 3, 2, 4, init=True)
    with pytest.raises(ValueError, match="x must be"):
        ssd(x[0], dt, A, B, C)
    with pytest.raises(ValueError, match="dt must be"):
        ssd(x, dt[:, :4], A, B, C)
    with pytest.raises(ValueError, match="A must be"):
        ssd(x, dt, A[:3], B, C)
    with pytest.raises(ValueError, match="multiple of G"):
        ssd(x, dt, A, torch.randn(2, 5, 3, 4, dtype=x.dtype), torch.randn(2, 5, 3, 4, dtype=x.dtype))
    with pytest.raises(ValueError, match="C must have"):
        ssd(x, dt, A, B, C[..., :3])
    with pytest.raises(ValueError, match="initial_state must be"):
        ssd(x, dt, A, B, C, initial_state=h0[..., :3])
    with pytest.raises(TypeError, match="floating-point"):
        ssd(x.long(), dt, A, B, C)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ssd(x, dt.tolist(), A, B, C)
    with pytest.raises(ValueError, match="backend"):
        ssd(x, dt, A, B, C, backend="cuda")
    for backend in ("fla", "mamba_ssm"):
        with pytest.raises(ValueError, match=f"'{backend}' needs CUDA"):
            ssd(x, dt, A, B, C, backend=backend)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd(x, dt, A, B, C, chunk_size=0)
    with pytest.raises(ValueError, match="state must be"):
        ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], h0[:1])


def _forward_only_scan(calls):
    """scan_chunk as a forward-only kernel: it refuses to run with autograd recording and counts its calls."""
    from ramba.ops.ssd.chunk import scan_chunk

    def scan(q, k, v, g, initial_state):
        assert not torch.is_grad_enabled()
        calls.append(tuple(v.shape))
        return scan_chunk(q, k, v, g, 16, initial_state, True)

    return scan


@pytest.mark.parametrize(
    "T,HG,init", list(itertools.product([1, 7, 16, 41], [(1, 1), (4, 1), (4, 2), (6, 3)], [False, True]))
)
def test_adjoint_scan_matches_autograd(T, HG, init):
    """Gradients by the three adjoint scans equal autograd through the chunked scan, in float64."""
    from ramba.ops.ssd.adjoint import adjoint_scan
    from ramba.ops.ssd.chunk import scan_chunk

    H, G = HG
    gen = torch.Generator().manual_seed(T * 31 + H * 5 + G + init)
    K, V = 5, 3
    q, k = (torch.randn(2, T, G, K, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, T, H, V, generator=gen, dtype=torch.float64)
    g = -torch.rand(2, T, H, generator=gen, dtype=torch.float64) * 2
    h0 = torch.randn(2, H, V, K, generator=gen, dtype=torch.float64) if init else None
    w_o = torch.randn(2, T, H, V, generator=gen, dtype=torch.float64)
    w_h = torch.randn(2, H, V, K, generator=gen, dtype=torch.float64)
    calls = []
    results = []
    for f in (lambda *a: scan_chunk(*a[:4], 8, a[4], True), lambda *a: adjoint_scan(_forward_only_scan(calls), *a)):
        leaves = [None if t is None else t.clone().requires_grad_() for t in (q, k, v, g, h0)]
        o, hT = f(*leaves)
        ((o * w_o).sum() + (hT * w_h).sum()).backward()
        results.append([o, hT] + [None if t is None else t.grad for t in leaves])
    assert len(calls) == 4  # one forward scan, three adjoint scans
    for name, ref, got in zip(["o", "final state", "dq", "dk", "dv", "dg", "dh0"], *results):
        if ref is None:
            assert got is None
            continue
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10, msg=name)


def test_adjoint_scan_only_output_used():
    """With the final state unused (its gradient all zeros) the adjoint gradients still match."""
    from ramba.ops.ssd.adjoint import adjoint_scan
    from ramba.ops.ssd.chunk import scan_chunk

    gen = torch.Generator().manual_seed(5)
    args = [torch.randn(1, 20, 2, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    args += [
        torch.randn(1, 20, 4, 3, generator=gen, dtype=torch.float64),
        -torch.rand(1, 20, 4, generator=gen, dtype=torch.float64),
    ]
    leaves = [t.requires_grad_() for t in args]
    assert torch.autograd.gradcheck(lambda *a: adjoint_scan(_forward_only_scan([]), *a, None)[0], leaves)
    ref = torch.autograd.grad(scan_chunk(*leaves, 8).sum(), leaves)
    got = torch.autograd.grad(adjoint_scan(_forward_only_scan([]), *leaves)[0].sum(), leaves)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
