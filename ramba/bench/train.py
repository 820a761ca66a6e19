"""Training throughput: RAMba vs Mamba-2 only vs Transformer (SDPA), built from the same preset, in one run.

Usage:
    ramba bench train --presets 370m --lengths 4096,16384 --batch-tokens 32768 [--out DIR]
    ramba bench train --presets tiny --set d_model=64 --lengths 64,128 --batch-tokens 256 --steps 2 --warmup 1

For every (preset, architecture, length): a model with random weights, AdamW, random tokens, batch
`max(1, batch_tokens // length)` sequences of `length` tokens (halved while out of memory, then with
`--checkpoint-fallback` one sequence with gradient checkpointing; the batch and checkpointing used are
recorded); `warmup` full training steps (forward + backward + optimizer) are run untimed, then `steps` timed
ones, each on its own, through `ramba.train.step.TrainStep`, the step `ramba train` runs (AdamW from
`make_optimizer`, fused on CUDA; clipping at 1.0). tokens/s = tokens per step / the median step time (robust to
the odd slow step; the mean-based rate and every step time are recorded too), and MFU against the GPU's dense
bf16 peak (`ramba.train.flops`). bf16 autocast on CUDA (fp32 weights, as in training), fp32 on the CPU. As in
`ramba train`, on CUDA the forward and backward are one CUDA graph by default (not with `--fused-loss` or
gradient checkpointing; `--no-cuda-graph` runs them eagerly), captured in the first warmup step (after two eager
runs of its own). Peak GPU memory is torch.cuda.max_memory_allocated over the run of that model, alloc_retries
the times the caching allocator had to free its cache to allocate (each one slow and synchronising),
device_allocs_timed its cudaMalloc calls during the timed steps;
PYTORCH_CUDA_ALLOC_CONF is recorded. A configuration that fails (e.g. out of memory) is recorded with its
error and the run goes on.

Writes <out>/<name>.json (machine, date, versions, settings, every number, the RAMba/baseline
ratios and the issue's goals: RAMba >= 0.8x Mamba-2 tokens/s at 4K, faster than the Transformer at
16K) and <out>/<name>.png after every model (a run cut short keeps what it measured), and prints a table.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from ramba import RambaConfig, RambaForCausalLM
from ramba.cli.args import at_least
from ramba.eval.loading import resolve_device
from ramba.eval.measure import free_memory, parse_overrides, profiled, synchronized_time
from ramba.eval.plots import Panel, line_plots
from ramba.eval.results import format_length, parse_lengths, write_results
from ramba.layers.mamba2 import set_compile_glue
from ramba.train.cuda_graph import use_cuda_graph
from ramba.train.flops import flops_per_token, peak_flops
from ramba.train.step import TrainStep, make_optimizer

logger = logging.getLogger("bench_train")
ARCH_LABELS = {
    "ramba": "RAMba",
    "mamba2": "Mamba-2",
    "transformer": "Transformer (SDPA)",
    "mamba2-swa": "Mamba-2 + SWA",
    "mamba2-nsa": "Mamba-2 + NSA",
}
GOALS = [("mamba2", 4096, 0.8, ">="), ("transformer", 16384, 1.0, ">")]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="370m", help="comma-separated RambaConfig presets (default 370m)")
    p.add_argument(
        "--architectures", default="ramba,mamba2,transformer", help="comma-separated (default ramba,mamba2,transformer)"
    )
    p.add_argument("--lengths", default="4096,16384", help="context lengths, e.g. 4k,16k (default 4096,16384)")
    p.add_argument("--batch-tokens", type=at_least(1), default=32768, help="tokens per step (default 32768)")
    p.add_argument("--steps", type=at_least(1), default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=at_least(0), default=3, help="untimed steps first (default 3)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a RambaConfig field of every preset (repeatable)",
    )
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward")
    p.add_argument(
        "--checkpoint-fallback",
        action="store_true",
        help="a model out of memory at one sequence is measured again with gradient checkpointing",
    )
    p.add_argument(
        "--compile-glue",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the Mamba-2 layers' element-wise work around the scan, or not (default: on "
        "with CUDA; see the training option compile_glue)",
    )
    p.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="capture forward + backward in a CUDA graph (ramba.train.cuda_graph.GraphedLoss) and replay it every "
        "step, or not; the optimizer step stays eager (default: as the training option cuda_graph, on with CUDA "
        "unless --fused-loss or gradient checkpointing)",
    )
    p.add_argument(
        "--fused-loss",
        action="store_true",
        help="the LM head and cross-entropy as liger-kernel's fused kernel (the training option fused_loss)",
    )
    p.add_argument(
        "--profile", metavar="DIR", help="profile the timed steps; one table per model into DIR (slows them)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results", help="output folder (default benchmarks/results)")
    p.add_argument("--name", default="bench_train", help="file name stem (default bench_train)")
    return p


def measure(
    config: RambaConfig,
    length: int,
    batch: int,
    steps: int,
    warmup: int,
    device: torch.device,
    grad_checkpointing: bool,
    seed: int,
    profile_path: Path | None = None,
    compile_glue: bool | None = None,
    cuda_graph: bool | None = None,
    fused_loss: bool = False,
) -> dict:
    """Times `steps` training steps on `[batch, length]` random tokens; returns tokens/s and memory (`cuda_graph`
    None: as `ramba train` decides, :func:`~ramba.train.cuda_graph.use_cuda_graph`).
    With `profile_path`, the timed steps run under torch.profiler (slower) and its table of kernels by
    self device time goes to that file."""
    torch.manual_seed(seed)
    model = RambaForCausalLM(config).to(device).train()
    if grad_checkpointing:
        model.gradient_checkpointing_enable()
    set_compile_glue(model, compile_glue)
    model.loss_backend = "liger" if fused_loss else None
    n_params = sum(p.numel() for p in model.parameters())
    flops = flops_per_token(model, length)["total"]
    # the step of `ramba train` with its defaults (AdamW groups, clipping at 1.0, token-mean loss), at a fixed lr
    optimizer = make_optimizer(model, lr=1e-4, weight_decay=0.1)
    bf16 = torch.bfloat16 if device.type == "cuda" else None
    cuda_graph = use_cuda_graph(cuda_graph, device, grad_checkpointing=grad_checkpointing, fused_loss=fused_loss)
    step_fn = TrainStep(model, optimizer, grad_clip=1.0, autocast_dtype=bf16, cuda_graph=cuda_graph)
    ids = torch.randint(0, config.vocab_size, (batch, length), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.reset_accumulated_memory_stats(device)

    def step() -> None:
        step_fn([(ids, ids)], 1e-4)

    try:
        for _ in range(warmup):
            step()
        allocs_before = _device_allocs(device)
        step_seconds = []
        with profiled(device, profile_path):
            for _ in range(steps):
                start = synchronized_time(device)
                step()
                step_seconds.append(synchronized_time(device) - start)
        median = statistics.median(step_seconds)
        row = {
            "params": n_params,
            "batch": batch,
            "cuda_graph": cuda_graph,
            "tokens_per_step": batch * length,
            "seconds": sum(step_seconds),
            "step_ms": 1e3 * median,
            "step_ms_all": [1e3 * t for t in step_seconds],
            "tokens_per_s": batch * length / median,
            "tokens_per_s_mean": batch * length * steps / sum(step_seconds),
            "flops_per_token": flops,
        }
        peak = peak_flops(device)
        if peak is not None:
            row["mfu"] = row["tokens_per_s"] * flops / peak
        if device.type == "cuda":
            row["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            # the caching allocator freeing everything to retry a failed cudaMalloc: slow, synchronising
            row["alloc_retries"] = torch.cuda.memory_stats(device).get("num_alloc_retries", 0)
            # cudaMalloc calls during the timed steps: a steady state needs none
            allocs = _device_allocs(device)
            row["device_allocs_timed"] = None if allocs is None or allocs_before is None else allocs - allocs_before
        return row
    finally:
        del model, optimizer, step_fn, ids
        free_memory(device)


def _device_allocs(device: torch.device) -> int | None:
    """How many times the CUDA caching allocator has called cudaMalloc (None off CUDA or where not counted)."""
    return torch.cuda.memory_stats(device).get("num_device_alloc") if device.type == "cuda" else None


def measure_fitting(
    config: RambaConfig, length: int, batch: int, args: argparse.Namespace, device: torch.device
) -> dict:
    """`measure` at `batch` sequences, halving the batch while it runs out of memory, then (with
    `--checkpoint-fallback`) at one sequence with gradient checkpointing; the row records both. A failure
    at the last resort (or any other error) is returned as `{"error": ...}` so the run goes on."""
    checkpointing = args.grad_checkpointing
    while True:
        error = None
        try:
            profile = (
                None if args.profile is None else Path(args.profile) / f"{config.architecture}-{length}.profile.txt"
            )
            row = measure(
                config,
                length,
                batch,
                args.steps,
                args.warmup,
                device,
                checkpointing,
                args.seed,
                profile,
                args.compile_glue,
                args.cuda_graph,
                args.fused_loss,
            )
            return {**row, "grad_checkpointing": checkpointing}
        except torch.OutOfMemoryError as exc:
            error = f"OutOfMemoryError at batch {batch}: {exc}"[:500]
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
            logger.debug("%s", traceback.format_exc())
        free_memory(device)  # after the except block, whose exception held the failed step's tensors
        if not error.startswith("OutOfMemoryError"):
            return {"error": error}
        if batch > 1:
            logger.info("%s %s: out of memory at batch %d, trying %d", config.architecture, length, batch, batch // 2)
            batch //= 2
        elif args.checkpoint_fallback and not checkpointing:
            logger.info("%s %s: out of memory at batch 1, trying gradient checkpointing", config.architecture, length)
            checkpointing = True
        else:
            return {"error": error}


def run(args: argparse.Namespace, on_row: Callable[[dict], None] | None = None) -> dict:
    """Measures every (preset, length, architecture); `on_row(partial result)` after each one."""
    device = resolve_device(args.device)
    lengths = parse_lengths(args.lengths)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    archs = [a.strip() for a in args.architectures.split(",") if a.strip()]
    overrides = parse_overrides(args.overrides)
    configs = {(p, a): RambaConfig.preset(p, architecture=a, **overrides) for p in presets for a in archs}

    graphed = use_cuda_graph(args.cuda_graph, device, fused_loss=args.fused_loss)

    def summary(rows: list[dict]) -> dict:
        return {
            "device": str(device),
            "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
            "step": "CUDA graph" if graphed else "eager",  # rows that fell back to checkpointing: eager
            "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
            "rows": rows,
            "ratios": ratios(rows),
            "goals": goals(rows),
            "settings": dict(vars(args)),
            "configs": {f"{p}/{a}": c.to_dict() for (p, a), c in configs.items()},
        }

    rows = []
    for preset in presets:
        for length in lengths:
            for arch in archs:
                row = {"preset": preset, "architecture": arch, "length": length}
                row.update(
                    measure_fitting(configs[preset, arch], length, max(1, args.batch_tokens // length), args, device)
                )
                if "error" in row:
                    logger.warning("%s %s %s failed: %s", preset, arch, length, row["error"])
                else:
                    logger.info(
                        "%s %s %s: %.0f tokens/s (batch %d)",
                        preset,
                        arch,
                        format_length(length),
                        row["tokens_per_s"],
                        row["batch"],
                    )
                rows.append(row)
                if on_row is not None:
                    on_row(summary(rows))
    return summary(rows)


def _tps(rows, preset, arch, length):
    for r in rows:
        if (r["preset"], r["architecture"], r["length"]) == (preset, arch, length):
            return r.get("tokens_per_s")
    return None


def ratios(rows: list[dict]) -> list[dict]:
    """RAMba tokens/s divided by each baseline's, per (preset, length)."""
    out = []
    for preset, length in dict.fromkeys((r["preset"], r["length"]) for r in rows):
        ours = _tps(rows, preset, "ramba", length)
        for r in rows:
            if (r["preset"], r["length"]) == (preset, length) and r["architecture"] != "ramba":
                base = r.get("tokens_per_s")
                out.append(
                    {
                        "preset": preset,
                        "length": length,
                        "baseline": r["architecture"],
                        "ramba_over_baseline": ours / base if ours and base else None,
                    }
                )
    return out


def goals(rows: list[dict]) -> list[dict]:
    """The issue's targets, checked where this run measured both sides."""
    out = []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        for base, length, target, op in GOALS:
            ours, theirs = _tps(rows, preset, "ramba", length), _tps(rows, preset, base, length)
            if ours and theirs:
                ratio = ours / theirs
                out.append(
                    {
                        "preset": preset,
                        "length": length,
                        "baseline": base,
                        "ratio": ratio,
                        "target": f"{op} {target}",
                        "met": ratio >= target if op == ">=" else ratio > target,
                    }
                )
    return out


def table(result: dict) -> str:
    lines = [
        f"{'preset':>8} {'arch':>12} {'length':>7} {'batch':>5} {'tokens/s':>11} {'step ms':>9} {'peak GiB':>9} {'MFU':>6}"
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(
                f"{r['preset']:>8} {r['architecture']:>12} {format_length(r['length']):>7}  failed: {r['error'][:80]}"
            )
            continue
        mem = f"{r['peak_gpu_gib']:9.2f}" if "peak_gpu_gib" in r else f"{'-':>9}"
        mfu = f"{r['mfu']:6.1%}" if "mfu" in r else f"{'-':>6}"
        lines.append(
            f"{r['preset']:>8} {r['architecture']:>12} {format_length(r['length']):>7} {r['batch']:>5} "
            f"{r['tokens_per_s']:11.0f} {r['step_ms']:9.1f} {mem} {mfu}"
        )
    for g in result["goals"]:
        lines.append(
            f"goal {g['preset']}: RAMba/{g['baseline']} at {format_length(g['length'])} = {g['ratio']:.2f} "
            f"(target {g['target']}): {'met' if g['met'] else 'NOT met'}"
        )
    return "\n".join(lines)


def save(result: dict, out: str, name: str, seed: int) -> tuple[Path, Path]:
    rows = result["rows"]
    panels = []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        series = {}
        for arch in dict.fromkeys(r["architecture"] for r in rows):
            pts = [r for r in rows if r["preset"] == preset and r["architecture"] == arch]
            series[ARCH_LABELS.get(arch, arch)] = ([r["length"] for r in pts], [r.get("tokens_per_s") for r in pts])
        panels.append(
            Panel(f"training tokens/s, {preset}", "context length (tokens)", "tokens/s", series, length_axis=True)
        )
    json_path = write_results(Path(out) / f"{name}.json", result, result["settings"], seed)
    png_path = line_plots(
        panels,
        Path(out) / f"{name}.png",
        title=f"training throughput ({result['device']}, {result['precision']}, {result['step']} step)",
    )
    return json_path, png_path


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.cuda_graph and args.fused_loss:
        parser.error("--cuda-graph and --fused-loss: liger's fused loss synchronises with the host; use one")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # the results so far are written after every model, so that a run cut short keeps them
    result = run(args, on_row=lambda partial: save(partial, args.out, args.name, args.seed))
    print(table(result))
    for path in save(result, args.out, args.name, args.seed):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
