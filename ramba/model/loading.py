"""Finding and loading a model: the one resolver behind ``--model`` (eval, generate, export, demo) and the
training option ``model.init_from`` (docs/design.md §8).

A model is named by
- a model folder written by ``save_pretrained`` (``config.json`` + ``*.safetensors``);
- a training checkpoint (``step-N/``, holding ``model/``) or a training run (``out_dir/``: its newest checkpoint);
- a single-file model (``*.safetensors`` written by ``ramba export``: config and tokenizer in its metadata);
- the name of a model shipped with ramba (``tiny-ruler``).

Loads are verified unless ``verify=False``: a folder inside a checkpoint against the checkpoint's
manifest (size and sha256 of every weight file), a single-file model against the weights checksum in
its metadata, and every model for non-finite weights. Each failure raises ModelLoadError (or
CheckpointError for a damaged checkpoint) naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import torch

from ramba.errors import InputError, ModelLoadError
from ramba.files import MANIFEST, verify_manifest

__all__ = [
    "MODEL_FORMS",
    "SHIPPED_MODELS",
    "list_checkpoints",
    "latest_checkpoint",
    "model_folder",
    "resolve_model",
    "resolve_model_dir",
    "resolve_device",
    "resolve_dtype",
    "load_model",
    "weights_digest",
    "check_finite",
    "verify_model_folder",
]

logger = logging.getLogger(__name__)

SHIPPED_MODELS = {p.stem: p for p in sorted((Path(__file__).resolve().parents[1] / "pretrained").glob("*.safetensors"))}
_STEP_DIR = re.compile(r"^step-(\d+)$")
_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
MODEL_FORMS = (
    "a model folder (config.json + *.safetensors), a checkpoint folder (step-N), a training run folder "
    "(its newest checkpoint), a single-file model (*.safetensors, from `ramba export`) or the name of a "
    f"shipped model ({', '.join(SHIPPED_MODELS) or 'none installed'})"
)


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """The ``step-*`` folders under ``root``, oldest first (temporary folders of unfinished saves excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def model_folder(path: str | os.PathLike) -> Path | None:
    """The ``save_pretrained`` folder (config.json + *.safetensors) that ``path`` names: ``path`` itself, a
    checkpoint's ``model/``, or the ``model/`` of a training run's newest checkpoint; None when it names none."""
    path = Path(path)
    newest = latest_checkpoint(path / "checkpoints")
    for folder in (path, path / "model", None if newest is None else newest / "model"):
        if folder is not None and (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
            return folder
    return None


def _why_not_a_model(path: Path) -> str:
    """What a folder that holds no model lacks, for the error message."""
    for folder in (path, path / "model"):
        has_config, has_weights = (folder / "config.json").is_file(), any(folder.glob("*.safetensors"))
        if has_weights and not has_config:
            return f"{folder} has weights but no config.json (save the model with save_pretrained, which writes both)"
        if has_config and not has_weights:
            return f"{folder} has a config.json but no *.safetensors weights"
    if (path / "checkpoints").is_dir():
        return f"the run {path} has no complete checkpoint yet (checkpoints/step-N/model/)"
    return f"{path} is not a model folder"


def resolve_model(spec: str | os.PathLike) -> Path:
    """The file (single-file model) or folder (config.json + weights) that ``spec`` names; see the module doc."""
    path = Path(spec)
    if not path.exists() and str(spec) in SHIPPED_MODELS:
        return SHIPPED_MODELS[str(spec)]
    if not path.exists():
        raise ModelLoadError(f"model: no such folder or file: {path}; give {MODEL_FORMS}")
    if path.is_file():
        return path
    folder = model_folder(path)
    if folder is None:
        raise ModelLoadError(f"model: {_why_not_a_model(path)}; give {MODEL_FORMS}")
    return folder


def resolve_model_dir(spec: str | os.PathLike) -> Path:
    """The folder holding ``config.json`` + weights for a model folder, checkpoint folder or run folder."""
    path = resolve_model(spec)
    if path.is_file():
        raise ModelLoadError(f"model: {path} is a single-file model; a model folder is needed here")
    return path


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU; otherwise the device named, checked to exist here."""
    if isinstance(spec, torch.device):
        device = spec
    elif spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(spec)
        except (RuntimeError, TypeError):
            raise InputError(f"device: cannot read {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"device {spec}: CUDA is not available on this machine (torch {torch.__version__}); use cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(
                f"device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s); use cuda:0 .. cuda:N-1"
            )
    return device


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/``"auto"``: bfloat16 on CUDA, float32 elsewhere; else one of fp32, bf16, fp16."""
    if isinstance(spec, torch.dtype):
        return spec
    if spec in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if spec not in _DTYPES:
        raise InputError(f"dtype: expected auto, fp32, bf16 or fp16, got {spec!r}")
    return _DTYPES[spec]


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (independent of the file layout)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def check_finite(tensors, source) -> None:
    """Raises ModelLoadError when a floating tensor of ``tensors`` (name -> tensor pairs) holds NaN or inf."""
    for name, t in tensors:
        if not t.is_floating_point() or t.numel() == 0:
            continue
        lo, hi = t.detach().aminmax()  # NaN propagates, inf shows at an end: 10x faster than isfinite().all()
        if not (bool(lo.isfinite()) and bool(hi.isfinite())):
            bad = int((~torch.isfinite(t)).sum())
            raise ModelLoadError(
                f"model {source}: weight {name} holds {bad} non-finite value(s) (NaN/inf): the file is "
                "corrupt or the training diverged; use an earlier checkpoint (or --no-verify / "
                "verify=False to load it anyway)"
            )


def verify_model_folder(folder: str | os.PathLike) -> None:
    """Checks a model folder that sits inside a training checkpoint (``step-N/model``) against the checkpoint's
    manifest; a plain ``save_pretrained`` folder carries no checksums and is not checked here."""
    folder = Path(folder)
    if folder.name == "model" and (folder.parent / MANIFEST).is_file():
        verify_manifest(folder.parent, prefix="model/")


def load_model(spec: str | os.PathLike, device=None, dtype=None, verify: bool = True):
    """A ``RambaForCausalLM`` in eval mode on ``device`` (default: auto) in ``dtype`` (default: auto), from
    anything :func:`resolve_model` accepts; verified unless ``verify=False`` (see the module doc)."""
    from ramba import RambaForCausalLM
    from ramba.model.single_file import load_model_file

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    path = resolve_model(spec)
    logger.info("loading model %s (%s, %s)", path, device, dtype)
    if path.is_file():
        return load_model_file(path, device, dtype, verify=verify)
    return RambaForCausalLM.from_pretrained(path, verify=verify).to(device=device, dtype=dtype).eval()
