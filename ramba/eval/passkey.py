"""Passkey retrieval accuracy over context length x needle depth (JSON + heatmap PNG + text table).

A 5-digit pass key is hidden at each depth of a haystack of each length (`ramba.data.tasks.PasskeyTask`);
the model continues the prompt "... What is the pass key? The pass key is" greedily, and a sample
scores 1 when the first number it writes is the key. Run over several haystacks with
`ramba.eval.tasks.over_haystacks`; the table, JSON and PNG then hold a grid per haystack.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ramba.data.tasks import make_task
from ramba.eval.plots import depth_grid, heatmaps
from ramba.eval.results import format_grid, write_results
from ramba.eval.tasks import GenerationSettings, evaluate_task, summarize

__all__ = ["evaluate_passkey", "save_passkey", "passkey_table"]


def evaluate_passkey(
    model,
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    samples: int,
    settings: GenerationSettings | None = None,
    seed: int = 0,
    haystack=None,
    digits: int = 5,
    progress: bool = False,
    long_samples: int | None = None,
) -> dict:
    """`{"lengths", "depths", "samples", "long_samples", "accuracy" [lengths, depths], "mean", "mean_by_length",
    "cells"}` on one haystack (None: the template)."""
    task = make_task("passkey", tokenizer, haystack, digits=digits)
    cells = evaluate_task(model, task, lengths, depths, samples, settings, seed, progress, long_samples)
    summary = summarize(cells, lengths, depths)
    accuracy = summary.pop("scores")
    return {
        "task": "passkey",
        "lengths": list(lengths),
        "depths": list(depths),
        "samples": samples,
        "long_samples": long_samples,
        "accuracy": accuracy,
        **summary,
    }


def passkey_table(result: dict) -> str:
    """The accuracy grid of each haystack of an `over_haystacks` result as text: a row per length, a column
    per depth."""
    return "\n\n".join(
        f"haystack {name}{' (held out)' if r['held_out'] else ''}, mean {r['mean']:.3f}:\n"
        + format_grid(r["accuracy"], r["lengths"], r["depths"])
        for name, r in result["haystacks"].items()
    )


def save_passkey(
    result: dict, out_dir, config: dict | None = None, seed: int | None = None, name: str = "passkey"
) -> tuple[Path, Path]:
    """Writes `<name>.json` (an `over_haystacks` result) and `<name>.png` (a length x depth heatmap per haystack)
    into `out_dir`; returns both paths."""
    out_dir = Path(out_dir)
    grids = [
        depth_grid(r["accuracy"], r["lengths"], r["depths"], f"{hay}{' (held out)' if r['held_out'] else ''}")
        for hay, r in result["haystacks"].items()
    ]
    samples = {r["samples"] for r in result["haystacks"].values()}
    json_path = write_results(out_dir / f"{name}.json", result, config, seed)
    png_path = heatmaps(
        grids,
        out_dir / f"{name}.png",
        title=f"passkey retrieval ({'/'.join(map(str, sorted(samples)))} samples per cell)",
    )
    return json_path, png_path
