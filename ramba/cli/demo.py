"""`ramba demo`: the shipped tiny RAMba retrieves from contexts far longer than any it was trained on,
on whatever device there is (a few minutes on a laptop CPU).

First the RULER-style suite (five needle and tracking tasks by context length: a printed task x length
table, JSON and a heatmap PNG), then a grid of passkey trials (context length x needle depth), then one
pass key of your choosing (`--passkey`) hidden in the longest context, with the model's answer streamed
as it is generated. Prefill runs in the fast mode (HSA for the final segment only).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from ramba.cli.args import at_least

SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "pretrained" / "tiny-ruler.safetensors"
SUITE = "niah_single,niah_multikey,niah_multivalue,niah_multiquery,variable_tracking"


def add_parser(subparsers) -> None:
    from ramba.cli.eval import _arg
    from ramba.eval.results import parse_depths, parse_lengths

    p = subparsers.add_parser(
        "demo",
        help="the RULER-style suite and passkey retrieval far beyond the training length, with the shipped model",
        description=__doc__,
    )
    p.add_argument("--model", default=str(SHIPPED_MODEL), help="a model (default: the shipped tiny-ruler model)")
    p.add_argument("--passkey", default=None, help="the pass key to hide in the last trial (digits; default random)")
    p.add_argument(
        "--lengths",
        type=_arg(parse_lengths),
        default="4k,16k,64k,256k",
        help="context lengths of the grid (default 4k,16k,64k,256k; k = 1024)",
    )
    p.add_argument("--depths", type=_arg(parse_depths), default="0,0.5,1", help="needle depths (default 0,0.5,1)")
    p.add_argument("--samples", type=at_least(1), default=1, help="trials per (length, depth) cell (default 1)")
    p.add_argument(
        "--tasks", default=SUITE, help=f"comma-separated tasks of the suite (default {SUITE}); 'none' skips the suite"
    )
    p.add_argument(
        "--suite-lengths",
        type=_arg(parse_lengths),
        default="4k,16k,64k",
        help="context lengths of the suite (default 4k,16k,64k)",
    )
    p.add_argument(
        "--suite-depths",
        type=_arg(parse_depths),
        default="0.5",
        help="needle depths of the suite, averaged in its table (default 0.5)",
    )
    p.add_argument(
        "--haystack",
        default=None,
        help="token file whose text fills the haystack (default: the classic repeated grass-sky-sun text)",
    )
    p.add_argument("--segment-len", type=at_least(1), default=4096, help="prefill segment length (default 4096)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    p.add_argument("--out", default="demo_results", help="folder for demo_tasks.json/.png and demo_passkey.json/.png")
    p.add_argument("--seed", type=int, default=0, help="seed of the trials")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--no-verify", action="store_true", help="skip the checks of the weights (checksums, NaN/inf)")
    p.set_defaults(func=run)


def _training_length(model_path: str) -> int | None:
    """`data.seq_len` of the training config recorded in a single-file model, if any."""
    import json

    from ramba.model.loading import resolve_model
    from ramba.model.single_file import TRAIN_CONFIG_KEY, read_model_file_metadata

    path = resolve_model(model_path)
    if not path.is_file():
        return None
    config = read_model_file_metadata(path).get(TRAIN_CONFIG_KEY)
    return None if config is None else json.loads(config).get("data", {}).get("seq_len")


def run(args: argparse.Namespace) -> int:
    import torch

    from ramba.cli.generate import StreamDecoder
    from ramba.data.tasks import TokenFileHaystack, make_task
    from ramba.errors import EvalError, ModelLoadError
    from ramba.eval.loading import load_model_tokenizer
    from ramba.eval.passkey import evaluate_passkey, passkey_table, save_passkey
    from ramba.eval.results import format_length
    from ramba.eval.tasks import GenerationSettings, evaluate_tasks, over_haystacks, save_tasks, tasks_tables
    from ramba.files import check_output
    from ramba.inference import generate

    if not Path(args.model).exists() and args.model == str(SHIPPED_MODEL):
        raise ModelLoadError(
            f"demo: the shipped model {SHIPPED_MODEL} is missing from this installation; "
            "reinstall ramba or give --model"
        )
    check_output(args.out, folder=True, exist_ok=True, what="--out")  # the demo replaces its own results
    model, tok = load_model_tokenizer(args.model, None, args.device, "auto", verify=not args.no_verify)
    haystack = TokenFileHaystack(args.haystack, tok) if args.haystack else None
    rng = random.Random(args.seed)
    key = args.passkey or str(rng.randrange(10_000, 100_000))
    try:
        task = make_task("passkey", tok, haystack, key=key)
    except ValueError as e:
        raise EvalError(f"passkey: {e}") from None
    device = next(model.parameters()).device
    n_params = sum(p.numel() for p in model.parameters())
    trained = _training_length(args.model)
    longest = max(args.lengths)
    print(f"model: {args.model} ({n_params / 1e6:.2f}M parameters, on {device})")
    if trained:
        print(
            f"trained on contexts of {trained:,} tokens; the longest trial here is {longest:,} tokens "
            f"({longest / trained:g}x the training length)"
        )
    settings = GenerationSettings(segment_len=args.segment_len, mode="fast", offload=False)

    config = {
        "model_path": args.model,
        "model": model.config.to_dict(),
        "training_length": trained,
        "demo": {k: v for k, v in vars(args).items() if k != "func"},
    }
    haystacks = {Path(args.haystack).name if args.haystack else "template": haystack}
    specs = [t.strip() for t in args.tasks.split(",") if t.strip() and t.strip() != "none"]
    if specs:
        start = time.perf_counter()
        result = over_haystacks(
            lambda hay: evaluate_tasks(
                model,
                tok,
                specs,
                args.suite_lengths,
                args.suite_depths,
                args.samples,
                settings,
                args.seed,
                hay,
                progress=not args.no_progress,
            ),
            haystacks,
        )
        print(f"\nRULER-style suite ({args.samples} trial(s) per cell, {time.perf_counter() - start:.0f} s):")
        print(tasks_tables(result))
        for path in save_tasks(result, args.out, config, args.seed, "demo_tasks"):
            print(f"wrote {path}")

    start = time.perf_counter()
    result = over_haystacks(
        lambda hay: evaluate_passkey(
            model, tok, args.lengths, args.depths, args.samples, settings, args.seed, hay, progress=not args.no_progress
        ),
        haystacks,
    )
    print(f"\npasskey accuracy ({args.samples} trial(s) per cell, {time.perf_counter() - start:.0f} s):")
    print(passkey_table(result))
    for path in save_passkey(result, args.out, config, args.seed, "demo_passkey"):
        print(f"wrote {path}")

    depth = rng.random()
    sample = task.generate(longest, depth, seed=args.seed)
    print(
        f"\nyour pass key {key} is hidden at depth {depth:.2f} of {format_length(longest)} tokens "
        f"(token {sample.needles[0][0]:,})."
    )
    print(f"...{tok.decode(sample.input_ids[sample.prompt_len - 60 : sample.prompt_len])!r}")
    ids = torch.as_tensor(sample.input_ids[None, : sample.prompt_len])

    stream = StreamDecoder(tok)
    label = ["model:"]  # printed with the first token, after the prefill's progress bar has gone

    def show(token: torch.Tensor) -> None:
        if int(token[0]) != tok.eos_id:
            print(label.pop() if label else "", stream.push(int(token[0])), sep="", end="", flush=True)

    start = time.perf_counter()
    new = generate(
        model,
        ids,
        len(sample.answer_ids) + 4,
        segment_len=args.segment_len,
        mode="fast",
        eos_token_id=tok.eos_id,
        on_token=show,
    )
    print(*label, stream.flush(), sep="", end="")
    answer = tok.decode([t for t in new[0].tolist() if t != tok.eos_id])
    found = task.score(sample, answer) == 1.0
    print(
        f"\n{'found' if found else 'missed'} the pass key in {time.perf_counter() - start:.0f} s "
        f"({'correct' if found else 'expected ' + key})"
    )
    return 0
