"""The chunk memory of a cache in fixed-size pages: on the device, in pinned host memory or on disk
(docs/design.md §5).

Keys and values live in pages of ``page_chunks`` chunks each, ``[P, B, 2, S, H, D]`` (chunk-major, keys and
values side by side, so one chunk of every batch row is one contiguous slab). A page, once made, never moves:
the memory grows by adding pages, never by copying. Where pages live is an :class:`Offload`:
``"device"`` (all on the compute device), ``"host"`` (pinned host memory) or ``"disk"`` (pinned host memory up
to a byte budget, the pages beyond it in one memory-mapped file whose space is reserved up front).

A fetch gathers the selected chunks (deduplicated over tokens, heads and batch rows) from their pages into one
staging buffer and copies it to the device; a long selection is fetched in token blocks, the next block gathered
on a worker thread (reading pinned or memory-mapped pages) and copied on a side CUDA stream while the caller
computes on the current one. On a CPU-only machine the same path runs without streams.

The landmarks ``[B, C, R, Dr]`` are one buffer, on the device or (offloaded) in pinned host memory, where
selection streams over it block by block; :meth:`ChunkMemoryStore.reserve` sizes it for a whole prompt at once
(``prefill(new_tokens=)``: and what will be decoded). Decoding over offloaded landmarks selects through their
int8 sketch on the device (:meth:`ChunkMemoryStore.landmark_sketch`, ``ramba.ops.retrieval.sketch``).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch

from ramba.errors import RambaUserError
from ramba.layers.base import ChunkMemory, ChunkSelection
from ramba.ops.retrieval.sketch import SKETCH_TOKENS, LandmarkSketch

# The most chunk-memory bytes one fetch may gather, were every selected chunk distinct: a long segment attends
# block by block (see ChunkMemoryStore.fetch_tokens), so the GPU memory a prefill needs does not grow with
# the number of chunks its tokens can choose from.
FETCH_BYTES = 64 * 2**20
# Bytes of keys and values per page (a power of two for the usual shapes: the pinned allocator rounds up to one).
PAGE_BYTES = 64 * 2**20
TIERS = ("device", "host", "disk")
# host landmark bytes from which decoding selects through a device sketch (Offload landmarks "sketch")
SKETCH_MIN_BYTES = 16 * 2**20
LANDMARK_PLACES = ("sketch", "host", "device")


class OffloadError(RambaUserError, RuntimeError):
    """The chunk memory's offload target cannot hold it (unwritable folder, full disk, bad spec)."""


def available_host_bytes() -> int:
    """Host memory available to new allocations now (``MemAvailable`` of /proc/meminfo, else physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class Offload:
    """Where a cache's chunk memory lives.

    Fields:
        tier: "device" (keys, values and landmarks on the compute device), "host" (key/value pages in pinned
            host memory) or "disk" (pinned pages up to ``host_budget`` bytes, the rest memory-mapped in a file
            under ``path``).
        path: the disk tier's folder. host_budget: bytes of host pages before the disk tier (None: half the
            host memory available when the cache is made).
        landmarks: where offloaded landmarks live: "sketch" (the default: in host memory, and decoding selects
            through an int8 sketch of them on the device, ``B * C * R * (Dr + 12)`` bytes, made when decoding
            starts once they hold ``SKETCH_MIN_BYTES`` and freed when a long input comes), "host" (in host memory
            only: GPU memory flat in the context length, every selection streams them in) or "device"
            (``B * C * R * Dr`` elements on the GPU).
    """

    tier: str = "device"
    path: str | None = None
    host_budget: int | None = None
    landmarks: str = "sketch"

    def __post_init__(self):
        if self.tier not in TIERS:
            raise OffloadError(f"offload: tier must be one of {TIERS}, got {self.tier!r}")
        if self.landmarks not in LANDMARK_PLACES:
            raise OffloadError(f"offload: landmarks must be one of {LANDMARK_PLACES}, got {self.landmarks!r}")
        if (self.tier == "disk") != (self.path is not None):
            raise OffloadError("offload: the disk tier needs a folder (offload='disk:PATH'), and only it takes one")
        if self.host_budget is not None and self.host_budget < 0:
            raise OffloadError(f"offload: host_budget must be >= 0 bytes, got {self.host_budget}")

    @classmethod
    def parse(cls, offload: bool | str | Offload | None) -> Offload:
        """``False``/``None`` -> device, ``True`` -> host, ``"disk:PATH"`` -> disk tier under PATH, an Offload as is."""
        if isinstance(offload, Offload):
            return offload
        if offload is None or offload is False:
            return cls()
        if offload is True:
            return cls("host")
        if isinstance(offload, str) and offload.startswith("disk:") and len(offload) > 5:
            return cls("disk", offload[5:])
        raise OffloadError(f"offload: expected False, True, 'disk:PATH' or an Offload, got {offload!r}")

    @property
    def landmarks_on_host(self) -> bool:
        return self.tier != "device" and self.landmarks != "device"

    def resolved(self) -> Offload:
        """This spec with the disk tier's default host budget filled in."""
        if self.tier == "disk" and self.host_budget is None:
            return replace(self, host_budget=available_host_bytes() // 2)
        return self


def unwritable_folder(folder: str, reason: str) -> OffloadError:
    """The error for a disk-tier folder that cannot hold the tier's file."""
    return OffloadError(
        f"offload: cannot create the disk tier's file in {folder!r} ({reason}); "
        f"pass a writable folder as offload='disk:PATH' (CLI --offload-dir PATH)"
    )


class _DiskPages:
    """Pages in one memory-mapped file under ``folder``. The file is unlinked at once (its space is freed with the
    store, even after a crash) and its space is reserved with ``posix_fallocate``: a full disk fails in
    :meth:`reserve`, before any work, not as a SIGBUS when a mapped page is first written."""

    def __init__(self, folder: str, page_bytes: int):
        self.folder, self.page_bytes, self.size = folder, page_bytes, 0
        try:
            fd, name = tempfile.mkstemp(prefix="ramba-chunks-", suffix=".bin", dir=folder)
        except OSError as e:
            raise unwritable_folder(folder, e.strerror or str(e)) from None
        os.unlink(name)
        self.file = os.fdopen(fd, "r+b")

    def reserve(self, n_pages: int) -> None:
        size = n_pages * self.page_bytes
        if size <= self.size:
            return
        try:
            os.posix_fallocate(self.file.fileno(), self.size, size - self.size)
        except OSError as e:
            raise OffloadError(
                f"offload: the disk tier needs {size / 2**30:.2f} GiB in {self.folder!r} ({e.strerror or e}); "
                f"free space there, pick another folder, or raise the host budget"
            ) from None
        self.size = size

    def page(self, index: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self.reserve(index + 1)
        raw = np.memmap(self.file, dtype=np.uint8, mode="r+", offset=index * self.page_bytes, shape=(self.page_bytes,))
        return torch.from_numpy(raw).view(dtype).view(shape)


class ChunkMemoryStore:
    """The keys, values and landmarks of all complete chunks of a batch of sequences (see the module docstring).

    Args:
        batch, chunk_size (S), n_kv_heads (H), head_dim (D), retrieval_heads (R), retrieval_dim (Dr): shapes.
        dtype, device: of the stored values and of the compute. offload: an :class:`Offload` or what
            :meth:`Offload.parse` takes. page_chunks: chunks per page (default: ``PAGE_BYTES`` of keys and values).
    """

    def __init__(
        self,
        batch: int,
        chunk_size: int,
        n_kv_heads: int,
        head_dim: int,
        retrieval_heads: int,
        retrieval_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        offload: bool | str | Offload = False,
        page_chunks: int | None = None,
    ):
        self.chunk_size, self.dtype, self.device = chunk_size, dtype, torch.device(device)
        self.placement = Offload.parse(offload).resolved()
        self.offload = self.placement.tier != "device"
        self.n_chunks = 0
        self.chunk_shape = (batch, 2, chunk_size, n_kv_heads, head_dim)  # one chunk's keys and values, every row
        self.chunk_bytes = math.prod(self.chunk_shape) * dtype.itemsize
        self.page_chunks = page_chunks or max(1, PAGE_BYTES // self.chunk_bytes)
        self.page_bytes = self.page_chunks * self.chunk_bytes
        self.pages: list[torch.Tensor] = []  # each [page_chunks, B, 2, S, H, D]
        self._page_rows: list[np.ndarray] = []  # host pages as [page_chunks, chunk_bytes] uint8
        self.page_tiers: list[str] = []
        self._pin = self.device.type == "cuda"
        self._disk = _DiskPages(self.placement.path, self.page_bytes) if self.placement.tier == "disk" else None
        self._worker: ThreadPoolExecutor | None = None
        self._copy_stream = torch.cuda.Stream(self.device) if self.offload and self._pin else None
        on_host = self.placement.landmarks_on_host
        self._landmarks = torch.empty(
            batch,
            0,
            retrieval_heads,
            retrieval_dim,
            dtype=dtype,
            device="cpu" if on_host else self.device,
            pin_memory=on_host and self._pin,
        )
        self._sketch: LandmarkSketch | None = None

    @property
    def landmarks(self) -> torch.Tensor:
        """``[B, C, R, Dr]`` of the complete chunks so far (in host memory when offloaded with host landmarks)."""
        return self._landmarks[:, : self.n_chunks]

    @property
    def sketch(self) -> LandmarkSketch | None:
        """The landmark sketch decoding selects through (:meth:`landmark_sketch`), while one is held."""
        return self._sketch

    def nbytes(self) -> dict[str, int]:
        """Bytes held now: ``device``, ``pinned`` (host pages and host landmarks) and ``disk``."""
        out = dict.fromkeys(("device", "pinned", "disk"), 0)
        for tier in self.page_tiers:
            out["pinned" if tier == "host" else tier] += self.page_bytes
        out["device" if self._landmarks.device.type != "cpu" else "pinned"] += self._landmarks.nbytes
        out["device"] += self._sketch.nbytes() if self._sketch is not None else 0
        return out

    def landmark_sketch(self, tokens: int) -> LandmarkSketch | None:
        """For selecting ``tokens`` tokens a row at once: the device sketch of the host landmarks, brought up to
        date, when they are placed ``"sketch"``, ``tokens <= SKETCH_TOKENS`` (decoding) and they hold at least
        ``SKETCH_MIN_BYTES`` (below that, streaming them in costs less than the sketch's bookkeeping); else None,
        and a sketch made for earlier decoding is freed (a long input's activations get its memory)."""
        if (
            self.placement.tier == "device"
            or self.placement.landmarks != "sketch"
            or tokens > SKETCH_TOKENS
            or self.landmarks.nbytes < SKETCH_MIN_BYTES
        ):
            self._sketch = None
            return None
        if self._sketch is None:
            B, _, R, Dr = self._landmarks.shape
            self._sketch = LandmarkSketch(B, R, Dr, self.dtype, self.device)
        self._sketch.append(self.landmarks[:, self._sketch.n_chunks :])
        return self._sketch

    def _host_pages_allowed(self) -> int:
        if self.placement.tier == "disk":
            return self.placement.host_budget // self.page_bytes
        return math.inf

    def reserve(self, n_chunks: int) -> None:
        """Make room for ``n_chunks`` chunks in all: the landmark buffer grows to that (one copy of what it holds)
        and the disk tier reserves its file's space now, so a full disk fails before a prefill starts."""
        if n_chunks > self._landmarks.shape[1]:
            old = self._landmarks
            self._landmarks = torch.empty(
                (old.shape[0], n_chunks, *old.shape[2:]), dtype=old.dtype, device=old.device, pin_memory=old.is_pinned()
            )
            self._landmarks[:, : self.n_chunks] = old[:, : self.n_chunks]
        if self._disk is not None:
            self._disk.reserve(max(0, -(-n_chunks // self.page_chunks) - self._host_pages_allowed()))

    def _add_page(self) -> None:
        shape = (self.page_chunks, *self.chunk_shape)
        if not self.offload:
            tier, page = "device", torch.empty(shape, dtype=self.dtype, device=self.device)
        elif self.page_tiers.count("host") < self._host_pages_allowed():
            tier, page = "host", torch.empty(shape, dtype=self.dtype, pin_memory=self._pin)
        else:
            tier, page = "disk", self._disk.page(self.page_tiers.count("disk"), shape, self.dtype)
        self.pages.append(page)
        self.page_tiers.append(tier)
        if tier != "device":  # the worker gathers host pages with numpy: no torch thread pool beside the compute's
            self._page_rows.append(page.view(torch.uint8).view(self.page_chunks, self.chunk_bytes).numpy())

    @torch.no_grad()
    def append(self, memory: ChunkMemory) -> None:
        """Add the memory of newly completed chunks: k, v ``[B, c*S, H, D]``, landmarks ``[B, c, R, Dr]``
        (stored without their autograd history: a cache serves inference)."""
        c = memory.landmarks.shape[1]
        if c == 0:
            return
        if self.n_chunks + c > self._landmarks.shape[1]:
            self.reserve(max(self.n_chunks + c, 2 * self._landmarks.shape[1], 16))
        B, _, H, D = memory.k.shape
        S = self.chunk_size
        kv = torch.stack((memory.k.reshape(B, c, S, H, D), memory.v.reshape(B, c, S, H, D)), dim=2).transpose(0, 1)
        done = 0
        while done < c:  # fill the last page, then new ones; a blocking copy, so a later fetch reads finished data
            page, slot = divmod(self.n_chunks + done, self.page_chunks)
            if page == len(self.pages):
                self._add_page()
            n = min(c - done, self.page_chunks - slot)
            self.pages[page][slot : slot + n].copy_(kv[done : done + n])
            done += n
        self._landmarks[:, self.n_chunks : self.n_chunks + c] = memory.landmarks.to(self.dtype)
        self.n_chunks += c

    def fetch_tokens(self, selection: ChunkSelection) -> int:
        """Tokens per fetch for this ``selection`` (indices ``[B, T, R, K]``): all ``T`` when the whole memory
        is at most ``FETCH_BYTES``, else as many as gather at most that with every selected chunk distinct."""
        B, T, R, K = selection.indices.shape
        if self.n_chunks * self.chunk_bytes <= FETCH_BYTES:
            return T
        return max(1, FETCH_BYTES // (R * K * self.chunk_bytes))

    def fetch(self, selection: ChunkSelection) -> tuple[ChunkMemory, ChunkSelection]:
        """The chunks ``selection`` picks, on the compute device, and the selection re-indexed into them
        (one block, however many tokens; see :meth:`fetch_blocks`)."""
        _, _, memory, remapped = next(self.fetch_blocks(selection, selection.indices.shape[1]))
        return memory, remapped

    def fetch_blocks(
        self, selection: ChunkSelection, step: int | None = None
    ) -> Iterator[tuple[int, int, ChunkMemory, ChunkSelection]]:
        """``(t0, t1, memory, selection)`` for the token blocks ``[t0, t1)`` of ``step`` tokens (default
        :meth:`fetch_tokens`): the chunks the block picks, deduplicated over tokens, heads and batch rows,
        as ``k, v [B, U*S, H, D]`` on the compute device, and the block's selection re-indexed into them
        (``B * U * S * H * D`` values moved for ``U`` distinct chunks, whatever the context length).
        Offloaded, the next block is gathered and copied while the caller computes on this one."""
        indices, weights = selection
        T = indices.shape[1]
        step = step or self.fetch_tokens(selection)
        chosen = indices.masked_fill(weights == 0, 0)  # empty slots read chunk 0 with weight 0
        blocks = [(t0, min(T, t0 + step)) for t0 in range(0, T, step)]
        if self.n_chunks == 0:  # nothing to attend to yet (HSA layers skip an empty memory)
            empty = self._memory(torch.empty((0, *self.chunk_shape), dtype=self.dtype, device=self.device))
            for t0, t1 in blocks:
                yield t0, t1, empty, ChunkSelection(indices[:, t0:t1], weights[:, t0:t1])
            return
        if not self.offload:
            for t0, t1 in blocks:
                used = torch.unique(chosen[:, t0:t1])
                yield t0, t1, self._memory(self._gather(used)), self._remap(used, chosen, weights, t0, t1)
            return
        chosen_host = chosen.cpu()  # one device-to-host sync for every block
        used = [torch.unique(chosen_host[:, t0:t1]) for t0, t1 in blocks]
        self._worker = self._worker or ThreadPoolExecutor(max_workers=1, thread_name_prefix="ramba-fetch")
        pending = self._worker.submit(self._gather_host, used[0])
        for i, (t0, t1) in enumerate(blocks):
            staged = pending.result()
            if i + 1 < len(blocks):
                pending = self._worker.submit(self._gather_host, used[i + 1])
            device_used = used[i].to(self.device, non_blocking=self._pin)
            yield t0, t1, self._memory(self._to_device(staged)), self._remap(device_used, chosen, weights, t0, t1)

    def _gather(self, used: torch.Tensor) -> torch.Tensor:
        """The chunks ``used [U]`` (sorted ids) from device pages: ``[U, B, 2, S, H, D]``."""
        out = torch.empty((used.numel(), *self.chunk_shape), dtype=self.dtype, device=used.device)
        pages, counts = torch.unique_consecutive(used // self.page_chunks, return_counts=True)
        start = 0
        for page, n in zip(pages.tolist(), counts.tolist()):
            torch.index_select(
                self.pages[page], 0, used[start : start + n] - page * self.page_chunks, out=out[start : start + n]
            )
            start += n
        return out

    def _gather_host(self, used: torch.Tensor) -> torch.Tensor:
        """The chunks ``used [U]`` (sorted ids, CPU) from host or disk pages into a (pinned) staging buffer."""
        out = torch.empty((used.numel(), *self.chunk_shape), dtype=self.dtype, pin_memory=self._pin)
        rows, ids = out.view(torch.uint8).view(used.numel(), self.chunk_bytes).numpy(), used.numpy()
        pages, starts = np.unique(ids // self.page_chunks, return_index=True)
        for page, start, end in zip(pages.tolist(), starts.tolist(), [*starts[1:].tolist(), len(ids)]):
            np.take(self._page_rows[page], ids[start:end] - page * self.page_chunks, axis=0, out=rows[start:end])
        return out

    def _to_device(self, staged: torch.Tensor) -> torch.Tensor:
        """A staged gather on the compute device: copied on the side stream, which the compute stream waits for."""
        if self._copy_stream is None:
            return staged.to(self.device)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            moved = staged.to(self.device, non_blocking=True)
        compute.wait_stream(self._copy_stream)
        moved.record_stream(compute)
        return moved

    def _memory(self, chunks: torch.Tensor) -> ChunkMemory:
        """``chunks [U, B, 2, S, H, D]`` -> a :class:`ChunkMemory` with k, v ``[B, U*S, H, D]``."""
        U, B, _, S, H, D = chunks.shape
        kv = chunks.permute(2, 1, 0, 3, 4, 5).reshape(2, B, U * S, H, D)
        return ChunkMemory(kv[0], kv[1], self.landmarks)

    @staticmethod
    def _remap(used: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, t0: int, t1: int) -> ChunkSelection:
        remapped = torch.searchsorted(used, chosen[:, t0:t1].contiguous())
        return ChunkSelection(remapped, weights[:, t0:t1])
