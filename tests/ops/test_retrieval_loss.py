"""The retrieval loss (ramba.ops.retrieval.retrieval_target_loss, docs/design.md §6) against a per-position loop in
float64: values and gradients, targets partly or wholly invisible, rows without a target, bad shapes."""

import math

import pytest
import torch

from ramba.ops.retrieval import retrieval_target_loss, scores_target_loss


def _reference(q_r, landmarks, targets, S):
    B, T, R, Dr = q_r.shape
    C = landmarks.shape[1]
    terms = []
    for b in range(B):
        for t in range(T):
            lo, hi = targets[b, t].tolist()
            visible = [c for c in range(C) if (c + 1) * S <= t]
            wanted = [c for c in visible if lo <= c <= hi]
            if lo < 0 or not wanted:
                continue
            for r in range(R):
                s = torch.stack([q_r[b, t, r] @ landmarks[b, c, r] / math.sqrt(Dr) for c in visible])
                p = torch.softmax(s, 0)
                terms.append(-torch.log(p[[visible.index(c) for c in wanted]].sum()))
    return torch.stack(terms).mean() if terms else torch.zeros((), dtype=q_r.dtype)


def _inputs(seed, B, T, R, Dr, S, n_targets):
    g = torch.Generator().manual_seed(seed)
    C = T // S
    q = torch.randn(B, T, R, Dr, generator=g, dtype=torch.float64, requires_grad=True)
    lm = torch.randn(B, C, R, Dr, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.full((B, T, 2), -1, dtype=torch.long)
    for _ in range(n_targets):
        b, t = int(torch.randint(B, (1,), generator=g)), int(torch.randint(T, (1,), generator=g))
        lo = int(torch.randint(C, (1,), generator=g))
        targets[b, t] = torch.tensor([lo, min(C - 1, lo + int(torch.randint(3, (1,), generator=g)))])
    return q, lm, targets


@pytest.mark.parametrize(
    "seed,B,T,R,Dr,S,n_targets",
    [(0, 1, 32, 1, 8, 4, 6), (1, 2, 48, 2, 16, 8, 10), (2, 3, 20, 3, 4, 5, 12), (3, 2, 64, 1, 8, 16, 40)],
)
def test_matches_the_loop(seed, B, T, R, Dr, S, n_targets):
    """Targets of one to three chunks, some beyond the visible chunks (clipped) or wholly invisible (ignored)."""
    q, lm, targets = _inputs(seed, B, T, R, Dr, S, n_targets)
    got = retrieval_target_loss(q, lm, targets, S)
    want = _reference(q, lm, targets, S)
    assert want.item() > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    dq, dlm = torch.autograd.grad(got, (q, lm))
    wq, wlm = torch.autograd.grad(want, (q, lm))
    torch.testing.assert_close(dq, wq, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dlm, wlm, rtol=1e-9, atol=1e-12)


def test_no_visible_target_is_zero_with_zero_gradients():
    q, lm, targets = _inputs(5, 2, 32, 1, 8, 8, 0)
    targets[0, 5] = torch.tensor([0, 1])  # at t = 5 no chunk of 8 tokens is complete yet
    targets[1, 20] = torch.tensor([3, 3])  # chunk 3 ends at 32 > 20
    loss = retrieval_target_loss(q, lm, targets, 8)
    assert loss.item() == 0.0
    dq, dlm = torch.autograd.grad(loss, (q, lm))
    assert not dq.any() and not dlm.any() and torch.isfinite(dq).all()


def test_float32_and_a_bad_target_shape():
    q, lm, targets = _inputs(6, 1, 32, 1, 8, 4, 5)
    assert retrieval_target_loss(q.float(), lm.float(), targets, 4).dtype == torch.float32
    with pytest.raises(ValueError, match=r"targets must be \[B=1, T=32, 2\]"):
        retrieval_target_loss(q, lm, targets[..., :1], 4)


def test_autocast_leaves_the_scores_in_float32():
    """Under bf16 autocast the scores are the float32 ones, bit for bit: at the sizes a sharpened retrieval reaches
    (thousands) bf16 rounds them by 16, far more than the gaps the loss compares."""
    from ramba.ops.retrieval import chunk_scores

    q, lm, targets = _inputs(7, 2, 64, 1, 16, 8, 20)
    q, lm = (q.detach().float() * 30).requires_grad_(), (lm.detach().float() * 30).requires_grad_()
    plain = retrieval_target_loss(q, lm, targets, 8)
    grads = torch.autograd.grad(plain, (q, lm))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = chunk_scores(q, lm)
        cast = retrieval_target_loss(q, lm, targets, 8)
    assert scores.dtype == torch.float32 and scores.abs().max() > 1000
    torch.testing.assert_close(scores, chunk_scores(q, lm), rtol=0, atol=0)
    torch.testing.assert_close(cast, plain, rtol=0, atol=0)
    for got, want in zip(torch.autograd.grad(cast, (q, lm)), grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_from_any_scores():
    """scores_target_loss on scores that are no single product (the max over a chunk's 4 token landmarks) equals
    the loop on those scores, values and gradients."""
    q, lm, targets = _inputs(7, 2, 48, 2, 8, 8, 12)
    tokens = torch.randn(2, lm.shape[1], 4, 2, 8, dtype=torch.float64, requires_grad=True)  # [B, C, 4, R, Dr]
    scores = torch.einsum("btrd,bcsrd->btrcs", q, tokens).amax(-1) / math.sqrt(8)
    got = scores_target_loss(scores, targets, 8)
    terms = []
    for b in range(2):
        for t in range(48):
            lo, hi = targets[b, t].tolist()
            visible = [c for c in range(lm.shape[1]) if (c + 1) * 8 <= t]
            wanted = [c for c in visible if lo <= c <= hi]
            if lo >= 0 and wanted:
                for r in range(2):
                    p = torch.softmax(scores[b, t, r, visible], 0)
                    terms.append(-torch.log(p[[visible.index(c) for c in wanted]].sum()))
    want = torch.stack(terms).mean()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(got, tokens, retain_graph=True)[0],
        torch.autograd.grad(want, tokens)[0],
        rtol=1e-9,
        atol=1e-12,
    )
