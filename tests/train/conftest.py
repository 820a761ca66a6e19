"""Shared fixtures: a small English-like corpus, a token file, and a very small training config."""

import pytest
import torch

from ramba.data import ByteTokenizer, prepare
from train_helpers import MODEL_OVERRIDES, make_text


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine this is faster and steadier than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def token_file(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(4):
        (src / f"doc{i}.txt").write_text(make_text(150, seed=i))
    return prepare([src], tmp_path / "data" / "text", ByteTokenizer(), progress=False)


@pytest.fixture
def config_dict(tmp_path, token_file):
    return {
        "out_dir": str(tmp_path / "run"),
        "seed": 0,
        "max_steps": 12,
        "micro_batch": 4,
        "model": {"preset": "tiny", "overrides": dict(MODEL_OVERRIDES)},
        "data": {"seq_len": 64, "holdout": 0.05, "sources": [{"path": str(token_file.path), "weight": 1.0}]},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 3},
        "checkpoint": {"every": 4, "keep": 2},
        "log": {"progress": False, "tensorboard": False},
    }
