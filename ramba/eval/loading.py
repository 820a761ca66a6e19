"""Finding and loading a model (and its tokenizer) for evaluation and generation.

`--model` may name a model folder (`config.json` + `model.safetensors`), a training checkpoint
(`step-N/`, holding `model/`), or a training run (`out_dir/`, its newest checkpoint is used).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ramba.eval.results import EvalError

__all__ = ["resolve_model_dir", "load_model", "load_model_tokenizer", "resolve_device", "resolve_dtype"]

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def resolve_model_dir(spec: str | os.PathLike) -> Path:
    """The folder holding `config.json` + weights for a model folder, checkpoint folder or run folder."""
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"model: no such folder: {path}")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    from ramba.train.checkpoint import latest_checkpoint

    newest = latest_checkpoint(path / "checkpoints")
    if newest is not None and (newest / "model" / "config.json").is_file():
        return newest / "model"
    raise EvalError(f"model: {path} is not a model folder (config.json + *.safetensors), a checkpoint (step-N/model/) "
                    "or a training run (checkpoints/step-N/)")


def resolve_device(spec: str | None = None) -> torch.device:
    """`None`/`"auto"`: CUDA when available, else CPU."""
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def resolve_dtype(spec: str | None, device: torch.device) -> torch.dtype:
    """`None`/`"auto"`: bfloat16 on CUDA, float32 elsewhere; else one of fp32, bf16, fp16."""
    if spec in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if spec not in _DTYPES:
        raise EvalError(f"dtype: expected auto, fp32, bf16 or fp16, got {spec!r}")
    return _DTYPES[spec]


def load_model(spec: str | os.PathLike, device=None, dtype=None):
    """A `RambaForCausalLM` in eval mode on `device` (default: auto) in `dtype` (default: auto)."""
    from ramba import RambaForCausalLM

    folder = resolve_model_dir(spec)
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    dtype = resolve_dtype(dtype, device) if not isinstance(dtype, torch.dtype) else dtype
    logger.info("loading model from %s (%s, %s)", folder, device, dtype)
    return RambaForCausalLM.from_pretrained(folder).to(device=device, dtype=dtype).eval()


def _run_tokenizer(model_dir: Path) -> str | None:
    """The tokenizer a training run was configured with: `data.tokenizer` of the run's config.json,
    looked up in the folders above a checkpoint (`run/checkpoints/step-N/model`)."""
    for parent in list(model_dir.resolve().parents)[:4]:
        cfg = parent / "config.json"
        if cfg.is_file():
            try:
                data = json.loads(cfg.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            tok = data.get("data", {}).get("tokenizer") if isinstance(data.get("data"), dict) else None
            if tok is not None:
                return str(tok)
    return None


def load_model_tokenizer(spec: str | os.PathLike, tokenizer: str | None = None, device=None, dtype=None):
    """`(model, tokenizer)`. The tokenizer is `tokenizer` when given, else a `tokenizer.json` beside the
    weights, else the training run's configured tokenizer, else the built-in byte tokenizer."""
    from ramba.data.tokenizer import load_tokenizer

    folder = resolve_model_dir(spec)
    if tokenizer is None:
        tokenizer = str(folder / "tokenizer.json") if (folder / "tokenizer.json").is_file() else _run_tokenizer(folder)
    tok = load_tokenizer(tokenizer)
    model = load_model(folder, device, dtype)
    if tok.vocab_size > model.config.vocab_size:
        raise EvalError(f"tokenizer {tok.name!r} has {tok.vocab_size} ids but the model's vocab_size is "
                        f"{model.config.vocab_size}; pass the tokenizer the model was trained with (--tokenizer)")
    return model, tok
