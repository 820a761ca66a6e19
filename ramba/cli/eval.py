"""`ramba eval passkey|tasks|ppl`: long-context evaluations writing JSON + PNG results and a printed table."""

from __future__ import annotations

import argparse
from pathlib import Path

from ramba.cli.args import at_least

ALL_TASKS = "niah_single,niah_multikey,niah_multivalue,niah_multiquery,variable_tracking"
HELD_OUT = ("debian-manuals",)  # as ramba.eval.tasks.HELD_OUT (not imported here: the parser stays light)


def _arg(parse):
    """An argparse `type=` that reports the parser's own message (e.g. a bad length) as a usage error."""

    def convert(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = parse.__name__
    return convert


def _common(p: argparse.ArgumentParser, out: str) -> None:
    from ramba.eval.results import parse_lengths
    from ramba.model.loading import MODEL_FORMS

    p.add_argument("--model", required=True, help=f"the model: {MODEL_FORMS}")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="'byte' or a tokenizer path (default: tokenizer.json beside the model, else the run's, else byte)",
    )
    p.add_argument(
        "--lengths", type=_arg(parse_lengths), required=True, help="context lengths, e.g. 4k,64k,1m,16m (k = 1024)"
    )
    p.add_argument("--out", default=out, help=f"output folder for the JSON and PNG (default {out})")
    p.add_argument("--name", default=None, help="file name stem of the outputs (default: the command name)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the samples (sample i of every cell uses seed + i)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace <out>/<name>.json and .png if they exist")
    p.add_argument("--no-verify", action="store_true", help="skip the checks of the weights (checksums, NaN/inf)")


def check_outputs(out: str, name: str, overwrite: bool) -> None:
    """Before any work: `out` is a folder that can be created and written, and `<name>.json`/`.png` in it do not
    exist (or `overwrite`)."""
    from ramba.files import check_output

    check_output(out, folder=True, exist_ok=True, what="--out")
    for suffix in (".json", ".png"):
        check_output(Path(out) / f"{name}{suffix}", overwrite=overwrite, what="--out")


def _generation(p: argparse.ArgumentParser, depths: str) -> None:
    from ramba.eval.results import parse_depths

    p.add_argument(
        "--depths", type=_arg(parse_depths), default=depths, help=f"needle depths in [0, 1] (default {depths})"
    )
    p.add_argument("--samples", type=at_least(1), default=5, help="samples per (length, depth) cell (default 5)")
    p.add_argument(
        "--mode",
        choices=["exact", "fast"],
        default="exact",
        help="prefill mode: exact (HSA on every prompt token) or fast (HSA only in the last segment)",
    )
    from ramba.cli import offload

    offload.add_arguments(p)
    p.add_argument(
        "--segment-len", type=at_least(1), default=2048, help="prefill segment length in tokens (default 2048)"
    )
    p.add_argument("--batch-size", type=at_least(1), default=1, help="prompts generated together (default 1)")
    p.add_argument(
        "--extra-tokens",
        type=at_least(0),
        default=8,
        help="new tokens allowed beyond the reference answer's length (default 8)",
    )
    p.add_argument(
        "--long-samples",
        type=at_least(1),
        default=None,
        help="samples per cell at lengths above 1M (default: --samples; the protocol: --samples 2 --long-samples 1)",
    )
    p.add_argument(
        "--haystack",
        default="template",
        help="comma-separated haystacks, each evaluated on its own: token files (made by `ramba prepare`) "
        "or 'template' (a repeated sentence); default template. The protocol: template,"
        "data/python-doc,data/debian-manuals (docs/evaluation.md)",
    )
    p.add_argument(
        "--held-out",
        default=",".join(HELD_OUT),
        help=f"comma-separated names of the haystacks used in neither training nor tuning, marked so in "
        f"the results (default {','.join(HELD_OUT)})",
    )


def add_parser(subparsers) -> None:
    from ramba.eval.results import parse_depths

    p = subparsers.add_parser(
        "eval",
        help="evaluate a model: passkey, synthetic tasks, perplexity",
        description="Long-context evaluations. Every command writes <out>/<name>.json "
        "(with machine, date, versions, config, seed) and <out>/<name>.png. See docs/evaluation.md.",
    )
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")

    pk = sub.add_parser("passkey", help="passkey retrieval accuracy over lengths x depths (heatmap)")
    _common(pk, "eval_results")
    _generation(pk, "0,0.25,0.5,0.75,1")
    pk.add_argument("--digits", type=at_least(1), default=5, help="digits of the pass key (default 5)")
    pk.set_defaults(func=run_passkey)

    tk = sub.add_parser("tasks", help="needle-in-a-haystack / variable-tracking accuracy by length")
    _common(tk, "eval_results")
    _generation(tk, "0,0.25,0.5,0.75,1")
    tk.add_argument(
        "--tasks",
        default=ALL_TASKS,
        help=f"comma-separated tasks, each NAME or NAME:key=value:... (e.g. variable_tracking:num_hops=2); "
        f"default {ALL_TASKS}",
    )
    tk.add_argument(
        "--export-harness",
        metavar="DIR",
        default=None,
        help="instead of evaluating, write these samples as lm-evaluation-harness tasks (JSONL + YAML per "
        "task and length) into DIR; run them with `ramba-lm-eval --model ramba --include_path DIR ...`",
    )
    tk.set_defaults(func=run_tasks)

    rk = sub.add_parser("ranks", help="where the asked needle's chunk ranks among all chunks while the model answers")
    _common(rk, "eval_results")
    rk.add_argument("--depths", type=_arg(parse_depths), default="0,0.5,1", help="needle depths (default 0,0.5,1)")
    rk.add_argument("--samples", type=at_least(1), default=1, help="samples per (length, depth) cell (default 1)")
    rk.add_argument("--mode", choices=["exact", "fast"], default="fast", help="prefill mode (default fast)")
    rk.add_argument(
        "--segment-len", type=at_least(1), default=2048, help="prefill segment length in tokens (default 2048)"
    )
    rk.add_argument(
        "--haystack", default=None, help="token file whose text fills the haystack (default: a repeated template)"
    )
    rk.add_argument(
        "--task",
        default="passkey",
        help="the task, NAME or NAME:key=value:... as --tasks of `ramba eval tasks` (default passkey)",
    )
    rk.set_defaults(func=run_ranks)

    pp = sub.add_parser("ppl", help="perplexity by context length and by position")
    _common(pp, "eval_results")
    pp.add_argument("--data", required=True, help="token file (made by `ramba prepare`) to read the windows from")
    pp.add_argument(
        "--windows", type=at_least(1), default=4, help="windows per length, at evenly spaced offsets (default 4)"
    )
    pp.add_argument("--buckets", type=at_least(1), default=8, help="position buckets per length (default 8)")
    pp.add_argument("--bucket-scale", choices=["log", "linear"], default="log", help="bucket widths (default log)")
    pp.add_argument("--batch-size", type=at_least(1), default=1, help="windows per forward (default 1)")
    pp.add_argument("--segment-len", type=at_least(1), default=2048, help="tokens per forward segment (default 2048)")
    pp.add_argument("--offload", action="store_true", help="keep the chunk memory in CPU pinned memory")
    pp.set_defaults(func=run_ppl)


def _load(args):
    import torch

    from ramba.eval.loading import load_model_tokenizer

    check_outputs(args.out, args.name or args.eval_command, args.overwrite)
    torch.manual_seed(args.seed)
    return load_model_tokenizer(args.model, args.tokenizer, args.device, args.dtype, verify=not args.no_verify)


def _settings(args):
    from ramba.cli import offload
    from ramba.eval.tasks import GenerationSettings

    return GenerationSettings(
        segment_len=args.segment_len,
        mode=args.mode,
        offload=offload.offload(args),
        batch_size=args.batch_size,
        extra_tokens=args.extra_tokens,
    )


def _check_memory(model, args) -> dict:
    """The memory plan of the longest prompt (its answer included), checked before the first cell."""
    from ramba.cli import offload

    return offload.check_memory(model, args, max(args.lengths) + 64 + args.extra_tokens, args.batch_size)


def _haystack(args, tokenizer):
    """The one haystack of --haystack (None: the template)."""
    from ramba.eval.results import EvalError
    from ramba.eval.tasks import load_haystacks

    hays = load_haystacks(args.haystack, tokenizer)
    if len(hays) > 1:
        raise EvalError(f"haystack: this command takes one haystack, got {args.haystack!r}")
    return next(iter(hays.values()))


def _over_haystacks(args, tokenizer, evaluate):
    """`evaluate(haystack)` on every haystack of --haystack (see `ramba.eval.tasks.over_haystacks`)."""
    from ramba.eval.tasks import load_haystacks, over_haystacks

    held_out = [n.strip() for n in args.held_out.split(",") if n.strip()]
    return over_haystacks(evaluate, load_haystacks(args.haystack, tokenizer), held_out)


def _config(args, model, **extra) -> dict:
    skip = {"func"}
    settings = {k: v for k, v in vars(args).items() if k not in skip}
    return {"model_path": str(Path(args.model)), "model": model.config.to_dict(), "eval": {**settings, **extra}}


def _done(paths) -> None:
    for path in paths:
        print(f"wrote {path}")


def run_passkey(args: argparse.Namespace) -> int:
    from ramba.eval.passkey import evaluate_passkey, passkey_table, save_passkey

    model, tok = _load(args)
    plan = _check_memory(model, args)
    result = _over_haystacks(
        args,
        tok,
        lambda hay: evaluate_passkey(
            model,
            tok,
            args.lengths,
            args.depths,
            args.samples,
            _settings(args),
            args.seed,
            hay,
            args.digits,
            progress=not args.no_progress,
            long_samples=args.long_samples,
        ),
    )
    print(f"passkey accuracy ({args.samples} samples per cell, mode {args.mode}{', offload' if args.offload else ''}):")
    print(passkey_table(result))
    means = [r["mean"] for r in result["haystacks"].values()]
    print(f"mean accuracy: {sum(means) / len(means):.3f}")
    _done(
        save_passkey(
            result,
            args.out,
            _config(args, model, tokenizer=tok.name, memory_plan=plan),
            args.seed,
            args.name or "passkey",
        )
    )
    return 0


def run_tasks(args: argparse.Namespace) -> int:
    from ramba.eval.results import format_grid
    from ramba.eval.tasks import evaluate_tasks, save_tasks, tasks_tables

    model, tok = _load(args)
    plan = _check_memory(model, args)
    specs = [s.strip() for s in args.tasks.split(",") if s.strip()]
    if args.export_harness:
        return _export_harness(args, tok, specs)
    result = _over_haystacks(
        args,
        tok,
        lambda hay: evaluate_tasks(
            model,
            tok,
            specs,
            args.lengths,
            args.depths,
            args.samples,
            _settings(args),
            args.seed,
            hay,
            progress=not args.no_progress,
            long_samples=args.long_samples,
        ),
    )
    for hay, h in result["haystacks"].items():
        for spec, r in h["tasks"].items():
            print(f"{spec} on {hay} (mean {r['mean']:.3f}):")
            print(format_grid(r["scores"], args.lengths, args.depths))
    print(tasks_tables(result))
    _done(
        save_tasks(
            result,
            args.out,
            _config(args, model, tokenizer=tok.name, memory_plan=plan),
            args.seed,
            args.name or "tasks",
        )
    )
    return 0


def _export_harness(args: argparse.Namespace, tok, specs: list[str]) -> int:
    from ramba.eval.harness_tasks import export_harness_tasks

    names = export_harness_tasks(
        args.export_harness,
        tok,
        specs,
        args.lengths,
        args.depths,
        args.samples,
        args.seed,
        _haystack(args, tok),
        args.extra_tokens,
    )
    print(f"wrote {len(names)} lm-evaluation-harness tasks to {args.export_harness}: {', '.join(names)}")
    model_args = f"pretrained={args.model},mode={args.mode},segment_len={args.segment_len}"
    model_args += (f",tokenizer={args.tokenizer}" if args.tokenizer else "") + (",offload=True" if args.offload else "")
    print(
        f"run them with: ramba-lm-eval --model ramba --model_args {model_args} --include_path {args.export_harness} "
        "--tasks ramba_tasks"
    )
    return 0


def run_ranks(args: argparse.Namespace) -> int:
    from ramba.eval.retrieval import evaluate_needle_ranks, ranks_table, save_needle_ranks

    model, tok = _load(args)
    result = evaluate_needle_ranks(
        model,
        tok,
        args.lengths,
        args.depths,
        args.samples,
        args.segment_len,
        args.mode,
        args.seed,
        _haystack(args, tok),
        progress=not args.no_progress,
        task=args.task,
    )
    print(
        f"{args.task}: rank of the answer's needle chunk at each answer token (0 = best; selected below "
        f"top-{result['topk']}):"
    )
    print(ranks_table(result))
    _done(
        save_needle_ranks(result, args.out, _config(args, model, tokenizer=tok.name), args.seed, args.name or "ranks")
    )
    return 0


def run_ppl(args: argparse.Namespace) -> int:
    from ramba.data.tokens import TokenFile
    from ramba.eval.ppl import evaluate_ppl, ppl_table, save_ppl

    model, tok = _load(args)
    data = TokenFile(args.data)
    data.check_tokenizer(tok)
    result = evaluate_ppl(
        model,
        data,
        args.lengths,
        args.windows,
        args.buckets,
        args.bucket_scale,
        args.batch_size,
        args.segment_len,
        args.offload,
        progress=not args.no_progress,
    )
    print(ppl_table(result))
    _done(save_ppl(result, args.out, _config(args, model, tokenizer=tok.name), args.seed, args.name or "ppl"))
    return 0
