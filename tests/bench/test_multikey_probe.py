"""benchmarks/multikey_query_probe.py: it finds every needle's key in every phrasing and re-asks the question."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

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
