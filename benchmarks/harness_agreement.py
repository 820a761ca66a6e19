"""Do `ramba eval tasks` and lm-evaluation-harness (ramba's tasks exported with `--export-harness`) agree?

Runs both command lines as a user would, on the same model, tasks, lengths, depths and samples, then
compares every sample's prediction and score and every (task, length) mean. Writes a JSON (with the
machine and date) and prints a Markdown table for docs/evaluation.md.

Usage:
    python benchmarks/harness_agreement.py --model tiny-passkey --tasks passkey,niah_single --lengths 2k,4k \\
        --depths 0,0.5,1 --samples 1 -o benchmarks/results/harness_agreement.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ramba.eval.harness_tasks import harness_task_name
from ramba.eval.results import format_length, parse_lengths, read_results, write_results


def _run(cmd: list[str]) -> float:
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-passkey")
    p.add_argument("--tasks", default="passkey,niah_single")
    p.add_argument("--lengths", default="2k,4k")
    p.add_argument("--depths", default="0,0.5,1")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("-o", "--output", default="benchmarks/results/harness_agreement.json")
    args = p.parse_args()
    specs = args.tasks.split(",")
    work = Path(tempfile.mkdtemp(prefix="harness_agreement_"))
    grid = [
        "--model",
        args.model,
        "--tasks",
        args.tasks,
        "--lengths",
        args.lengths,
        "--depths",
        args.depths,
        "--samples",
        str(args.samples),
        "--no-progress",
    ]
    ramba_s = _run([sys.executable, "-m", "ramba", "eval", "tasks", *grid, "--out", str(work / "ramba")])
    _run([sys.executable, "-m", "ramba", "eval", "tasks", *grid, "--export-harness", str(work / "tasks")])
    harness_s = _run(
        [
            sys.executable,
            "-m",
            "ramba.eval.harness",
            "--model",
            "ramba",
            "--model_args",
            f"pretrained={args.model}",
            "--device",
            "cpu",
            "--include_path",
            str(work / "tasks"),
            "--tasks",
            "ramba_tasks",
            "--log_samples",
            "--output_path",
            str(work / "lm_eval"),
        ]
    )

    ours = read_results(work / "ramba" / "tasks.json")
    harness = {}  # (spec, length, depth, seed) -> (prediction, score)
    harness_means = {}
    for f in (work / "lm_eval").rglob("samples_*.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            doc = rec["doc"]
            harness[(doc["task"], doc["length"], doc["depth"], doc["seed"])] = (rec["filtered_resps"][0], rec["score"])
    for f in (work / "lm_eval").rglob("results_*.json"):
        for name, r in json.loads(f.read_text())["results"].items():
            if "score,none" in r:
                harness_means[name] = r["score,none"]
    rows, mismatches = [], 0
    for spec in specs:
        cells = ours["tasks"][spec]["cells"]
        for length in parse_lengths(args.lengths):
            ramba_scores, same = [], 0
            for cell in (c for c in cells if c["length"] == length):
                for s in cell["samples"]:
                    prediction, score = harness[(spec, length, cell["depth"], s["seed"])]
                    ramba_scores.append(s["score"])
                    same += prediction == s["prediction"] and score == s["score"]
            n = len(ramba_scores)
            mismatches += n - same
            rows.append(
                {
                    "task": spec,
                    "length": length,
                    "samples": n,
                    "ramba": sum(ramba_scores) / n,
                    "harness": harness_means[harness_task_name(spec, length)],
                    "identical_samples": same,
                }
            )
    body = {
        "model": args.model,
        "tasks": specs,
        "lengths": args.lengths,
        "depths": args.depths,
        "samples_per_cell": args.samples,
        "rows": rows,
        "mismatched_samples": mismatches,
        "seconds": {"ramba_eval_tasks": ramba_s, "lm_eval": harness_s},
    }
    path = write_results(args.output, body, {"work_dir": str(work)})
    print("| task | length | samples | `ramba eval tasks` | lm-eval | identical predictions |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['task']} | {format_length(r['length'])} | {r['samples']} | {r['ramba']:.3f} | {r['harness']:.3f} "
            f"| {r['identical_samples']}/{r['samples']} |"
        )
    print(f"wrote {path}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
