"""Scoring synthetic long-context tasks (passkey, needle-in-a-haystack, variable tracking) by generation.

For every (length, depth) cell, `samples` prompts are generated with seeds `seed, seed + 1, ...`
(the same seeds in every cell, so cells differ only in length and depth; lengths above 1M take
`long_samples`), the model continues each prompt through `ramba.inference.generate` (segmented
prefill, so any length that fits the cache works, whether or not it is a multiple of the chunk size),
and the task's scorer grades the decoded continuation, cut at the first eos. Every sample's record keeps
the expected answer, the model's answer and the token positions of the needles, so a failure can be
read without running again.

The protocol runs over several haystacks (`load_haystacks`, `over_haystacks`): results name each one and
say which are held out (used in neither training nor tuning; docs/evaluation.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ramba.data.tasks import Task, TaskSample, TokenFileHaystack, make_task
from ramba.eval.measure import peak_rss_bytes
from ramba.eval.results import EvalError, format_length, format_table, write_results

__all__ = [
    "GenerationSettings",
    "CellResult",
    "parse_task_spec",
    "build_task",
    "continue_prompts",
    "cell_samples",
    "evaluate_task",
    "score_matrix",
    "summarize",
    "evaluate_tasks",
    "save_tasks",
    "tasks_tables",
    "samples_per_length",
    "interval_bound",
    "load_haystacks",
    "over_haystacks",
    "sample_record",
    "task_length_matrix",
    "LONG_CONTEXT",
    "HELD_OUT",
]

logger = logging.getLogger(__name__)

LONG_CONTEXT = 1 << 20  # cells longer than this (1M tokens) take `long_samples` samples
HELD_OUT = ("debian-manuals",)  # the protocol's held-out haystack: in neither training nor tuning (docs/evaluation.md)
TEMPLATE = "template"  # the haystack name of the repeated template sentence


@dataclass
class GenerationSettings:
    """How prompts are continued: see `ramba.inference.generate`. A sample gets the length of its
    reference answer (eos included) plus `extra_tokens` new tokens, so a model that words its answer
    a little differently is not cut off."""

    segment_len: int = 2048
    mode: str = "exact"
    offload: bool = False
    batch_size: int = 1
    extra_tokens: int = 8

    def __post_init__(self):
        if self.mode not in ("exact", "fast"):
            raise EvalError(f"mode: expected 'exact' or 'fast', got {self.mode!r}")
        if self.segment_len < 1 or self.batch_size < 1 or self.extra_tokens < 0:
            raise EvalError(
                f"segment_len, batch_size, extra_tokens: expected >= 1, >= 1, >= 0, got "
                f"{self.segment_len}, {self.batch_size}, {self.extra_tokens}"
            )


@dataclass
class CellResult:
    """The samples of one (task, length, depth) cell: `score` is their mean score in [0, 1]."""

    task: str
    length: int
    depth: float
    score: float
    samples: list[dict] = field(default_factory=list)
    seconds: float | None = None  # wall clock of the cell's generations
    peak_gpu_gib: float | None = None  # peak CUDA memory allocated during the cell (None on the CPU)
    peak_rss_gib: float | None = None  # the process's peak resident host memory so far, after the cell

    def to_dict(self) -> dict:
        return asdict(self)


def parse_task_spec(spec: str) -> tuple[str, dict]:
    """`"variable_tracking:num_hops=2:value_format=word:vary=true"` -> `("variable_tracking", {"num_hops": 2,
    "value_format": "word", "vary": True})`: integers, floats, true/false, else strings."""
    name, *items = spec.strip().split(":")
    params: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise EvalError(f"tasks: cannot read {item!r} in {spec!r}; expected name:key=value:key=value")
        params[key] = _spec_value(value)
    return name, params


def _spec_value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def build_task(spec: str, tokenizer, haystack=None) -> Task:
    """The task named by `spec` (see `parse_task_spec`)."""
    name, params = parse_task_spec(spec)
    try:
        return make_task(name, tokenizer, haystack, **params)
    except (ValueError, TypeError) as e:
        raise EvalError(str(e)) from None


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def continue_prompts(
    model, prompts: np.ndarray, max_new_tokens: int, settings: GenerationSettings, eos_id: int | None
) -> list[list[int]]:
    """Greedy continuations of `prompts [B, T]` (one length per batch): per row up to `max_new_tokens`
    ids, cut before the first eos."""
    from ramba.inference import generate

    ids = torch.as_tensor(np.ascontiguousarray(prompts), dtype=torch.long)  # prefill moves one segment at a time
    with torch.no_grad():
        out = generate(
            model,
            ids,
            max_new_tokens,
            segment_len=settings.segment_len,
            mode=settings.mode,
            offload=settings.offload,
            do_sample=False,
            eos_token_id=eos_id,
        )
    rows = []
    for row in out.tolist():
        rows.append(row[: row.index(eos_id)] if eos_id is not None and eos_id in row else row)
    return rows


def sample_record(sample: TaskSample, prediction: str, score: float, seed: int) -> dict:
    """What a results file keeps of one sample: the expected and the predicted answer, and where the needles
    are (`needle_position`: the asked needle's first token; `answer_positions`: per expected answer, the first
    token of the needle holding it; `needles`: every needle's `[start, end)`, distractors included;
    `answered_needles`: the indices into `needles` of those whose answer string the prediction holds, and
    `wanted_needles`, those of the expected answers: a wrong answer taken from another needle shows as an index
    missing from the second)."""
    return {
        "seed": seed,
        "answer": sample.answer,
        "expected": sample.answers,
        "prediction": prediction,
        "score": float(score),
        "depth": sample.depth,
        "needle_position": sample.needles[sample.target][0],
        "answer_positions": [sample.needles[i][0] for i in sample.answer_needles],
        "needles": [list(n) for n in sample.needles],
        "answered_needles": sample.needles_answered(prediction),
        "wanted_needles": list(sample.answer_needles),
        "options": sample.metadata,
    }


def cell_samples(task: Task, length: int, depth: float, n: int, seed: int) -> list[TaskSample]:
    """The `n` samples of one (length, depth) cell: seeds `seed, seed + 1, ...`."""
    try:
        return [task.generate(length, depth, seed=seed + i) for i in range(n)]
    except ValueError as e:
        raise EvalError(str(e)) from None


def _predict(model, cell: list[TaskSample], settings: GenerationSettings, eos_id: int | None, bar) -> list[list[int]]:
    """The continuation ids of every sample of `cell`, generated in batches of prompts of equal length
    (a batch gets as many new tokens as its longest reference answer needs)."""
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(cell):
        groups.setdefault(s.prompt_len, []).append(i)
    outputs: dict[int, list[int]] = {}
    for prompt_len, members in groups.items():
        for start in range(0, len(members), settings.batch_size):
            part = members[start : start + settings.batch_size]
            prompts = np.stack([cell[i].input_ids[:prompt_len] for i in part])
            new = max(len(cell[i].answer_ids) for i in part) + settings.extra_tokens
            outputs.update(zip(part, continue_prompts(model, prompts, new, settings, eos_id)))
            bar.update(len(part))
    return [outputs[i] for i in range(len(cell))]


def evaluate_task(
    model,
    task: Task,
    lengths: Sequence[int],
    depths: Sequence[float],
    samples: int,
    settings: GenerationSettings | None = None,
    seed: int = 0,
    progress: bool = False,
    long_samples: int | None = None,
) -> list[CellResult]:
    """Scores `task` on every (length, depth) cell, `samples` prompts per cell (`long_samples` above
    LONG_CONTEXT tokens; None: `samples`); cells in order of length, then depth. `progress` shows a
    progress bar (one step per sample) on stderr."""
    from tqdm.auto import tqdm

    settings = settings or GenerationSettings()
    long_samples = samples if long_samples is None else long_samples
    if samples < 1 or long_samples < 1:
        raise EvalError(f"samples, long_samples: expected >= 1, got {samples}, {long_samples}")
    per_cell = {int(n): long_samples if n > LONG_CONTEXT else samples for n in lengths}
    tok = task.tokenizer
    device = _device(model)
    results = []
    bar = tqdm(total=len(depths) * sum(per_cell.values()), desc=task.name, unit="sample", disable=not progress)
    try:
        for length in lengths:
            for depth in depths:
                cell = cell_samples(task, int(length), float(depth), per_cell[int(length)], seed)
                records = []
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                predictions = _predict(model, cell, settings, tok.eos_id, bar)
                seconds = time.perf_counter() - start
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                for i, (s, ids) in enumerate(zip(cell, predictions)):
                    prediction = tok.decode(ids)
                    records.append(sample_record(s, prediction, task.score(s, prediction), seed + i))
                score = float(np.mean([r["score"] for r in records]))
                logger.debug("%s length %d depth %g: %.3f", task.name, length, depth, score)
                rss = peak_rss_bytes() / 2**30
                results.append(CellResult(task.name, int(length), float(depth), score, records, seconds, peak, rss))
                bar.set_postfix(length=length, depth=depth, score=f"{score:.2f}")
    finally:
        bar.close()
    return results


def score_matrix(cells: Sequence[CellResult], lengths: Sequence[int], depths: Sequence[float]) -> np.ndarray:
    """`[len(lengths), len(depths)]` mean scores of one task's cells (NaN where a cell is missing)."""
    out = np.full((len(lengths), len(depths)), np.nan)
    li = {int(n): i for i, n in enumerate(lengths)}
    di = {float(d): j for j, d in enumerate(depths)}
    for c in cells:
        out[li[c.length], di[c.depth]] = c.score
    return out


def summarize(cells: Sequence[CellResult], lengths: Sequence[int], depths: Sequence[float]) -> dict:
    """JSON-ready summary of one task's cells: `scores [lengths, depths]`, the mean per length, the
    overall mean, and every cell with its samples."""
    matrix = score_matrix(cells, lengths, depths)
    return {
        "scores": matrix,
        "mean_by_length": dict(zip((str(n) for n in lengths), np.nanmean(matrix, axis=1))),
        "mean": float(np.nanmean(matrix)),
        "cells": [c.to_dict() for c in cells],
    }


def evaluate_tasks(
    model,
    tokenizer,
    specs: Sequence[str],
    lengths: Sequence[int],
    depths: Sequence[float],
    samples: int,
    settings: GenerationSettings | None = None,
    seed: int = 0,
    haystack=None,
    progress: bool = False,
    long_samples: int | None = None,
) -> dict:
    """Scores every task of `specs` (see `parse_task_spec`) on the length x depth grid of one haystack."""
    tasks = {spec: build_task(spec, tokenizer, haystack) for spec in specs}
    out = {
        "lengths": list(lengths),
        "depths": list(depths),
        "samples": samples,
        "long_samples": long_samples,
        "tasks": {},
    }
    for spec, task in tasks.items():
        cells = evaluate_task(model, task, lengths, depths, samples, settings, seed, progress, long_samples)
        out["tasks"][spec] = summarize(cells, lengths, depths)
    return out


def load_haystacks(spec: str | None, tokenizer) -> dict[str, object]:
    """`"template,data/python-doc"` -> `{"template": None, "python-doc": TokenFileHaystack}` (named by the token
    file's folder name; None or "" gives the template alone)."""
    out: dict[str, object] = {}
    for item in (spec or TEMPLATE).split(","):
        item = item.strip()
        if not item:
            continue
        name = TEMPLATE if item == TEMPLATE else Path(item).name
        if name in out:
            raise EvalError(f"haystack: {name!r} is given twice in {spec!r}")
        if item != TEMPLATE and not Path(item).exists():
            raise EvalError(f"haystack: no such token file: {item} (make it with `ramba prepare`, or use 'template')")
        out[name] = None if item == TEMPLATE else TokenFileHaystack(item, tokenizer)
    if not out:
        raise EvalError(f"haystack: no haystack named in {spec!r}")
    return out


def over_haystacks(
    evaluate: Callable[[object], dict], haystacks: dict[str, object], held_out: Collection[str] = HELD_OUT
) -> dict:
    """`{"held_out": [names], "haystacks": {name: {"source", "held_out", **evaluate(haystack)}}}`: one evaluation
    per haystack of `load_haystacks`; `held_out` names the haystacks used in neither training nor tuning."""
    result: dict = {"held_out": [n for n in haystacks if n in held_out], "haystacks": {}}
    for name, haystack in haystacks.items():
        source = TEMPLATE if haystack is None else str(haystack.file.path)
        result["haystacks"][name] = {"source": source, "held_out": name in held_out, **evaluate(haystack)}
    return result


def _mean_by_length(r: dict) -> np.ndarray:
    return np.nanmean(np.asarray(r["scores"], dtype=np.float64), axis=1)


def task_length_matrix(result: dict) -> np.ndarray:
    """`[tasks, lengths]` mean score over depths of one haystack's `evaluate_tasks` result."""
    return np.stack([_mean_by_length(r) for r in result["tasks"].values()])


def samples_per_length(r: dict) -> list[int]:
    """Samples behind each length's mean (over depths) in one haystack's `evaluate_tasks` result."""
    cells = next(iter(r["tasks"].values()))["cells"]
    return [sum(len(c["samples"]) for c in cells if c["length"] == int(n)) for n in r["lengths"]]


def interval_bound(n: int) -> float:
    """Half-width bound of a 95% normal interval for the mean of `n` independent scores in [0, 1]
    (their standard deviation is at most 0.5)."""
    return 1.96 * 0.5 / np.sqrt(max(n, 1))


def other_needle_answers(task_result: dict) -> tuple[int, int]:
    """`(n_other, n_wrong)` over one task's samples: of the `n_wrong` samples scored below 1, those whose
    prediction holds the answer string of a needle that was not asked for (another key's value, a distractor's).
    Records written before these fields existed are not counted."""
    samples = [s for c in task_result["cells"] for s in c["samples"] if "answered_needles" in s]
    wrong = [s for s in samples if s["score"] < 1]
    other = [s for s in wrong if set(s["answered_needles"]) - set(s["wanted_needles"])]
    return len(other), len(wrong)


def tasks_tables(result: dict) -> str:
    """A task x length table (mean over depths) per haystack of an `over_haystacks` result; the title says how
    many samples each table cell averages and the widest 95% interval that allows, the last line how many wrong
    answers were read from a needle not asked for."""
    blocks = []
    for name, r in result["haystacks"].items():
        n = samples_per_length(r)
        count = str(min(n)) if min(n) == max(n) else f"{min(n)}-{max(n)}"
        title = (
            f"haystack {name}{' (held out)' if r['held_out'] else ''}: mean score over {len(r['depths'])} depths, "
            f"n = {count} samples a table cell (95% interval within ±{interval_bound(min(n)):.2f})"
        )
        lengths = [format_length(int(n)) for n in r["lengths"]]
        block = title + "\n" + format_table(task_length_matrix(r), list(r["tasks"]), lengths, corner="task")
        counts = {task: other_needle_answers(t) for task, t in r["tasks"].items()}
        wrong = [f"{task} {other} of {n}" for task, (other, n) in counts.items() if n]
        if wrong:
            block += "\nwrong answers holding another needle's answer: " + ", ".join(wrong)
        blocks.append(block)
    return "\n\n".join(blocks)


def save_tasks(result: dict, out_dir, config: dict | None = None, seed: int | None = None, name: str = "tasks"):
    """Writes `<name>.json` (an `over_haystacks` result) and `<name>.png` (a task x length heatmap per haystack)."""
    from ramba.eval.plots import heatmaps, task_grid

    out_dir = Path(out_dir)
    grids = [
        task_grid(
            task_length_matrix(r),
            list(r["tasks"]),
            r["lengths"],
            f"{hay}{' (held out)' if r['held_out'] else ''}: mean over {len(r['depths'])} depths",
        )
        for hay, r in result["haystacks"].items()
    ]
    json_path = write_results(out_dir / f"{name}.json", result, config, seed)
    return json_path, heatmaps(grids, out_dir / f"{name}.png", title="task accuracy by context length")
