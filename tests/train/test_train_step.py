"""The shared training step (ramba.train.step) against a step written out by hand, in float64 on the CPU; the
benchmark runs the same step; the FLOPs count against the parameter count and a brute-force key count.
(DataLoader workers and torchrun against one process: tests/train/test_train_loop.py.)"""

import random

import pytest
import torch

import ramba.bench.train as bench_train
from ramba import RambaConfig, RambaForCausalLM
from ramba.model.config import LayerKind
from ramba.train.flops import _mean_keys, flops_per_token, peak_flops
from ramba.train.step import TrainStep, make_optimizer, sequence_mean_loss
from small_models import SMALL


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return RambaForCausalLM(RambaConfig(**{**SMALL, **overrides})).double().train()


def _batches(seed, n, batch=2, length=48):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, SMALL["vocab_size"], (batch, length), generator=g)
        labels = ids.clone()
        labels[:, : int(torch.randint(0, length // 2, (1,), generator=g))] = -100  # an answer-only loss
        out.append((ids, labels))
    return out


@pytest.mark.parametrize("loss_average", ["token", "sequence"])
@pytest.mark.parametrize("grad_accum,grad_clip", [(1, 0.0), (2, 0.05), (3, 1e9)])
def test_step_equals_a_hand_written_step(loss_average, grad_accum, grad_clip):
    """Losses, gradient norms and weights after three steps, each at its own learning rate, to float64 rounding."""
    ours, theirs = _model(), _model()
    opt_ours = make_optimizer(ours, lr=1.0, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    decay = [p for p in theirs.parameters() if p.dim() >= 2]
    no_decay = [p for p in theirs.parameters() if p.dim() < 2]
    opt_theirs = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1.0,
        betas=(0.9, 0.95),
        eps=1e-8,
        foreach=False,
    )
    step = TrainStep(ours, opt_ours, grad_accum=grad_accum, grad_clip=grad_clip, loss_average=loss_average)
    for k, lr in enumerate([3e-3, 1e-3, 2e-4]):
        micro = _batches(100 + k, grad_accum)
        loss, norm = step(micro, lr)
        want_loss = 0.0
        for ids, labels in micro:
            if loss_average == "token":
                part = theirs(input_ids=ids, labels=labels).loss
            else:
                part = sequence_mean_loss(theirs(input_ids=ids).logits, labels)
            (part / grad_accum).backward()
            want_loss += part.item() / grad_accum
        grads = [p.grad for p in theirs.parameters() if p.grad is not None]
        want_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if grad_clip > 0 and want_norm > grad_clip:
            for g in grads:
                g.mul_(grad_clip / (want_norm + 1e-6))
        for group in opt_theirs.param_groups:
            group["lr"] = lr
        opt_theirs.step()
        opt_theirs.zero_grad()
        assert loss.item() == pytest.approx(want_loss, rel=1e-6)  # the loss is summed in float32 for logging
        assert norm.item() == pytest.approx(want_norm.item(), rel=1e-10)
        assert all(p.grad is None for p in ours.parameters())
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_accumulated_micro_batches_equal_one_batch():
    """Two micro-batches of 2 (token-mean loss, all tokens labelled) take the step one batch of 4 takes."""
    ids = torch.randint(3, SMALL["vocab_size"], (4, 40), generator=torch.Generator().manual_seed(1))
    models = [_model(), _model()]
    steps = [TrainStep(m, make_optimizer(m, 1e-3, 0.1), grad_accum=n, grad_clip=1.0) for m, n in zip(models, (2, 1))]
    loss_a, norm_a = steps[0]([(ids[:2], ids[:2]), (ids[2:], ids[2:])], 1e-3)
    loss_b, norm_b = steps[1]([(ids, ids)], 1e-3)
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-6)
    assert norm_a.item() == pytest.approx(norm_b.item(), rel=1e-10)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_average", ["token", "sequence"])
def test_retrieval_loss_adds_its_weighted_gradient(loss_average):
    """With a retrieval_loss weight the step trains on LM loss + weight x the model's retrieval loss."""
    ours, theirs = _model(), _model()
    step = TrainStep(ours, make_optimizer(ours, 1e-3, 0.1), grad_accum=2, loss_average=loss_average, retrieval_loss=0.5)
    opt = make_optimizer(theirs, 1e-3, 0.1)
    micro = []
    for k, (ids, labels) in enumerate(_batches(7, 2, length=64)):
        g = torch.Generator().manual_seed(k)
        targets = torch.full((*ids.shape, 2), -1, dtype=torch.long)
        t = torch.randint(40, 64, (ids.shape[0],), generator=g)
        targets[torch.arange(ids.shape[0]), t] = torch.tensor([1, 1])
        micro.append((ids, labels, targets))
    loss, _ = step(micro, 1e-3)
    want = 0.0
    for ids, labels, targets in micro:
        out = theirs(input_ids=ids, labels=labels, retrieval_targets=targets)
        lm = out.loss if loss_average == "token" else sequence_mean_loss(out.logits, labels)
        assert out.retrieval_loss.item() > 0
        part = (lm + 0.5 * out.retrieval_loss) / 2
        part.backward()
        want += part.item()
    opt.step()
    assert loss.item() == pytest.approx(want, rel=1e-6)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="exactly when the retrieval_loss weight is set"):
        step([m[:2] for m in micro], 1e-3)
    plain = TrainStep(theirs, opt, grad_accum=2)
    with pytest.raises(ValueError, match="exactly when the retrieval_loss weight is set"):
        plain(micro, 1e-3)


def test_step_refuses_a_wrong_number_of_micro_batches_and_bad_settings():
    m = _model()
    step = TrainStep(m, make_optimizer(m, 1e-3, 0.0), grad_accum=2)
    with pytest.raises(ValueError, match="expected 2 micro-batches, got 1"):
        step(_batches(0, 1), 1e-3)
    with pytest.raises(ValueError, match="loss_average"):
        TrainStep(m, make_optimizer(m, 1e-3, 0.0), loss_average="mean")
    with pytest.raises(ValueError, match="grad_accum"):
        TrainStep(m, make_optimizer(m, 1e-3, 0.0), grad_accum=0)
    m.loss_backend = "liger"
    with pytest.raises(ValueError, match="cannot be captured"):
        TrainStep(m, make_optimizer(m, 1e-3, 0.0), cuda_graph=True)


def test_make_optimizer_decays_matrices_only_and_picks_foreach_off_cuda():
    m = _model()
    opt = make_optimizer(m, 1e-3, 0.1)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(m.parameters()))
    assert opt.defaults["foreach"] and not opt.defaults["fused"]


def test_the_benchmark_times_the_training_step(monkeypatch):
    """`ramba bench train` builds its step from ramba.train.step: a spy sees its calls, and a row reports FLOPs."""
    calls = []
    real = bench_train.TrainStep.__call__

    def spy(self, micro, lr):
        calls.append((len(micro), self.grad_clip))
        return real(self, micro, lr)

    monkeypatch.setattr(bench_train.TrainStep, "__call__", spy)
    config = RambaConfig(**SMALL)
    row = bench_train.measure(config, 32, 2, 2, 1, torch.device("cpu"), False, 0)
    assert calls == [(1, 1.0)] * 3  # warmup + timed steps, clipping at ramba train's default
    torch.manual_seed(0)
    assert row["flops_per_token"] == flops_per_token(RambaForCausalLM(config), 32)["total"]
    assert "mfu" not in row  # no GPU peak on the CPU


def test_the_benchmark_refuses_a_graph_with_the_fused_loss(capsys):
    with pytest.raises(SystemExit):
        bench_train.main(["--cuda-graph", "--fused-loss"])
    assert "--cuda-graph and --fused-loss" in capsys.readouterr().err


def _non_linear_params(model):
    """Parameters outside nn.Linear layers (embeddings, norms, convolutions, SSM vectors, summary tokens)."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return sum(p.numel() for p in model.parameters() if id(p) not in linear)


@pytest.mark.parametrize("architecture", ["ramba", "mamba2", "transformer", "mamba2-swa"])
def test_flops_per_token_terms(architecture):
    config = RambaConfig(**{**SMALL, "architecture": architecture, "tie_embeddings": False})
    model = RambaForCausalLM(config)
    T = 256
    f = flops_per_token(model, T)
    params = sum(p.numel() for p in model.parameters())
    assert f["matmul"] == 6 * (params - _non_linear_params(model))  # the untied LM head is a Linear, counted
    assert f["total"] == pytest.approx(sum(v for k, v in f.items() if k != "total"))
    plan = config.layer_plan()
    c = config
    assert f["hsa"] == 3 * plan.count(LayerKind.HSA) * 4 * c.n_heads * c.head_dim * c.topk * c.chunk_size
    if architecture == "transformer":
        assert f["attention"] == pytest.approx(3 * len(plan) * 4 * c.n_heads * c.head_dim * (T + 1) / 2)
    if architecture == "mamba2":
        assert f["attention"] == f["hsa"] == f["selection"] == 0 and f["ssd"] > 0
    if architecture == "ramba":
        assert f["selection"] > 0 and f["attention"] > 0  # the chunk encoder attends inside each chunk


def test_mean_keys_matches_counting():
    rng = random.Random(0)
    for _ in range(50):
        T, W = rng.randint(1, 300), rng.randint(1, 400)
        assert _mean_keys(T, W) == pytest.approx(sum(min(t + 1, W) for t in range(T)) / T)
    assert peak_flops(torch.device("cpu")) is None


@pytest.mark.parametrize("architecture", ["ramba", "mamba2", "transformer", "mamba2-swa"])
def test_step_under_bf16_autocast_matches_float32(architecture):
    """The step under bf16 autocast (as on a GPU) runs every layout and lands near the float32 step: autocast
    hands the ops bf16 tensors they must accept (chunk selection once failed on bf16 scores)."""
    losses = []
    for autocast in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = RambaForCausalLM(RambaConfig(**{**SMALL, "architecture": architecture})).train()
        opt = make_optimizer(model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
        step = TrainStep(model, opt, grad_accum=1, grad_clip=1.0, autocast_dtype=autocast)
        loss, norm = step(_batches(7, 1), 1e-3)
        assert torch.isfinite(loss) and torch.isfinite(norm)
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=0.02)
