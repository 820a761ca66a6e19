"""The training loop: `train(cfg, resume=...)`.

One process, or one per rank under torchrun. Rank 0 alone logs (progress bar, metrics.jsonl,
TensorBoard) and writes checkpoints. Every example is a function of the data position, which is
checkpointed with the model, optimizer, scheduler and every rank's RNG state, so resuming gives
exactly the losses of an uninterrupted run. SIGTERM or SIGINT (a job scheduler's time limit, `timeout`,
Ctrl-C) stops the run after the current step with a checkpoint; a second signal stops it at once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ramba.data.mixture import DistributedSampler, Mixture, TaskStream, TokenWindows, collate
from ramba.data.tasks import MixedHaystack, TemplateHaystack, TokenFileHaystack, make_task
from ramba.data.tokenizer import load_tokenizer
from ramba.data.tokens import TokenFile
from ramba.errors import CheckpointError, ConfigError, InputError, ModelLoadError
from ramba.files import check_output, write_text_atomic
from ramba.layers.mamba2 import set_compile_glue
from ramba.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ramba.train.config import TrainConfig
from ramba.train.cuda_graph import GraphedLoss
from ramba.train.distributed import (
    DistInfo,
    all_reduce_mean,
    any_rank,
    gather_objects,
    init_distributed,
    shutdown_distributed,
    wrap_model,
)
from ramba.train.evaluate import eval_loss, eval_task
from ramba.train.lock import RunLock
from ramba.train.schedule import make_scheduler

__all__ = ["train", "build_model", "build_data"]

logger = logging.getLogger(__name__)


def build_model(cfg: TrainConfig, tokenizer):
    """The RambaForCausalLM described by `cfg.model`, checked against the tokenizer's vocabulary."""
    from ramba.model import RambaConfig, RambaForCausalLM

    m = cfg.model
    if m.init_from is not None:
        model = _initial_weights(m.init_from, m.verify)
    else:
        try:
            if m.preset is not None:
                mcfg = RambaConfig.preset(m.preset, **m.overrides)
            else:
                mcfg = RambaConfig(**m.overrides)
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"config keys 'model.preset'/'model.overrides': {e}") from None
        model = RambaForCausalLM(mcfg)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model vocab_size {model.config.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} "
            f"({tokenizer.name}); set model.overrides.vocab_size to at least {tokenizer.vocab_size}"
        )
    return model


def _initial_weights(spec: str, verify: bool):
    """The model `model.init_from` names (anything `ramba.model.loading.resolve_model` accepts), in fp32 on the CPU."""
    from ramba.model.loading import load_model

    try:
        return load_model(spec, "cpu", torch.float32, verify=verify).train()
    except ModelLoadError as e:
        raise ModelLoadError(f"config key 'model.init_from': {e}") from None


def _holdout_start(tf: TokenFile, holdout: float) -> int:
    return len(tf) - int(round(len(tf) * holdout))


def build_data(cfg: TrainConfig, tokenizer):
    """`(train Mixture, eval sources)`; eval sources are `(name, TokenWindows)` over each token
    file's held-out tail. Opening checks every token file against the tokenizer."""
    d, seq = cfg.data, cfg.data.seq_len
    files: dict[str, TokenFile] = {}

    def open_file(path: str, key: str) -> TokenFile:
        if path not in files:
            if not Path(path).exists():
                raise FileNotFoundError(
                    f"config key '{key}': no such token file: {path} (create it with `ramba prepare`)"
                )
            tf = TokenFile(path)
            tf.check_tokenizer(tokenizer)
            files[path] = tf
        return files[path]

    sources, weights, evals = [], [], []
    for i, s in enumerate(d.sources):
        seed = cfg.seed * 1000 + i
        if s.path is not None:
            tf = open_file(s.path, f"data.sources.{i}.path")
            cut = _holdout_start(tf, d.holdout)
            sources.append(TokenWindows(tf, seq, seed, 0, cut))
            if cut + seq <= len(tf):
                evals.append((Path(s.path).name, TokenWindows(tf, seq, seed + 500, cut, len(tf))))
            elif cfg.eval.every:
                logger.warning(
                    "%s: held-out part (%d tokens) is shorter than seq_len %d; no eval loss for it",
                    s.path,
                    len(tf) - cut,
                    seq,
                )
        else:
            if s.haystack:
                paths = [s.haystack] if isinstance(s.haystack, str) else s.haystack
                tfs = [open_file(path, f"data.sources.{i}.haystack") for path in paths]
                hays = [TokenFileHaystack(tf, tokenizer, 0, _holdout_start(tf, d.holdout)) for tf in tfs]
                hay = hays[0] if len(hays) == 1 else MixedHaystack(hays)
            else:
                hay = TemplateHaystack(tokenizer)
            try:
                task = make_task(s.task, tokenizer, hay, **s.params)
                sources.append(TaskStream(task, seq, seed, s.depth, s.loss_on_prompt))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"config key 'data.sources.{i}': {e}") from None
        weights.append(s.weight)
    return Mixture(sources, weights, cfg.seed), evals


def sequence_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged per sequence, then over the sequences that have labels.

    logits ``[B, T, V]``, labels ``[B, T]`` (-100: no loss; shifted inside, as the model's own loss).
    """
    targets = labels[:, 1:]
    per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
    counts = (targets != -100).sum(dim=1)
    per_sequence = per_token.sum(dim=1) / counts.clamp_min(1)
    return per_sequence.sum() / (counts > 0).sum().clamp_min(1)


def _loss(model, ids: torch.Tensor, labels: torch.Tensor, average: str) -> torch.Tensor:
    if average == "token":
        return model(input_ids=ids, labels=labels).loss
    return sequence_mean_loss(model(input_ids=ids).logits, labels)


def _rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _Logger:
    """Rank-0 metrics sink: metrics.jsonl and TensorBoard."""

    def __init__(self, cfg: TrainConfig, out: Path, enabled: bool):
        self.jsonl = open(out / "metrics.jsonl", "a") if enabled and cfg.log.jsonl else None
        self.tb = None
        if enabled and cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                logger.warning("tensorboard is not installed; install it or set log.tensorboard: false")

    def write(self, step: int, metrics: dict) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _resolve_resume(resume, ckpt_root: Path) -> Path | None:
    if resume in (None, False):
        return None
    if resume is True or resume == "auto":
        path = latest_checkpoint(ckpt_root)
        if path is None:
            logger.warning("--resume: no checkpoint under %s yet; starting from scratch", ckpt_root)
        return path
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume: no such checkpoint folder: {path}")
    return path


class StopSignals:
    """While entered (in the main thread), SIGTERM and SIGINT only record their name in `received`, for
    the loop to stop at the end of its step (on every rank, after a checkpoint); a second signal raises
    KeyboardInterrupt at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            raise KeyboardInterrupt(f"{name} after {self.received}")
        self.received = name
        logger.warning("%s received: stopping after this step with a checkpoint (again to stop at once)", name)


def train(cfg: TrainConfig, resume: str | bool | None = None) -> dict:
    """Trains per `cfg`; `resume` is True/'auto' (newest checkpoint under out_dir) or a checkpoint
    path. Returns the last logged metrics (on every rank), with `stopped_at_step` when a signal ended
    the run early."""
    if cfg.device is not None:
        from ramba.model.loading import resolve_device

        try:
            resolve_device(cfg.device)
        except InputError as e:
            raise ConfigError(f"config key 'device': {e}") from None
    check_output(cfg.out_dir, folder=True, exist_ok=True, what="out_dir")
    info = init_distributed(cfg.distributed.backend, cfg.device)
    finished = False
    try:
        metrics = _locked_train(cfg, resume, info)
        finished = True
        return metrics
    finally:
        shutdown_distributed(wait_for_all=finished)


def _locked_train(cfg: TrainConfig, resume, info: DistInfo) -> dict:
    """`_train` holding the lock of out_dir (rank 0 takes it for every rank)."""
    lock, refused = RunLock(cfg.out_dir), None
    if info.is_main:
        try:
            lock.acquire()
        except CheckpointError as e:
            refused = e
    if any_rank(refused is not None, info.device):
        raise refused or CheckpointError(f"out_dir {cfg.out_dir}: rank 0 could not take the run lock (see its error)")
    try:
        return _train(cfg, resume, info)
    finally:
        lock.release()


def _train(cfg: TrainConfig, resume, info: DistInfo) -> dict:
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    mixture, eval_sources = build_data(cfg, tokenizer)
    resume_path = _resolve_resume(resume, ckpt_root)
    if resume in (None, False) and latest_checkpoint(ckpt_root) is not None:
        raise ConfigError(
            f"out_dir {out} already holds checkpoints ({latest_checkpoint(ckpt_root).name}); pass --resume to continue "
            "that run, or choose another out_dir"
        )
    eval_tasks = []
    for name in cfg.eval.tasks:
        try:
            eval_tasks.append(make_task(name, tokenizer))
            eval_tasks[-1].generate(cfg.data.seq_len, 0.5, seed=0)
        except ValueError as e:
            raise ConfigError(f"config key 'eval.tasks': {e}") from None

    if cfg.cuda_graph and (info.device.type != "cuda" or info.enabled):
        raise ConfigError(
            f"config key 'cuda_graph': needs a single CUDA process, got device {info.device} with {info.world_size} "
            "rank(s); turn it off"
        )
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(cfg, tokenizer).to(info.device)
    if cfg.grad_checkpointing:
        # transformers 5 renamed gradient_checkpointing_enable (now deprecated) to activation_checkpointing_enable.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    set_compile_glue(model, cfg.compile_glue)
    model = wrap_model(model, info, cfg.distributed.strategy)
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps
    )
    scheduler = make_scheduler(optimizer, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps, cfg.max_steps)

    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and info.device.type == "cuda")
    autocast = (
        # autocast's cast cache would live in the CUDA graph's memory: off when capturing
        functools.partial(
            torch.autocast, device_type=info.device.type, dtype=torch.bfloat16, cache_enabled=not cfg.cuda_graph
        )
        if use_bf16
        else contextlib.nullcontext
    )
    sampler = DistributedSampler(cfg.micro_batch, cfg.grad_accum, info.rank, info.world_size)

    step, examples = 0, 0
    if resume_path is not None:
        state = load_checkpoint(resume_path, model, optimizer)
        fresh = dict(scheduler.lr_lambdas[0].__dict__)
        scheduler.load_state_dict(state["scheduler"])
        if scheduler.lr_lambdas[0].__dict__ != fresh:
            logger.warning(
                "the schedule changed since the checkpoint (%s -> %s); following the config",
                scheduler.lr_lambdas[0].__dict__,
                fresh,
            )
            scheduler.lr_lambdas[0].__dict__.update(fresh)
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base * scheduler.lr_lambdas[0](scheduler.last_epoch)
        step, examples = int(state["step"]), int(state["examples"])
        rngs = state["rng"]
        if len(rngs) == info.world_size:
            _set_rng_state(rngs[info.rank], info.device)
        else:
            logger.warning(
                "checkpoint was written by %d ranks, now %d: RNG states not restored", len(rngs), info.world_size
            )
        if info.is_main:
            logger.info("resumed from %s at step %d (%d examples consumed)", resume_path, step, examples)

    if info.is_main:
        write_text_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
    log = _Logger(cfg, out, info.is_main)
    eval_batches = [
        (
            name,
            [
                collate([src.example(j) for j in range(b * cfg.micro_batch, (b + 1) * cfg.micro_batch)])
                for b in range(cfg.eval.batches)
            ],
        )
        for name, src in eval_sources
    ]

    def evaluate(at: int) -> dict:
        model.eval()
        metrics = {}
        for name, batches in eval_batches:
            metrics[f"eval/loss/{name}"] = eval_loss(model, batches, info.device, autocast)
        if eval_batches:
            metrics["eval/loss"] = float(np.mean([metrics[f"eval/loss/{n}"] for n, _ in eval_batches]))
        for task in eval_tasks:
            metrics[f"eval/{task.name}"] = eval_task(
                model, task, cfg.data.seq_len, cfg.eval.task_samples, cfg.micro_batch, info.device, autocast
            )
        model.train()
        if info.is_main:
            log.write(at, metrics)
            logger.info("step %d eval: %s", at, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def checkpoint(at: int) -> None:
        state = {
            "step": at,
            "examples": examples,
            "scheduler": scheduler.state_dict(),
            "rng": gather_objects(_rng_state(info.device)),
            "world_size": info.world_size,
            "config": cfg.to_dict(),
        }
        save_checkpoint(ckpt_root, at, model, optimizer, state, cfg.checkpoint.keep, info.is_main)

    tokens_per_step = sampler.examples_per_step * cfg.data.seq_len
    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not (info.is_main and cfg.log.progress),
        dynamic_ncols=True,
    )

    def micro_loss(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One micro-batch's loss, scaled so that the micro-batches' gradients add up to the step's."""
        with autocast():
            return _loss(model, ids, labels, cfg.loss_average) / cfg.grad_accum

    graphed = GraphedLoss(micro_loss, model.parameters()) if cfg.cuda_graph else None
    last: dict = {}
    model.train()
    # Throughput counts training steps only, not evaluation or checkpoint time.
    busy, steps_since = 0.0, 0
    with StopSignals() as stop:
        try:
            while step < cfg.max_steps:
                t0 = time.perf_counter()
                loss_sum = torch.zeros((), device=info.device)
                for micro in range(cfg.grad_accum):
                    ids, labels = collate([mixture.example(i) for i in sampler.indices(examples, micro)])
                    ids, labels = ids.to(info.device), labels.to(info.device)
                    if graphed is not None:
                        loss = graphed(ids, labels)
                    else:
                        sync = micro == cfg.grad_accum - 1 or not hasattr(model, "no_sync")
                        with contextlib.nullcontext() if sync else model.no_sync():
                            loss = micro_loss(ids, labels)
                        loss.backward()
                    loss_sum += loss.detach().float()
                if cfg.optim.grad_clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                else:
                    grad_norm = torch.nn.utils.get_total_norm(
                        [p.grad for p in model.parameters() if p.grad is not None]
                    )
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                # a CUDA graph writes the .grad tensors it captured: zero them, keep them
                optimizer.zero_grad(set_to_none=graphed is None)
                step += 1
                examples += sampler.examples_per_step
                steps_since += 1
                if info.device.type == "cuda":
                    torch.cuda.synchronize(info.device)
                busy += time.perf_counter() - t0

                if step % cfg.log.every == 0 or step == cfg.max_steps:
                    loss_val = all_reduce_mean(loss_sum).item()
                    if not math.isfinite(loss_val):
                        raise FloatingPointError(f"step {step}: loss is {loss_val}; lower optim.lr or check the data")
                    tok_s = tokens_per_step * steps_since / max(busy, 1e-9)
                    busy, steps_since = 0.0, 0
                    last = {
                        "loss": loss_val,
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "tokens_per_s": tok_s,
                        "tokens": examples * cfg.data.seq_len,
                    }
                    if info.is_main:
                        log.write(step, last)
                        bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}")
                bar.update(1)
                if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.max_steps):
                    last = {**last, **evaluate(step)}
                saved = bool(cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == cfg.max_steps
                if saved:
                    checkpoint(step)
                if step < cfg.max_steps and any_rank(stop.received is not None, info.device):
                    if not saved:
                        checkpoint(step)
                    logger.warning("stopped at step %d by a signal (checkpoint saved); continue with --resume", step)
                    last = {**last, "stopped_at_step": step}
                    break
        finally:
            bar.close()
            log.close()
    return last
