"""causal_attention (blocked sliding window) against an explicit softmax over allowed keys, float64."""

import pytest
import torch

from ramba.ops.attention import causal_attention


def explicit_attention(q, k, v, window):
    B, T, HQ, D = q.shape
    Tk, H = k.shape[1], k.shape[2]
    out = torch.zeros_like(q)
    for t in range(T):
        pos = Tk - T + t
        lo = 0 if window is None else max(0, pos - window + 1)
        for j in range(HQ):
            h = j // (HQ // H)
            s = torch.einsum("bd,bsd->bs", q[:, t, j], k[:, lo : pos + 1, h]) * D**-0.5
            out[:, t, j] = torch.einsum("bs,bsd->bd", s.softmax(-1), v[:, lo : pos + 1, h])
    return out


@pytest.mark.parametrize(
    "T,Tk,window", [(37, 37, None), (37, 37, 5), (40, 40, 8), (7, 30, 4), (1, 50, 16), (33, 33, 64), (20, 45, None)]
)
@pytest.mark.parametrize("HQ,H", [(2, 2), (4, 1)])
def test_causal_attention_matches_explicit(T, Tk, window, HQ, H):
    g = torch.Generator().manual_seed(T * 100 + Tk + HQ)
    q = torch.randn(2, T, HQ, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, Tk, H, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, Tk, H, 8, generator=g, dtype=torch.float64, requires_grad=True)
    out = causal_attention(q, k, v, window)
    ref = explicit_attention(q, k, v, window)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_causal_attention_bad_input():
    q = torch.randn(1, 5, 2, 4)
    with pytest.raises(ValueError, match="Tk"):
        causal_attention(q, torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4))
    with pytest.raises(ValueError, match="window"):
        causal_attention(q, torch.randn(1, 5, 2, 4), torch.randn(1, 5, 2, 4), window=0)
