"""Results files, length/depth parsing, tables and plots."""

import json
import math
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from ramba.eval.plots import Panel, heatmap, line_plots
from ramba.eval.results import (
    EvalError,
    environment,
    format_grid,
    format_length,
    parse_depths,
    parse_lengths,
    read_results,
    write_results,
)


def test_environment_records_the_commit_and_whether_the_tree_differs_from_it():
    """git_commit is the checkout's HEAD and git_dirty whether tracked files differ from it (None outside git)."""
    versions = environment()["versions"]
    root = Path(__file__).resolve().parents[2]
    if shutil.which("git") is None or not (root / ".git").exists():
        assert versions["git_commit"] is None and versions["git_dirty"] is None
        return

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout

    assert versions["git_commit"] == git("rev-parse", "HEAD").strip()
    assert versions["git_dirty"] is bool(git("status", "--porcelain", "--untracked-files=no").strip())


def test_parse_lengths():
    assert parse_lengths("4k,64k,1m,16m") == [4096, 65536, 1 << 20, 16 << 20]
    assert parse_lengths("300, 1.5K,64M") == [300, 1536, 64 << 20]
    for bad in ("", "4x", "0", "1.3", "-5", "k"):
        with pytest.raises(EvalError, match="lengths"):
            parse_lengths(bad)


def test_parse_depths_and_format_length():
    assert parse_depths("0,0.25,1") == [0.0, 0.25, 1.0]
    for bad in ("", "1.5", "-0.1", "a"):
        with pytest.raises(EvalError, match="depths"):
            parse_depths(bad)
    assert [format_length(n) for n in (300, 4096, 1 << 20, 16 << 20, 1536)] == ["300", "4K", "1M", "16M", "1536"]


def test_write_results_carries_metadata(tmp_path):
    body = {"scores": np.array([[1.0, np.nan]]), "n": np.int64(3), "x": math.inf}
    path = write_results(tmp_path / "sub" / "r.json", body, config={"d_model": 32}, seed=7)
    data = read_results(path)
    meta = data["meta"]
    assert meta["seed"] == 7 and meta["config"] == {"d_model": 32}
    assert {"python", "torch", "triton", "ramba", "transformers", "numpy"} <= set(meta["versions"])
    assert meta["machine"]["cpu_count"] >= 1 and meta["date"].startswith("20") and meta["command"]
    assert data["scores"] == [[1.0, None]] and data["n"] == 3 and data["x"] is None
    assert json.loads(path.read_text())["n"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary file left behind


def test_format_grid():
    text = format_grid(np.array([[1.0, 0.5], [np.nan, 0.0]]), [4096, 300], [0.0, 1.0])
    lines = text.splitlines()
    assert "0%" in lines[0] and "100%" in lines[0]
    assert lines[2].split() == ["4K", "|", "1.000", "0.500", "|", "0.750"]
    assert lines[3].split() == ["300", "|", "-", "0.000", "|", "0.000"]


def test_heatmap_and_line_plots_open(tmp_path):
    scores = np.array([[1.0, 0.0, np.nan], [0.5, 0.25, 1.0]])
    png = heatmap(scores, [4096, 1 << 20], [0.0, 0.5, 1.0], tmp_path / "h.png", title="t")
    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    with pytest.raises(ValueError, match="lengths x depths"):
        heatmap(scores.T, [4096, 1 << 20], [0.0, 0.5, 1.0], tmp_path / "bad.png")
    panels = [
        Panel("a", "x", "y", {"one": ([64, 128, 256], [1.0, None, 3.0])}, length_axis=True, logy=True),
        Panel("b", "x", "y", {"two": ([1, 2], [float("nan"), 2.0])}),
    ]
    img = matplotlib.image.imread(line_plots(panels, tmp_path / "l.png", title="both"))
    assert img.ndim == 3 and img.shape[1] > img.shape[0]


def test_task_heatmaps_per_haystack_and_table(tmp_path):
    from ramba.eval.plots import depth_grid, heatmaps, task_grid
    from ramba.eval.results import format_table

    tasks, lengths = ["niah_single", "variable_tracking"], [4096, 65536, 1 << 20]
    scores = np.array([[1.0, 0.5, np.nan], [0.0, 0.25, 1.0]])
    grid = task_grid(scores, tasks, lengths, "template")
    assert grid.yticks == tasks and grid.xticks == ["4K", "64K", "1M"] and grid.scores.shape == (3, 2)
    png = heatmaps(
        [grid, task_grid(scores, tasks, lengths, "held out"), depth_grid(scores, lengths[:2], [0, 0.5, 1])],
        tmp_path / "t.png",
        title="suite",
    )
    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[1] > 3 * img.shape[0] // 2  # three panels side by side
    with pytest.raises(ValueError, match="tasks x lengths"):
        task_grid(scores.T, tasks, lengths)
    lines = format_table(scores, tasks, ["4K", "64K", "1M"], corner="task").splitlines()
    assert lines[2].split() == ["niah_single", "|", "1.000", "0.500", "-", "|", "0.750"]
