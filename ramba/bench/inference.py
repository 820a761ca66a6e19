"""Inference speed and memory by context length: segmented prefill, decoding, chunk memory offloaded.

Usage:
    ramba bench inference --preset 370m --lengths 4k,64k,1m,16m [--no-offload] [--out DIR]
    ramba bench inference --model runs/x/checkpoints/step-N --lengths 4k,64k
    ramba bench inference --preset tiny --set d_model=64 --lengths 100,300 --segment-len 64   (CPU)
    ramba bench inference --preset tiny --architectures ramba --lengths 64k,1m,16m,64m,128m,256m \
        --segment-len 65536 --mode fast --decode-tokens 16      (one H200: the issue-16 run, chunk memory to 256M)

For every (architecture, length): random prompt tokens `[batch, length]` go through
`ramba.inference.prefill`, then `decode_tokens` greedy tokens; the time to the first new token is the
prefill (tokens/s = batch x length / seconds), the first decoding step is `first_decode_ms` (it also
makes the landmark sketch of an offloaded store), the mean of the later steps is the decode time per token
(ms; every step in `decode_step_ms`, and the sketch's candidates per step in `sketch_candidates`). Each
decoding step of a row is followed by one step of a reference cache (a prompt of the first length, at most
2 x segment_len tokens, prefilled once per model; its memory counts in every row's peak):
`decode_vs_reference` is the row's median step over the reference's median step in the same stretch of time,
a ratio that host noise hits alike on both sides (the decoding steps of small models are bound by the host).
The reference's prefill and as many decoding steps as a measurement are the warm-up (kernel compilation).
Peak GPU memory is torch.cuda.max_memory_allocated during that call (weights included; `gpu_weights_gib` says
how much of it they are). Host memory: the process RSS when the prefill ends, and the process's peak RSS so
far (a running maximum over the whole run, since the lengths go up); the chunk store's bytes by tier (pinned
host pages and landmarks, disk-tier pages, device) and the memory planner's estimate (`plan`) beside them.
`--offload-dir PATH --host-budget 8g` runs the disk tier. Random weights are fine for speed: nothing here
depends on what the model says. A configuration that fails (e.g. out of memory) is recorded with its error,
and longer lengths of that architecture are skipped.

Writes <out>/<name>.json (machine, date, versions, settings, every number) and <out>/<name>.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import traceback
from pathlib import Path

import torch

from ramba import RambaConfig, RambaForCausalLM
from ramba.cli.args import at_least
from ramba.eval.loading import load_model, resolve_device, resolve_dtype
from ramba.eval.measure import free_memory, parse_overrides, peak_rss_bytes, profiled, rss_bytes, synchronized_time
from ramba.eval.plots import Panel, line_plots
from ramba.eval.results import format_length, parse_lengths, write_results
from ramba.layers.mamba2 import Mamba2Mixer, set_compile_glue
from ramba.model.chunk_store import LANDMARK_PLACES, Offload

logger = logging.getLogger("bench_inference")
GIB = 2**30
PROFILED_STEPS = 4  # --profile: decoding steps profiled after the timed ones


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="a trained model folder (default: random weights from --preset)")
    src.add_argument("--preset", default="370m", help="RambaConfig preset for random weights (default 370m)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a RambaConfig field of the preset (repeatable)",
    )
    p.add_argument(
        "--architectures",
        default="ramba,mamba2,transformer",
        help="with --preset: comma-separated architectures (default ramba,mamba2,transformer)",
    )
    p.add_argument("--lengths", default="4k,64k,1m,16m", help="prompt lengths (default 4k,64k,1m,16m)")
    p.add_argument("--batch", type=at_least(1), default=1, help="prompts per call (default 1)")
    p.add_argument("--decode-tokens", type=at_least(1), default=32, help="new tokens per call (default 32)")
    p.add_argument("--segment-len", type=at_least(1), default=2048, help="prefill segment length (default 2048)")
    p.add_argument("--mode", choices=["exact", "fast"], default="exact", help="prefill mode (default exact)")
    p.add_argument(
        "--offload",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="chunk memory in CPU pinned memory (default on; --no-offload keeps it on the GPU)",
    )
    p.add_argument(
        "--offload-dir",
        default=None,
        metavar="PATH",
        help="disk tier: chunk pages beyond --host-budget in a memory-mapped file under PATH",
    )
    p.add_argument(
        "--host-budget", default=None, metavar="SIZE", help="with --offload-dir: host bytes for pages, e.g. 8g"
    )
    p.add_argument(
        "--landmarks",
        choices=list(LANDMARK_PLACES),
        default="sketch",
        help="offloaded landmarks: in pinned host memory with an int8 sketch on the GPU for decoding (default), "
        "in host memory only, or on the GPU",
    )
    p.add_argument(
        "--ssd-backend",
        default=None,
        choices=["fla", "mamba_ssm", "torch"],
        help="the Mamba-2 layers' SSD backend (default: ramba.ops.ssd.default_backend)",
    )
    p.add_argument(
        "--compile-glue",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the Mamba-2 element-wise work (default: only when training on CUDA)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results", help="output folder (default benchmarks/results)")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help=f"after the timed decoding steps, profile {PROFILED_STEPS} more (the timed ones stay unprofiled); one "
        "table of ops per model and length into DIR",
    )
    p.add_argument("--name", default="bench_inference", help="file name stem (default bench_inference)")
    return p


def offload_spec(args):
    """The ``offload`` argument of ``prefill`` for these settings: the placement `ramba eval` reads from the same
    options (:func:`ramba.cli.offload.offload`, which also checks them), with ``--landmarks``."""
    from ramba.cli.offload import offload

    spec = offload(args)  # False, True or the disk tier's Offload
    if spec is False:
        return False
    return dataclasses.replace(Offload("host") if spec is True else spec, landmarks=args.landmarks)


class Reference:
    """A short prompt's cache (``tokens`` random tokens), decoded once right after each timed decoding step of a
    row: the decoding steps of small models are bound by the host, whose noise then hits both alike, so a row's
    median step over the reference's median in the same stretch of time (``decode_vs_reference``) is steadier than
    a ratio of two rows. Its prefill and first ``warm_steps`` decoding steps are the benchmark's warm-up."""

    def __init__(self, model, tokens: int, args, device: torch.device, warm_steps: int):
        from ramba.inference import prefill

        gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, tokens), generator=gen)
        logits, self.cache = prefill(model, ids, args.segment_len, args.mode, offload_spec(args))
        self.model, self.device, self.tokens, self.token = model, device, tokens, logits.argmax(-1)
        for _ in range(warm_steps):
            self.step()

    def step(self) -> float:
        """One decoding step; its time in ms."""
        start = synchronized_time(self.device)
        logits = self.model(input_ids=self.token[:, None], past_key_values=self.cache, use_cache=True).logits
        self.token = logits[:, -1].argmax(-1)
        return 1e3 * (synchronized_time(self.device) - start)


def measure(model, length: int, args, device: torch.device, reference: Reference, profile: Path | None = None) -> dict:
    """A prefill of `[batch, length]` random tokens, then greedy decoding (each step followed by one of
    `reference`): prefill tokens/s, decode ms/token, memory (GPU peak, host RSS, the chunk store's pinned / disk /
    device bytes) and the memory plan. With `profile`, ``PROFILED_STEPS`` more decoding steps run under
    torch.profiler and its table goes there."""
    from ramba.inference import prefill
    from ramba.inference.planner import plan_memory

    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, length), generator=gen)  # stays on the CPU
    offload = offload_spec(args)
    plan = plan_memory(model, args.batch, length, args.segment_len, offload)
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = synchronized_time(device)
    logits, cache = prefill(model, ids, segment_len=args.segment_len, mode=args.mode, offload=offload)
    token = logits.argmax(-1)
    prefill_s = synchronized_time(device) - start
    rss_after_prefill = rss_bytes()
    steps_ms, reference_ms, candidates = [], [], []

    def decode(token):
        step_start = synchronized_time(device)
        token = model(input_ids=token[:, None], past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
        steps_ms.append(1e3 * (synchronized_time(device) - step_start))
        sketch = cache.memory.sketch if cache.memory is not None else None
        candidates.append(sketch.candidates if sketch is not None else None)
        return token

    for _ in range(args.decode_tokens):  # the first step also makes the landmark sketch
        token = decode(token)
        reference_ms.append(reference.step())
    if profile is not None:  # more steps, after the timed ones, under the profiler
        with profiled(device, profile):
            for _ in range(PROFILED_STEPS):
                token = decode(token)
    held = cache.memory.nbytes() if cache.memory is not None else {}
    later, reference_later = steps_ms[1 : args.decode_tokens], reference_ms[1:]
    row = {
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": args.batch * length / prefill_s,
        # the first step also makes the landmark sketch (once per prefill): timed on its own
        "first_decode_ms": steps_ms[0],
        "decode_ms_per_token": statistics.mean(later),
        "decode_step_ms": later,
        "reference_tokens": reference.tokens,
        "reference_step_ms": reference_later,
        "decode_vs_reference": statistics.median(later) / statistics.median(reference_later),
        # the most candidates of a row the sketch left per step (None: no sketch, or that step streamed instead)
        "sketch_candidates": candidates[: args.decode_tokens],
        "rss_after_prefill_gib": rss_after_prefill / GIB,
        "peak_rss_gib": peak_rss_bytes() / GIB,
        "store_pinned_gib": held.get("pinned", 0) / GIB,
        "store_disk_gib": held.get("disk", 0) / GIB,
        "store_device_gib": held.get("device", 0) / GIB,
        "plan": plan.to_dict(),
    }
    if device.type == "cuda":
        row["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    del cache
    return row


def _models(args, device, dtype):
    """`(label, model)` pairs, built one at a time so only one is in memory."""
    if args.model is not None:
        yield Path(args.model).name, load_model(args.model, device, dtype)
        return
    overrides = parse_overrides(args.overrides)
    for arch in (a.strip() for a in args.architectures.split(",") if a.strip()):
        torch.manual_seed(args.seed)
        config = RambaConfig.preset(args.preset, architecture=arch, **overrides)
        yield arch, RambaForCausalLM(config).to(device=device, dtype=dtype).eval()


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    lengths = sorted(parse_lengths(args.lengths))
    offload_spec(args)  # bad offload options fail here, in one line, not as every row's recorded failure
    rows, configs = [], {}
    for label, model in _models(args, device, dtype):
        set_compile_glue(model, args.compile_glue)
        for module in model.modules():
            if isinstance(module, Mamba2Mixer):
                module.backend = args.ssd_backend
        configs[label] = model.config.to_dict()
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        failed, reference = None, None
        try:
            # the warm-up: a short prompt and as many decoding steps as a measurement, so that the first row does not
            # compile (H200, 2026-12-01: after generate() on GPU-resident ids as the warm-up, the 4K row's first two
            # decoding steps still took 15.8 s and 4.0 s; the reference's ids stay on the CPU, as the rows' do)
            reference = Reference(model, min(lengths[0], 2 * args.segment_len), args, device, args.decode_tokens)
        except Exception as exc:
            failed = f"warm-up: {type(exc).__name__}: {exc}"[:500]
            logger.warning("%s: warm-up failed, every length skipped", label, exc_info=True)
        for length in lengths:
            row = {"model": label, "length": length, "batch": args.batch, "gpu_weights_gib": weights / GIB}
            if failed is not None:
                row["error"] = f"skipped ({failed})"
            else:
                try:
                    profile = None
                    if args.profile is not None:
                        profile = Path(args.profile) / f"{label}-{format_length(length)}.decode.txt"
                    row.update(measure(model, length, args, device, reference, profile))
                    logger.info(
                        "%s %s: prefill %.0f tokens/s, decode %.2f ms/token",
                        label,
                        format_length(length),
                        row["prefill_tokens_per_s"],
                        row["decode_ms_per_token"],
                    )
                except Exception as exc:  # record the failure (e.g. out of memory) and skip longer lengths
                    row["error"] = failed = f"{type(exc).__name__}: {exc}"[:500]
                    failed = f"failed at {format_length(length)}: {failed}"
                    logger.warning("%s %s failed: %s", label, length, row["error"])
                    logger.debug("%s", traceback.format_exc())
            rows.append(row)
        del model, reference
        free_memory(device)
    return {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "rows": rows,
        "settings": dict(vars(args)),
        "configs": configs,
    }


def table(result: dict) -> str:
    lines = [
        f"{'model':>12} {'length':>7} {'prefill tok/s':>14} {'decode ms/tok':>14} {'vs ref':>7} {'peak GPU GiB':>13} "
        f"{'RSS GiB':>8} {'pinned GiB':>10} {'disk GiB':>8}"
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['model']:>12} {format_length(r['length']):>7}  {r['error'][:90]}")
            continue
        gpu = f"{r['peak_gpu_gib']:13.3f}" if "peak_gpu_gib" in r else f"{'-':>13}"
        lines.append(
            f"{r['model']:>12} {format_length(r['length']):>7} {r['prefill_tokens_per_s']:14.0f} "
            f"{r['decode_ms_per_token']:14.2f} {r['decode_vs_reference']:7.2f} {gpu} {r['rss_after_prefill_gib']:8.2f} "
            f"{r['store_pinned_gib']:10.2f} {r['store_disk_gib']:8.2f}"
        )
    return "\n".join(lines)


def save(result: dict, out: str, name: str, seed: int) -> tuple[Path, Path]:
    rows = result["rows"]
    labels = list(dict.fromkeys(r["model"] for r in rows))

    def series(key):
        return {
            m: ([r["length"] for r in rows if r["model"] == m], [r.get(key) for r in rows if r["model"] == m])
            for m in labels
        }

    x = "context length (tokens)"

    def from_zero(title, ylabel, key, least):  # a y range from 0, so that noise does not look like a trend
        top = 1.15 * max([least] + [r[key] for r in rows if r.get(key) is not None])
        return Panel(title, x, ylabel, series(key), length_axis=True, ylim=(0.0, top))

    panels = [
        Panel("prefill", x, "tokens/s", series("prefill_tokens_per_s"), length_axis=True, logy=True),
        from_zero("decode", "ms / token", "decode_ms_per_token", 1.0),
        from_zero("decode / a short prompt's step (same run)", "ratio of medians", "decode_vs_reference", 1.5),
    ]
    if result["device"].startswith("cuda"):
        panels.append(Panel("peak GPU memory", x, "GiB", series("peak_gpu_gib"), length_axis=True))
    panels.append(Panel("host memory (RSS after prefill)", x, "GiB", series("rss_after_prefill_gib"), length_axis=True))
    s = result["settings"]
    where = "on" if s["offload"] else "off"
    if s["offload_dir"]:
        where = f"disk tier, host budget {s['host_budget'] or 'default'}"
    title = f"inference ({result['device']}, {result['dtype']}, mode {s['mode']}, offload {where})"
    json_path = write_results(Path(out) / f"{name}.json", result, s, seed)
    png_path = line_plots(panels, Path(out) / f"{name}.png", title=title)
    return json_path, png_path


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.decode_tokens < 3:
        parser.error("--decode-tokens: need >= 3 to time decoding (the first step is timed on its own)")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    result = run(args)
    print(table(result))
    for path in save(result, args.out, args.name, args.seed):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
