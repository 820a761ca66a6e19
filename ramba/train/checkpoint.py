"""Atomic training checkpoints.

A checkpoint is a folder `<root>/step-NNNNNNNN/` holding
- `model/`:        `config.json` + `model.safetensors` (loadable with `RambaForCausalLM.from_pretrained`);
- `optimizer.pt`:  the full (unsharded) AdamW state, keyed by parameter name;
- `trainer.pt`:    step, data position (examples consumed), scheduler state, every rank's RNG states, config;
- `manifest.json`: size and sha256 of every file above, written last.

It is written into a hidden temporary folder, flushed to disk, and renamed into place, so a crash
or a full disk never leaves a half-written `step-*` folder: the previous checkpoint stays the newest
valid one. Loading verifies the manifest and raises CheckpointError naming the bad file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
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
_STEP_DIR = re.compile(r"^step-(\d+)$")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read (corrupt, truncated, missing, disk full)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """The `step-*` folders under `root`, oldest first (temporary folders of unfinished saves excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def model_folder(path: str | os.PathLike) -> Path | None:
    """The `save_pretrained` folder (config.json + *.safetensors) that `path` names: `path` itself, a
    checkpoint's `model/`, or the `model/` of a training run's newest checkpoint; None when it names none."""
    path = Path(path)
    newest = latest_checkpoint(path / "checkpoints")
    for folder in (path, path / "model", None if newest is None else newest / "model"):
        if folder is not None and (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
            return folder
    return None


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Checks every file of the checkpoint against its manifest; returns the manifest."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: no such folder")
    manifest_file = path / "manifest.json"
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {path}: manifest.json is missing; the checkpoint is incomplete or corrupt"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: manifest.json is corrupt ({e})") from None
    for rel, want in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: {rel} is missing")
        size = f.stat().st_size
        if size != want["size"]:
            raise CheckpointError(
                f"checkpoint {path}: {rel} is {size} bytes, expected {want['size']} (truncated or corrupt)"
            )
        if _sha256(f) != want["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {rel} does not match its checksum (corrupt)")
    return manifest


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

    trainer_state: picklable dict (step, data position, scheduler state, RNG states, config).
    Raises CheckpointError if writing fails (e.g. disk full); the older checkpoints are untouched.
    """
    model_sd = get_model_state_dict(model, options=_FULL)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if not is_main:
        return None
    from ramba.train.distributed import unwrap_model

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        _save_model(unwrap_model(model), dict(model_sd), tmp / "model")
        torch.save(optim_sd, tmp / "optimizer.pt")
        torch.save(trainer_state, tmp / "trainer.pt")
        files = {
            str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        (tmp / "manifest.json").write_text(
            json.dumps({"format_version": FORMAT_VERSION, "step": step, "files": files}, indent=1)
        )
        _fsync_tree(tmp)
        if final.exists():
            old = root / f".{final.name}.old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(root)
        raise CheckpointError(
            f"saving checkpoint step {step} to {root} failed ({e}); nothing was written, "
            f"the newest complete checkpoint is {previous if previous else 'none'}"
        ) from e
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
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
    verify_checkpoint(path)
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


def _umask() -> int:
    """The process umask (mkdtemp creates 0700 folders; the final folder should follow the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
