"""Plots of evaluation and benchmark results, drawn on matplotlib `Figure`s with the Agg canvas
(no pyplot, no display, no global backend change), saved as PNG.

- `heatmap`: a score over context length x needle depth, as in the long-context papers
  (x: length, y: depth from 0% at the top to 100% at the bottom, red = 0, green = 1);
- `heatmaps`: several such panels side by side (`depth_grid`, or `task_grid`: task x length);
- `line_plots`: one or more panels of lines, e.g. perplexity by length, tokens/s by length.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ramba.eval.results import format_length

__all__ = ["heatmap", "heatmaps", "Grid", "depth_grid", "task_grid", "Panel", "line_plots"]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    fig.tight_layout()
    from ramba.files import atomic_write

    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    return path


@dataclass
class Grid:
    """One heatmap panel: `scores [len(xticks), len(yticks)]` in [0, 1] (NaN: not run), x across, y down."""

    scores: np.ndarray
    xticks: list[str]
    yticks: list[str]
    xlabel: str
    ylabel: str
    title: str = ""


def depth_grid(scores: np.ndarray, lengths: Sequence[int], depths: Sequence[float], title: str = "") -> Grid:
    """`scores [lengths, depths]` as a panel: x the context length, y the depth from 0% (top) to 100%."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(lengths), len(depths)):
        raise ValueError(
            f"scores: expected shape [{len(lengths)}, {len(depths)}] (lengths x depths), got {scores.shape}"
        )
    return Grid(
        scores,
        [format_length(n) for n in lengths],
        [f"{100 * d:g}%" for d in depths],
        "context length (tokens)",
        "depth",
        title,
    )


def task_grid(scores: np.ndarray, tasks: Sequence[str], lengths: Sequence[int], title: str = "") -> Grid:
    """`scores [tasks, lengths]` as a panel: x the context length, y the task."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(tasks), len(lengths)):
        raise ValueError(f"scores: expected shape [{len(tasks)}, {len(lengths)}] (tasks x lengths), got {scores.shape}")
    return Grid(scores.T, [format_length(n) for n in lengths], list(tasks), "context length (tokens)", "task", title)


def heatmaps(grids: Sequence[Grid], path: str | os.PathLike, title: str = "", label: str = "accuracy") -> Path:
    """Saves a PNG with the panels side by side (red = 0, green = 1, grey = not run) and returns its path."""
    from matplotlib.colors import LinearSegmentedColormap

    if not grids:
        raise ValueError("grids: need at least one Grid")
    cmap = LinearSegmentedColormap.from_list(
        "score", ["#d7191c", "#fdae61", "#ffffbf", "#a6d96a", "#1a9641"]
    ).with_extremes(bad="#dddddd")
    label_room = max(len(t) for g in grids for t in g.yticks) * 0.07
    width = sum(max(4.0, 1.0 + label_room + 0.7 * len(g.xticks)) for g in grids)
    fig = _figure(width, max(3.0, 1.2 + 0.45 * max(len(g.yticks) for g in grids)))
    for k, g in enumerate(grids):
        ax = fig.add_subplot(1, len(grids), k + 1)
        image = ax.imshow(np.ma.masked_invalid(g.scores.T), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(g.xticks)), g.xticks)
        ax.set_yticks(range(len(g.yticks)), g.yticks)
        ax.set_xlabel(g.xlabel)
        ax.set_ylabel(g.ylabel)
        if g.scores.size <= 400:
            for i in range(g.scores.shape[0]):
                for j in range(g.scores.shape[1]):
                    if not math.isnan(g.scores[i, j]):
                        ax.text(i, j, f"{g.scores[i, j]:.2f}", ha="center", va="center", fontsize=7)
        if g.title:
            ax.set_title(g.title, fontsize=9)
        if k == len(grids) - 1:
            fig.colorbar(image, ax=ax, label=label)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def heatmap(
    scores: np.ndarray,
    lengths: Sequence[int],
    depths: Sequence[float],
    path: str | os.PathLike,
    title: str = "",
    label: str = "accuracy",
) -> Path:
    """Saves a PNG of `scores [len(lengths), len(depths)]` in [0, 1] (NaN: not run) and returns its path."""
    return heatmaps([depth_grid(scores, lengths, depths, title)], path, label=label)


@dataclass
class Panel:
    """One subplot: `series` maps a line's label to `(xs, ys)`; None / NaN points are left out.
    `length_axis`: x values are token counts, labelled 4K, 1M, ... on a log2 axis; `ylim`: fixed y range."""

    title: str
    xlabel: str
    ylabel: str
    series: dict[str, tuple[Sequence[float], Sequence[float | None]]] = field(default_factory=dict)
    length_axis: bool = False
    logy: bool = False
    ylim: tuple[float, float] | None = None


def line_plots(panels: Sequence[Panel], path: str | os.PathLike, title: str = "") -> Path:
    """Saves a PNG with the panels side by side and returns its path."""
    if not panels:
        raise ValueError("panels: need at least one Panel")
    fig = _figure(4.8 * len(panels), 3.8)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ticks: set[float] = set()
        for name, (xs, ys) in panel.series.items():
            pts = [(float(x), float(y)) for x, y in zip(xs, ys) if y is not None and math.isfinite(float(y))]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
                ticks.update(x for x, _ in pts)
        if panel.length_axis and ticks:
            if min(ticks) > 0:
                ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(ticks), [format_length(int(t)) for t in sorted(ticks)])
            ax.minorticks_off()
        if panel.logy and ticks:
            ax.set_yscale("log")
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        ax.set_title(panel.title)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ticks:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
