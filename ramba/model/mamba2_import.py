"""Initialise RAMba's Mamba-2 blocks from a local Hugging Face ``Mamba2ForCausalLM`` directory."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ramba.model.config import RambaConfig

logger = logging.getLogger(__name__)


@dataclass
class Mamba2ImportReport:
    """What :func:`load_mamba2_weights` did, by RAMba parameter name."""

    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)  # RAMba parameters with no Mamba-2 source (HSA parts)
    unused: list[str] = field(default_factory=list)  # Mamba-2 tensors with no RAMba destination
    zeroed: list[str] = field(default_factory=list)  # new residual outputs set to 0

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from Mamba-2", f"new (freshly initialised): {len(self.new)}"]
        lines += [f"  {name}" for name in self.new]
        lines.append(f"zeroed residual outputs of new layers: {len(self.zeroed)}")
        lines += [f"  {name}" for name in self.zeroed]
        lines.append(f"unused Mamba-2 tensors: {len(self.unused)}")
        lines += [f"  {name}" for name in self.unused]
        return "\n".join(lines)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors (or index) in {path}: save the Mamba-2 model with safetensors")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(path / name)))
    return state


def ramba_config_from_mamba2(path: str | Path, **overrides) -> RambaConfig:
    """A :class:`RambaConfig` whose Mamba-2 blocks match the Mamba-2 model in ``path`` (its layers split
    between lower and upper blocks as ``overrides`` say, default half and half).

    HF's ``use_bias``, ``use_conv_bias`` and ``time_step_limit`` become ``ssm_proj_bias``, ``conv_bias`` and
    ``dt_limit``; a ``hidden_act`` other than SiLU is refused (RAMba's mixer has no other)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    if cfg.get("model_type") != "mamba2":
        raise ValueError(f"{path}: config.json has model_type {cfg.get('model_type')!r}, expected 'mamba2'")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"{path}: config.json has hidden_act {cfg['hidden_act']!r}; RAMba's Mamba-2 mixer uses 'silu' only"
        )
    n_layers = cfg["num_hidden_layers"]
    fields = dict(
        vocab_size=cfg["vocab_size"],
        d_model=cfg["hidden_size"],
        d_state=cfg["state_size"],
        ssm_head_dim=cfg["head_dim"],
        expand=cfg["expand"],
        conv_kernel=cfg["conv_kernel"],
        n_groups=cfg["n_groups"],
        rms_norm_eps=cfg["layer_norm_epsilon"],
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        conv_bias=cfg.get("use_conv_bias", True),
        ssm_proj_bias=cfg.get("use_bias", False),
        dt_limit=cfg.get("time_step_limit", (0.0, float("inf"))),
        n_lower_layers=n_layers // 2,
        n_upper_layers=n_layers - n_layers // 2,
    )
    return RambaConfig(**{**fields, **overrides})


@torch.no_grad()
def load_mamba2_weights(model, path: str | Path, zero_new_outputs: bool = True) -> Mamba2ImportReport:
    """Copy the embeddings, final norm, LM head and the i-th Mamba-2 layer into RAMba's i-th Mamba-2 block.

    With ``zero_new_outputs`` the output projections of the new residual branches (HSA, attention, MLP)
    start at zero, so the loaded model computes exactly what the Mamba-2 model computes until it is trained.

    Args:
        model: a ``RambaForCausalLM`` whose Mamba-2 blocks have the Mamba-2 model's shapes.
        path: a directory saved by ``Mamba2ForCausalLM.save_pretrained`` (safetensors).
    Returns:
        a :class:`Mamba2ImportReport`; also logged.
    """
    path = Path(path)
    source = _read_state_dict(path)
    mamba_layers = [i for i, kind in enumerate(model.model.layer_kinds) if kind == "mamba2"]
    n_source = len({k.split(".")[2] for k in source if k.startswith("backbone.layers.")})
    if n_source < len(mamba_layers):
        raise ValueError(f"{path} has {n_source} Mamba-2 layers, the RAMba model needs {len(mamba_layers)}")
    rename = {"backbone.embeddings.weight": "model.embeddings.weight", "backbone.norm_f.weight": "model.norm_f.weight"}
    if not model.config.tie_word_embeddings:
        rename["lm_head.weight"] = "lm_head.weight"
    for key in source:
        parts = key.split(".")
        if parts[:2] == ["backbone", "layers"] and int(parts[2]) < len(mamba_layers):
            rename[key] = ".".join(["model", "layers", str(mamba_layers[int(parts[2])])] + parts[3:])
    target = model.state_dict()
    for what, option in (("conv1d.bias", "conv_bias"), ("in_proj.bias", "ssm_proj_bias")):
        in_source = any(k.endswith(f"mixer.{what}") for k in source)
        if in_source != getattr(model.config, option):
            raise ValueError(
                f"{path}: the Mamba-2 model {'has' if in_source else 'has no'} {what} but the RAMba model's "
                f"config has {option}={getattr(model.config, option)}: build it with ramba_config_from_mamba2"
            )
    report = Mamba2ImportReport()
    for key, tensor in source.items():
        dest = rename.get(key)
        if dest is None or dest not in target:
            report.unused.append(key)
            continue
        if target[dest].shape != tensor.shape:
            raise ValueError(
                f"shape mismatch for {key} -> {dest}: Mamba-2 {tuple(tensor.shape)}, RAMba {tuple(target[dest].shape)}"
            )
        target[dest].copy_(tensor)
        report.loaded.append(dest)
    loaded = set(report.loaded)
    report.new = [
        k for k in target if k not in loaded and not (k == "lm_head.weight" and model.config.tie_word_embeddings)
    ]
    if zero_new_outputs:
        residual_outputs = ("o_proj.weight", "attn.o_proj.weight", "mlp.down_proj.weight")
        for i, kind in enumerate(model.model.layer_kinds):
            if kind in ("hsa", "swa", "attention"):
                for name, param in model.model.layers[i].named_parameters():
                    if name in residual_outputs:
                        param.zero_()
                        report.zeroed.append(f"model.layers.{i}.{name}")
    logger.info("Mamba-2 import from %s:\n%s", path, report.summary())
    return report
