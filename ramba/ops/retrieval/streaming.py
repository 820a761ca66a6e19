"""Streaming chunk selection (docs/design.md §2): never builds the ``T × C`` score matrix.

Tokens are processed in blocks; for each token block, chunks are scored one block at a time
and merged into a running top-K (``topk`` of tie-free integer keys, see :func:`_running_topk`).
The selected scores are then recomputed by an autograd function that gathers only the K chosen
landmarks per token, one token block at a time, in the forward and the backward, so peak memory
is O(T·K + T_block·(C_block + K) + T_block·K·Dr). Decoding over host landmarks can take its top-K from a
device sketch instead (``sketch=``, :mod:`ramba.ops.retrieval.sketch`): the same chunks, no landmarks copied in.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from ramba.ops.precision import compute_dtype
from ramba.ops.retrieval.naive import NORMALISERS, check_inputs, resolve_positions

DEFAULT_BLOCK_CHUNKS = 1024
# elements in one tile (scores of a token block × chunk block, or gathered landmarks): 16 MiB in float32
TILE_ELEMENTS = 1 << 22
# elements in one block of landmarks in the compute dtype on a GPU: 64 MiB in float32 (fewer blocks, fewer
# kernel launches); on the CPU a block stays within a tile, which converts bf16 faster (cache, allocator)
LANDMARK_BLOCK_ELEMENTS = 1 << 24
# sort key of an invisible chunk or an empty slot: below every score's key
MASKED = torch.iinfo(torch.int64).min
# float dtype -> (integer dtype of its bits, bits of +inf)
_ORDER_BITS = {torch.float32: (torch.int32, 0x7F800000), torch.float64: (torch.int64, 0x7FF0000000000000)}


def _flat_index(indices: torch.Tensor, C: int) -> torch.Tensor:
    """Row of ``landmarks.reshape(B * C * R, Dr)`` for each entry of ``indices [B, t, R, K]``."""
    B, _, R, _ = indices.shape
    b = torch.arange(B, device=indices.device)[:, None, None, None]
    r = torch.arange(R, device=indices.device)[None, None, :, None]
    return (b * C + indices) * R + r


def _gather(landmarks: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``landmarks [B, C, R, Dr]``, ``indices [B, t, R, K]`` in ``[0, C)`` -> ``[B, t, R, K, Dr]`` on ``indices``'
    device (only those rows read: a store's landmarks are a view of a larger buffer, never copied whole)."""
    B, _, R, _ = landmarks.shape
    b = torch.arange(B, device=landmarks.device)[:, None, None, None]
    r = torch.arange(R, device=landmarks.device)[None, None, :, None]
    return landmarks[b, indices.to(landmarks.device), r].to(indices.device)


class _SelectedScores(torch.autograd.Function):
    """``scores[b, t, r, k] = q_r[b, t, r] . landmarks[b, indices[b, t, r, k], r] / sqrt(Dr)``, 0 where not valid.

    Saves only its inputs; the gathered landmarks are rebuilt per token block in the backward.
    """

    @staticmethod
    def forward(ctx, q_r, landmarks, indices, valid, block_tokens):
        B, T, R, Dr = q_r.shape
        C = landmarks.shape[1]
        acc = compute_dtype(q_r.dtype, landmarks.dtype)
        out = torch.zeros(indices.shape, dtype=acc, device=q_r.device)
        if C > 0:
            for t0 in range(0, T, block_tokens):
                t1 = min(T, t0 + block_tokens)
                picked = _gather(landmarks, indices[:, t0:t1]).to(acc)
                out[:, t0:t1] = torch.einsum("btrd,btrkd->btrk", q_r[:, t0:t1].to(acc), picked)
        out = out.div_(math.sqrt(Dr)).masked_fill_(~valid, 0.0)
        ctx.save_for_backward(q_r, landmarks, indices, valid)
        ctx.block_tokens = block_tokens
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q_r, landmarks, indices, valid = ctx.saved_tensors
        B, T, R, Dr = q_r.shape
        C = landmarks.shape[1]
        acc = grad.dtype
        need_q, need_lm = ctx.needs_input_grad[:2]
        g = grad.masked_fill(~valid, 0.0) / math.sqrt(Dr)
        dq = torch.zeros(q_r.shape, dtype=acc, device=q_r.device) if need_q else None
        dlm = torch.zeros(B * C * R, Dr, dtype=acc, device=q_r.device) if need_lm else None
        if C > 0 and (need_q or need_lm):
            for t0 in range(0, T, ctx.block_tokens):
                t1 = min(T, t0 + ctx.block_tokens)
                gb = g[:, t0:t1]
                if need_q:
                    picked = _gather(landmarks, indices[:, t0:t1]).to(acc)
                    dq[:, t0:t1] = torch.einsum("btrk,btrkd->btrd", gb, picked)
                if need_lm:
                    contrib = gb[..., None] * q_r[:, t0:t1, :, None, :].to(acc)  # [B, t, R, K, Dr]
                    dlm.index_add_(0, _flat_index(indices[:, t0:t1], C).reshape(-1), contrib.reshape(-1, Dr))
        dq = dq.to(q_r.dtype) if need_q else None
        dlm = dlm.view(landmarks.shape).to(landmarks.dtype) if need_lm else None
        return dq, dlm, None, None, None


def _order_bits(s: torch.Tensor) -> torch.Tensor:
    """Scores -> integers in the same order: float32 ``[...]`` -> int32 ``[...]``, float64 -> int64.

    Sign-magnitude to two's complement, so ``-0.0`` and ``0.0`` both map to 0 and ties stay ties; every NaN
    maps to one value above ``+inf`` (``torch.sort`` ranks NaNs highest and equal); ``-inf`` maps above the
    integer minimum, which marks invisible chunks.
    """
    bits_dtype, inf = _ORDER_BITS[s.dtype]
    magnitude = (s.view(bits_dtype) & torch.iinfo(bits_dtype).max).clamp_max_(inf + 1)
    return torch.where(s < 0, -magnitude, magnitude)


def _running_topk(
    q_r: torch.Tensor,
    landmarks: torch.Tensor,
    n_vis: torch.Tensor,
    K: int,
    block_chunks: int,
    visible: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Top-K visible chunks of one token block, streamed over chunk blocks.

    Each chunk gets an integer key ordered like (score, chunk id), invisible chunks the minimum
    ``MASKED``, so ties go to the more recent chunk. float32 scores: the key packs the score's
    order bits above the chunk id in one int64, so ``topk`` of (running top-K + block) is exact.
    float64 scores leave no room for the id: a stable sort of the order bits over the candidates in
    descending chunk order breaks the ties instead. Chunk ids must be below ``2**32``.

    Args:
        q_r: ``[B, t, R, Dr]`` in the compute dtype; landmarks ``[B, C, R, Dr]``;
        n_vis: ``[B, t]`` visible chunks per token (chunks ``0 .. n_vis - 1``);
        visible: ``(n_vis.min(), n_vis.max())`` when the caller knows them (saves a device-to-host sync),
            else None.
    Returns:
        ``[B, t, R, K]`` int64 chunk ids, most recent first, empty slots ``-1`` last.
    """
    B, t, R, Dr = q_r.shape
    dev, packed = q_r.device, q_r.dtype == torch.float32
    if visible is None:
        visible = torch.stack([n_vis.min(), n_vis.max()]).tolist() if n_vis.numel() else (0, 0)
    lo, hi = visible
    run = torch.full((B, t, R, K), MASKED, dtype=torch.long, device=dev)
    run_i = None if packed else torch.full((B, t, R, K), -1, dtype=torch.long, device=dev)
    # low-precision landmarks are converted into one reused buffer (fresh large host tensors page-fault)
    staged = landmarks.dtype != q_r.dtype
    buffer = torch.empty(B, min(block_chunks, hi), R, Dr, dtype=q_r.dtype, device=dev) if staged and hi else None
    # chunks at or beyond the largest visible count are masked for every token: skip them
    for c0 in range(0, hi, block_chunks):
        c1 = min(hi, c0 + block_chunks)
        cidx = torch.arange(c0, c1, device=dev)
        block = landmarks[:, c0:c1].to(dev, non_blocking=True)  # streamed in from host landmarks, in their dtype
        if staged:
            block = buffer[:, : c1 - c0].copy_(block)
        with torch.autocast(dev.type, enabled=False):  # keys need the compute dtype's bits, not autocast's bf16
            key = _order_bits(torch.einsum("btrd,bcrd->btrc", q_r, block).div_(math.sqrt(Dr)))
        if packed:
            key = key.long().mul_(1 << 32).add_(cidx)
        if c1 > lo:  # some token does not see the whole block
            key = key.masked_fill_((cidx >= n_vis[:, :, None])[:, :, None, :], MASKED)
        if packed:
            top = key.topk(min(K, c1 - c0), dim=-1, sorted=False).values
            run = torch.cat([run, top], dim=-1).topk(K, dim=-1, sorted=False).values
        else:
            # candidates in descending chunk order (the block reversed, then the older running top-K)
            cand = torch.cat([key.flip(-1), run], dim=-1)
            cand_i = torch.cat([cidx.flip(0).expand(B, t, R, c1 - c0), run_i], dim=-1)
            run, order = torch.sort(cand, dim=-1, descending=True, stable=True)
            run, run_i = run[..., :K], cand_i.gather(-1, order[..., :K])
    run_i = torch.where(run > MASKED, run & 0xFFFFFFFF if packed else run_i, -1)
    return torch.sort(run_i, dim=-1, descending=True).values


def select_chunks_streaming(
    q_r: torch.Tensor,
    landmarks: torch.Tensor,
    chunk_size: int,
    topk: int,
    positions: torch.Tensor | None = None,
    norm: str = "stick_breaking",
    block_chunks: int | None = None,
    block_tokens: int | None = None,
    sketch=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk selection streamed over blocks of tokens and chunks; same function as the reference.

    Args:
        q_r: ``[B, T, R, Dr]`` retrieval queries, any float dtype.
        landmarks: ``[B, C, R, Dr]`` one vector per complete chunk; on ``q_r``'s device, or (inference, no
            gradient for them) in host memory, streamed in block by block.
        chunk_size: tokens per chunk ``S``; chunk ``c`` is visible at position ``p`` iff ``(c + 1) * S <= p``.
        topk: ``K`` slots per token.
        positions: ``None`` (token ``t`` at position ``t``) or integer ``[T]`` / ``[B, T]``.
        norm: ``"stick_breaking"`` or ``"softmax"``.
        block_chunks: chunks scored at once (default: at least 1024, more when few tokens fill a tile).
        block_tokens: tokens per block (default: sized so a tile holds about ``TILE_ELEMENTS``).
        sketch: a :class:`~ramba.ops.retrieval.sketch.LandmarkSketch` of ``landmarks`` on ``q_r``'s device
            (decoding over host landmarks): the top-K of up to ``sketch.max_tokens`` tokens at a time comes from it,
            the same chunks, without copying the landmarks in; None: stream them.
    Returns:
        indices ``[B, T, R, K]`` int64, most recent chunk first, empty slots (index 0) last;
        weights ``[B, T, R, K]`` float32 (float64 for float64 inputs), 0 on empty slots.
    """
    check_inputs("select_chunks", q_r, landmarks, chunk_size, topk, positions, norm, host_landmarks=True)
    for name, value in (("block_chunks", block_chunks), ("block_tokens", block_tokens)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"select_chunks: {name} must be None or a positive int, got {value!r}")
    B, T, R, Dr = q_r.shape
    C, K, dev = landmarks.shape[1], topk, q_r.device
    acc = compute_dtype(q_r.dtype, landmarks.dtype)
    BR = max(B * R, 1)  # an empty batch sizes its (empty) tiles like a batch of one
    first_block = min(block_chunks or DEFAULT_BLOCK_CHUNKS, max(C, 1))
    tokens_topk = block_tokens or max(1, TILE_ELEMENTS // (BR * (first_block + K)))
    # few tokens (decoding) score many chunks per tile, but a block of landmarks in the compute dtype stays
    # bounded too (decoding at 256M tokens would otherwise convert 4 GiB of landmarks at once)
    lm_block = TILE_ELEMENTS if dev.type == "cpu" else LANDMARK_BLOCK_ELEMENTS
    wide = min(TILE_ELEMENTS // (BR * min(tokens_topk, max(T, 1))) - K, lm_block // (BR * Dr))
    block_chunks = block_chunks or max(DEFAULT_BLOCK_CHUNKS, wide)
    tokens_gather = block_tokens or max(1, TILE_ELEMENTS // (BR * K * Dr))
    n_vis = resolve_positions(positions, B, T, dev).div(chunk_size, rounding_mode="floor").clamp(0, C)
    indices = torch.empty(B, T, R, K, dtype=torch.long, device=dev)
    if sketch is not None and (sketch.n_chunks != C or (sketch.batch, sketch.heads, sketch.dim) != (B, R, Dr)):
        raise ValueError(
            f"select_chunks: the sketch holds {sketch.n_chunks} chunks of other landmarks than [{B}, {C}, {R}, {Dr}]"
        )
    use_sketch = sketch is not None and C > 0
    if use_sketch:
        tokens_topk = sketch.max_tokens
    with torch.no_grad():
        for t0 in range(0, T, tokens_topk):
            t1 = min(T, t0 + tokens_topk)
            q_block = q_r[:, t0:t1].to(acc)
            found = sketch.topk(q_block, landmarks, n_vis[:, t0:t1], K) if use_sketch else None
            if found is None:
                # default positions: the block's first and last tokens see the fewest and the most chunks, known
                # without asking the device
                known = None if positions is not None else (min(C, t0 // chunk_size), min(C, (t1 - 1) // chunk_size))
                found = _running_topk(q_block, landmarks, n_vis[:, t0:t1], K, block_chunks, known)
            indices[:, t0:t1] = found
    valid = indices >= 0
    indices = indices.clamp_min(0)
    selected = _SelectedScores.apply(q_r, landmarks, indices, valid, tokens_gather)
    return indices, NORMALISERS[norm](selected, valid)
