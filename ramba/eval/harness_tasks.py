"""ramba's synthetic long-context tasks as local lm-evaluation-harness tasks (docs/evaluation.md).

`export_harness_tasks` writes, per (task, length), `ramba_<task>_<length>.jsonl` (one sample per line:
the prompt as text, the answer and what the scorer needs) and `ramba_<task>_<length>.yaml`, a
`generate_until` task over that file that `lm_eval --include_path DIR --tasks ...` runs offline. The
samples are those `ramba eval tasks` draws (same seeds, depths, samples per cell), the harness generates
greedily up to the reference answer's length plus `extra_tokens` new tokens and cuts at eos, and
`process_results` grades with the task's own `score()`: the two give the same scores for the same model.

The harness sees text, not token ids: the prompt is the sample's ids decoded (without the leading
bos, which the `ramba` harness model adds), so it reaches the model unchanged when encoding the text
gives the ids back; the export checks that for every sample and warns where it does not (a BPE
tokenizer may merge across the task's pieces, a token-file haystack may hold special tokens).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict
from functools import cache
from pathlib import Path

import numpy as np

from ramba.data.tasks import TaskSample
from ramba.eval.results import format_length
from ramba.eval.tasks import build_task, cell_samples

__all__ = ["harness_task_name", "export_harness_tasks", "sample_from_doc", "process_results"]

logger = logging.getLogger(__name__)

TAG = "ramba_tasks"


def _task_tag(spec: str) -> str:
    """`"variable_tracking:num_hops=2"` -> `"ramba_variable_tracking_num_hops_2"`."""
    return "ramba_" + re.sub(r"[^0-9A-Za-z]+", "_", spec).strip("_")


def harness_task_name(spec: str, length: int) -> str:
    """`("variable_tracking:num_hops=2", 4096)` -> `"ramba_variable_tracking_num_hops_2_4k"`."""
    return f"{_task_tag(spec)}_{format_length(int(length)).lower()}"


def _doc(spec: str, sample: TaskSample, seed: int, tokenizer) -> tuple[dict, bool]:
    """The JSONL record of one sample, and whether its prompt text encodes back to its prompt ids."""
    start = 1 if tokenizer.bos_id is not None else 0  # the harness model puts the bos back
    prompt_ids = sample.input_ids[start : sample.prompt_len].tolist()
    prompt = tokenizer.decode(prompt_ids)
    fields = {k: v for k, v in asdict(sample).items() if k != "input_ids"}
    doc = {
        "task": spec,
        "length": int(sample.input_ids.size),
        "depth": float(sample.depth),
        "seed": seed,
        "prompt": prompt,
        "answer": sample.answer,
        "sample": json.dumps(fields, default=lambda x: x.item() if isinstance(x, np.generic) else str(x)),
    }
    return doc, tokenizer.encode(prompt) == prompt_ids


def _task_yaml(name: str, tags: list[str], data_file: Path, max_gen_toks: int) -> str:
    # JSON strings are YAML; `until: []` stops only at eos, as `ramba eval tasks` does.
    return "\n".join(
        [
            f"task: {name}",
            f"tag: {json.dumps(tags)}",
            "dataset_path: json",
            f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(data_file.resolve()))}}}}}",
            "test_split: test",
            "output_type: generate_until",
            "doc_to_text: prompt",
            "doc_to_target: answer",
            f"generation_kwargs: {{until: [], max_gen_toks: {max_gen_toks}, do_sample: false}}",
            "process_results: !function ramba.eval.harness_tasks.process_results",
            "metric_list: [{metric: score, aggregation: mean, higher_is_better: true}]",
            "metadata: {version: 1.0}",
            "",
        ]
    )


def export_harness_tasks(
    out_dir,
    tokenizer,
    specs: Sequence[str],
    lengths: Sequence[int],
    depths: Sequence[float],
    samples: int,
    seed: int = 0,
    haystack=None,
    extra_tokens: int = 8,
) -> list[str]:
    """Writes a JSONL file and a task YAML per (task spec, length) into `out_dir`; returns the task names.

    Every task is tagged `ramba_tasks` and `ramba_<task>` (all its lengths), so `--tasks ramba_tasks`
    runs everything. `max_gen_toks` is the longest reference answer (eos included) plus `extra_tokens`,
    which for answers of one length (every task with the byte tokenizer) is what `ramba eval tasks`
    allows each sample.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for spec in specs:
        task = build_task(spec, tokenizer, haystack)
        for length in lengths:
            name = harness_task_name(spec, length)
            data_file = out_dir / f"{name}.jsonl"
            longest, mismatched, n = 0, 0, 0
            with open(data_file, "w", encoding="utf-8") as f:
                for depth in depths:
                    for i, sample in enumerate(cell_samples(task, int(length), float(depth), samples, seed)):
                        doc, round_trips = _doc(spec, sample, seed + i, tokenizer)
                        f.write(json.dumps(doc, ensure_ascii=False) + "\n")
                        longest = max(longest, len(sample.answer_ids))
                        mismatched += not round_trips
                        n += 1
            if mismatched:
                logger.warning(
                    "%s: %d of %d prompts do not encode back to the ids ramba evaluates (tokenizer %s); "
                    "the harness scores of those samples may differ from `ramba eval tasks`",
                    name,
                    mismatched,
                    n,
                    tokenizer.name,
                )
            (out_dir / f"{name}.yaml").write_text(
                _task_yaml(name, [TAG, _task_tag(spec)], data_file, longest + extra_tokens)
            )
            names.append(name)
    return names


def sample_from_doc(doc: dict) -> TaskSample:
    """The `TaskSample` a scorer needs, rebuilt from a JSONL record (without its token ids)."""
    fields = json.loads(doc["sample"])
    fields["needles"] = [tuple(span) for span in fields["needles"]]
    fields["haystack_span"] = tuple(fields["haystack_span"])
    return TaskSample(input_ids=np.empty(0, dtype=np.int64), **fields)


@cache
def _scorer(spec: str):
    from ramba.data.tokenizer import ByteTokenizer

    return build_task(spec, ByteTokenizer())  # scores compare text; the tokenizer only shaped the prompts


def process_results(doc: dict, results: list[str]) -> dict:
    """The harness's per-sample metric: `{"score": task.score(sample, prediction)}`, in [0, 1]."""
    return {"score": float(_scorer(doc["task"]).score(sample_from_doc(doc), results[0]))}
