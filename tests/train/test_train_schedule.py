"""Warmup + cosine schedule."""

import math

import pytest
import torch

from ramba.train.schedule import WarmupCosine, make_scheduler


def test_shape_of_the_schedule():
    f = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11)
    assert all(f(s) < f(s + 1) for s in range(10))
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(f(s) >= f(s + 1) for s in range(10, 120))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert WarmupCosine(0, 5, 0.0)(0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="warmup"):
        WarmupCosine(-1, 10, 0.0)


def test_scheduler_drives_the_optimizer_and_round_trips():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1e-2)
    sched = make_scheduler(opt, 1e-2, 1e-3, warmup=2, total=10)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[2] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-3)
    opt2 = torch.optim.AdamW([p], lr=1e-2)
    sched2 = make_scheduler(opt2, 1e-2, 1e-3, warmup=2, total=10)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == sched.last_epoch and sched2.get_last_lr() == sched.get_last_lr()
