"""Perplexity by context length, and by position inside the context.

For each length `L`, `windows` windows of `L` tokens are read from a token file at evenly spaced
offsets (deterministic: the same windows on every machine). Every token but the first of a window is
scored given all tokens before it in the window: `nll[p] = -log P(x[p] | x[:p])`, p = 1 .. L-1.
`ppl = exp(mean nll)`, over the whole window and per position bucket (log-spaced by default:
[0, L/2^(n-1)), ..., [L/2, L)), so one sees whether far context still lowers the loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ramba.data.tokens import TokenFile
from ramba.eval.results import EvalError, format_length, write_results

__all__ = ["bucket_edges", "window_starts", "token_nll", "evaluate_ppl", "save_ppl", "ppl_table"]


def bucket_edges(length: int, buckets: int = 8, scale: str = "log") -> list[int]:
    """Position-bucket boundaries `[0, e_1, ..., length]` (strictly increasing).

    `log`: every bucket but the first twice as long as the one before; `linear`: equal widths.
    """
    if length < 2 or buckets < 1:
        raise EvalError(f"length, buckets: need length >= 2 and buckets >= 1, got {length}, {buckets}")
    if scale == "log":
        inner = [round(length / 2 ** (buckets - 1 - i)) for i in range(buckets)]
    elif scale == "linear":
        inner = [round(length * (i + 1) / buckets) for i in range(buckets)]
    else:
        raise EvalError(f"scale: expected 'log' or 'linear', got {scale!r}")
    edges = [0]
    for e in inner:
        if e > edges[-1]:
            edges.append(e)
    edges[-1] = length
    return edges


def window_starts(n_tokens: int, length: int, windows: int) -> list[int]:
    """`windows` offsets of windows of `length` tokens spread evenly over a file of `n_tokens` tokens."""
    if length > n_tokens:
        raise EvalError(f"lengths: the token file holds {n_tokens} tokens, fewer than the length {length}")
    if windows == 1:
        return [0]
    return [int(x) for x in np.linspace(0, n_tokens - length, windows).round()]


@torch.no_grad()
def token_nll(
    model, ids: torch.Tensor, segment_len: int = 2048, offload: bool = False, cache=None, greedy: bool = False
):
    """`ids [B, T]` -> `nll [B, T - 1]` float32: `nll[:, p - 1] = -log P(ids[:, p] | ids[:, :p])`.

    The window runs through the model in segments of `segment_len` tokens with the inference cache
    (as an exact prefill does), so memory is bounded by the segment, not by `T`; the logits of one
    segment `[B, segment_len, V]` are the largest tensor. `offload` keeps the chunk memory on the CPU.
    `cache` continues a filled `RambaCache` (`ids` then follow the tokens it has seen; the scores are
    conditioned on them too). `greedy` also returns `[B, T - 1]` bool: whether each token is the argmax
    of the logits that predict it.
    """
    from ramba.inference import RambaCache

    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"ids: expected [B, T] with T >= 2, got shape {tuple(ids.shape)}")
    if segment_len < 1:
        raise ValueError(f"segment_len: expected >= 1, got {segment_len}")
    B, T = ids.shape
    weight = model.get_input_embeddings().weight
    if cache is None:
        cache = RambaCache(model.config, B, weight.device, weight.dtype, offload=offload)
    nll = torch.empty(B, T - 1, dtype=torch.float32, device=ids.device)
    is_argmax = torch.empty(B, T - 1, dtype=torch.bool, device=ids.device)
    for s in range(0, T - 1, segment_len):
        logits = model(input_ids=ids[:, s : s + segment_len], past_key_values=cache, use_cache=True).logits
        targets = ids[:, s + 1 : s + segment_len + 1]  # logits[:, i] predicts ids[:, s + i + 1]
        n = targets.shape[1]
        nll[:, s : s + n] = F.cross_entropy(logits[:, :n].float().transpose(1, 2), targets, reduction="none")
        is_argmax[:, s : s + n] = logits[:, :n].argmax(dim=-1) == targets
    return (nll, is_argmax) if greedy else nll


def evaluate_ppl(
    model,
    token_file: TokenFile | str,
    lengths: Sequence[int],
    windows: int = 4,
    buckets: int = 8,
    scale: str = "log",
    batch_size: int = 1,
    segment_len: int = 2048,
    offload: bool = False,
    progress: bool = False,
) -> dict:
    """Perplexity per length and per position bucket; see the module docstring.

    Returns `{"lengths", "windows", "by_length": [{"length", "tokens", "nll", "ppl", "buckets": [...]}]}`,
    each bucket `{"start", "end", "tokens", "nll", "ppl"}` over predicted positions `start <= p < end`.
    """
    from tqdm.auto import tqdm

    tf = token_file if isinstance(token_file, TokenFile) else TokenFile(token_file)
    if tf.vocab_size > model.config.vocab_size:
        raise EvalError(
            f"data: the token file's vocabulary ({tf.vocab_size}) is larger than the model's "
            f"({model.config.vocab_size}); it was prepared with another tokenizer"
        )
    if windows < 1 or batch_size < 1:
        raise EvalError(f"windows, batch_size: expected positive ints, got {windows}, {batch_size}")
    device = next(model.parameters()).device
    plan = {n: window_starts(len(tf), n, windows) for n in lengths}
    by_length = []
    bar = tqdm(total=len(lengths) * windows, desc="ppl", unit="window", disable=not progress)
    try:
        for length in lengths:
            edges = bucket_edges(length, buckets, scale)
            sums = np.zeros(len(edges) - 1)
            counts = np.zeros(len(edges) - 1, dtype=np.int64)
            starts = plan[length]
            for b0 in range(0, len(starts), batch_size):
                rows = [np.asarray(tf.tokens[s : s + length], dtype=np.int64) for s in starts[b0 : b0 + batch_size]]
                ids = torch.from_numpy(np.stack(rows)).to(device)
                nll = (
                    token_nll(model, ids, segment_len, offload).double().cpu().numpy()
                )  # position p predicted at column p - 1
                for i in range(len(edges) - 1):
                    lo, hi = max(edges[i], 1) - 1, edges[i + 1] - 1
                    if hi > lo:
                        sums[i] += nll[:, lo:hi].sum()
                        counts[i] += nll[:, lo:hi].size
                bar.update(len(rows))
            total_nll = float(sums.sum() / counts.sum())
            by_length.append(
                {
                    "length": int(length),
                    "tokens": int(counts.sum()),
                    "nll": total_nll,
                    "ppl": math.exp(total_nll),
                    "buckets": [
                        {
                            "start": int(edges[i]),
                            "end": int(edges[i + 1]),
                            "tokens": int(counts[i]),
                            "nll": float(sums[i] / counts[i]) if counts[i] else None,
                            "ppl": math.exp(sums[i] / counts[i]) if counts[i] else None,
                        }
                        for i in range(len(edges) - 1)
                    ],
                }
            )
    finally:
        bar.close()
    return {
        "data": str(tf.path),
        "lengths": list(lengths),
        "windows": windows,
        "bucket_scale": scale,
        "segment_len": segment_len,
        "offload": offload,
        "by_length": by_length,
    }


def ppl_table(result: dict) -> str:
    """Text table: a row per length with its perplexity and the perplexity of its last bucket."""
    lines = [f"{'length':>8} | {'tokens':>10} | {'ppl':>9} | {'ppl last bucket':>15}", "-" * 52]
    for r in result["by_length"]:
        last = r["buckets"][-1]
        lines.append(
            f"{format_length(r['length']):>8} | {r['tokens']:>10} | {r['ppl']:>9.3f} | "
            f"{last['ppl'] if last['ppl'] is not None else float('nan'):>15.3f}"
        )
    return "\n".join(lines)


def save_ppl(
    result: dict, out_dir, config: dict | None = None, seed: int | None = None, name: str = "ppl"
) -> tuple[Path, Path]:
    """Writes `<name>.json` and `<name>.png` (ppl by length; ppl by position, a line per length)."""
    from ramba.eval.plots import Panel, line_plots

    out_dir = Path(out_dir)
    rows = result["by_length"]
    by_len = Panel(
        "perplexity by context length",
        "context length (tokens)",
        "perplexity",
        {"whole window": ([r["length"] for r in rows], [r["ppl"] for r in rows])},
        length_axis=True,
    )
    by_pos = Panel(
        "perplexity by position",
        "position (bucket end)",
        "perplexity",
        {
            f"L={format_length(r['length'])}": ([b["end"] for b in r["buckets"]], [b["ppl"] for b in r["buckets"]])
            for r in rows
        },
        length_axis=True,
        logy=True,
    )
    json_path = write_results(out_dir / f"{name}.json", result, config, seed)
    png_path = line_plots([by_len, by_pos], out_dir / f"{name}.png")
    return json_path, png_path
