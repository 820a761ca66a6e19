"""NSA's compressed + selected branches (ramba.ops.nsa): the vectorised torch path against a per-token loop
written from the definition, in float64, forward and backward; against fla-core's own reference functions
where fla is installed; clear errors. (tests/gpu/test_nsa_gpu.py compares fla's CUDA kernels with it.)"""

import math

import pytest
import torch

from ramba.ops.nsa import mean_pool, nsa, nsa_torch


def nsa_loop(q, k, v, g_cmp, g_slc, topk, S, scale):
    """One query at a time, straight from the definition in ramba/ops/nsa.py."""
    B, T, HQ, D = q.shape
    H = k.shape[2]
    G, n = HQ // H, -(-T // S)
    out = []
    for b in range(B):
        rows = []
        for t in range(T):
            heads = [None] * HQ
            for h in range(H):
                kc = torch.stack([k[b, c * S : (c + 1) * S, h].mean(0) for c in range(n)])
                vc = torch.stack([v[b, c * S : (c + 1) * S, h].mean(0) for c in range(n)])
                visible = [c for c in range(n) if (c + 1) * S - 1 <= t]
                probs = {}
                o_cmp = []
                for j in range(h * G, (h + 1) * G):
                    if visible:
                        p = torch.softmax(torch.stack([q[b, t, j] @ kc[c] for c in visible]) * scale, 0)
                        probs[j] = dict(zip(visible, p))
                        o_cmp.append(sum(pc * vc[c] for c, pc in zip(visible, p)))
                    else:
                        probs[j] = {}
                        o_cmp.append(torch.zeros(D, dtype=q.dtype))
                forced = {c for c in (0, t // S - 1, t // S) if 0 <= c < n}
                mass = {c: sum(p.get(c, torch.zeros(())) for p in probs.values()).detach().item() / G for c in range(n)}
                rank = {c: 1.0 if c in forced else mass[c] for c in range(n)}
                chosen = sorted(range(n), key=lambda c: -rank[c])[:topk]
                chosen = [c for c in chosen if c in forced or c in visible]
                tokens = [i for c in chosen for i in range(c * S, min((c + 1) * S, T)) if i <= t]
                for g_i, j in enumerate(range(h * G, (h + 1) * G)):
                    p = torch.softmax(torch.stack([q[b, t, j] @ k[b, i, h] for i in tokens]) * scale, 0)
                    o_slc = sum(pi * v[b, i, h] for i, pi in zip(tokens, p))
                    heads[j] = g_slc[b, t, j] * o_slc + g_cmp[b, t, j] * o_cmp[g_i]
            rows.append(torch.stack(heads))
        out.append(torch.stack(rows))
    return torch.stack(out)


def _inputs(B, T, HQ, H, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, D, generator=g, dtype=dtype).requires_grad_() for h in (HQ, H, H))
    gates = [torch.rand(B, T, HQ, generator=g, dtype=dtype).requires_grad_() for _ in range(2)]
    return q, k, v, *gates


@pytest.mark.parametrize(
    "B, T, HQ, H, D, S, K",
    [
        (2, 40, 4, 1, 8, 16, 3),  # T not a multiple of S, K above the visible count early on
        (1, 48, 4, 2, 8, 16, 4),  # GQA 2, T a multiple of S
        (2, 37, 2, 2, 4, 8, 8),  # no grouping, K above the block count
        (1, 5, 4, 1, 8, 16, 3),  # shorter than one block: nothing compressed is visible
    ],
)
def test_nsa_torch_matches_the_definition(B, T, HQ, H, D, S, K):
    inputs = _inputs(B, T, HQ, H, D, seed=T)
    scale = D**-0.5
    out = nsa_torch(*inputs, K, S, scale)
    ref = nsa_loop(*inputs, K, S, scale)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad((out * grad).sum(), inputs)
    want = torch.autograd.grad((ref * grad).sum(), inputs)
    for name, a, b in zip(("q", "k", "v", "g_cmp", "g_slc"), got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


def test_mean_pool_averages_each_block_over_its_tokens():
    x = torch.arange(10, dtype=torch.float64).view(1, 10, 1, 1)
    assert mean_pool(x, 4).flatten().tolist() == [1.5, 5.5, 8.5]


def test_nsa_torch_matches_fla_reference():
    """fla-core's own reference functions (its selection, compression and top-k; its mean pooling is a
    Triton kernel, so ours stands in), float32 as fla computes them."""
    naive = pytest.importorskip("fla.ops.nsa.naive", reason="fla-core is not installed (pip install fla-core)")
    B, T, HQ, H, D, S, K = 2, 75, 8, 2, 16, 16, 4
    q, k, v, g_cmp, g_slc = _inputs(B, T, HQ, H, D, seed=1)
    scale = D**-0.5
    kc, vc = mean_pool(k, S), mean_pool(v, S)
    o_cmp, _ = naive.naive_nsa_compression(q, kc, vc, S, scale)
    indices = naive.naive_nsa_topk(q, kc, K, S, scale)
    o_slc = naive.naive_nsa_selection(q, k, v, indices, S, scale)
    ref = o_slc * g_slc[..., None] + o_cmp * g_cmp[..., None]
    out = nsa_torch(q, k, v, g_cmp, g_slc, K, S, scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    for a, b in zip(
        torch.autograd.grad((out * grad).sum(), (q, k, v)), torch.autograd.grad((ref * grad).sum(), (q, k, v))
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_nsa_picks_torch_on_cpu_and_checks_its_inputs():
    q, k, v, g_cmp, g_slc = _inputs(1, 20, 4, 1, 8, dtype=torch.float32)
    torch.testing.assert_close(nsa(q, k, v, g_cmp, g_slc, 2, 16), nsa_torch(q, k, v, g_cmp, g_slc, 2, 16, 8**-0.5))
    assert nsa(q, k, v, g_cmp, g_slc, 2, 16).dtype == torch.float32
    with pytest.raises(ValueError, match="backend 'fla' needs"):
        nsa(q, k, v, g_cmp, g_slc, 2, 16, backend="fla")
    with pytest.raises(ValueError, match="backend must be one of"):
        nsa(q, k, v, g_cmp, g_slc, 2, 16, backend="cuda")
    k3, v3 = (x.expand(-1, -1, 3, -1) for x in (k, v))
    with pytest.raises(ValueError, match="multiple of k's"):
        nsa(q, k3, v3, g_cmp, g_slc, 2, 16)
    with pytest.raises(ValueError, match="g_cmp and g_slc must be"):
        nsa(q, k, v, g_cmp[:, :, :1], g_slc, 2, 16)
    with pytest.raises(ValueError, match="topk must be a positive int"):
        nsa(q, k, v, g_cmp, g_slc, 0, 16)
    with pytest.raises(ValueError, match=r"q must be \[B, T, HQ, D\]"):
        nsa(q, k[:, :10], v[:, :10], g_cmp, g_slc, 2, 16)
    assert math.isfinite(float(nsa(q, k, v, g_cmp, g_slc, 2, 16).detach().sum()))
