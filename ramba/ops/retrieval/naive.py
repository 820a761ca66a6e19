"""Reference chunk selection (docs/design.md §2): full score matrix, mask, top-k, sort. The spec in code.

Also holds what both implementations share: input checks, positions, and the two weight
normalisers (used by the model's layers too).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from ramba.ops.precision import compute_dtype

NORMS = ("stick_breaking", "softmax")


def _check_norm_inputs(fn: str, scores: torch.Tensor, valid: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        got = getattr(scores, "dtype", type(scores).__name__)
        raise TypeError(f"{fn}: scores must be a floating-point tensor [..., K], got {got}")
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        got = getattr(valid, "dtype", type(valid).__name__)
        raise TypeError(f"{fn}: valid must be a bool tensor [..., K], got {got}")
    if valid.shape != scores.shape:
        raise ValueError(f"{fn}: valid must have the shape of scores {tuple(scores.shape)}, got {tuple(valid.shape)}")


def stick_breaking_weights(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Stick-breaking weights over ordered slots.

    ``w_i = sigmoid(s_i) * prod_{j<i} (1 - sigmoid(s_j))`` over the valid slots; an invalid slot
    gets weight 0 and breaks nothing off the stick. The weights sum to at most 1.

    Args:
        scores: ``[..., K]`` float slot scores, in slot order.
        valid: ``[..., K]`` bool, which slots hold a chunk.
    Returns:
        ``[..., K]`` float32 (float64 for float64 scores).
    """
    _check_norm_inputs("stick_breaking_weights", scores, valid)
    s = torch.where(valid, scores.to(compute_dtype(scores.dtype)), 0.0)
    # log sigmoid(s) = -softplus(-s) and log(1 - sigmoid(s)) = -softplus(s): log space, no overflow
    broken = torch.where(valid, F.softplus(s), 0.0)
    before = F.pad(torch.cumsum(broken, dim=-1)[..., :-1], (1, 0))  # sum over j < i
    return torch.where(valid, torch.exp(-F.softplus(-s) - before), 0.0)


def softmax_weights(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the valid slots; invalid slots get 0, a row with no valid slot is all 0.

    Args:
        scores: ``[..., K]`` float slot scores.
        valid: ``[..., K]`` bool, which slots hold a chunk.
    Returns:
        ``[..., K]`` float32 (float64 for float64 scores).
    """
    _check_norm_inputs("softmax_weights", scores, valid)
    s = torch.where(valid, scores.to(compute_dtype(scores.dtype)), -math.inf)
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, 0.0)  # rows with no valid slot
    e = torch.where(valid, torch.exp(s - m), 0.0)
    den = e.sum(dim=-1, keepdim=True)
    return e / torch.where(den > 0, den, 1.0)


NORMALISERS = {"stick_breaking": stick_breaking_weights, "softmax": softmax_weights}


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_inputs(fn: str, q_r, landmarks, chunk_size, topk, positions, norm, host_landmarks: bool = False) -> None:
    """Raise TypeError/ValueError naming the bad argument of ``select_chunks`` (``host_landmarks``: landmarks may
    be in host memory while ``q_r`` is on a GPU)."""
    for name, t, dims in (("q_r", q_r, "[B, T, R, Dr]"), ("landmarks", landmarks, "[B, C, R, Dr]")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor {dims}, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor {dims}, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must have rank 4 {dims}, got shape {tuple(t.shape)}")
    B, T, R, Dr = q_r.shape
    if landmarks.shape[0] != B or landmarks.shape[2:] != (R, Dr):
        raise ValueError(
            f"{fn}: landmarks must be [B={B}, C, R={R}, Dr={Dr}] to match q_r {tuple(q_r.shape)}, "
            f"got {tuple(landmarks.shape)}"
        )
    if Dr == 0:
        raise ValueError(f"{fn}: q_r's retrieval dim Dr must be positive, got shape {tuple(q_r.shape)}")
    if q_r.device != landmarks.device and not (host_landmarks and landmarks.device.type == "cpu"):
        raise ValueError(f"{fn}: q_r and landmarks must be on one device, got {q_r.device} and {landmarks.device}")
    if not _is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be a positive int, got {chunk_size!r}")
    if not _is_int(topk) or topk < 1:
        raise ValueError(f"{fn}: topk must be a positive int, got {topk!r}")
    if norm not in NORMS:
        raise ValueError(f"{fn}: norm must be one of {NORMS}, got {norm!r}")
    if positions is not None:
        if not isinstance(positions, torch.Tensor):
            raise TypeError(
                f"{fn}: positions must be None or an integer tensor [T] or [B, T], got {type(positions).__name__}"
            )
        if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
            raise TypeError(f"{fn}: positions must be an integer tensor [T] or [B, T], got {positions.dtype}")
        if positions.shape not in ((T,), (B, T)):
            raise ValueError(f"{fn}: positions must be [T={T}] or [B={B}, T={T}], got {tuple(positions.shape)}")
        if positions.device != q_r.device:
            raise ValueError(f"{fn}: positions must be on q_r's device {q_r.device}, got {positions.device}")


def resolve_positions(positions: torch.Tensor | None, B: int, T: int, device: torch.device) -> torch.Tensor:
    """``[B, T]`` int64 absolute positions; ``None`` means token ``t`` sits at position ``t``."""
    if positions is None:
        positions = torch.arange(T, device=device)
    return positions.long().expand(B, T)


def chunk_scores(q_r: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
    """Every chunk's retrieval score ``q_r · landmark / sqrt(Dr)``, visible or not: ``q_r [B, T, R, Dr]``,
    ``landmarks [B, C, R, Dr]`` -> ``[B, T, R, C]`` in the compute dtype (float32, float64 for float64), under autocast
    too."""
    acc = compute_dtype(q_r.dtype, landmarks.dtype)
    # autocast would run the product in bf16, whose rounding of scores in the hundreds or thousands (8 or more) is
    # wider than the gaps between needles' scores: the retrieval loss's gradient turned to noise (2026-12-07)
    with torch.autocast(q_r.device.type, enabled=False):
        return torch.einsum("btrd,bcrd->btrc", q_r.to(acc), landmarks.to(acc)) / math.sqrt(q_r.shape[-1])


def retrieval_target_loss(
    q_r: torch.Tensor, landmarks: torch.Tensor, targets: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """The retrieval loss (docs/design.md §6): at each position with a target, the cross-entropy of the softmax of
    :func:`chunk_scores` over the chunks visible there (``(c + 1) * S <= t``) against the target chunks
    ``targets[b, t, 0] .. targets[b, t, 1]`` (inclusive; ``-log`` of their summed probability), averaged over those
    positions and the retrieval heads. ``q_r [B, T, R, Dr]``, ``landmarks [B, C, R, Dr]``, ``targets [B, T, 2]``
    int (``-1``: none) -> ``[]`` float32 (float64 for float64 inputs); 0, with zero gradients, when no position
    has a visible target. No host sync (CUDA-graph safe)."""
    B, T, R, _ = q_r.shape
    if targets.shape != (B, T, 2):
        raise ValueError(f"retrieval_target_loss: targets must be [B={B}, T={T}, 2], got {tuple(targets.shape)}")
    return scores_target_loss(chunk_scores(q_r, landmarks), targets, chunk_size)


def scores_target_loss(scores: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """:func:`retrieval_target_loss` from given chunk scores ``[B, T, R, C]`` (however they were computed)."""
    _, T, R, C = scores.shape
    c = torch.arange(C, device=scores.device)
    visible = ((c + 1) * chunk_size <= torch.arange(T, device=scores.device)[:, None])[None]  # [1, T, C]
    lo, hi = targets[..., :1], targets[..., 1:]
    positive = (c >= lo) & (c <= hi) & visible  # [B, T, C]
    has = positive.any(-1)  # [B, T]
    # rows without a target take every chunk on both sides: finite, and weighted 0 below
    everything = ~has[..., None]
    denominator = torch.logsumexp(scores.masked_fill(~(visible | everything)[:, :, None], -math.inf), -1)
    numerator = torch.logsumexp(scores.masked_fill(~(positive | everything)[:, :, None], -math.inf), -1)
    per_row = (denominator - numerator) * has[..., None]  # [B, T, R]
    return per_row.sum() / (has.sum() * R).clamp_min(1)


def select_chunks_naive(
    q_r: torch.Tensor,
    landmarks: torch.Tensor,
    chunk_size: int,
    topk: int,
    positions: torch.Tensor | None = None,
    norm: str = "stick_breaking",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's top-``K`` visible chunks and weight them; the plain reference.

    Materialises the full ``[B, T, R, C]`` score matrix: use :func:`select_chunks` for long inputs.

    Args:
        q_r: ``[B, T, R, Dr]`` retrieval queries, any float dtype.
        landmarks: ``[B, C, R, Dr]`` one vector per complete chunk.
        chunk_size: tokens per chunk ``S``; chunk ``c`` is visible at position ``p`` iff ``(c + 1) * S <= p``.
        topk: ``K`` slots per token.
        positions: ``None`` (token ``t`` at position ``t``) or integer ``[T]`` / ``[B, T]``.
        norm: ``"stick_breaking"`` or ``"softmax"``.
    Returns:
        indices ``[B, T, R, K]`` int64, most recent chunk first, empty slots (index 0) last;
        weights ``[B, T, R, K]`` float32 (float64 for float64 inputs), 0 on empty slots.
    """
    check_inputs("select_chunks_naive", q_r, landmarks, chunk_size, topk, positions, norm)
    B, T, R, Dr = q_r.shape
    C, K, dev = landmarks.shape[1], topk, q_r.device
    acc = compute_dtype(q_r.dtype, landmarks.dtype)
    pos = resolve_positions(positions, B, T, dev)
    with torch.no_grad():
        scores = chunk_scores(q_r, landmarks)
        visible = (torch.arange(C, device=dev) + 1) * chunk_size <= pos[:, :, None]  # [B, T, C]
        # ties go to the more recent chunk: reverse the chunk axis so that a stable sort keeps
        # equal scores in recent-first order; a second stable sort then puts every visible chunk
        # before every invisible one (a visible score may be -inf too)
        order = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices
        seen = visible.flip(-1)[:, :, None, :].expand_as(scores).gather(-1, order).to(torch.uint8)
        order = order.gather(-1, torch.sort(seen, dim=-1, descending=True, stable=True).indices)[..., :K]
        top = C - 1 - order  # [B, T, R, min(K, C)]
        n_valid = visible.sum(-1).clamp(max=K)[:, :, None, None]
        top = torch.where(torch.arange(top.shape[-1], device=dev) < n_valid, top, -1)
        top = F.pad(top, (0, K - top.shape[-1]), value=-1)
        indices = torch.sort(top, dim=-1, descending=True).values  # recent first, empty (-1) last
        valid = indices >= 0
    # the selected scores again, with autograd; empty slots read an appended zero row (index C)
    lm = F.pad(landmarks.to(acc), (0, 0, 0, 0, 0, 1))  # [B, C + 1, R, Dr]
    b = torch.arange(B, device=dev)[:, None, None, None]
    r = torch.arange(R, device=dev)[None, None, :, None]
    picked = lm[b, torch.where(valid, indices, C), r]  # [B, T, R, K, Dr]
    selected = (q_r.to(acc)[..., None, :] * picked).sum(-1) / math.sqrt(Dr)
    weights = NORMALISERS[norm](selected, valid)
    return torch.where(valid, indices, 0), weights
