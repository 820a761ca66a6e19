"""`ramba prepare`: text files, folders and JSONL -> a memory-mapped token file."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="tokenize text files, folders and JSONL into a token file",
        description="Tokenize text into a memory-mapped token file folder (tokens.bin, offsets.npy, meta.json) "
        "for `ramba train`. Every text file is one document, every JSONL line one document; "
        ".gz files are read directly.",
    )
    p.add_argument("inputs", nargs="+", help="text files, JSONL files or folders (walked recursively)")
    p.add_argument("-o", "--output", required=True, help="token file folder to create, e.g. data/mytext")
    p.add_argument(
        "--tokenizer",
        default="byte",
        help="'byte' (built in) or a path to tokenizer.json / a tokenizer folder (default: byte)",
    )
    p.add_argument("--jsonl-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument(
        "--ext",
        default=None,
        help="comma-separated extensions taken from folders (default: .txt,.md,.rst,.text,.jsonl,.json)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ramba.data.prepare import DEFAULT_EXTENSIONS, prepare
    from ramba.data.tokenizer import load_tokenizer
    from ramba.files import check_output

    check_output(args.output, overwrite=args.overwrite, folder=True)

    exts = DEFAULT_EXTENSIONS
    if args.ext:
        exts = tuple(e if e.startswith(".") else "." + e for e in args.ext.split(",") if e)
    tok = load_tokenizer(args.tokenizer)
    tf = prepare(
        args.inputs,
        args.output,
        tok,
        jsonl_field=args.jsonl_field,
        extensions=exts,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(f"{tf.path}: {tf.n_docs:,} documents, {len(tf):,} tokens ({tok.name} tokenizer, vocab {tok.vocab_size})")
    return 0
