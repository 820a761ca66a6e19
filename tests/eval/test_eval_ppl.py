"""Perplexity: segmented scoring against a full forward, a uniform model (ppl = vocabulary size), buckets."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eval_helpers import tiny_model
from ramba.eval.ppl import bucket_edges, evaluate_ppl, token_nll, window_starts
from ramba.eval.results import EvalError


@pytest.mark.parametrize("arch", ["ramba", "mamba2", "transformer"])
def test_segmented_nll_equals_full_forward(arch):
    model = tiny_model(seed=2, architecture=arch).double()
    ids = torch.randint(0, 260, (2, 75), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    ref = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    for segment_len in (16, 23, 74, 75, 500):
        torch.testing.assert_close(token_nll(model, ids, segment_len), ref.float(), atol=1e-6, rtol=1e-6)


def test_uniform_model_has_perplexity_of_vocabulary(token_file):
    """All-zero logits: every token has probability 1/260, in every bucket and at every length."""
    model = tiny_model(tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    result = evaluate_ppl(model, token_file, [100, 257], windows=3, buckets=4, batch_size=2, segment_len=48)
    for row, length in zip(result["by_length"], [100, 257]):
        assert row["length"] == length and row["tokens"] == 3 * (length - 1)
        assert row["ppl"] == pytest.approx(260, rel=1e-5)
        assert sum(b["tokens"] for b in row["buckets"]) == row["tokens"]
        assert all(b["ppl"] == pytest.approx(260, rel=1e-5) for b in row["buckets"])


def test_bucket_means_by_hand(token_file, monkeypatch):
    """Per-position NLL = position p: each bucket's mean NLL is the mean of its positions."""
    import ramba.eval.ppl as ppl

    def fake_nll(model, ids, segment_len, offload):
        return torch.arange(1, ids.shape[1], dtype=torch.float32).expand(ids.shape[0], -1)

    monkeypatch.setattr(ppl, "token_nll", fake_nll)
    result = evaluate_ppl(tiny_model(), token_file, [16], windows=2, buckets=3, scale="linear")
    buckets = result["by_length"][0]["buckets"]
    assert [(b["start"], b["end"]) for b in buckets] == [(0, 5), (5, 11), (11, 16)]
    assert [b["nll"] for b in buckets] == pytest.approx(
        [np.mean([1, 2, 3, 4]), np.mean(range(5, 11)), np.mean(range(11, 16))]
    )
    assert [b["tokens"] for b in buckets] == [8, 12, 10]
    assert result["by_length"][0]["nll"] == pytest.approx(np.mean(range(1, 16)))
    assert result["by_length"][0]["ppl"] == pytest.approx(math.exp(8.0))


def test_bucket_edges_and_windows():
    assert bucket_edges(4096, 8) == [0, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    assert bucket_edges(10, 8) == [0, 1, 2, 5, 10]  # empty buckets merged away
    assert bucket_edges(12, 4, "linear") == [0, 3, 6, 9, 12]
    assert window_starts(1000, 100, 3) == [0, 450, 900]
    assert window_starts(100, 100, 1) == [0]
    with pytest.raises(EvalError, match="fewer than the length"):
        window_starts(50, 100, 2)
    with pytest.raises(EvalError, match="scale"):
        bucket_edges(100, 4, "cubic")
