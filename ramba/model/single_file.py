"""A whole model in one safetensors file: the weights plus, in the file's metadata, the config and the
tokenizer name. This is how trained models ship (``ramba export`` writes one, ``ramba demo`` reads one).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ramba.model.config import RambaConfig
from ramba.model.modeling import RambaForCausalLM

__all__ = ["save_model_file", "load_model_file", "read_model_file_metadata"]

CONFIG_KEY = "ramba_config"
TOKENIZER_KEY = "ramba_tokenizer"
TRAIN_CONFIG_KEY = "ramba_train_config"  # the `ramba train` config the model came from (JSON), where known


def save_model_file(model: RambaForCausalLM, path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                    tokenizer: str = "byte", metadata: dict[str, str] | None = None) -> Path:
    """Writes ``model``'s weights (cast to ``dtype``; tied weights stored once), its config and the tokenizer
    name to ``path``, atomically (a temporary file renamed into place). ``metadata``: extra string entries
    (e.g. how the model was trained). Returns the path."""
    path = Path(path)
    tied = {"lm_head.weight"} if model.config.tie_embeddings else set()
    tensors = {name: t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
               for name, t in model.state_dict().items() if name not in tied}
    meta = {**(metadata or {}), "format": "pt", CONFIG_KEY: model.config.to_json_string(use_diff=False),
            TOKENIZER_KEY: tokenizer}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_model_file_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a model file; raises ``ValueError`` when it is not one written by :func:`save_model_file`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise ValueError(f"model file {path}: not a readable safetensors file ({e})") from None
    if CONFIG_KEY not in meta:
        raise ValueError(f"model file {path}: no RAMba config in its metadata (write it with `ramba export`)")
    return meta


def load_model_file(path: str | os.PathLike, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> RambaForCausalLM:
    """The ``RambaForCausalLM`` stored in ``path``, in eval mode on ``device`` in ``dtype``."""
    meta = read_model_file_metadata(path)
    fields = {k: v for k, v in json.loads(meta[CONFIG_KEY]).items() if k not in ("transformers_version", "model_type")}
    model = RambaForCausalLM(RambaConfig(**fields))
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    missing = [name for name in missing if not (name == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise ValueError(f"model file {path}: weights do not match its config (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    model.tie_weights()
    return model.to(device=device, dtype=dtype).eval()
