"""The terminal: log lines never share a line with a progress bar, `prepare` counts tokens, long
prefills show a token bar, and `--model` help names every form a model may take."""

import importlib
import io
import logging
import re

import pytest
import torch

from ramba.cli.main import main
from ramba.inference import prefill, prefill_progress
from small_models import small_model


def _screen(text: str) -> list[str]:
    """The lines a terminal shows for `text`: `\\r` returns to column 0, later characters overwrite."""
    lines = []
    for raw in text.split("\n"):
        row: list[str] = []
        for piece in raw.split("\r"):
            row[: len(piece)] = piece
        lines.append("".join(row).rstrip())
    return lines


def test_the_screen_model_sees_a_log_line_glued_to_a_bar():
    from tqdm import tqdm

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    log = logging.getLogger("glue-demo")
    log.addHandler(handler)
    try:
        with tqdm(total=3, desc="work", file=out) as bar:
            bar.update(1)
            log.warning("LOGLINE")
    finally:
        log.removeHandler(handler)
    assert any(line.startswith("work:") and line.endswith("LOGLINE") for line in _screen(out.getvalue()))


def test_log_lines_never_land_on_a_progress_bar_line(tmp_path, monkeypatch, capsys):
    prepare = importlib.import_module("ramba.data.prepare")  # the package exports a function of that name

    monkeypatch.setattr(logging.root, "handlers", [])  # as in a fresh process: main() sets up the console
    monkeypatch.setattr(logging.root, "level", logging.root.level)
    documents = prepare.iter_documents

    def logging_documents(path, jsonl_field="text"):
        for i, text in enumerate(documents(path, jsonl_field)):
            logging.getLogger("ramba.test").warning("LOGLINE %s %d", path.name, i)
            yield text

    monkeypatch.setattr(prepare, "iter_documents", logging_documents)
    (tmp_path / "a.txt").write_text("first document " * 20)
    (tmp_path / "b.jsonl").write_text('{"text": "second"}\n{"text": "third one"}\n')
    assert main(["prepare", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), "-o", str(tmp_path / "out")]) == 0
    screen = _screen(capsys.readouterr().err)
    logged = [line for line in screen if "LOGLINE" in line]
    assert len(logged) == 3
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d WARNING ramba.test: LOGLINE \S+ \d", line) for line in logged)
    # The bar counts the tokens written (300 + 6 + 9 bytes and an eos per document), with files and documents.
    assert any(re.match(r"prepare: 318tok \[.*docs=3, files=2/2\]$", line) for line in screen)


def test_long_prefills_show_a_token_bar_only_when_asked(monkeypatch):
    import tqdm.auto

    closed = []

    class Recording(tqdm.auto.tqdm):
        def close(self):
            if not self.disable:  # tqdm closes again when collected
                closed.append((self.desc, self.n, self.total))
            super().close()

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    model, ids = small_model(), torch.randint(3, 64, (1, 64))
    prefill(model, ids, segment_len=16)
    with prefill_progress():
        prefill(model, ids[:, :16], segment_len=16)  # one segment: nothing to show
        prefill(model, ids, segment_len=16)
    with prefill_progress(False):
        prefill(model, ids, segment_len=16)
    assert closed == [("prefill", 64, 64)]


def test_model_help_names_every_form(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "tasks", "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps at hyphens
    for form in (
        "model folder",
        "checkpoint folder",
        "training run folder",
        "single-file model (*.safetensors",
        "shipped model (tiny-ruler)",
    ):
        assert form in text


def test_a_shipped_model_loads_by_name():
    from ramba.errors import ModelLoadError
    from ramba.eval.loading import load_model_tokenizer, resolve_model

    model, tok = load_model_tokenizer("tiny-ruler")
    assert tok.name == "byte" and model.config.vocab_size == 260
    with pytest.raises(ModelLoadError, match="no such folder or file: no-such-model.*tiny-ruler"):
        resolve_model("no-such-model")
