"""Evaluation during training: held-out loss and synthetic-task scores.

Task answers are read off one forward pass (teacher forcing): the argmax at each answer position.
Given the correct prefix, greedy decoding would emit exactly these tokens up to the first
mistake, so a fully correct teacher-forced answer is a correct greedy answer, and the task's
scorer is applied to the decoded argmax tokens.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from ramba.data.mixture import collate
from ramba.data.tasks import Task

__all__ = ["eval_loss", "eval_task", "teacher_forced_answers"]


def eval_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device, autocast) -> float:
    """Mean of the per-batch losses over `batches` of `(input_ids [B, T], labels [B, T])`."""
    losses = []
    with torch.no_grad(), autocast():
        for ids, labels in batches:
            losses.append(model(input_ids=ids.to(device), labels=labels.to(device)).loss.float().item())
    return float(np.mean(losses))


def teacher_forced_answers(logits: torch.Tensor, prompt_lens: list[int]) -> list[np.ndarray]:
    """Argmax predictions of every answer token: logits `[B, T, V]` -> per row `[T - prompt_len]` ids.

    The token at position `p` is predicted by the logits at `p - 1`.
    """
    pred = logits.argmax(-1).cpu().numpy()
    return [pred[b, n - 1 : logits.shape[1] - 1] for b, n in enumerate(prompt_lens)]


def eval_task(
    model: nn.Module,
    task: Task,
    seq_len: int,
    n_samples: int,
    batch_size: int,
    device,
    autocast=contextlib.nullcontext,
    seed: int = 10**6,
) -> float:
    """Mean score of `task` over `n_samples` fixed samples at depths spread evenly over [0, 1]."""
    depths = np.linspace(0.0, 1.0, n_samples) if n_samples > 1 else np.array([0.5])
    samples = [task.generate(seq_len, float(d), seed=seed + i) for i, d in enumerate(depths)]
    scores = []
    with torch.no_grad(), autocast():
        for start in range(0, n_samples, batch_size):
            chunk = samples[start : start + batch_size]
            ids, _ = collate([(s.input_ids, s.input_ids) for s in chunk])
            logits = model(input_ids=ids.to(device)).logits
            for s, ans in zip(chunk, teacher_forced_answers(logits, [s.prompt_len for s in chunk])):
                scores.append(task.score(s, task.tokenizer.decode(ans)))
    return float(np.mean(scores))
