"""Training FLOPs per token and model FLOPs utilisation (docs/design.md §6, "FLOPs per token").

Counted per token of a ``seq_len``-token sequence, forward + backward = 3x the forward's matrix products:

- ``matmul``: 2 x the weights of every ``nn.Linear`` (the LM head included, the embedding lookup not);
- ``attention``: 4 x heads x head_dim x the mean number of keys a query sees ((T + 1) / 2 causal, fewer within
  a sliding window, S + 1 in the chunk encoder, which attends inside each chunk and its summary token);
- ``hsa``: 4 x query heads x head_dim x topk x chunk_size per HSA layer (every selected chunk in full);
- ``selection``: scoring every visible chunk, 2 x R x Dr x (T / S - 1) / 2, once (the top-k search has no
  gradient), plus the K selected scores, 3 x 2 x R x Dr x K;
- ``ssd``: the Mamba-2 chunked scan, 2QNG + 2QPH + 4NPH (chunk Q, state N, groups G, heads H of dim P).

Element-wise work (norms, convolutions, gates, softmax) is not counted, as in the usual 6N convention.
MFU = tokens/s x FLOPs per token / the device's dense bf16 peak (:func:`peak_flops`, from the vendor's data sheet).
"""

from __future__ import annotations

import torch
from torch import nn

from ramba.model.config import LayerKind

__all__ = ["flops_per_token", "peak_flops", "PEAK_BF16_FLOPS"]

# dense bf16 tensor-core peaks (no sparsity), from the data sheets; matched against the CUDA device name
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12}


def _mean_keys(seq_len: int, window: int) -> float:
    """Mean over causal positions of ``min(position + 1, window)``."""
    T, W = seq_len, min(window, seq_len)
    return (W * (W + 1) / 2 + (T - W) * W) / T


def flops_per_token(model: nn.Module, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token of ``model`` at ``seq_len``, by term (see the module docstring) and ``total``."""
    c = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    plan = c.layer_plan()
    n = {kind: plan.count(kind) for kind in LayerKind}
    T = seq_len
    attention = 0.0
    for kind, window in ((LayerKind.ATTENTION, T), (LayerKind.SWA, c.window)):
        attention += n[kind] * 4 * c.n_heads * c.head_dim * _mean_keys(T, window)
    sparse = c.topk * c.chunk_size * 4 * c.n_heads * c.head_dim
    attention += n[LayerKind.NSA] * sparse  # NSA counted by its selected blocks
    attention += n[LayerKind.CHUNK_ENCODER] * c.encoder_layers * 4 * (c.chunk_size + 1) * c.d_model
    score = 2 * c.retrieval_heads * c.retrieval_dim
    visible = max(T // c.chunk_size - 1, 0) / 2
    d_inner = c.expand * c.d_model
    heads = d_inner // c.ssm_head_dim
    Q, N, P, G = c.ssm_chunk_size, c.d_state, c.ssm_head_dim, c.n_groups
    terms = {
        "matmul": 3 * 2 * linear,
        "attention": 3 * attention,
        "hsa": 3 * n[LayerKind.HSA] * sparse,
        "selection": n[LayerKind.RETRIEVAL] * score * (visible + 3 * c.topk),
        "ssd": 3 * n[LayerKind.MAMBA2] * (2 * Q * N * G + 2 * Q * P * heads + 4 * N * P * heads),
    }
    terms["total"] = sum(terms.values())
    return terms


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of a CUDA ``device`` named in :data:`PEAK_BF16_FLOPS`, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)
