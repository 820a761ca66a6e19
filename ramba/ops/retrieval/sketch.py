"""Exact decoding-time top-K over host landmarks from an int8 sketch on the device (docs/design.md §2).

Decoding one token over landmarks held in host memory would copy all of them to the device every step (2 GiB a
token at 256M tokens of the tiny preset). A :class:`LandmarkSketch` keeps on the device, per (row, chunk, head),
int8 codes of the landmark's offset from a center ``m`` (per row and head: the mean of the first landmarks it
holds), ``d = l - m``, ``c = round(d / s)`` with ``s = max|d| / 127``, and the norms ``||l||`` and
``||d - s·c||``: ``Dr + 3·4`` bytes instead of ``Dr·2`` (bf16). The query gets two levels of int8 codes,
``q̂ = s1·c1 + s2·c2`` (the second quantises the first's error), so ``q̂ · s·c`` is a sum of two exact integer dot
products (int8 codes into int32 sums, :func:`_integer_dots`), and

    |q·d - q̂·s·c| <= ||q - q̂||·||d|| + ||q̂||·||d - s·c||        (Cauchy-Schwarz)

bounds every chunk's centered score in ``[lb, ub]`` (widened for the rounding of the exact score and of the
centering). ``q·m`` is the same for every chunk of a row and head, so the centered scores rank the chunks as the
scores do: landmarks that share a large common part (a random model's do: cosine ~0.85 to their mean) get bounds
as tight as their spread, not as their norm. Every visible chunk whose ``ub`` reaches the K-th largest ``lb`` is a
candidate, so no other chunk can be in the top K; the candidates' exact scores, from their host landmarks, are
ranked with the streaming path's keys (ties to the more recent chunk). When the bounds leave more than
``MAX_CANDIDATES`` candidates in a row, or a value is not finite, :meth:`LandmarkSketch.topk` returns None and the
caller streams instead.
"""

from __future__ import annotations

import math

import torch

from ramba.ops.retrieval.streaming import MASKED, _gather, _order_bits

# int8 code bytes of a sketch block (appending adds blocks, never copies one; fewer, larger blocks launch fewer
# kernels a decoding step)
BLOCK_BYTES = 1 << 27
# landmark elements converted and quantised at once when appending (64 MiB in float32: bounds the transient
# device memory; the first decoding step at 256M tokens makes the whole sketch this way)
APPEND_ELEMENTS = 1 << 24
MAX_CANDIDATES = 4096
# a sketch serves selections of at most this many tokens at a time (decoding); longer ones stream the landmarks
SKETCH_TOKENS = 4
_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` float -> codes ``[..., D]`` (integers in [-127, 127], x's dtype) and scale ``[...]``."""
    scale = x.abs().amax(-1) / 127
    codes = torch.round(x / scale[..., None]).clamp_(-127, 127)
    return torch.where(scale[..., None] > 0, codes, 0.0), scale


def _query_codes(q_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q_r [..., Dr]`` -> two levels of codes ``[..., 2, Dr]``, their scales ``[..., 2]`` and ``q̂ [..., Dr]``
    (``q̂ = s1·c1 + s2·c2``; the second level quantises ``q_r - s1·c1``)."""
    first, s1 = _quantize(q_r)
    second, s2 = _quantize(q_r - s1[..., None] * first)
    codes, scales = torch.stack((first, second), dim=-2), torch.stack((s1, s2), dim=-1)
    return codes, scales, (scales[..., None] * codes).sum(-2)


def _int8_gemm_applies(device: torch.device, rows: int, Dr: int) -> bool:
    """Whether :func:`_integer_dots` over blocks of ``rows`` chunks of width ``Dr`` goes through ``torch._int_mm``:
    on CUDA (cuBLASLt's int8 GEMM reads the codes as they are; on the CPU it ran 1.6x slower than the float
    products, one thread, 1M chunks, 2026-12-01) within its shape limits (more than 16 rows, ``Dr`` a multiple of 8)."""
    return device.type == "cuda" and rows > 16 and Dr % 8 == 0


def _integer_dots(q_codes: torch.Tensor, blocks: list[torch.Tensor], n: int) -> torch.Tensor:
    """Exact dot products of integer codes in [-127, 127]: ``q_codes [B, t, R, L, Dr]`` (any dtype) with the first
    ``n`` chunks held by ``blocks`` (int8 ``[B, R, block_chunks, Dr]`` each, chunks in order) -> ``[B, t, R, L, n]``.

    Through ``torch._int_mm`` (int8 in, int32 out; one product a block and (row, head), whole blocks) where
    :func:`_int8_gemm_applies`; else, and as its twin in the tests, float products of the integer values (exact
    while the sums stay below 2**24, float64 beyond).
    """
    B, t, R, L, Dr = q_codes.shape
    rows, columns = blocks[0].shape[2], t * L
    if _int8_gemm_applies(blocks[0].device, rows, Dr):
        queries = torch.zeros(B, R, -(-columns // 8) * 8, Dr, dtype=torch.int8, device=blocks[0].device)
        queries[:, :, :columns] = q_codes.permute(0, 2, 1, 3, 4).reshape(B, R, columns, Dr)
        per_head = [
            [torch.cat([torch._int_mm(c[b, r], queries[b, r].t()) for c in blocks]) for r in range(R)] for b in range(B)
        ]
        out = torch.stack([torch.stack(heads) for heads in per_head])[..., :n, :columns]  # [B, R, n, t * L]
    else:
        mm = torch.float32 if Dr * 127 * 127 < 2**24 else torch.float64
        queries = q_codes.to(mm).permute(0, 2, 4, 1, 3).reshape(B, R, Dr, columns)
        out = torch.cat([codes.to(mm) @ queries for codes in blocks], dim=2)[:, :, :n]
    return out.unflatten(-1, (t, L)).permute(0, 3, 1, 4, 2)


def _bounds(q_r: torch.Tensor, sketch: LandmarkSketch) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate centered scores ``q·(l - m)`` and their error bounds ``[B, t, R, C]`` (before the ``1/sqrt(Dr)``
    scaling); the bounds also cover the rounding of the exact score ``q·l`` and of the centering."""
    Dr, acc = q_r.shape[-1], q_r.dtype
    u = _UNIT_ROUNDOFF[acc]
    q_codes, q_scales, q_hat = _query_codes(q_r)
    q_err, q_norm = (q_r - q_hat).norm(dim=-1), q_r.norm(dim=-1)
    q_parts = (q_scales * q_codes.norm(dim=-1)).sum(-1)  # ||s1·c1|| + ||s2·c2||: the sums' rounding scales with it
    codes, stats = zip(*sketch.blocks)  # the products a block at a time; the rest on all chunks at once
    dot = _integer_dots(q_codes.to(torch.int8), list(codes), sketch.n_chunks).to(acc)  # [B, t, R, 2, C]
    stats = torch.cat(stats, dim=2)[:, :, : sketch.n_chunks].to(acc)
    scale, l_norm, residual = (x[:, None] for x in stats.unbind(-1))  # [B, 1, R, C]
    approx = (dot * q_scales[..., None]).sum(-2).mul_(scale)
    d_norm = l_norm + sketch.center.norm(dim=-1).to(acc)[:, None, :, None]  # >= ||l - m|| (and ||l||)
    # the exact score's own rounding (relative to ||q||·||l||) and the centering's, relative to ||d||
    rounding = (2 * Dr + 1) * u * (q_norm + q_err)
    err = (q_err + rounding)[..., None] * d_norm + (q_norm + q_err)[..., None] * residual
    err += (Dr + 16) * 4 * u * q_parts[..., None] * (d_norm + residual)  # the two levels' products and sum
    return approx, err


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a sketch's center and per-chunk stats for landmarks of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_chunks(batch: int, heads: int, dim: int) -> int:
    """Chunks a block holds by default: ``BLOCK_BYTES`` of codes, a multiple of 16 chunks and more than 16 (every
    (row, head) of a block starts 16-byte aligned and has the rows the int8 GEMM wants)."""
    return max(32, BLOCK_BYTES // (batch * heads * dim) // 16 * 16)


class LandmarkSketch:
    """The int8 sketch of a growing landmark buffer ``[B, C, R, Dr]`` on ``device`` (see the module docstring).

    ``center [B, R, Dr]``: ``m``, the mean of the (finite) landmarks of the first append. Block ``i`` holds chunks
    ``i·block_chunks ..`` (default: ``BLOCK_BYTES`` of codes): ``codes [B, R, block_chunks, Dr]`` int8 and ``stats
    [B, R, block_chunks, 3]`` (scale, ``||l||``, ``||l - m - scale·codes||``) in float32 (float64 for float64
    landmarks); ``n_chunks`` of them are filled. ``candidates``: the most candidates of a row in the last
    :meth:`topk` (None: it handed that selection back to streaming, or none yet).
    """

    max_tokens = SKETCH_TOKENS

    def __init__(
        self,
        batch: int,
        heads: int,
        dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        block_chunks: int | None = None,
    ):
        self.batch, self.heads, self.dim = batch, heads, dim
        self.stats_dtype = _stats_dtype(dtype)
        self.device = torch.device(device)
        self.block_chunks = block_chunks or _block_chunks(batch, heads, dim)
        self.blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.n_chunks = 0
        self.center: torch.Tensor | None = None
        self.candidates: int | None = None

    @staticmethod
    def planned_bytes(batch: int, heads: int, dim: int, n_chunks: int, dtype: torch.dtype) -> int:
        """The device bytes a sketch of ``n_chunks`` chunks of ``dtype`` landmarks holds (:meth:`nbytes`: whole
        default blocks, as :meth:`append` allocates them, and the center), for a memory plan."""
        if n_chunks == 0:
            return 0
        stats, block_chunks = _stats_dtype(dtype).itemsize, _block_chunks(batch, heads, dim)
        return batch * heads * (dim * stats + -(-n_chunks // block_chunks) * block_chunks * (dim + 3 * stats))

    def nbytes(self) -> int:
        center = self.center.nbytes if self.center is not None else 0
        return center + sum(codes.nbytes + stats.nbytes for codes, stats in self.blocks)

    @torch.no_grad()
    def append(self, landmarks: torch.Tensor) -> None:
        """Add ``landmarks [B, c, R, Dr]`` (on any device; copied over ``APPEND_ELEMENTS`` at a time)."""
        B, R, Dr = self.batch, self.heads, self.dim
        done, c, most = 0, landmarks.shape[1], max(1, APPEND_ELEMENTS // (B * R * Dr))
        while done < c:
            block, slot = divmod(self.n_chunks, self.block_chunks)
            if block == len(self.blocks):
                self.blocks.append(
                    (
                        torch.empty(B, R, self.block_chunks, Dr, dtype=torch.int8, device=self.device),
                        torch.empty(B, R, self.block_chunks, 3, dtype=self.stats_dtype, device=self.device),
                    )
                )
            n = min(c - done, self.block_chunks - slot, most)
            part = landmarks[:, done : done + n].to(self.device, non_blocking=True)
            lm = part.to(self.stats_dtype).transpose(1, 2)  # [B, R, n, Dr]
            if self.center is None:
                self.center = torch.nan_to_num(lm, nan=0.0, posinf=0.0, neginf=0.0).mean(dim=2)
            offset = lm - self.center[:, :, None]
            codes, scale = _quantize(offset)
            residual = (offset - scale[..., None] * codes).norm(dim=-1)
            block_codes, block_stats = self.blocks[block]
            block_codes[:, :, slot : slot + n] = codes.to(torch.int8)
            block_stats[:, :, slot : slot + n] = torch.stack((scale, lm.norm(dim=-1), residual), dim=-1)
            done += n
            self.n_chunks += n

    @torch.no_grad()
    def topk(self, q_r: torch.Tensor, landmarks: torch.Tensor, n_vis: torch.Tensor, K: int) -> torch.Tensor | None:
        """Top-K chunks by the exact score, found through the sketch; the same chunks as the streaming top-K.

        Args:
            q_r: ``[B, t, R, Dr]`` queries in the compute dtype (float32 or float64), on the sketch's device.
            landmarks: ``[B, C, R, Dr]`` the sketched landmarks (``C = n_chunks``; host or device memory).
            n_vis: ``[B, t]`` visible chunks per token (chunks ``0 .. n_vis - 1``).
        Returns:
            ``[B, t, R, K]`` int64 chunk ids, most recent first, empty slots ``-1`` last; or None (too many
            candidates, or a value not finite: stream instead).
        """
        B, t, R, Dr = q_r.shape
        C, acc = self.n_chunks, q_r.dtype
        with torch.autocast(q_r.device.type, enabled=False):  # integer-exact products need float32, not bf16
            approx, err = _bounds(q_r, self)
        slack = (Dr + 16) * 4 * _UNIT_ROUNDOFF[acc]  # the rounding of the norms and of the bounds' own arithmetic
        err = err.mul_(1 + slack).add_(approx.abs().mul_(slack))
        visible = torch.arange(C, device=q_r.device) < n_vis[:, :, None, None]  # [B, t, 1, C]
        lower = (approx - err).div_(math.sqrt(Dr)).masked_fill_(~visible, -math.inf)
        upper = (approx + err).div_(math.sqrt(Dr))
        kth = lower.topk(min(K, C), dim=-1).values[..., -1:]
        candidate = visible & (upper >= kth)
        finite = torch.isfinite(approx).all() & torch.isfinite(err).all() & torch.isfinite(q_r).all()
        most, ok = torch.stack([candidate.sum(-1).amax(), finite.long()]).tolist()
        self.candidates = most if ok and most <= MAX_CANDIDATES else None
        if self.candidates is None:
            return None
        if most == 0:
            return torch.full((B, t, R, K), -1, dtype=torch.long, device=q_r.device)
        ids = upper.masked_fill_(~candidate, -math.inf).topk(most, dim=-1).indices  # [B, t, R, most]
        exact = (q_r[..., None, :] * _gather(landmarks, ids).to(acc)).sum(-1).div_(math.sqrt(Dr))
        key = _order_bits(exact).long().masked_fill_(~candidate.gather(-1, ids), MASKED)
        # rank by (score, chunk id): sort by id descending, then a stable sort by score keeps the later chunk first
        ids, order = ids.sort(dim=-1, descending=True)
        key, order = key.gather(-1, order).sort(dim=-1, descending=True, stable=True)
        top = torch.where(key[..., :K] > MASKED, ids.gather(-1, order[..., :K]), -1)
        if top.shape[-1] < K:
            top = torch.cat([top, top.new_full((B, t, R, K - top.shape[-1]), -1)], dim=-1)
        return top.sort(dim=-1, descending=True).values
