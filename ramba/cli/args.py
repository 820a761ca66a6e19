"""Argument types shared by the command-line tools: a bad value is a one-line usage error (exit 2)."""

from __future__ import annotations

import argparse


def at_least(least: int):
    """An argparse ``type=``: an integer >= ``least``, else a usage error naming the bound."""

    def integer(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = None
        if n is None or n < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
        return n

    return integer
