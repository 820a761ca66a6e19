"""The training loop: `train(cfg, resume=...)`.

One process, or one per rank under torchrun. Rank 0 alone logs (progress bar, metrics.jsonl,
TensorBoard) and writes checkpoints. Every example is a function of the data position, which is
checkpointed with the model, optimizer and every rank's RNG state (the learning rate is a function of
the step), so resuming gives
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
from tqdm.auto import tqdm

from ramba.data.mixture import DistributedSampler, Mixture, TaskStream, TokenWindows, collate, micro_batch_loader
from ramba.data.tasks import MixedHaystack, TemplateHaystack, TokenFileHaystack, make_task
from ramba.data.tokenizer import load_tokenizer
from ramba.data.tokens import TokenFile
from ramba.errors import CheckpointError, ConfigError, InputError, ModelLoadError
from ramba.files import check_output, write_text_atomic
from ramba.layers.mamba2 import set_compile_glue
from ramba.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ramba.train.config import TrainConfig
from ramba.train.cuda_graph import use_cuda_graph
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
from ramba.train.flops import flops_per_token, peak_flops
from ramba.train.lock import RunLock
from ramba.train.schedule import WarmupCosine
from ramba.train.step import TrainStep, make_optimizer

__all__ = ["train", "build_model", "build_data"]

logger = logging.getLogger(__name__)


def build_model(cfg: TrainConfig, tokenizer):
    """The RambaForCausalLM described by `cfg.model`, checked against the tokenizer's vocabulary."""
    from ramba.model import RambaConfig, RambaForCausalLM

    m = cfg.model
    if m.init_from is not None:
        model = _initial_weights(m.init_from, m.verify)
        if m.overrides:
            model = _with_overrides(model, m.overrides)
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


def _with_overrides(model, overrides: dict):
    """`model` rebuilt with the config fields `overrides` changed and every weight kept: only fields that leave the
    weights' names and shapes as they are (e.g. sm_n, weight_norm, topk, window) can change in a continuation."""
    from ramba.model import RambaConfig, RambaForCausalLM

    try:
        config = RambaConfig.from_dict({**model.config.to_dict(), **overrides})
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"config key 'model.overrides': {e}") from None
    rebuilt = RambaForCausalLM(config)
    try:
        rebuilt.load_state_dict(model.state_dict())
    except RuntimeError as e:
        problem = str(e).strip().splitlines()[-1].strip()[:200]
        raise ConfigError(
            f"config key 'model.overrides': {sorted(overrides)} change the weights of model.init_from ({problem}); "
            "a continuation keeps its architecture, so only fields such as sm_n, weight_norm, topk or window can change"
        ) from None
    return rebuilt.train()


def _holdout_start(tf: TokenFile, holdout: float) -> int:
    return len(tf) - int(round(len(tf) * holdout))


def build_data(cfg: TrainConfig, tokenizer, retrieval_chunk_size: int = 0):
    """`(train Mixture, eval sources)`; eval sources are `(name, TokenWindows)` over each token
    file's held-out tail. Opening checks every token file against the tokenizer. With `retrieval_chunk_size`
    (the model's chunk size, for `cfg.retrieval_loss`) every training example carries `retrieval_targets`."""
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
                sources.append(TaskStream(task, seq, seed, s.depth, s.loss_on_prompt, retrieval_chunk_size))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"config key 'data.sources.{i}': {e}") from None
        weights.append(s.weight)
    return Mixture(sources, weights, cfg.seed, retrieval_targets=bool(retrieval_chunk_size)), evals


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
    """`Trainer(cfg, info).run(resume)` holding the lock of out_dir (rank 0 takes it for every rank)."""
    lock, refused = RunLock(cfg.out_dir), None
    if info.is_main:
        try:
            lock.acquire()
        except CheckpointError as e:
            refused = e
    if any_rank(refused is not None, info.device):
        raise refused or CheckpointError(f"out_dir {cfg.out_dir}: rank 0 could not take the run lock (see its error)")
    try:
        return Trainer(cfg, info).run(resume)
    finally:
        lock.release()


class StepTimer:
    """Seconds the loop spends between ``start()`` and ``stop()``: CUDA events on CUDA, so that timing needs no
    sync until ``read()``; the host clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._open, self._spans = None, []

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self._open = self._now()

    def stop(self) -> None:
        if self._open is not None:
            self._spans.append((self._open, self._now()))
            self._open = None

    def read(self) -> float:
        """Seconds of the spans stopped since the last ``read()`` (waits for the GPU to reach them)."""
        if self.cuda and self._spans:
            self._spans[-1][1].synchronize()
        seconds = sum(a.elapsed_time(b) / 1e3 if self.cuda else b - a for a, b in self._spans)
        self._spans = []
        return seconds


class Trainer:
    """One rank's training run: data, model, optimizer and :class:`~ramba.train.step.TrainStep` from ``cfg``
    (built here), then :meth:`run`: resume, the loop, evaluation, logging and checkpoints."""

    def __init__(self, cfg: TrainConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.out = Path(cfg.out_dir)
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.eval_tasks = []
        for name in cfg.eval.tasks:
            try:
                self.eval_tasks.append(make_task(name, tokenizer))
                self.eval_tasks[-1].generate(cfg.data.seq_len, 0.5, seed=0)
            except ValueError as e:
                raise ConfigError(f"config key 'eval.tasks': {e}") from None
        if cfg.cuda_graph and (info.device.type != "cuda" or info.enabled):
            raise ConfigError(
                f"config key 'cuda_graph': needs a single CUDA process, got device {info.device} with "
                f"{info.world_size} rank(s); turn it off"
            )
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        model = build_model(cfg, tokenizer).to(info.device)
        if cfg.retrieval_loss and "retrieval" not in model.model.layer_kinds:
            raise ConfigError(
                f"config key 'retrieval_loss': the model (architecture {model.config.architecture!r}) has no "
                "retrieval layer; set retrieval_loss: 0"
            )
        self.mixture, eval_sources = build_data(cfg, tokenizer, model.config.chunk_size if cfg.retrieval_loss else 0)
        if cfg.grad_checkpointing:
            # transformers 5 renamed gradient_checkpointing_enable (now deprecated) to activation_checkpointing_enable.
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        set_compile_glue(model, cfg.compile_glue)
        model.loss_backend = "liger" if cfg.fused_loss else None
        self.flops_per_token = flops_per_token(model, cfg.data.seq_len)["total"]
        self.peak_flops = peak_flops(info.device)
        self.model = wrap_model(model, info, cfg.distributed.strategy)
        o = cfg.optim
        self.optimizer = make_optimizer(self.model, o.lr, o.weight_decay, o.betas, o.eps)
        self.schedule = WarmupCosine(o.lr, o.min_lr, o.warmup_steps, cfg.max_steps)
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and info.device.type == "cuda")
        dtype = torch.bfloat16 if bf16 else None
        self.autocast = (
            functools.partial(torch.autocast, device_type=info.device.type, dtype=dtype)
            if bf16
            else contextlib.nullcontext
        )
        graph = use_cuda_graph(cfg.cuda_graph, info.device, info.world_size, cfg.grad_checkpointing, cfg.fused_loss)
        self.train_step = TrainStep(
            self.model, self.optimizer, cfg.grad_accum, o.grad_clip, cfg.loss_average, dtype, graph, cfg.retrieval_loss
        )
        self.sampler = DistributedSampler(cfg.micro_batch, cfg.grad_accum, info.rank, info.world_size)
        self.eval_batches = [
            (
                name,
                [
                    collate([src.example(j) for j in range(b * cfg.micro_batch, (b + 1) * cfg.micro_batch)])
                    for b in range(cfg.eval.batches)
                ],
            )
            for name, src in eval_sources
        ]
        self.step = self.examples = 0

    def resume(self, path: Path) -> None:
        """Model, optimizer, data position and this rank's RNG states from the checkpoint at ``path``."""
        state = load_checkpoint(path, self.model, self.optimizer)
        self.step, self.examples = int(state["step"]), int(state["examples"])
        rngs, info = state["rng"], self.info
        if len(rngs) == info.world_size:
            _set_rng_state(rngs[info.rank], info.device)
        else:
            logger.warning(
                "checkpoint was written by %d ranks, now %d: RNG states not restored", len(rngs), info.world_size
            )
        if info.is_main:
            logger.info("resumed from %s at step %d (%d examples consumed)", path, self.step, self.examples)

    def evaluate(self, log: _Logger) -> dict:
        """Held-out losses and task scores now, logged."""
        cfg, info = self.cfg, self.info
        self.model.eval()
        metrics = {}
        for name, batches in self.eval_batches:
            metrics[f"eval/loss/{name}"] = eval_loss(self.model, batches, info.device, self.autocast)
        if self.eval_batches:
            metrics["eval/loss"] = float(np.mean([metrics[f"eval/loss/{n}"] for n, _ in self.eval_batches]))
        for task in self.eval_tasks:
            metrics[f"eval/{task.name}"] = eval_task(
                self.model, task, cfg.data.seq_len, cfg.eval.task_samples, cfg.micro_batch, info.device, self.autocast
            )
        self.model.train()
        if info.is_main:
            log.write(self.step, metrics)
            logger.info("step %d eval: %s", self.step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def checkpoint(self) -> None:
        state = {
            "step": self.step,
            "examples": self.examples,
            "rng": gather_objects(_rng_state(self.info.device)),
            "world_size": self.info.world_size,
            "config": self.cfg.to_dict(),
        }
        save_checkpoint(
            self.out / "checkpoints",
            self.step,
            self.model,
            self.optimizer,
            state,
            self.cfg.checkpoint.keep,
            self.info.is_main,
        )

    def metrics(self, loss: torch.Tensor, grad_norm: torch.Tensor, seconds: float, steps: int) -> dict:
        """The logged metrics of the last step (loss, lr, gradient norm) and of the last ``steps`` steps (rates)."""
        loss_val = all_reduce_mean(loss).item()
        if not math.isfinite(loss_val):
            raise FloatingPointError(f"step {self.step}: loss is {loss_val}; lower optim.lr or check the data")
        tokens_per_s = steps * self.sampler.examples_per_step * self.cfg.data.seq_len / max(seconds, 1e-9)
        out = {
            "loss": loss_val,
            "lr": self.schedule(self.step - 1),
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens_per_s,
            "tokens": self.examples * self.cfg.data.seq_len,
        }
        if self.peak_flops is not None:  # model FLOPs utilisation against the data sheet's bf16 peak of every GPU
            out["mfu"] = tokens_per_s * self.flops_per_token / (self.peak_flops * self.info.world_size)
        return out

    def start(self, resume=None) -> None:
        """Resume per ``resume`` (see :func:`train`), refusing a folder with checkpoints when not resuming; write
        config.json."""
        ckpt_root = self.out / "checkpoints"
        path = _resolve_resume(resume, ckpt_root)
        if resume in (None, False) and latest_checkpoint(ckpt_root) is not None:
            raise ConfigError(
                f"out_dir {self.out} already holds checkpoints ({latest_checkpoint(ckpt_root).name}); pass --resume "
                "to continue that run, or choose another out_dir"
            )
        if path is not None:
            self.resume(path)
        if self.info.is_main:
            write_text_atomic(self.out / "config.json", json.dumps(self.cfg.to_dict(), indent=2))

    def run(self, resume=None) -> dict:
        """Trains to ``cfg.max_steps`` (see :func:`train`); the last logged metrics."""
        cfg, info = self.cfg, self.info
        self.start(resume)
        loader = micro_batch_loader(
            self.mixture,
            self.sampler,
            self.examples,
            cfg.max_steps - self.step,
            cfg.data.workers,
            info.device.type == "cuda",
        )
        log, batches, timer = _Logger(cfg, self.out, info.is_main), iter(loader), StepTimer(info.device)
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not (info.is_main and cfg.log.progress),
            dynamic_ncols=True,
        )
        last, window = {}, 0
        self.model.train()
        with StopSignals() as stop:
            try:
                timer.start()  # tokens/s counts the steps only, not evaluation, checkpoints or logging
                while self.step < cfg.max_steps:
                    micro = [
                        [t.to(info.device, non_blocking=True) for t in next(batches)] for _ in range(cfg.grad_accum)
                    ]
                    loss, grad_norm = self.train_step(micro, self.schedule(self.step))
                    self.step, window = self.step + 1, window + 1
                    self.examples += self.sampler.examples_per_step
                    bar.update(1)
                    end = self.step == cfg.max_steps
                    logging_now = self.step % cfg.log.every == 0 or end
                    evaluating = bool(cfg.eval.every) and (self.step % cfg.eval.every == 0 or end)
                    saving = bool(cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or end
                    stopping = not end and any_rank(stop.received is not None, info.device)
                    if not (logging_now or evaluating or saving or stopping):
                        continue
                    timer.stop()
                    if logging_now:
                        last, window = self.metrics(loss, grad_norm, timer.read(), window), 0
                        if info.is_main:
                            log.write(self.step, last)
                            bar.set_postfix(
                                loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:,.0f}", lr=f"{last['lr']:.2e}"
                            )
                    if evaluating:
                        last = {**last, **self.evaluate(log)}
                    if saving or stopping:
                        self.checkpoint()
                    if stopping:
                        logger.warning(
                            "stopped at step %d by a signal (checkpoint saved); continue with --resume", self.step
                        )
                        last = {**last, "stopped_at_step": self.step}
                        break
                    timer.start()
            finally:
                del batches
                bar.close()
                log.close()
        return last
