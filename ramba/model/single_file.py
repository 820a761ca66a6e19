"""A whole model in one safetensors file: the weights plus, in the file's metadata, the config, the
tokenizer name and a checksum of the weights. This is how trained models ship (``ramba export`` writes
one, ``ramba demo`` reads one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ramba.errors import ConfigError, ModelLoadError
from ramba.files import atomic_write
from ramba.model.config import RambaConfig
from ramba.model.loading import check_finite, weights_digest
from ramba.model.modeling import RambaForCausalLM

__all__ = ["save_model_file", "load_model_file", "read_model_file_metadata"]

CONFIG_KEY = "ramba_config"
TOKENIZER_KEY = "ramba_tokenizer"
TRAIN_CONFIG_KEY = "ramba_train_config"  # the `ramba train` config the model came from (JSON), where known
DIGEST_KEY = "ramba_weights_sha256"  # weights_digest of the stored tensors; files written before 2026-12 lack it


def _tensors(model: RambaForCausalLM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict cast to ``dtype`` on the CPU, tied weights stored once."""
    tied = {"lm_head.weight"} if model.config.tie_embeddings else set()
    return {
        name: t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
        for name, t in model.state_dict().items()
        if name not in tied
    }


def save_model_file(
    model: RambaForCausalLM,
    path: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer: str = "byte",
    metadata: dict[str, str] | None = None,
) -> Path:
    """Writes ``model``'s weights (cast to ``dtype``; tied weights stored once), its config, the tokenizer
    name and the weights' checksum to ``path``, atomically. ``metadata``: extra string entries (e.g. how
    the model was trained). Returns the path."""
    tensors = _tensors(model, dtype)
    meta = {
        **(metadata or {}),
        "format": "pt",
        CONFIG_KEY: model.config.to_json_string(use_diff=False),
        TOKENIZER_KEY: tokenizer,
        DIGEST_KEY: weights_digest(tensors),
    }
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return Path(path)


def model_file_bytes(model: RambaForCausalLM, dtype: torch.dtype) -> int:
    """About the size :func:`save_model_file` writes (the tensors' bytes; the header is small)."""
    tied = {"lm_head.weight"} if model.config.tie_embeddings else set()
    return sum(
        t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
        for name, t in model.state_dict().items()
        if name not in tied
    )


def read_model_file_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a model file; raises ModelLoadError (a ValueError) when it is not one written by
    :func:`save_model_file`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise ModelLoadError(
            f"model file {path}: not a readable safetensors file ({e}); the file is truncated, "
            "corrupt or of another format"
        ) from None
    if CONFIG_KEY not in meta:
        raise ModelLoadError(f"model file {path}: no RAMba config in its metadata (write it with `ramba export`)")
    return meta


def load_model_file(
    path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, verify: bool = True
) -> RambaForCausalLM:
    """The ``RambaForCausalLM`` stored in ``path``, in eval mode on ``device`` in ``dtype``. With ``verify``
    the weights must match the checksum in the metadata (when the file has one) and be finite."""
    meta = read_model_file_metadata(path)
    fields = {k: v for k, v in json.loads(meta[CONFIG_KEY]).items() if k not in ("transformers_version", "model_type")}
    try:
        config = RambaConfig(**fields)
    except ConfigError as e:
        raise ModelLoadError(f"model file {path}: its config is not valid here ({e})") from None
    try:
        tensors = load_file(str(path))
    except Exception as e:  # a header that reads but data that does not (truncated file)
        raise ModelLoadError(
            f"model file {path}: cannot read the weights ({e}); the file is truncated or corrupt"
        ) from None
    model = RambaForCausalLM(config)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_embeddings else set())
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ModelLoadError(
            f"model file {path}: weights do not match its config (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}); export it again"
        )
    if verify:
        if DIGEST_KEY in meta and weights_digest(tensors) != meta[DIGEST_KEY]:
            raise ModelLoadError(
                f"model file {path}: the weights do not match their checksum (the file is corrupt); "
                "export it again (or --no-verify / verify=False to load it anyway)"
            )
        check_finite(tensors.items(), path)
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    return model.to(device=device, dtype=dtype).eval()
