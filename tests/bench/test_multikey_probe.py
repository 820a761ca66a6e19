"""benchmarks/multikey_query_probe.py: it finds every needle's key in every phrasing and re-asks the question."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from ramba.data import ByteTokenizer, make_task
from small_models import small_model

SPEC = importlib.util.spec_from_file_location(
    "multikey_query_probe", Path(__file__).resolve().parents[2] / "benchmarks" / "multikey_query_probe.py"
)
probe = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(probe)


@pytest.mark.parametrize("phrasing", range(4))
def test_keys_found_in_every_phrasing(phrasing):
    tok = ByteTokenizer()
    sample = make_task("niah_multikey", tok, phrasing=phrasing).generate(1024, 0.5, seed=phrasing)
    keys = [probe.KEY.search(tok.decode(sample.input_ids[a:b].tolist())).group(1) for a, b in sample.needles]
    question = tok.decode(sample.input_ids[sample.haystack_span[1] : sample.prompt_len].tolist())
    assert len(set(keys)) == 4 and len({len(k) for k in keys}) == 1
    assert keys[sample.target] in question and not any(k in question for k in keys if k != keys[sample.target])


def test_probe_asks_every_key():
    tok = ByteTokenizer()
    model = small_model(vocab_size=260, pad_token_id=256, bos_token_id=257, eos_token_id=258)
    sample = make_task("niah_multikey", tok).generate(768, 0.5, seed=1)
    scores = probe.probe_sample(model, tok, sample)
    assert scores.shape == (4, 4) and np.isfinite(scores).all()
    assert np.ptp(scores, axis=0).max() > 0  # another key asked: another query


def test_match_features_of_every_ask():
    tok = ByteTokenizer()
    model = small_model(vocab_size=260, pad_token_id=256, bos_token_id=257, eos_token_id=258)
    sample = make_task("niah_multikey", tok).generate(768, 0.5, seed=2)
    asks = probe.match_features(model, tok, sample)
    d, lm = model.config.d_model, model.config.retrieval_heads * model.config.retrieval_dim
    assert [a[3] for a in asks] == [0, 1, 2, 3]
    assert all(a[0].shape == (d,) and a[1].shape == (4, d) and a[2].shape == (4, lm) for a in asks)
    assert torch.isfinite(torch.stack([a[2] for a in asks])).all()
    assert not torch.equal(asks[0][0], asks[1][0])  # another key asked: another last-token state
    torch.testing.assert_close(asks[0][1], asks[1][1])  # the needles (before the question) do not change


def test_fit_reads_a_key_both_sides_carry_and_not_one_a_side_lacks():
    """Needles and question share a key code beside a large common part: the fitted match finds the asked needle
    on unseen asks; with needle features that carry nothing it stays near chance on them."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(50, 6, generator=g)  # 50 possible keys

    def asks(n, needles_carry):
        out = []
        for k in range(n):
            keys = torch.randperm(50, generator=g)[:4]
            i = k % 4
            q = torch.cat([codes[keys[i]], torch.randn(10, generator=g)]) + 10.0
            needles = torch.randn(4, 12, generator=g) + 5.0
            if needles_carry:
                needles[:, :6] += 2 * codes[keys]
            out.append((q, needles, i))
        return out

    train, test = probe.fit_match(asks(200, True), asks(80, True))
    assert train >= 0.8 and test >= 0.7  # chance: 0.25
    _, blind = probe.fit_match(asks(200, False), asks(200, False))
    assert blind <= 0.4
