"""A model and its tokenizer for evaluation and generation.

The model comes from :mod:`ramba.model.loading` (model folder, checkpoint, training run, single-file
model or shipped model name, verified unless ``verify=False``); this module adds the tokenizer that goes
with it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ramba.errors import EvalError
from ramba.model.loading import load_model, resolve_device, resolve_dtype, resolve_model, resolve_model_dir

__all__ = [
    "resolve_model",
    "resolve_model_dir",
    "run_config",
    "load_model",
    "load_model_tokenizer",
    "resolve_device",
    "resolve_dtype",
]


def run_config(model_dir: Path) -> dict | None:
    """The training config (`ramba train`'s config.json) of the run a model folder belongs to, looked up
    in the folders above a checkpoint (`run/checkpoints/step-N/model`); None when there is none."""
    for parent in list(Path(model_dir).absolute().parents)[:4]:
        cfg = parent / "config.json"
        if cfg.is_file():
            try:
                data = json.loads(cfg.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(data.get("data"), dict):
                return data
    return None


def _run_tokenizer(model_dir: Path) -> str | None:
    """The tokenizer a training run was configured with (`data.tokenizer` of its config)."""
    tok = (run_config(model_dir) or {}).get("data", {}).get("tokenizer")
    return None if tok is None else str(tok)


def load_model_tokenizer(
    spec: str | os.PathLike, tokenizer: str | None = None, device=None, dtype=None, verify: bool = True
):
    """`(model, tokenizer)`. The tokenizer is `tokenizer` when given, else the one named in a single-file
    model's metadata, else a `tokenizer.json` beside the weights, else the training run's configured
    tokenizer, else the built-in byte tokenizer."""
    from ramba.data.tokenizer import load_tokenizer
    from ramba.model.single_file import TOKENIZER_KEY, read_model_file_metadata

    device = resolve_device(device)
    source = resolve_model(spec)
    if source.is_file():
        tokenizer = tokenizer or read_model_file_metadata(source).get(TOKENIZER_KEY)
    else:
        if tokenizer is None and (source / "tokenizer.json").is_file():
            tokenizer = str(source / "tokenizer.json")
        tokenizer = tokenizer or _run_tokenizer(source)
    tok = load_tokenizer(tokenizer)
    model = load_model(source, device, dtype, verify=verify)
    if tok.vocab_size > model.config.vocab_size:
        raise EvalError(
            f"tokenizer {tok.name!r} has {tok.vocab_size} ids but the model's vocab_size is "
            f"{model.config.vocab_size}; pass the tokenizer the model was trained with (--tokenizer)"
        )
    return model, tok
