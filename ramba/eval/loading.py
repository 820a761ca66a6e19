"""Finding and loading a model (and its tokenizer) for evaluation and generation.

`--model` may name a model folder (`config.json` + `model.safetensors`), a training checkpoint
(`step-N/`, holding `model/`), a training run (`out_dir/`, its newest checkpoint is used), a
single-file model (`*.safetensors` written by `ramba export`, config and tokenizer in its metadata),
or a model shipped with the package by its name (`tiny-ruler`, in `ramba/pretrained/`).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ramba.eval.results import EvalError

__all__ = ["MODEL_FORMS", "SHIPPED_MODELS_DIR", "shipped_models", "resolve_model_path", "resolve_model_dir", "run_config",
           "load_model", "load_model_tokenizer", "resolve_device", "resolve_dtype"]

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}
SHIPPED_MODELS_DIR = Path(__file__).resolve().parents[1] / "pretrained"


def shipped_models() -> list[str]:
    """The names of the models shipped with the package (single files in `ramba/pretrained/`)."""
    return sorted(p.stem for p in SHIPPED_MODELS_DIR.glob("*.safetensors"))


MODEL_FORMS = ("a model folder (config.json + *.safetensors), a checkpoint folder (step-N), a training run folder "
               "(its newest checkpoint), a single-file model (*.safetensors, from `ramba export`) or the name of a "
               f"shipped model ({', '.join(shipped_models()) or 'none installed'})")


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """`spec` as a path when it exists, else the file of the shipped model of that name."""
    path = Path(spec)
    if path.exists():
        return path
    shipped = SHIPPED_MODELS_DIR / f"{spec}.safetensors"
    if path.name == str(spec) and shipped.is_file():
        return shipped
    raise FileNotFoundError(f"model: no such folder or file: {path} (expected {MODEL_FORMS})")


def resolve_model_dir(spec: str | os.PathLike) -> Path:
    """The folder holding `config.json` + weights for a model folder, checkpoint folder or run folder."""
    path = resolve_model_path(spec)
    from ramba.train.checkpoint import model_folder

    folder = model_folder(path)
    if folder is not None:
        return folder
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


def _model_file_metadata(path: Path) -> dict | None:
    """The metadata of a single-file model, None for a folder."""
    if not path.is_file():
        return None
    from ramba.model.single_file import read_model_file_metadata

    try:
        return read_model_file_metadata(path)
    except ValueError as e:
        raise EvalError(f"model: {e}") from None


def load_model(spec: str | os.PathLike, device=None, dtype=None):
    """A `RambaForCausalLM` in eval mode on `device` (default: auto) in `dtype` (default: auto)."""
    from ramba import RambaForCausalLM
    from ramba.model.single_file import load_model_file

    device = resolve_device(device) if not isinstance(device, torch.device) else device
    dtype = resolve_dtype(dtype, device) if not isinstance(dtype, torch.dtype) else dtype
    spec = resolve_model_path(spec)
    if _model_file_metadata(spec) is not None:
        logger.info("loading model file %s (%s, %s)", spec, device, dtype)
        return load_model_file(spec, device, dtype)
    folder = resolve_model_dir(spec)
    logger.info("loading model from %s (%s, %s)", folder, device, dtype)
    return RambaForCausalLM.from_pretrained(folder).to(device=device, dtype=dtype).eval()


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


def load_model_tokenizer(spec: str | os.PathLike, tokenizer: str | None = None, device=None, dtype=None):
    """`(model, tokenizer)`. The tokenizer is `tokenizer` when given, else the one named in a single-file
    model's metadata, else a `tokenizer.json` beside the weights, else the training run's configured
    tokenizer, else the built-in byte tokenizer."""
    from ramba.data.tokenizer import load_tokenizer
    from ramba.model.single_file import TOKENIZER_KEY

    spec = resolve_model_path(spec)
    meta = _model_file_metadata(spec)
    if meta is not None:
        source = spec
        tokenizer = tokenizer or meta.get(TOKENIZER_KEY)
    else:
        source = resolve_model_dir(spec)
        if tokenizer is None and (source / "tokenizer.json").is_file():
            tokenizer = str(source / "tokenizer.json")
        tokenizer = tokenizer or _run_tokenizer(source)
    tok = load_tokenizer(tokenizer)
    model = load_model(source, device, dtype)
    if tok.vocab_size > model.config.vocab_size:
        raise EvalError(f"tokenizer {tok.name!r} has {tok.vocab_size} ids but the model's vocab_size is "
                        f"{model.config.vocab_size}; pass the tokenizer the model was trained with (--tokenizer)")
    return model, tok
