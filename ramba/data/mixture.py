"""Training examples from a weighted mixture of token files and synthetic tasks.

Every example is a pure function of `(seed, global index)`: which source it comes from, which
window of a token file or which task sample. The data position of a run is therefore one integer
(examples consumed), resuming is exact, and ranks read disjoint indices (`DistributedSampler`).

A token-file source cuts its token range into non-overlapping windows of `seq_len` tokens and
visits them in a fresh random order every epoch. A task source generates a sample of exactly
`seq_len` tokens, with loss only on the answer tokens.

For the retrieval loss (docs/design.md §6) a task source built with `retrieval_chunk_size` adds each
sample's `retrieval_targets [seq_len, 2]` to its example, and a mixture built with it gives text windows
`-1` targets, so every example is `(input_ids, labels, retrieval_targets)`.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

import numpy as np
import torch

from ramba.data.tasks import Task, retrieval_targets
from ramba.data.tokens import DataError, TokenFile

__all__ = [
    "TokenWindows",
    "TaskStream",
    "Mixture",
    "DistributedSampler",
    "MicroBatches",
    "micro_batch_loader",
    "collate",
]


class TokenWindows:
    """Windows of `seq_len` tokens from `tokens[start:end]` of a token file, shuffled per epoch."""

    def __init__(self, token_file: TokenFile, seq_len: int, seed: int, start: int = 0, end: int | None = None):
        self.file, self.seq_len, self.seed = token_file, seq_len, seed
        self.start, self.end = start, len(token_file) if end is None else end
        self.n_windows = (self.end - self.start) // seq_len
        if self.n_windows < 1:
            raise DataError(
                f"token file {token_file.path}: its range holds {self.end - self.start} tokens, "
                f"fewer than one sequence of {seq_len}; use more text or a shorter seq_len"
            )
        self._epoch, self._perm = -1, None

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """`(input_ids [seq_len], labels [seq_len])` int64 for the `index`-th draw."""
        epoch, i = divmod(index, self.n_windows)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._epoch = epoch
        off = self.start + int(self._perm[i]) * self.seq_len
        ids = np.asarray(self.file.tokens[off : off + self.seq_len], dtype=np.int64)
        return ids, ids.copy()


class TaskStream:
    """Samples of a synthetic task at `seq_len` tokens; `depth` None draws a depth per sample."""

    def __init__(
        self,
        task: Task,
        seq_len: int,
        seed: int,
        depth: float | None = None,
        loss_on_prompt: bool = False,
        retrieval_chunk_size: int = 0,
    ):
        self.task, self.seq_len, self.seed, self.depth = task, seq_len, seed, depth
        self.loss_on_prompt, self.retrieval_chunk_size = loss_on_prompt, retrieval_chunk_size
        task.generate(seq_len, depth, seed)  # fails now, with the task's message, if seq_len is too short

    def example(self, index: int) -> tuple[np.ndarray, ...]:
        """`(input_ids [seq_len], labels [seq_len])`, and `retrieval_targets [seq_len, 2]` with a
        `retrieval_chunk_size`."""
        sample = self.task.generate(self.seq_len, self.depth, seed=self.seed * 1_000_003 + index)
        labels = sample.input_ids.copy() if self.loss_on_prompt else sample.labels()
        if not self.retrieval_chunk_size:
            return sample.input_ids, labels
        return sample.input_ids, labels, retrieval_targets(sample, self.task.tokenizer, self.retrieval_chunk_size)


class Mixture:
    """Draws example `index` from source `i` with probability `weights[i]` (normalised); with
    `retrieval_targets`, examples without targets (text windows) get `-1` ones (see the module docstring)."""

    def __init__(self, sources: list, weights: list[float], seed: int, retrieval_targets: bool = False):
        if not sources or len(sources) != len(weights):
            raise ValueError(
                f"sources, weights: need at least one source and one weight per source, "
                f"got {len(sources)}, {len(weights)}"
            )
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights: need non-negative weights with a positive sum, got {weights}")
        self.sources, self.cdf, self.seed = sources, np.cumsum(w / w.sum()), seed
        self.retrieval_targets = retrieval_targets

    def source_of(self, index: int) -> int:
        u = np.random.default_rng([self.seed, index]).random()
        return min(int(np.searchsorted(self.cdf, u, side="right")), len(self.sources) - 1)

    def example(self, index: int) -> tuple[np.ndarray, ...]:
        example = self.sources[self.source_of(index)].example(index)
        if self.retrieval_targets and len(example) == 2:
            example = (*example, np.full((len(example[0]), 2), -1, dtype=np.int64))
        return example


@dataclass
class DistributedSampler:
    """Global example indices of one micro-batch on `rank` of `world_size`.

    One optimizer step consumes `examples_per_step = world_size * grad_accum * micro_batch`
    examples starting at `base` (the examples consumed so far, i.e. the data position); rank `r`
    takes its own contiguous slice of each micro-step, so ranks never see the same example.
    """

    micro_batch: int
    grad_accum: int = 1
    rank: int = 0
    world_size: int = 1

    @property
    def examples_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def indices(self, base: int, micro_step: int) -> range:
        start = base + (micro_step * self.world_size + self.rank) * self.micro_batch
        return range(start, start + self.micro_batch)


def collate(examples: list[tuple[np.ndarray, ...]]) -> tuple[torch.Tensor, ...]:
    """`(input_ids [B, T], labels [B, T])` long tensors, labels -100 where no loss is taken; and
    `retrieval_targets [B, T, 2]` when the examples carry them."""
    return tuple(torch.from_numpy(np.stack(field)) for field in zip(*examples))


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batch ``j`` of a run continuing from data position ``start``: the ``(input_ids [B, T], labels [B, T])``
    (and ``retrieval_targets [B, T, 2]``, see the module docstring) this rank trains on in micro-step
    ``j % grad_accum`` of the ``j // grad_accum``-th step from there."""

    def __init__(self, mixture: Mixture, sampler: DistributedSampler, start: int, steps: int):
        self.mixture, self.sampler, self.start, self.steps = mixture, sampler, start, steps

    def __len__(self) -> int:
        return self.steps * self.sampler.grad_accum

    def __getitem__(self, j: int) -> tuple[torch.Tensor, ...]:
        step, micro = divmod(j, self.sampler.grad_accum)
        base = self.start + step * self.sampler.examples_per_step
        return collate([self.mixture.example(i) for i in self.sampler.indices(base, micro)])


def _ignore_stop_signals(worker_id: int) -> None:
    """A worker ignores SIGTERM and SIGINT: `timeout`, job schedulers and Ctrl-C signal the whole process group, and
    the training loop, which stops after its step with a checkpoint, still needs its workers for that step (the
    loader ends them when it closes; they also exit when the training process dies)."""
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


def micro_batch_loader(
    mixture: Mixture, sampler: DistributedSampler, start: int, steps: int, workers: int = 2, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """The :class:`MicroBatches` of ``steps`` steps in order, built by ``workers`` processes (0: this one), each
    keeping 4 ahead; ``pin_memory`` for fast copies to a GPU."""
    return torch.utils.data.DataLoader(
        MicroBatches(mixture, sampler, start, steps),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        worker_init_fn=_ignore_stop_signals if workers else None,
    )
