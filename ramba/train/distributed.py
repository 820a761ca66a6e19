"""Process-group setup and model wrapping for torchrun (DDP, or FSDP for large models).

Without torchrun (no WORLD_SIZE in the environment) everything runs in one process and the
helpers reduce to no-ops, so the same training command works on 1 CPU, 1 GPU or many.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ramba.errors import ConfigError

__all__ = [
    "DistInfo",
    "init_distributed",
    "shutdown_distributed",
    "wrap_model",
    "unwrap_model",
    "all_reduce_mean",
    "gather_objects",
]

logger = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def rank_device(local_rank: int, device: str | None, gpus: int) -> torch.device:
    """This rank's device: ``device`` (a bare "cuda" gets an index), else a GPU when there are ``gpus`` of them,
    else the CPU. More ranks than GPUs on a node share them round-robin (``cuda:<LOCAL_RANK mod gpus>``)."""
    if device is not None and device != "cuda":
        return torch.device(device)
    if device == "cuda" or gpus > 0:
        return torch.device(f"cuda:{local_rank % max(gpus, 1)}")
    return torch.device("cpu")


def resolve_backend(backend: str, device: torch.device, local_world: int, gpus: int) -> str:
    """'auto' -> nccl with one GPU a rank, gloo on the CPU or when ranks share a GPU (NCCL needs a GPU of its own
    for every rank); an explicit nccl with shared GPUs is refused with the option that works."""
    shared = device.type == "cuda" and local_world > gpus
    if backend == "auto":
        return "nccl" if device.type == "cuda" and not shared else "gloo"
    if backend == "nccl" and shared:
        raise ConfigError(
            f"config key 'distributed.backend': nccl: {local_world} ranks on this node share {gpus} GPU(s), and NCCL needs one GPU "
            "a rank; set distributed.backend=gloo (or auto)"
        )
    return backend


def init_distributed(backend: str = "auto", device: str | None = None) -> DistInfo:
    """Joins the torchrun process group when WORLD_SIZE > 1 and picks this rank's device (:func:`rank_device`).

    backend: 'auto' (see :func:`resolve_backend`), 'nccl' or 'gloo'. device: None picks cuda:<LOCAL_RANK> when
    CUDA is available (ranks beyond the node's GPUs share them, with gloo), else cpu.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    dev = rank_device(local_rank, device, gpus)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = resolve_backend(backend, dev, local_world, gpus)
        dist.init_process_group(backend=backend, device_id=dev if backend == "nccl" else None)
        logger.info("rank %d/%d joined the %s process group on %s", rank, world, backend, dev)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shutdown_distributed(wait_for_all: bool = False) -> None:
    """Leaves the process group; `wait_for_all` (after a run that ended well) first waits for every rank:
    rank 0 may still be writing a checkpoint, and a rank that tears its gloo group down earlier can abort
    with "terminate called without an active exception". After an error nothing waits (peers may hang)."""
    if dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, strategy: str) -> nn.Module:
    """DDP, or FSDP2 (`fully_shard` on every block of every ModuleList, then the root), when distributed."""
    if not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("dp",))
        # Innermost blocks first: reversed pre-order visits every module after its descendants.
        for module in reversed(list(model.modules())):
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(f"strategy: expected 'ddp' or 'fsdp', got {strategy!r}")


def unwrap_model(model: nn.Module) -> nn.Module:
    return (
        model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model
    )


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (identity when not distributed)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on some rank (`flag` itself when not distributed)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = torch.tensor(float(flag), device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())
    return flag


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (`[obj]` when not distributed)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]
