"""The Triton SSD paths (mamba_ssm's and fla-core's) against the chunked PyTorch path on CUDA: forward,
gradients, states.

Run on a GPU machine with ``pytest -m gpu tests/gpu/test_ssd_gpu.py`` (needs ``mamba-ssm`` and ``fla-core``)."""

import pytest
import torch

from ramba.ops.ssd import default_backend, ssd
from ramba.ops.ssd.fla import simple_gla_backward_ok, ssd_fla
from ramba.ops.ssd.mamba_triton import chunk_scan_combined

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# fla runs fp32 matmuls as tf32 on Hopper/Ampere, hence the fp32 tolerance
TOL = {torch.float32: 5e-3, torch.bfloat16: 3e-2}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def make_inputs(b, T, H, P, G, N, init, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(b, T, H, P, generator=g, device="cuda")
    dt = torch.nn.functional.softplus(torch.randn(b, T, H, generator=g, device="cuda") - 3)
    A = -torch.arange(1, H + 1, device="cuda", dtype=torch.float32) / 2
    B = torch.randn(b, T, G, N, generator=g, device="cuda") / N**0.5
    C = torch.randn(b, T, G, N, generator=g, device="cuda")
    h0 = torch.randn(b, H, P, N, generator=g, device="cuda") if init else None
    return x, dt, A, B, C, h0


def run(backend, inputs, dtype, kernel=None, grads=True):
    """y, final state and grads; x, B, C, h0 in ``dtype``, dt and A in float32 (as the layer passes them)."""
    x, dt, A, B, C, h0 = inputs
    cast = [x.to(dtype), dt, A, B.to(dtype), C.to(dtype), None if h0 is None else h0]
    leaves = [None if t is None else t.detach().clone().requires_grad_(grads) for t in cast]
    if backend == "torch":  # the reference: float64 from the very same (rounded) values
        args = [None if t is None else t.double() for t in leaves]
    else:
        args = leaves
    if backend == "fla":
        y, hT = ssd_fla(*args[:5], initial_state=args[5], return_final_state=True, kernel=kernel)
    else:
        y, hT = ssd(*args[:5], chunk_size=64, initial_state=args[5], return_final_state=True, backend=backend)
    if not grads:
        return y, hT, None
    g = torch.Generator(device="cuda").manual_seed(99)
    wy = torch.randn(y.shape, generator=g, device="cuda")
    wh = torch.randn(hT.shape, generator=g, device="cuda")
    ((y.double() * wy).sum() + (hT.double() * wh).sum()).backward()
    return y, hT, [None if t is None else t.grad for t in leaves]


# (dtype, (H, G), initial state, N, T); T = 200 is not a multiple of fla's chunk of 64
CASES = [
    pytest.param((torch.bfloat16, (4, 1), False, 64, 200), id="bf16-G1"),
    pytest.param((torch.bfloat16, (4, 2), True, 64, 200), id="bf16-G2-h0"),
    pytest.param((torch.bfloat16, (4, 1), True, 128, 64), id="bf16-N128-h0"),
    # fp32 kernels took minutes to compile/autotune on an H100 (Triton 3.6): skip with -m "gpu and not slow"
    pytest.param((torch.float32, (4, 2), True, 64, 200), id="fp32-G2-h0", marks=pytest.mark.slow),
]


def check(y, h, grads, y_ref, h_ref, g_ref, dtype):
    assert y.dtype == dtype and y.shape == y_ref.shape and h.dtype == torch.float32 and h.shape == h_ref.shape
    tol = TOL[dtype]
    assert rel_err(y, y_ref) < tol, ("y", rel_err(y, y_ref))
    assert rel_err(h, h_ref) < tol, ("final state", rel_err(h, h_ref))
    for name, a, b in zip("x dt A B C h0".split(), grads or [], g_ref):
        if b is None:
            continue
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 2 * tol, (f"grad {name}", rel_err(a, b))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kernel", ["adjoint", "simple_gla"])
def test_fla_matches_torch(kernel, case):
    dtype, (H, G), init, N, T = case
    inputs = make_inputs(2, T, H, 64, G, N, init, seed=T + H + N)
    y_ref, h_ref, g_ref = run("torch", inputs, dtype)
    # where fla refuses simple_gla's backward (Hopper + Triton < 3.7.1) only its forward is checked
    grads = kernel != "simple_gla" or simple_gla_backward_ok()
    y, h, g = run("fla", inputs, dtype, kernel=kernel, grads=grads)
    check(y, h, g, y_ref, h_ref, g_ref, dtype)


needs_mamba_ssm = pytest.mark.skipif(
    chunk_scan_combined() is None, reason="needs mamba-ssm (scripts/device_run.sh carries it)"
)

MAMBA_CASES = CASES + [
    pytest.param((torch.bfloat16, (8, 2), True, 64, 40), id="bf16-GQA4-h0-short"),
    pytest.param((torch.bfloat16, (8, 8), False, 16, 129), id="bf16-G8-N16"),
]


@needs_mamba_ssm
@pytest.mark.parametrize("case", MAMBA_CASES)
def test_mamba_ssm_matches_torch(case):
    dtype, (H, G), init, N, T = case
    inputs = make_inputs(2, T, H, 64, G, N, init, seed=T + H + N)
    y_ref, h_ref, g_ref = run("torch", inputs, dtype)
    check(*run("mamba_ssm", inputs, dtype), y_ref, h_ref, g_ref, dtype)


def test_default_fla_kernel_trains():
    inputs = make_inputs(1, 100, 4, 64, 2, 64, True, seed=1)
    y_ref, h_ref, g_ref = run("torch", inputs, torch.bfloat16)
    check(*run("fla", inputs, torch.bfloat16), y_ref, h_ref, g_ref, torch.bfloat16)


def test_default_backend_on_cuda():
    """mamba_ssm's kernels where they import (power-of-two chunks), else fla's."""
    cuda = torch.device("cuda")
    fast = "mamba_ssm" if chunk_scan_combined() is not None else "fla"
    assert default_backend(cuda) == fast and default_backend(cuda, chunk_size=48) == "fla"
    x, dt, A, B, C, _ = make_inputs(1, 100, 4, 64, 1, 64, False, seed=0)
    x, B, C = x.bfloat16(), B.bfloat16(), C.bfloat16()
    torch.testing.assert_close(ssd(x, dt, A, B, C), ssd(x, dt, A, B, C, backend=fast), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["fla", pytest.param("mamba_ssm", marks=needs_mamba_ssm)])
def test_mixer_matches_torch_with_segments(backend):
    """The layer under bf16 autocast (as in training): segmented prefill, a Triton path vs the torch path."""
    from ramba.layers.mamba2 import Mamba2Mixer

    torch.manual_seed(0)
    m = Mamba2Mixer(128, d_state=64, head_dim=64, n_groups=2).cuda()
    x = torch.randn(2, 150, 128, device="cuda")
    outs = {}
    for name in ("torch", backend):
        m.backend = name
        m.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y1, s = m(x[:, :70], return_state=True)
            y2, s = m(x[:, 70:], s, return_state=True)
            y = torch.cat([y1, y2], 1)
        (y.float().square().mean() + s.ssm.square().mean()).backward()
        outs[name] = (y.detach(), s.ssm.detach(), {k: p.grad.clone() for k, p in m.named_parameters()})
    (y_t, s_t, g_t), (y_f, s_f, g_f) = outs["torch"], outs[backend]
    assert rel_err(y_f, y_t) < 3e-2 and rel_err(s_f, s_t) < 3e-2
    for k in g_t:
        assert rel_err(g_f[k], g_t[k]) < 6e-2, (k, rel_err(g_f[k], g_t[k]))
