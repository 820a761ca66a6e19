"""GraphedLoss (the training step's forward and backward as one CUDA graph) against eager PyTorch, on every
architecture, with fresh inputs on every replay; and `ramba train` with cuda_graph against it without.

Under bf16 autocast, as models train on GPUs. Both sides run the same kernels; atomics in some backward kernels
sum in varying order, so gradients agree to bf16-level tolerances, not bit for bit.
"""

import pytest
import torch
from gpu_models import CONFIG

from ramba import RambaConfig, RambaForCausalLM
from ramba.train.cuda_graph import GraphedLoss

pytestmark = pytest.mark.gpu

ARCHITECTURES = [
    dict(architecture="ramba"),
    dict(architecture="ramba", local_mixer="swa"),
    dict(architecture="mamba2"),
    dict(architecture="mamba2-swa"),
    dict(architecture="transformer"),
    dict(architecture="mamba2-nsa"),
]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _loss_fn(model):
    def loss(ids):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return model(input_ids=ids, labels=ids).loss

    return loss


def _pair(overrides, seed=0):
    torch.manual_seed(seed)
    config = RambaConfig(**{**CONFIG, **overrides})
    eager, graphed = RambaForCausalLM(config).cuda(), RambaForCausalLM(config).cuda()
    graphed.load_state_dict(eager.state_dict())
    return eager, graphed


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("overrides", ARCHITECTURES, ids=lambda o: "-".join(o.values()))
def test_graphed_loss_matches_eager(overrides):
    """Three batches (T = 700, not a multiple of the chunk): the same loss and gradients as eager backward."""
    eager, graphed = _pair(overrides)
    step = GraphedLoss(_loss_fn(graphed), graphed.parameters())
    for i in range(3):
        ids = torch.randint(0, 256, (2, 700), device="cuda")
        eager.zero_grad(set_to_none=True)
        graphed.zero_grad(set_to_none=False)
        loss = _loss_fn(eager)(ids)
        loss.backward()
        assert abs(step(ids).item() - loss.item()) < 1e-3 * loss.item(), i
        expected, got = _grads(eager), _grads(graphed)
        assert expected.keys() == got.keys()
        for name, g in expected.items():
            assert rel_err(got[name], g) < 1e-2, (i, name)


def test_graphed_loss_with_the_retrieval_loss_matches_eager():
    """LM + retrieval loss (targets at random positions, fresh each batch, a row without any): the graph gives
    the eager loss and gradients, and the retrieval loss's gradient reaches the query projection."""
    eager, graphed = _pair({})

    def loss_fn(model):
        def loss(ids, targets):
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                out = model(input_ids=ids, labels=ids, retrieval_targets=targets)
            return out.loss + out.retrieval_loss

        return loss

    step = GraphedLoss(loss_fn(graphed), graphed.parameters())
    for i in range(3):
        ids = torch.randint(0, 256, (2, 512), device="cuda")
        targets = torch.full((2, 512, 2), -1, dtype=torch.long, device="cuda")
        pos = torch.randint(128, 512, (5,)).tolist()
        for t in pos[: 5 - i]:  # fewer targets each batch; row 1 never has any
            lo = int(torch.randint(t // 64 - 1, (1,)))
            targets[0, t] = torch.tensor([lo, lo], device="cuda")
        eager.zero_grad(set_to_none=True)
        graphed.zero_grad(set_to_none=False)
        loss = loss_fn(eager)(ids, targets)
        loss.backward()
        assert abs(step(ids, targets).item() - loss.item()) < 1e-3 * loss.item(), i
        expected, got = _grads(eager), _grads(graphed)
        assert any("q_proj" in n and g.abs().sum() > 0 for n, g in expected.items() if "layers.3." in n)
        for name, g in expected.items():
            assert rel_err(got[name], g) < 1e-2, (i, name)


def test_graphed_loss_accumulates_like_backward():
    """Two replays without zeroing add both batches' gradients, as two backward calls do; parameters the
    loss does not reach keep grad None."""
    eager, graphed = _pair({})
    unused = torch.nn.Parameter(torch.zeros(3, device="cuda"))
    step = GraphedLoss(_loss_fn(graphed), [*graphed.parameters(), unused])
    batches = [torch.randint(0, 256, (2, 256), device="cuda") for _ in range(2)]
    for ids in batches:
        _loss_fn(eager)(ids).backward()
        step(ids)
    assert unused.grad is None
    expected, got = _grads(eager), _grads(graphed)
    for name, g in expected.items():
        assert rel_err(got[name], g) < 1e-2, name


def test_graphed_training_matches_eager():
    """Five AdamW steps (fused, gradient clipping) from the same weights: the same weights after."""
    eager, graphed = _pair({}, seed=1)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True) for m in (eager, graphed)]
    step = GraphedLoss(_loss_fn(graphed), graphed.parameters())
    for _ in range(5):
        ids = torch.randint(0, 256, (2, 320), device="cuda")
        opts[0].zero_grad(set_to_none=True)
        _loss_fn(eager)(ids).backward()
        opts[1].zero_grad(set_to_none=False)
        step(ids)
        for model, opt in zip((eager, graphed), opts):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
        assert rel_err(b.detach(), a.detach()) < 1e-2, name


def test_graphed_loss_refuses_misuse():
    _, model = _pair(dict(architecture="mamba2"))
    step = GraphedLoss(_loss_fn(model), model.parameters())
    step(torch.randint(0, 256, (2, 128), device="cuda"))
    with pytest.raises(ValueError, match="captured for inputs"):
        step(torch.randint(0, 256, (2, 64), device="cuda"))
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="set_to_none=False"):
        step(torch.randint(0, 256, (2, 128), device="cuda"))


def test_ramba_train_with_cuda_graph_matches_eager(tmp_path):
    """`ramba train` with cuda_graph (two micro-batches a step, T not a multiple of the chunk): the loss curve
    of the eager run, and a checkpoint that resumes eagerly."""
    import json

    from ramba.train import train
    from ramba.train.config import config_from_dict

    def run(name, resume=None, **extra):
        cfg = {
            "out_dir": str(tmp_path / name),
            "max_steps": 6,
            "micro_batch": 2,
            "grad_accum": 2,
            "model": {"preset": "tiny", "overrides": CONFIG},
            "data": {"seq_len": 700, "sources": [{"task": "passkey"}]},
            "optim": {"lr": 1e-3, "warmup_steps": 2},
            "log": {"progress": False, "tensorboard": False},
            **extra,
        }
        train(config_from_dict(cfg), resume=resume)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    eager, graphed = run("eager", cuda_graph=False), run("graph", cuda_graph=True)
    assert sorted(graphed) == list(range(1, 7))
    for step, loss in eager.items():
        assert abs(graphed[step] - loss) < 2e-2 * loss, (step, graphed[step], loss)
    resumed = run("graph", resume=True, max_steps=8)
    assert sorted(resumed) == list(range(1, 9)) and all(resumed[s] == graphed[s] for s in graphed)
