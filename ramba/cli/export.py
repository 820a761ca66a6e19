"""`ramba export --model RUN -o FILE.safetensors`: a trained model as one safetensors file (config and
tokenizer name in its metadata), the form in which models ship and `--model` accepts them."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from ramba.model.loading import MODEL_FORMS

    p = subparsers.add_parser("export", help="write a trained model as a single safetensors file", description=__doc__)
    p.add_argument("--model", required=True, help=f"the model: {MODEL_FORMS}")
    p.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    p.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="weight dtype in the file (default bf16)"
    )
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer name to record (default: the model's, see `ramba eval`)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    p.add_argument("--no-verify", action="store_true", help="skip the checks of the weights read (checksums, NaN/inf)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from ramba import __version__
    from ramba.errors import OutputPathError
    from ramba.eval.loading import load_model_tokenizer, run_config
    from ramba.files import check_output
    from ramba.model.loading import resolve_dtype, resolve_model
    from ramba.model.single_file import TRAIN_CONFIG_KEY, model_file_bytes, read_model_file_metadata, save_model_file

    if not args.output.endswith(".safetensors"):
        raise OutputPathError(f"output: expected a file name ending in .safetensors, got {args.output!r}")
    check_output(args.output, overwrite=args.overwrite)
    source = resolve_model(args.model)
    model, tok = load_model_tokenizer(
        source, args.tokenizer, torch.device("cpu"), torch.float32, verify=not args.no_verify
    )
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    check_output(args.output, overwrite=args.overwrite, size=model_file_bytes(model, dtype))
    metadata = {"ramba_version": __version__, "ramba_exported_from": str(args.model)}
    if source.is_file():  # re-exporting a model file keeps the training config it carries
        train_config = read_model_file_metadata(source).get(TRAIN_CONFIG_KEY)
    else:
        found = run_config(source)
        train_config = None if found is None else json.dumps(found)
    if train_config is not None:
        metadata[TRAIN_CONFIG_KEY] = train_config
    path = save_model_file(model, args.output, dtype=dtype, tokenizer=tok.name, metadata=metadata)
    n = sum(p.numel() for p in model.parameters())
    print(
        f"{path}: {n / 1e6:.2f}M parameters, {Path(path).stat().st_size / 2**20:.1f} MiB ({args.dtype}, tokenizer {tok.name})"
    )
    return 0
