"""Where the needle's chunk ranks among all chunks when the model answers: a diagnosis of retrieval.

An answer is right only if, at each answer token, the retrieval layer puts a chunk holding the needle
that token comes from among its top K. For a sample of any task, the prompt is prefilled (as in
`ramba eval tasks`), then the reference answer is fed one token at a time; at each of those tokens every
retrieval layer's query is scored against the landmarks of all complete chunks. Reported per answer
token and retrieval head, for the needle holding the answer the next token belongs to (a multi-value
answer's third value: the third value's needle; a variable tracking answer's variable: the needle
assigning it; a separator: the asked needle): the rank of the best-ranked chunk of that needle (0 = the
top; selected when below K), its score, and the K-th best score (what the needle has to beat). Ranks
that grow with the context length show distractors crowding the needle out, as the long-context
failures of a model trained on short ones do. Where the sample has other needles (other keys, values,
chain links, near-miss distractors), also the best score among their chunks and whether it beats the
wanted needle's: a model that finds needles but not the asked one (a multi-key miss answering another
key's value) shows as "other needle ahead".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ramba.data.tasks import TaskSample, answer_token_needles
from ramba.eval.plots import Panel, line_plots
from ramba.eval.results import EvalError, format_length, write_results
from ramba.eval.tasks import build_task
from ramba.ops.retrieval import chunk_scores

__all__ = [
    "needle_ranks",
    "evaluate_needle_ranks",
    "save_needle_ranks",
    "ranks_table",
    "span_chunks",
]


def needle_ranks(model, sample: TaskSample, segment_len: int = 2048, mode: str = "fast", tokenizer=None) -> list[dict]:
    """Per answer token of `sample` (the final eos excluded) and retrieval layer (its index among the model's
    layers): `{"token", "layer", "needle", "rank" [R], "score" [R], "kth_score" [R], "selected" [R], "chunks",
    "other_score" [R] | None, "other_ahead" [R] | None}`, for the needle (an index into `sample.needles`) of the
    answer the next token belongs to (see `answer_token_needles`; without `tokenizer`, always the asked needle
    `sample.target`); `other_score` is the best score of the complete chunks of the other needles (those sharing
    none of this needle's chunks), None when there are none."""
    from ramba.inference import prefill

    layers = [
        (i, m) for i, (kind, m) in enumerate(zip(model.model.layer_kinds, model.model.layers)) if kind == "retrieval"
    ]
    if not layers:
        raise EvalError("model: it has no retrieval layer (architecture 'ramba' has one per group)")
    S, K = model.config.chunk_size, model.config.topk
    wanted = (
        answer_token_needles(sample, tokenizer) if tokenizer is not None else [sample.target] * len(sample.answer_ids)
    )
    captured: dict[int, torch.Tensor] = {}

    def capture(index):
        def hook(module, args, _out):
            hidden, ctx = args  # the layer protocol's inputs (docs/design.md §3); prefill made a cache
            scores = chunk_scores(module.queries(hidden[:, -1:]), ctx.store.landmarks)  # [B, 1, R, C]
            captured[index] = scores[0, 0].T.cpu()  # [C, R]

        return hook

    handles = [m.register_forward_hook(capture(i)) for i, m in layers]
    device = model.get_input_embeddings().weight.device
    ids = torch.as_tensor(sample.input_ids, dtype=torch.long)
    chunks_of_needle = [span_chunks(n, S) for n in sample.needles]
    needle_chunk_set = set().union(*(c.tolist() for c in chunks_of_needle))  # every needle's chunks
    rows = []
    try:
        with torch.no_grad():
            _, cache = prefill(model, ids[None, : sample.prompt_len], segment_len, mode)
            for t in range(sample.prompt_len, len(ids) - 1):
                captured.clear()
                model(input_ids=ids[None, t : t + 1].to(device), past_key_values=cache, use_cache=True)
                needle = wanted[t + 1 - sample.prompt_len]  # the query at token t serves the prediction of t + 1
                needle_chunks = chunks_of_needle[needle]
                others = sorted(needle_chunk_set - set(needle_chunks.tolist()))
                for index, scores in captured.items():
                    if int(needle_chunks.max()) >= scores.shape[0]:
                        continue  # the needle's chunk is still incomplete: the local mixer's part, not retrieval's
                    best = scores[needle_chunks].max(dim=0).values  # [R]
                    rank = (scores > best).sum(dim=0)  # chunks scoring strictly higher (ties in the needle's favour)
                    kth = scores.topk(min(K, scores.shape[0]), dim=0).values[-1]
                    rivals = [c for c in others if c < scores.shape[0]]
                    other = scores[rivals].max(dim=0).values if rivals else None
                    rows.append(
                        {
                            "token": t - sample.prompt_len,
                            "layer": index,
                            "needle": needle,
                            "rank": rank.tolist(),
                            "score": best.tolist(),
                            "kth_score": kth.tolist(),
                            "selected": (rank < K).tolist(),
                            "chunks": int(scores.shape[0]),
                            "other_score": None if other is None else other.tolist(),
                            "other_ahead": None if other is None else (other > best).tolist(),
                        }
                    )
    finally:
        for h in handles:
            h.remove()
    return rows


def span_chunks(span: tuple[int, int], chunk_size: int) -> torch.Tensor:
    """The chunk indices a token span `[start, end)` touches."""
    start, end = span
    return torch.arange(start // chunk_size, (end - 1) // chunk_size + 1)


def evaluate_needle_ranks(
    model,
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    samples: int,
    segment_len: int = 2048,
    mode: str = "fast",
    seed: int = 0,
    haystack=None,
    progress: bool = False,
    task: str = "passkey",
) -> dict:
    """`needle_ranks` for samples of `task` (a spec as `ramba eval tasks` takes, e.g. "niah_multikey" or
    "variable_tracking:num_hops=2") over lengths x depths: `{"task", "lengths", "depths", "samples", "cells":
    [{"length", "depth", "seed", "needles", "answer_needles", "rows"}], "median_rank" [lengths]}` (median over
    every answer token and head)."""
    from tqdm.auto import tqdm

    spec, task = task, build_task(task, tokenizer, haystack)
    cells = []
    bar = tqdm(total=len(lengths) * len(depths) * samples, desc="needle ranks", unit="sample", disable=not progress)
    try:
        for length in lengths:
            for depth in depths:
                for i in range(samples):
                    try:
                        sample = task.generate(int(length), float(depth), seed=seed + i)
                    except ValueError as e:
                        raise EvalError(str(e)) from None
                    rows = needle_ranks(model, sample, segment_len, mode, tokenizer)
                    cells.append(
                        {
                            "length": int(length),
                            "depth": float(depth),
                            "seed": seed + i,
                            "needles": [list(n) for n in sample.needles],
                            "answer_needles": sample.answer_needles,
                            "rows": rows,
                        }
                    )
                    bar.update(1)
    finally:
        bar.close()
    result = {
        "task": spec,
        "lengths": [int(n) for n in lengths],
        "depths": [float(d) for d in depths],
        "samples": samples,
        "topk": model.config.topk,
        "cells": cells,
    }
    result["median_rank"] = [float(np.median(_ranks(result, n) or [np.nan])) for n in result["lengths"]]
    return result


def _rows(result: dict, length: int) -> list[dict]:
    return [row for c in result["cells"] if c["length"] == length for row in c["rows"]]


def _ranks(result: dict, length: int) -> list[int]:
    """Every needle rank (answer tokens x heads) at one length."""
    return [r for row in _rows(result, length) for r in row["rank"]]


def ranks_table(result: dict) -> str:
    """A row per length, over its answer tokens and heads: median and worst rank of the needle, how often it
    is selected, the median margin (needle score - K-th best score; it shrinks as distractors multiply), and how
    often another needle's chunk scores above it (- where the samples hold no other needle)."""
    lines = [
        f"{'length':>8} | {'median rank':>11} | {'worst rank':>10} | {'selected':>8} | {'margin':>6} | other needle ahead"
    ]
    for n in result["lengths"]:
        rows, ranks = _rows(result, n), _ranks(result, n)
        if not ranks:
            lines.append(f"{format_length(n):>8} | {'-':>11} | {'-':>10} | {'-':>8} | {'-':>6} | -")
            continue
        chosen = np.mean([r < result["topk"] for r in ranks])
        margin = np.median([s - k for row in rows for s, k in zip(row["score"], row["kth_score"])])
        ahead = [a for row in rows if row["other_ahead"] is not None for a in row["other_ahead"]]
        lines.append(
            f"{format_length(n):>8} | {np.median(ranks):>11.0f} | {max(ranks):>10d} | {chosen:>8.0%} | {margin:>6.2f} | "
            + (f"{np.mean(ahead):.0%}" if ahead else "-")
        )
    return "\n".join(lines)


def save_needle_ranks(
    result: dict, out_dir, config: dict | None = None, seed: int | None = None, name: str = "ranks"
) -> tuple[Path, Path]:
    """Writes `<name>.json` and `<name>.png` (median and worst rank of the needle by context length)."""
    out_dir = Path(out_dir)
    worst = [max(_ranks(result, n) or [np.nan]) for n in result["lengths"]]
    k = result["topk"]
    series = {
        "median rank": (result["lengths"], [m + 1 for m in result["median_rank"]]),
        "worst rank": (result["lengths"], [w + 1 for w in worst]),
        f"top-{k} cut": (result["lengths"], [k] * len(result["lengths"])),
    }
    json_path = write_results(out_dir / f"{name}.json", result, config, seed)
    png_path = line_plots(
        [
            Panel(
                f"{result['task']}: needle chunk's rank among all chunks (1 = best)",
                "context length (tokens)",
                "rank + 1",
                series,
                length_axis=True,
                logy=True,
            )
        ],
        out_dir / f"{name}.png",
    )
    return json_path, png_path
