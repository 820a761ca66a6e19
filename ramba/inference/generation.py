"""Segmented prefill and token-by-token generation over contexts of millions of tokens (docs/design.md §5)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from ramba.errors import InputError
from ramba.inference.planner import plan_prefill
from ramba.model.cache import RambaCache
from ramba.model.chunk_store import Offload

PREFILL_MODES = ("exact", "fast")
_SHOW_PREFILL_PROGRESS: ContextVar[bool] = ContextVar("show_prefill_progress", default=False)


@contextmanager
def prefill_progress(enabled: bool = True) -> Iterator[None]:
    """Within this block every prefill of more than one segment shows a progress bar of its prompt tokens
    (tokens/s and ETA, updated after each segment) on stderr, removed when the prefill ends. The CLI turns
    it on; library calls stay silent."""
    token = _SHOW_PREFILL_PROGRESS.set(enabled)
    try:
        yield
    finally:
        _SHOW_PREFILL_PROGRESS.reset(token)


def _prefill_bar(total: int, segment_len: int):
    """A tqdm bar over `total` prompt tokens inside `prefill_progress` when they span several segments, else None."""
    if not _SHOW_PREFILL_PROGRESS.get() or total <= segment_len:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="prefill", unit="tok", unit_scale=True, leave=False, dynamic_ncols=True)


@torch.no_grad()
def prefill(
    model,
    input_ids: torch.Tensor,
    segment_len: int = 2048,
    mode: str = "exact",
    offload: bool | str | Offload = False,
    cache: RambaCache | None = None,
    progress: Callable[[int], None] | None = None,
    new_tokens: int = 0,
) -> tuple[torch.Tensor, RambaCache]:
    """Run a prompt through the model in segments of at most ``segment_len`` tokens, filling a cache.

    The segments are cut back from the end of the prompt: the last one holds the final ``segment_len``
    tokens, the first one what is left over. ``mode="exact"`` gives what one full forward gives.
    ``mode="fast"`` skips retrieval and the HSA attention term for every segment but the last (the chunk
    memory is still built from them): an approximation, as in the paper's longest runs, that makes
    prefill cost independent of HSA; the final ``segment_len`` prompt tokens (the question, in a
    retrieval task) always get HSA. ``offload=True`` keeps the chunk memory in CPU (pinned) memory, paged,
    only the selected chunks copied in; ``"disk:PATH"`` spills pages beyond a host budget to a memory-mapped
    file under PATH (see :class:`ramba.model.chunk_store.Offload`). A fresh prefill first plans its memory and
    raises :class:`ramba.inference.planner.MemoryPlanError` when it would not fit. ``input_ids`` may stay on
    the CPU: each segment is moved to the model's device on its own.

    Args:
        model: a ``RambaForCausalLM``. input_ids: ``[B, T]`` with ``T >= 1``.
        progress: called with the number of tokens done after each segment.
        new_tokens: tokens the caller will decode after the prompt: a fresh cache plans and reserves landmark
            room for them too, so decoding never grows (copies) the landmark buffer.
    Returns:
        logits of the last position ``[B, V]`` (float32) and the cache.
    """
    if mode not in PREFILL_MODES:
        raise ValueError(f"prefill: mode must be one of {PREFILL_MODES}, got {mode!r}")
    if segment_len < 1:
        raise ValueError(f"prefill: segment_len must be >= 1, got {segment_len}")
    if new_tokens < 0:
        raise ValueError(f"prefill: new_tokens must be >= 0, got {new_tokens}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"prefill: input_ids must be [B, T] with T >= 1, got {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    vocab = model.config.vocab_size
    lo, hi = (int(input_ids.min()), int(input_ids.max())) if B else (0, 0)
    if lo < 0 or hi >= vocab:
        raise InputError(
            f"prefill: input_ids must lie in [0, vocab_size={vocab}), got values in [{lo}, {hi}]; "
            "encode the prompt with the tokenizer the model was trained with"
        )
    weight = model.get_input_embeddings().weight
    if cache is None:
        plan_prefill(model, B, T + new_tokens, segment_len, offload)
        cache = RambaCache(model.config, B, weight.device, weight.dtype, offload=offload)
        if cache.memory is not None:  # landmark room for the prompt and what follows (exactly: pinned buffers
            cache.memory.reserve(-(-(T + new_tokens) // model.config.chunk_size))  # round up to 2^k bytes)
    logits = None
    ends = list(range(T, 0, -segment_len))[::-1]
    bar = _prefill_bar(T, segment_len)
    try:
        for start, end in zip([0] + ends[:-1], ends):
            out = model(
                input_ids=input_ids[:, start:end].to(weight.device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                skip_hsa=mode == "fast" and end < T,
            )
            logits = out.logits[:, -1].float()
            if bar is not None:
                bar.update(end - bar.n)
            if progress is not None:
                progress(end)
    finally:
        if bar is not None:
            bar.close()
    return logits, cache


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """Next tokens ``[B]`` from logits ``[B, V]``."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / max(temperature, 1e-6)
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    segment_len: int = 2048,
    mode: str = "exact",
    offload: bool | str | Offload = False,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Prefill ``input_ids [B, T]`` (see :func:`prefill`), then decode one token at a time.

    Greedy by default; ``do_sample`` draws from the softmax at ``temperature`` over the ``top_k`` best.
    Rows that produced ``eos_token_id`` continue with it. ``on_token(ids [B])`` sees every new token.

    Returns:
        the new tokens ``[B, max_new_tokens]``.
    """
    if max_new_tokens < 0:
        raise InputError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise InputError(f"generate: temperature must be > 0 when sampling, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"generate: top_k must be None or an int >= 1, got {top_k!r}")
    logits, cache = prefill(model, input_ids, segment_len, mode, offload, new_tokens=max_new_tokens)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=logits.device)
    new_tokens = []
    for step in range(max_new_tokens):
        token = _pick(logits, do_sample, temperature, top_k, generator)
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
            done |= token == eos_token_id
        new_tokens.append(token)
        if on_token is not None:
            on_token(token)
        if step + 1 < max_new_tokens:
            logits = model(input_ids=token[:, None], past_key_values=cache, use_cache=True).logits[:, -1].float()
    if not new_tokens:
        return input_ids.new_zeros(input_ids.shape[0], 0)
    return torch.stack(new_tokens, dim=1)
