"""Fixtures for the evaluation tests: a tiny random model folder and a small byte-level token file."""

import pytest

from eval_helpers import tiny_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_model")
    tiny_model().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def token_file(tmp_path_factory):
    from ramba.data import ByteTokenizer, TokenFileWriter

    path = tmp_path_factory.mktemp("data") / "text"
    text = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 30
    with TokenFileWriter(path, ByteTokenizer()) as w:
        for i in range(3):
            w.add(ByteTokenizer().encode(f"Document {i}. " + text))
        return w.close()
