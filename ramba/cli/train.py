"""`ramba train CONFIG`: train a model from a YAML/JSON config (single process or under torchrun)."""

from __future__ import annotations

import argparse
import json
import os
import textwrap


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model from a YAML/JSON config",
        description="Train a RAMba model. Multi-GPU / multi-node: the same command under "
        "`torchrun --nproc_per_node N -m ramba train CONFIG`. See docs/training.md and `ramba train --fields`.",
    )
    p.add_argument("config", nargs="?", help="YAML or JSON config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set optim.lr=1e-3 --set data.sources.0.weight=2 (repeatable)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="CHECKPOINT",
        help="continue from the newest checkpoint in out_dir, or from the given checkpoint folder",
    )
    p.add_argument(
        "--fields", action="store_true", help="list every config field with its type, default and meaning, then exit"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ramba.train.config import ConfigError, describe, load_config

    if args.fields:
        for key, tp, default, help_ in describe():
            print(f"{key}  ({tp}, default {default})")
            print(textwrap.indent(textwrap.fill(help_, 88), "    "))
        return 0
    if args.config is None and not args.overrides:
        raise ConfigError(
            "give a config file (see recipes/) or --set overrides; `ramba train --fields` lists the fields"
        )
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from ramba.train.loop import train

    metrics = train(cfg, resume=args.resume)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if metrics and main_rank:
        print("final: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    if "stopped_at_step" in metrics:
        if main_rank:
            print(
                f"stopped by a signal at step {metrics['stopped_at_step']} of {cfg.max_steps}: continue with --resume"
            )
        return 1
    return 0
