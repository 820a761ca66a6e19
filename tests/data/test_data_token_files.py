"""Token files and `prepare`: text, folders, JSONL, gzip; clear errors; nothing half-written."""

import gzip
import json

import numpy as np
import pytest

from ramba.data import ByteTokenizer, DataError, TokenFile, TokenFileWriter, load_tokenizer, prepare
from ramba.errors import OutputPathError


def test_prepare_files_folders_jsonl_gz(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.md").write_text("beta béta")
    (src / "skip.bin").write_bytes(b"\x00\x01")
    (src / ".hidden.txt").write_text("hidden")
    with gzip.open(src / "c.txt.gz", "wt") as f:
        f.write("gamma")
    jl = tmp_path / "docs.jsonl"
    jl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 3}) + "\n")
    tok = ByteTokenizer()
    tf = prepare([src, jl], tmp_path / "out", tok, progress=False)
    docs = [tok.decode(tf.document(i)[:-1]) for i in range(tf.n_docs)]
    assert docs == ["alpha", "gamma", "beta béta", "one", "two"]
    assert all(tf.document(i)[-1] == tok.eos_id for i in range(tf.n_docs))
    assert len(tf) == sum(len(d.encode()) + 1 for d in docs)
    assert tf.meta["tokenizer"] == "byte" and tf.vocab_size == 260 and tf.meta["dtype"] == "uint16"
    reopened = TokenFile(tmp_path / "out")
    np.testing.assert_array_equal(np.asarray(reopened.tokens), np.asarray(tf.tokens))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_prepare_refuses_to_overwrite_and_reports_missing_input(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    prepare([tmp_path / "a.txt"], tmp_path / "out", ByteTokenizer(), progress=False)
    with pytest.raises(OutputPathError, match="exists; pass --overwrite"):
        prepare([tmp_path / "a.txt"], tmp_path / "out", ByteTokenizer(), progress=False)
    prepare([tmp_path / "a.txt"], tmp_path / "out", ByteTokenizer(), overwrite=True, progress=False)
    with pytest.raises(FileNotFoundError, match="nope"):
        prepare([tmp_path / "nope.txt"], tmp_path / "out2", ByteTokenizer(), progress=False)


def test_empty_corpus_raises_and_writes_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty corpus"):
        prepare([tmp_path / "empty"], tmp_path / "out", ByteTokenizer(), progress=False)
    (tmp_path / "blank.txt").write_text("  \n\n ")
    with pytest.raises(DataError, match="empty corpus"):
        prepare([tmp_path / "blank.txt"], tmp_path / "out", ByteTokenizer(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.txt", "empty"]


def test_bad_jsonl_names_file_and_line(tmp_path):
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        prepare([jl], tmp_path / "out", ByteTokenizer(), progress=False)
    jl.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        prepare([jl], tmp_path / "out", ByteTokenizer(), progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.jsonl"]


def test_writer_aborts_on_exception(tmp_path):
    with pytest.raises(RuntimeError):
        with TokenFileWriter(tmp_path / "out", ByteTokenizer()) as w:
            w.add([1, 2, 3])
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with TokenFileWriter(tmp_path / "out", ByteTokenizer()) as w:
        with pytest.raises(ValueError, match="ids"):
            w.add([1, 300])
        w.abort()


def test_corrupt_token_files_raise_data_error(tmp_path):
    (tmp_path / "a.txt").write_text("some text here")
    tf = prepare([tmp_path / "a.txt"], tmp_path / "tf", ByteTokenizer(), progress=False)
    with pytest.raises(FileNotFoundError, match="ramba prepare"):
        TokenFile(tmp_path / "missing")
    with pytest.raises(DataError, match="not a token file"):
        TokenFile(tmp_path)
    bin_file = tf.path / "tokens.bin"
    data = bin_file.read_bytes()
    bin_file.write_bytes(data[:-2])
    with pytest.raises(DataError, match="truncated"):
        TokenFile(tf.path)
    bin_file.write_bytes(data)
    (tf.path / "meta.json").write_text("{broken")
    with pytest.raises(DataError, match="meta.json is corrupt"):
        TokenFile(tf.path)


def test_tokenizer_mismatch_is_detected(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "some": 2, "text": 3}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tok.json"))
    hf = load_tokenizer(tmp_path / "tok.json")
    (tmp_path / "a.txt").write_text("some text")
    tf = prepare([tmp_path / "a.txt"], tmp_path / "tf", hf, progress=False)
    assert tf.meta["dtype"] == "uint8" and tf.document(0).tolist() == [2, 3, 1]
    tf.check_tokenizer(hf)
    with pytest.raises(DataError, match="vocab_size 4.*configured tokenizer is 'byte'"):
        tf.check_tokenizer(ByteTokenizer())
