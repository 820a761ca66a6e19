"""Memory planning for long prefills (docs/design.md §5): the bytes a prompt will need on the compute device,
in pinned host memory, in pageable host memory and on disk, against what is free now, checked before any work.

``plan_prefill(model, batch, tokens, segment_len, offload)`` raises :class:`MemoryPlanError`, one
line naming what is short (needed vs available) and the first option that would fit (offload to host memory,
the disk tier, a smaller segment), instead of an out-of-memory error hours into a prefill.

What is counted: the chunk memory exactly as :class:`~ramba.model.chunk_store.ChunkMemoryStore` allocates it
(whole pages, landmarks), full-attention key/value caches, the fetch and selection buffers, and one segment's
activations, estimated as ``ACTIVATION_FACTOR`` times the widest per-token tensor (a Mamba-2 input projection
or an attention projection) per token: an estimate, calibrated on one measurement (below), not a bound.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass, replace

import torch

from ramba.errors import RambaUserError
from ramba.model.chunk_store import (
    FETCH_BYTES,
    PAGE_BYTES,
    SKETCH_MIN_BYTES,
    Offload,
    available_host_bytes,
    unwritable_folder,
)
from ramba.ops.retrieval.sketch import LandmarkSketch
from ramba.ops.retrieval.streaming import TILE_ELEMENTS

logger = logging.getLogger(__name__)
GIB = 2**30
# Segment activation bytes per token, in widest-per-token-tensors: the tiny preset peaked at 1.66 GiB of GPU
# memory for one 64K-token segment (bf16, H100, 2026-11-24, README), 13.7 of its 1160-wide projections a token.
ACTIVATION_FACTOR = 16
SELECTION_BYTES = 4 * TILE_ELEMENTS * 4  # the streaming selection's float32 tiles (scores, candidates, landmarks)


class MemoryPlanError(RambaUserError, RuntimeError):
    """A prefill that would not fit in the memory available; the message names the option that would."""


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a prefill of ``tokens`` tokens needs (``*_bytes``) and has (``*_available``; None: not checked).

    ``device_bytes`` are on the compute device (host memory when it is the CPU); ``pinned_bytes`` are
    page-locked host memory (offloaded pages, staging, host landmarks); ``host_bytes`` pageable host memory
    (the prompt's ids); ``disk_bytes`` the disk tier's file. ``parts`` splits them by what holds them.
    """

    tokens: int
    batch: int
    segment_len: int
    offload: str
    device: str
    chunks: int
    device_bytes: int
    pinned_bytes: int
    host_bytes: int
    disk_bytes: int
    device_available: int | None
    host_available: int
    disk_available: int | None
    parts: dict

    def shortfalls(self) -> list[tuple[str, int, int]]:
        """``(what, needed, available)`` for every kind of memory that is short."""
        out = []
        host_needed = self.pinned_bytes + self.host_bytes
        if self.device_available is None:  # the compute device is the host
            host_needed += self.device_bytes
        elif self.device_bytes > self.device_available:
            out.append((f"{self.device} memory", self.device_bytes, self.device_available))
        if host_needed > self.host_available:
            what = "pinned host memory" if self.pinned_bytes > self.host_bytes else "host memory"
            out.append((what, host_needed, self.host_available))
        if self.disk_available is not None and self.disk_bytes > self.disk_available:
            out.append(("disk space for the disk tier", self.disk_bytes, self.disk_available))
        return out

    def summary(self) -> str:
        parts = [
            f"{self.device} {_gib(self.device_bytes)}",
            f"pinned {_gib(self.pinned_bytes)}",
            f"host {_gib(self.host_bytes)}",
        ]
        if self.disk_bytes or self.offload == "disk":
            parts.append(f"disk {_gib(self.disk_bytes)}")
        return (
            f"memory plan for {self.tokens:,} tokens x {self.batch} (segment {self.segment_len:,}, offload "
            f"{self.offload}, {self.chunks:,} chunks): " + ", ".join(parts)
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def _widest_token_tensor(config) -> int:
    """Elements per token of the widest activation: a Mamba-2 input projection or the attention projections."""
    d_inner = config.expand * config.d_model
    mamba = 2 * d_inner + 2 * config.n_groups * config.d_state + d_inner // config.ssm_head_dim
    attention = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
    return max(mamba, attention, config.retrieval_heads * config.retrieval_dim, config.d_model)


def _needs(config, batch: int, tokens: int, segment_len: int, offload: Offload, dtype: torch.dtype) -> dict:
    """Bytes by holder: ``{(kind, what): bytes}`` with kind device / pinned / host / disk."""
    plan, elem = config.layer_plan(), dtype.itemsize
    needs = {
        ("device", "activations"): batch
        * min(segment_len, tokens)
        * ACTIVATION_FACTOR
        * _widest_token_tensor(config)
        * elem,
        ("host", "prompt ids"): batch * tokens * 8,
    }
    attention_layers = plan.count("attention")
    if attention_layers:
        needs[("device", "attention key/values")] = (
            attention_layers * 2 * batch * tokens * config.n_kv_heads * config.head_dim * elem
        )
    if "chunk_encoder" in plan:
        chunks = tokens // config.chunk_size
        chunk_bytes = batch * 2 * config.chunk_size * config.n_kv_heads * config.head_dim * elem
        page_chunks = max(1, PAGE_BYTES // chunk_bytes)
        pages, page_bytes = -(-chunks // page_chunks), page_chunks * chunk_bytes
        if offload.tier == "disk":
            host_pages = min(pages, offload.host_budget // page_bytes)
            needs[("pinned", "chunk pages")] = host_pages * page_bytes
            needs[("disk", "chunk pages")] = (pages - host_pages) * page_bytes
        else:
            needs[("device" if offload.tier == "device" else "pinned", "chunk pages")] = pages * page_bytes
        landmarks = batch * -(-tokens // config.chunk_size) * config.retrieval_heads * config.retrieval_dim * elem
        needs[("pinned" if offload.landmarks_on_host else "device", "landmarks")] = landmarks
        if offload.tier != "device" and offload.landmarks == "sketch" and landmarks >= SKETCH_MIN_BYTES:
            # made when decoding starts, in the memory the prefill's activations had
            sketch = LandmarkSketch.planned_bytes(
                batch, config.retrieval_heads, config.retrieval_dim, -(-tokens // config.chunk_size), dtype
            )
            needs[("device", "decoding's landmark sketch beyond the activations")] = max(
                0, sketch - needs[("device", "activations")]
            )
        needs[("device", "fetch and selection")] = 2 * FETCH_BYTES + SELECTION_BYTES
        if offload.tier != "device":
            needs[("pinned", "fetch staging")] = 2 * FETCH_BYTES
    return needs


def plan_memory(
    model,
    batch: int,
    tokens: int,
    segment_len: int,
    offload: bool | str | Offload = False,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> MemoryPlan:
    """The :class:`MemoryPlan` of prefilling ``[batch, tokens]`` in segments of ``segment_len`` with ``offload``
    (see :class:`~ramba.model.chunk_store.Offload`), on ``model``'s device and dtype unless given. A disk-tier
    folder that does not exist raises :class:`~ramba.model.chunk_store.OffloadError`."""
    weight = model.get_input_embeddings().weight
    device, dtype = torch.device(device or weight.device), dtype or weight.dtype
    spec = Offload.parse(offload).resolved()
    needs = _needs(model.config, batch, tokens, segment_len, spec, dtype)
    total = {kind: sum(v for (k, _), v in needs.items() if k == kind) for kind in ("device", "pinned", "host", "disk")}
    device_available = None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        device_available = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    disk_available = None
    if spec.tier == "disk":
        if not os.path.isdir(spec.path):
            raise unwritable_folder(spec.path, "not a folder")
        disk_available = shutil.disk_usage(spec.path).free
    chunks = tokens // model.config.chunk_size if "chunk_encoder" in model.config.layer_plan() else 0
    return MemoryPlan(
        tokens,
        batch,
        segment_len,
        spec.tier,
        "cpu" if device_available is None else str(device),
        chunks,
        total["device"],
        total["pinned"],
        total["host"],
        total["disk"],
        device_available,
        available_host_bytes(),
        disk_available,
        {f"{k}: {w}": v for (k, w), v in needs.items() if v},
    )


def _alternatives(model, plan: MemoryPlan, spec: Offload):
    """``(option text, plan)`` for the options a user can pass instead, in the order they are suggested."""
    if spec.tier == "device":
        yield "offload=True (CLI --offload)", replace(spec, tier="host")
    if spec.tier != "disk" and plan.chunks:  # a budget of 3/4 of the host memory left beside everything else
        others = plan.pinned_bytes + plan.host_bytes - plan.parts.get("pinned: chunk pages", 0)
        others += plan.device_bytes if plan.device_available is None else 0
        budget = max(0, plan.host_available - others) * 3 // 4
        yield (
            f"the disk tier: offload='disk:PATH' (CLI --offload-dir PATH), a host budget of about {_gib(budget)}",
            Offload("disk", os.getcwd(), budget),
        )


def check_plan(model, plan: MemoryPlan, offload: bool | str | Offload = False) -> MemoryPlan:
    """``plan`` if it fits, else :class:`MemoryPlanError` naming the shortfall and the first option that fits."""
    short = plan.shortfalls()
    if not short:
        return plan
    what, needed, available = short[0]
    message = (
        f"a prefill of {plan.tokens:,} tokens (batch {plan.batch}, segment {plan.segment_len:,}, offload "
        f"{plan.offload}) needs {_gib(needed)} of {what}, {_gib(available)} available"
    )
    spec = Offload.parse(offload).resolved()
    fix = None
    for option, other in _alternatives(model, plan, spec):
        if not plan_memory(model, plan.batch, plan.tokens, plan.segment_len, other).shortfalls():
            fix = option
            break
    segment = plan.segment_len // 2
    while fix is None and segment >= model.config.chunk_size:
        if not plan_memory(model, plan.batch, plan.tokens, segment, spec).shortfalls():
            fix = f"a smaller segment: segment_len={segment} (CLI --segment-len {segment})"
        segment //= 2
    if fix is None and what.startswith("disk"):
        fix = f"a folder with {_gib(needed)} free, or a larger host budget"
    raise MemoryPlanError(message + (f"; it would fit with {fix}" if fix else "; no offload or segment length fits"))


def plan_prefill(model, batch: int, tokens: int, segment_len: int, offload: bool | str | Offload = False) -> MemoryPlan:
    """Plan, log and check a prefill (raises :class:`MemoryPlanError` when it would not fit)."""
    plan = plan_memory(model, batch, tokens, segment_len, offload)
    logger.debug("%s", plan.summary())
    return check_plan(model, plan, offload)
