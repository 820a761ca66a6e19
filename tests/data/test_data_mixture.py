"""Mixture and sampler: examples are a function of the index; ranks get disjoint data; weights hold."""

import numpy as np
import pytest

from ramba.data import (
    ByteTokenizer,
    DataError,
    DistributedSampler,
    Mixture,
    TaskStream,
    TokenWindows,
    make_task,
    prepare,
)


@pytest.fixture
def token_file(tmp_path):
    (tmp_path / "a.txt").write_text("".join(f"line {i} of the text.\n" for i in range(300)))
    return prepare([tmp_path / "a.txt"], tmp_path / "tf", ByteTokenizer(), progress=False)


def test_windows_visit_every_window_once_per_epoch(token_file):
    w = TokenWindows(token_file, 32, seed=1)
    n = w.n_windows
    assert n == len(token_file) // 32
    starts = []
    for i in range(2 * n):
        ids, labels = w.example(i)
        assert ids.shape == (32,) and (ids == labels).all()
        off = int(np.flatnonzero([np.array_equal(ids, token_file.tokens[k * 32 : (k + 1) * 32]) for k in range(n)])[0])
        starts.append(off)
    assert sorted(starts[:n]) == list(range(n)) and sorted(starts[n:]) == list(range(n))
    assert starts[:n] != starts[n:]  # a new order each epoch
    again = TokenWindows(token_file, 32, seed=1)
    assert all(np.array_equal(again.example(i)[0], w.example(i)[0]) for i in (5, 0, n + 3))
    with pytest.raises(DataError, match="fewer than one sequence"):
        TokenWindows(token_file, len(token_file) + 1, seed=0)


def test_mixture_weights_and_determinism(token_file):
    task = TaskStream(make_task("passkey", ByteTokenizer()), 256, seed=0)
    mix = Mixture([TokenWindows(token_file, 256, 0), task], [3.0, 1.0], seed=7)
    picks = np.array([mix.source_of(i) for i in range(4000)])
    assert abs((picks == 1).mean() - 0.25) < 0.03
    for i in range(20):
        ids, labels = mix.example(i)
        ids2, labels2 = mix.example(i)
        assert ids.shape == labels.shape == (256,)
        np.testing.assert_array_equal(ids, ids2)
        np.testing.assert_array_equal(labels, labels2)
        if picks[i] == 1:
            assert (labels == -100).sum() > 200 and labels[-1] == ByteTokenizer.eos_id
    with pytest.raises(ValueError, match="weights"):
        Mixture([task], [0.0], seed=0)


def test_distributed_sampler_disjoint_and_contiguous():
    world, accum, micro = 3, 2, 4
    samplers = [DistributedSampler(micro, accum, r, world) for r in range(world)]
    per_step = samplers[0].examples_per_step
    assert per_step == world * accum * micro
    seen = []
    for step in range(3):
        for m in range(accum):
            for s in samplers:
                seen += list(s.indices(step * per_step, m))
    assert sorted(seen) == list(range(3 * per_step))
    single = DistributedSampler(micro * world, accum)
    assert single.examples_per_step == per_step


def test_task_stream_too_short_fails_early():
    with pytest.raises(ValueError, match="too short"):
        TaskStream(make_task("niah_multikey", ByteTokenizer()), 128, seed=0)
