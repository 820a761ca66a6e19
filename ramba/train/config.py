"""The training configuration: nested dataclasses whose every field carries its documentation.

`load_config(path, overrides)` reads YAML or JSON, applies `--set key=value` overrides
(dotted keys, values parsed as YAML: `optim.lr=3e-4`, `data.sources.0.weight=2`,
`model.overrides.d_model=64`), then checks every key and type: an unknown key raises ConfigError
naming it and the known keys, a wrong type raises ConfigTypeError (a TypeError) naming the key,
the expected type and the value. `describe()` renders the documentation of all fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ramba.errors import ConfigError
from ramba.overrides import apply_overrides
from ramba.overrides import yaml_load as _yaml_load

__all__ = [
    "ConfigError",
    "ConfigTypeError",
    "ModelConfig",
    "SourceConfig",
    "DataConfig",
    "OptimConfig",
    "EvalConfig",
    "CheckpointConfig",
    "LogConfig",
    "DistributedConfig",
    "TrainConfig",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "describe",
]


class ConfigTypeError(ConfigError, TypeError):
    """A configuration value of the wrong type."""


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    """Which model to train."""

    preset: str | None = _f(
        "tiny", "RambaConfig preset name ('tiny', '370m'); null builds RambaConfig(**overrides) from defaults."
    )
    overrides: dict = _f({}, "RambaConfig fields set on top of the preset, e.g. {d_model: 64, architecture: mamba2}.")
    init_from: str | None = _f(
        None,
        "Start from these weights: a folder written by save_pretrained, a checkpoint (step-N/), a training run "
        "(its newest checkpoint) or a model file (`ramba export`); preset is then ignored and overrides change only "
        "fields that keep the weights' shapes (e.g. sm_n, weight_norm, topk, window).",
    )
    verify: bool = _f(
        True, "Verify init_from's weights (checkpoint checksums, model-file checksum, no NaN/inf); false skips it."
    )


@dataclass
class SourceConfig:
    """One entry of the data mixture: a token file or a synthetic task."""

    path: str | None = _f(None, "Token file folder written by `ramba prepare` (give this or `task`).")
    task: str | None = _f(
        None,
        "Synthetic task name: passkey, niah_single, niah_multikey, niah_multivalue, niah_multiquery, "
        "variable_tracking (give this or `path`).",
    )
    weight: float = _f(1.0, "Relative sampling weight of this source in the mixture.")
    haystack: str | list[str] | None = _f(
        None,
        "Tasks: token file whose text fills the haystack, or a list of them (one drawn per sample); "
        "null repeats a template sentence.",
    )
    depth: float | None = _f(None, "Tasks: needle depth in [0, 1]; null draws a depth per sample.")
    params: dict = _f({}, "Tasks: extra task options, e.g. {num_keys: 4} or {num_chains: 2, num_hops: 3}.")
    loss_on_prompt: bool = _f(False, "Tasks: also train on the prompt tokens, not only on the answer.")


@dataclass
class DataConfig:
    """What the model reads."""

    tokenizer: str = _f(
        "byte",
        "'byte' (built in, 260 ids) or a local path to a tokenizer.json or a Hugging Face tokenizer folder. "
        "Must match the tokenizer the token files were prepared with.",
    )
    seq_len: int = _f(512, "Context length in tokens of every training sequence.")
    sources: list[SourceConfig] = _f([], "The mixture: a list of sources (see data.sources.*). At least one.")
    holdout: float = _f(
        0.01, "Fraction of every token file (its last tokens) kept out of training and used for evaluation."
    )
    workers: int = _f(
        2,
        "DataLoader worker processes building the micro-batches ahead of the training step (0: in the main "
        "process). The batches are the same for any number: every example is a function of its index.",
    )


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay."""

    lr: float = _f(3e-4, "Peak learning rate, reached after warmup_steps.")
    min_lr: float = _f(3e-5, "Learning rate at the end of the cosine decay (at train.max_steps).")
    warmup_steps: int = _f(100, "Steps of linear warmup from 0 to lr.")
    weight_decay: float = _f(
        0.1, "AdamW weight decay, applied to matrices only (not to norms, biases, embeddings' 1-D params)."
    )
    betas: list[float] = _f([0.9, 0.95], "AdamW betas.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this value; 0 disables clipping.")


@dataclass
class EvalConfig:
    """Evaluation during training."""

    every: int = _f(0, "Evaluate every this many steps (and at the end); 0 disables evaluation.")
    batches: int = _f(
        4, "Held-out batches of train.micro_batch sequences for the eval loss (from each token file's holdout)."
    )
    tasks: list[str] = _f(
        [], "Synthetic tasks scored at data.seq_len (teacher-forced greedy answer, scored by the task's scorer)."
    )
    task_samples: int = _f(8, "Samples per task per evaluation (fixed seeds, spread over depths).")


@dataclass
class CheckpointConfig:
    """Checkpoints under out_dir/checkpoints/step-NNNNNNNN/."""

    every: int = _f(0, "Save every this many steps (and at the end); 0 saves only at the end.")
    keep: int = _f(3, "Keep the newest this many checkpoints; older ones are deleted after a successful save.")


@dataclass
class LogConfig:
    """Where progress goes (rank 0 only)."""

    every: int = _f(1, "Log metrics every this many steps.")
    jsonl: bool = _f(True, "Append metrics to out_dir/metrics.jsonl.")
    tensorboard: bool = _f(
        True, "Write TensorBoard events to out_dir/tensorboard (skipped with a warning if tensorboard is missing)."
    )
    progress: bool = _f(True, "Show a progress bar with loss and tokens/s.")


@dataclass
class DistributedConfig:
    """Multi-GPU / multi-node through torchrun (single process when WORLD_SIZE is unset)."""

    strategy: Literal["ddp", "fsdp"] = _f(
        "ddp",
        "ddp replicates the model on every rank; fsdp shards parameters, gradients and optimizer state (large models).",
    )
    backend: Literal["auto", "nccl", "gloo"] = _f(
        "auto",
        "Process-group backend; auto picks nccl with one GPU a rank, gloo on the CPU or when a node runs more ranks "
        "than it has GPUs (they then share them round-robin, e.g. two ranks on one GPU to test the DDP path).",
    )


@dataclass
class TrainConfig:
    """A training run."""

    out_dir: str = _f("runs/default", "Run folder: checkpoints, metrics.jsonl, tensorboard, config.json.")
    seed: int = _f(0, "Seed of the model initialisation and of the data order.")
    max_steps: int = _f(1000, "Optimizer steps to train.")
    micro_batch: int = _f(8, "Sequences per rank per forward/backward.")
    grad_accum: int = _f(
        1, "Micro-batches accumulated per optimizer step (global batch = micro_batch * grad_accum * world size)."
    )
    precision: Literal["auto", "bf16", "fp32"] = _f(
        "auto", "auto: bf16 autocast on CUDA, fp32 on CPU. Weights and optimizer state stay fp32."
    )
    grad_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    compile_glue: bool | None = _f(
        None,
        "Run the Mamba-2 layers' element-wise work around the scan (conv, SiLU, dt; D skip, gated RMSNorm) and every "
        "block's RMSNorm through torch.compile: fewer kernels and less memory kept for the backward; the first step "
        "compiles (on the CPU this needs a C++ compiler). null: on with CUDA, off on the CPU.",
    )
    cuda_graph: bool | None = _f(
        None,
        "Capture each micro-batch's forward and backward in a CUDA graph on the first step and replay it after: "
        "the host no longer launches thousands of kernels a step (one H200, 2026-12-01: the tiny recipe 2.4x, the "
        "370m layout 1.4x). Needs one CUDA process, fixed shapes and no gradient checkpointing; the first step also "
        "runs its micro-batch twice eagerly before the capture (autotuning and compilation happen there). null: on "
        "for one CUDA process without grad_checkpointing and fused_loss, off otherwise.",
    )
    fused_loss: bool = _f(
        False,
        "Compute the LM head and the cross-entropy together with liger-kernel's fused kernel (needs liger-kernel "
        "and CUDA), a block of rows at a time, so the [tokens, vocab] logits are never held; loss_average token only, "
        "no cuda_graph (the kernel synchronises with the host).",
    )
    loss_average: Literal["token", "sequence"] = _f(
        "token",
        "token: the loss is the mean over every labelled token of the batch. sequence: the mean over sequences of "
        "each sequence's mean, so a task sample whose loss is on a few answer tokens weighs as much as a text window.",
    )
    retrieval_loss: float = _f(
        0.0,
        "Weight of the retrieval loss added to the LM loss (docs/design.md §6): at each answer token of a task "
        "sample, the cross-entropy of every retrieval layer's chunk scores against the chunks of the needle the "
        "answer is read from. A direct signal for the key-to-chunk match that the LM loss alone did not teach "
        "multi-key (README, issue 22); 0: off, retrieval learns from the LM loss only (the paper's setting). "
        "Needs an architecture with retrieval layers.",
    )
    device: str | None = _f(
        None, "Device ('cpu', 'cuda'); null picks cuda:LOCAL_RANK (modulo the node's GPUs) when available."
    )
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The model (see model.*)."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "The data (see data.*)."})
    optim: OptimConfig = field(
        default_factory=OptimConfig, metadata={"help": "The optimizer and schedule (see optim.*)."}
    )
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Evaluation (see eval.*)."})
    checkpoint: CheckpointConfig = field(
        default_factory=CheckpointConfig, metadata={"help": "Checkpointing (see checkpoint.*)."}
    )
    log: LogConfig = field(default_factory=LogConfig, metadata={"help": "Logging (see log.*)."})
    distributed: DistributedConfig = field(
        default_factory=DistributedConfig, metadata={"help": "Distributed training (see distributed.*)."}
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"list[{_type_name(arg)}]"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {int: "int", float: "float", str: "str", bool: "bool", dict: "mapping"}.get(tp, str(tp))


def _convert(value, tp, key: str):
    """Checks `value` against the annotation `tp` and returns it converted (int -> float, dict -> dataclass)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigTypeError:
                pass
        raise ConfigTypeError(f"config key '{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config key '{key}': expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigTypeError(
                f"config key '{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})"
            )
        (arg,) = typing.get_args(tp)
        return [_convert(v, arg, f"{key}.{i}") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigTypeError(f"config key '{key}': expected a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, key)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
    }.get(tp)
    if ok is None:
        raise TypeError(f"unsupported annotation {tp} for '{key}'")
    if not ok:
        raise ConfigTypeError(f"config key '{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
    return float(value) if tp is float else value


def _from_dict(cls, d: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in d:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"unknown config key '{where}'; known keys here: {', '.join(sorted(names))}")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in d.items()}
    return cls(**kwargs)


def _check(cfg: TrainConfig) -> None:
    def positive(key, value, allow_zero=False):
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"config key '{key}': expected {'>= 0' if allow_zero else '> 0'}, got {value}")

    for key, value in [
        ("max_steps", cfg.max_steps),
        ("micro_batch", cfg.micro_batch),
        ("grad_accum", cfg.grad_accum),
        ("data.seq_len", cfg.data.seq_len),
        ("log.every", cfg.log.every),
        ("checkpoint.keep", cfg.checkpoint.keep),
    ]:
        positive(key, value)
    for key, value in [
        ("eval.every", cfg.eval.every),
        ("checkpoint.every", cfg.checkpoint.every),
        ("optim.warmup_steps", cfg.optim.warmup_steps),
        ("optim.grad_clip", cfg.optim.grad_clip),
        ("optim.lr", cfg.optim.lr),
        ("optim.min_lr", cfg.optim.min_lr),
        ("eval.batches", cfg.eval.batches),
        ("data.workers", cfg.data.workers),
        ("retrieval_loss", cfg.retrieval_loss),
    ]:
        positive(key, value, allow_zero=True)
    if not 0.0 <= cfg.data.holdout < 1.0:
        raise ConfigError(f"config key 'data.holdout': expected a fraction in [0, 1), got {cfg.data.holdout}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"config key 'optim.betas': expected two numbers, got {cfg.optim.betas}")
    if cfg.fused_loss and cfg.loss_average != "token":
        raise ConfigError(
            "config keys 'fused_loss' and 'loss_average': the fused loss is the token mean; set loss_average: token"
        )
    if cfg.cuda_graph and cfg.grad_checkpointing:
        raise ConfigError("config keys 'cuda_graph' and 'grad_checkpointing': not supported together; turn one off")
    if cfg.cuda_graph and cfg.fused_loss:
        raise ConfigError(
            "config keys 'cuda_graph' and 'fused_loss': liger's fused loss reads a count back to the host, which a "
            "CUDA graph cannot capture; turn one off"
        )
    if not cfg.data.sources:
        raise ConfigError("config key 'data.sources': give at least one token file (path) or task")
    for i, s in enumerate(cfg.data.sources):
        if (s.path is None) == (s.task is None):
            raise ConfigError(f"config key 'data.sources.{i}': give exactly one of 'path' (a token file) or 'task'")
        if s.weight < 0:
            raise ConfigError(f"config key 'data.sources.{i}.weight': expected >= 0, got {s.weight}")
        if s.depth is not None and not 0.0 <= s.depth <= 1.0:
            raise ConfigError(f"config key 'data.sources.{i}.depth': expected a float in [0, 1] or null, got {s.depth}")
    if sum(s.weight for s in cfg.data.sources) <= 0:
        raise ConfigError("config key 'data.sources': the weights sum to 0")


def config_from_dict(d: dict) -> TrainConfig:
    """Validated TrainConfig from a plain dict (as read from YAML/JSON)."""
    if not isinstance(d, dict):
        raise ConfigTypeError(f"config: expected a mapping at the top level, got {type(d).__name__}")
    cfg = _from_dict(TrainConfig, d)
    _check(cfg)
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> TrainConfig:
    """Reads a YAML/JSON config file (None: defaults only), applies overrides, validates."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config: no such file: {p}; give a YAML or JSON file (see recipes/)")
        text = p.read_text()
        try:
            raw = json.loads(text) if p.suffix == ".json" else _yaml_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"config {p}: cannot parse ({e})") from None
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigTypeError(f"config {p}: expected a mapping at the top level, got {type(raw).__name__}")
    apply_overrides(raw, list(overrides))
    return config_from_dict(raw)


def describe(cls=TrainConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """`(key, type, default, help)` for every field, nested ones with dotted keys."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((key, _type_name(tp), json.dumps(default), f.metadata.get("help", "")))
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            rows += describe(typing.get_args(tp)[0], key + ".*.")
    return rows
