"""Atomic training checkpoints.

A checkpoint is a folder `<root>/step-NNNNNNNN/` holding
- `model/`:        `config.json` + `model.safetensors` (loadable with `RambaForCausalLM.from_pretrained`);
- `optimizer.pt`:  the full (unsharded) AdamW state, keyed by parameter name;
- `trainer.pt`:    step, data position (examples consumed), every rank's RNG states, config;
- `manifest.json`: size and sha256 of every file above, written last.

It is written into a hidden temporary folder, flushed to disk, and renamed into place, so a crash
or a full disk never leaves a half-written `step-*` folder: the previous checkpoint stays the newest
valid one. Loading verifies the manifest and raises CheckpointError naming the bad file.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ramba.errors import CheckpointError, OutputPathError
from ramba.files import check_free_space, commit_dir, new_temp_dir, remove_stale_temps, verify_manifest, write_manifest
from ramba.model.loading import latest_checkpoint, list_checkpoints, model_folder

__all__ = [
    "CheckpointError",
    "model_folder",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "verify_checkpoint",
]

logger = logging.getLogger(__name__)
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
FORMAT_VERSION = 1


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Checks every file of the checkpoint against its manifest; returns the manifest."""
    return verify_manifest(path)


def _state_bytes(state) -> int:
    """The bytes of the tensors in a (nested) state dict: about what saving it writes."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    return 0


def _disk_full(e: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space (torch.save reports it as "unexpected pos", not ENOSPC)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    keep: int,
    is_main: bool = True,
) -> Path | None:
    """Writes `<root>/step-NNNNNNNN` atomically (rank 0 writes; every rank must call, since
    gathering a sharded model is collective) and deletes all but the newest `keep` checkpoints.

    trainer_state: picklable dict (step, data position, RNG states, config).
    Raises CheckpointError if writing fails (e.g. disk full); the older checkpoints are untouched.
    """
    model_sd = get_model_state_dict(model, options=_FULL)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if not is_main:
        return None
    from ramba.train.distributed import unwrap_model

    root = Path(root)
    final = root / f"step-{step:08d}"
    previous = latest_checkpoint(root)
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        check_free_space(root, int(1.05 * (_state_bytes(model_sd) + _state_bytes(optim_sd))), f"checkpoint step {step}")
        tmp = new_temp_dir(final)
        _save_model(unwrap_model(model), dict(model_sd), tmp / "model")
        torch.save(optim_sd, tmp / "optimizer.pt")
        torch.save(trainer_state, tmp / "trainer.pt")
        write_manifest(tmp, format_version=FORMAT_VERSION, step=step)
        commit_dir(tmp, final)
    except (OSError, RuntimeError) as e:
        full = _disk_full(e, root)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        why = "No space left on device; free some space" if full else str(e).splitlines()[0] if str(e) else repr(e)
        if isinstance(e, OutputPathError):
            why = str(e)
        raise CheckpointError(
            f"saving checkpoint step {step} to {root} failed ({why}); nothing was written, "
            f"the newest complete checkpoint is {previous if previous else 'none'}"
        ) from e
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    remove_stale_temps(root, "step-*")
    logger.info("saved checkpoint %s", final)
    return final


def _save_model(model: nn.Module, state_dict: dict, folder: Path) -> None:
    if hasattr(model, "save_pretrained"):
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
    else:
        from safetensors.torch import save_model

        folder.mkdir()
        save_model(model, str(folder / "model.safetensors"))


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Verifies and loads a checkpoint into `model` (plain, DDP or FSDP) and `optimizer`; returns
    the trainer state dict saved with it."""
    path = Path(path)
    verify_manifest(path)
    weights = path / "model" / "model.safetensors"
    try:
        state = load_file(str(weights))
        optim_sd = (
            torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True) if optimizer is not None else None
        )
        trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # a manifest-consistent file that still fails to parse is corrupt all the same
        raise CheckpointError(f"checkpoint {path}: cannot read ({e})") from e
    from ramba.train.distributed import unwrap_model

    raw = unwrap_model(model)
    # Tied weights appear once in the file; the aliases are the names state_dict() has beyond named_parameters().
    aliases = set(raw.state_dict()) - {n for n, _ in raw.named_parameters()} - {n for n, _ in raw.named_buffers()}
    result = set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    missing = set(result.missing_keys) - aliases
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {path}: weights do not fit the model (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}); was it written for another model config?"
        )
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))
    return trainer_state
