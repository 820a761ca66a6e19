"""Warmup + cosine schedule: a pure function of the step."""

import math

import pytest

from ramba.train.schedule import WarmupCosine


def test_shape_of_the_schedule():
    f = WarmupCosine(lr=1.0, min_lr=0.1, warmup=10, total=110)
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11)
    assert all(f(s) < f(s + 1) for s in range(10))
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(f(s) >= f(s + 1) for s in range(10, 120))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert WarmupCosine(1.0, 0.0, 0, 5)(0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="warmup"):
        WarmupCosine(1.0, 0.0, -1, 10)


def test_peak_and_floor_scale_the_curve():
    """The rate at a step is the peak times the unit curve, moved to the floor: no state, so a resume needs none."""
    unit, scaled = WarmupCosine(1.0, 0.0, 3, 20), WarmupCosine(2e-3, 2e-4, 3, 20)
    for s in range(25):
        assert scaled(s) == pytest.approx(2e-4 + (2e-3 - 2e-4) * unit(s) if s >= 3 else 2e-3 * unit(s))
