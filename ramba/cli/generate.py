"""`ramba generate --model DIR --prompt-file F`: continue a prompt, streaming the new text to the terminal."""

from __future__ import annotations

import argparse
import sys
import time

from ramba.cli.args import at_least


class StreamDecoder:
    """Turns token ids into text as they arrive.

    Decodes a short tail of ids (from the start of the previous piece) so tokenizers whose pieces
    depend on their neighbours (leading spaces, multi-byte UTF-8 split over byte tokens) print the
    same text as decoding everything at once; an incomplete character (U+FFFD at the end) is held back.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already printed
        self.read = 0

    def push(self, token_id: int) -> str:
        """Adds one id; returns the new text that can be printed now (possibly empty)."""
        self.ids.append(int(token_id))
        printed = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(text) > len(printed) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(printed) :]
        return ""

    def flush(self) -> str:
        """The text still held back (e.g. a cut character, shown as U+FFFD)."""
        printed = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(printed) :]


def add_parser(subparsers) -> None:
    from ramba.model.loading import MODEL_FORMS

    p = subparsers.add_parser(
        "generate",
        help="continue a prompt, streaming tokens to the terminal",
        description="Generate a continuation of a prompt with a RAMba model; long prompts are "
        "prefilled in segments (memory bounded). See docs/evaluation.md.",
    )
    p.add_argument("--model", required=True, help=f"the model: {MODEL_FORMS}")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-file", help="file holding the prompt text ('-' reads stdin)")
    src.add_argument("--prompt", help="the prompt text itself")
    p.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer path (default: as for `ramba eval`)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    p.add_argument(
        "--top-k", type=at_least(1), default=None, help="sample from the k most likely tokens (with --sample)"
    )
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")
    p.add_argument("--mode", choices=["exact", "fast"], default="exact", help="prefill mode (default exact)")
    from ramba.cli import offload

    offload.add_arguments(p)
    p.add_argument("--segment-len", type=at_least(1), default=2048, help="prefill segment length (default 2048)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (for --sample)")
    p.add_argument("--no-verify", action="store_true", help="skip the checks of the weights (checksums, NaN/inf)")
    p.set_defaults(func=run)


def _read_prompt(args) -> str:
    from ramba.errors import InputError

    if args.prompt is not None:
        return args.prompt
    try:
        if args.prompt_file == "-":
            return sys.stdin.read()
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise InputError(
            f"--prompt-file {args.prompt_file}: not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}); "
            "give a text file"
        ) from None
    except IsADirectoryError:
        raise InputError(f"--prompt-file {args.prompt_file}: is a folder; give a text file") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from ramba.errors import InputError
    from ramba.eval.loading import load_model_tokenizer
    from ramba.inference import generate

    if not args.temperature > 0:
        raise InputError(f"--temperature: expected > 0, got {args.temperature}")
    prompt = _read_prompt(args)
    torch.manual_seed(args.seed)
    model, tok = load_model_tokenizer(args.model, args.tokenizer, args.device, args.dtype, verify=not args.no_verify)
    ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt)
    if len(ids) == 0:
        raise InputError("prompt: the prompt is empty; give some text")
    from ramba.cli import offload

    offload.check_memory(model, args, len(ids) + args.max_new_tokens, 1)
    input_ids = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    eos = None if args.ignore_eos else tok.eos_id
    stream = StreamDecoder(tok)
    times: list[float] = []
    done = False

    def on_token(new: torch.Tensor) -> None:
        nonlocal done
        token = int(new[0])
        times.append(time.perf_counter())
        if done:
            return
        if eos is not None and token == eos:
            done = True
            return
        sys.stdout.write(stream.push(token))
        sys.stdout.flush()

    start = time.perf_counter()
    with torch.no_grad():
        generate(
            model,
            input_ids,
            args.max_new_tokens,
            segment_len=args.segment_len,
            mode=args.mode,
            offload=offload.offload(args),
            do_sample=args.sample,
            temperature=args.temperature,
            top_k=args.top_k,
            eos_token_id=eos,
            on_token=on_token,
        )
    sys.stdout.write(stream.flush() + "\n")
    sys.stdout.flush()
    if times:
        decode = (times[-1] - times[0]) / (len(times) - 1) * 1e3 if len(times) > 1 else float("nan")
        print(
            f"[{len(ids)} prompt tokens, prefill {times[0] - start:.2f} s; {len(times)} new tokens, "
            f"{decode:.1f} ms/token]",
            file=sys.stderr,
        )
    return 0
