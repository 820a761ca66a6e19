"""One heatmap (and a Markdown table) from several `ramba eval passkey` results of the same model.

Long contexts are evaluated in separate runs (more samples at short lengths, fewer depths at 64M); this
merges their cells into one length x depth grid, leaving cells no run covered blank. A results file with
several haystacks gives the one `--haystack` names.

Usage:
    python -m ramba.bench.plot_passkey -o benchmarks/results/passkey_ramba.png --title "RAMba tiny" \\
        benchmarks/results/passkey-ramba-to-1m.json benchmarks/results/passkey-ramba-to-64m.json
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from ramba.eval.plots import heatmap
from ramba.eval.results import format_grid, read_results


def one_haystack(result: dict, name: str | None) -> dict:
    """The results of haystack `name` (None: the only one) of a results file; files written before
    2026-12-01 hold one haystack at the top level."""
    if "haystacks" not in result:
        return result
    hays = result["haystacks"]
    if name is None and len(hays) == 1:
        return next(iter(hays.values()))
    if name not in hays:
        raise SystemExit(f"--haystack: choose one of {', '.join(hays)} (got {name})")
    return hays[name]


def merge(results: list[dict]) -> tuple[np.ndarray, list[int], list[float], dict[int, int]]:
    """`(accuracy [lengths, depths] with NaN where no run has the cell, lengths, depths, samples per length)`."""
    lengths = sorted({int(n) for r in results for n in r["lengths"]})
    depths = sorted({float(d) for r in results for d in r["depths"]})
    grid = np.full((len(lengths), len(depths)), np.nan)
    samples: dict[int, int] = {}
    for r in results:
        acc = np.asarray(r["accuracy"], dtype=np.float64)
        for c in r["cells"]:
            samples[int(c["length"])] = len(c["samples"])
        for i, n in enumerate(r["lengths"]):
            for j, d in enumerate(r["depths"]):
                grid[lengths.index(int(n)), depths.index(float(d))] = acc[i, j]
    return grid, lengths, depths, samples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="passkey result JSON files of one model")
    p.add_argument("-o", "--output", required=True, help="the PNG to write")
    p.add_argument("--title", default="passkey retrieval", help="figure title")
    p.add_argument("--haystack", default=None, help="the haystack to plot, when the files hold several")
    args = p.parse_args(argv)
    grid, lengths, depths, samples = merge([one_haystack(read_results(path), args.haystack) for path in args.results])
    heatmap(grid, lengths, depths, args.output, title=args.title)
    print(format_grid(grid, lengths, depths))
    print("samples per cell by length:", {n: samples[n] for n in lengths})
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
