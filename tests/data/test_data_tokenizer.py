"""Tokenizers: the byte tokenizer round-trips; a `tokenizers` file loads from a local path."""

import pytest

from ramba.data import ByteTokenizer, HFTokenizer, load_tokenizer


def test_byte_tokenizer_round_trip_and_specials():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 260
    text = "Hello, wörld ✓\n\tend"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.encode_array(text).tolist() == ids
    assert {tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id} == {256, 257, 258, 259}
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text
    assert tok.decode([tok.bos_id, 104, 105, tok.eos_id], skip_special=False) == "<bos>hi<eos>"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([260])


def _word_level(path, words):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "</s>", "<pad>", *words])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(path))
    return path


def test_hf_tokenizer_from_file_and_folder(tmp_path):
    words = ["the", "cat", "sat", "on", "mat", "."]
    f = _word_level(tmp_path / "tokenizer.json", words)
    for spec in (f, tmp_path):
        tok = load_tokenizer(spec)
        assert isinstance(tok, HFTokenizer)
        assert tok.vocab_size == len(words) + 3
        assert tok.eos_id == 1 and tok.pad_id == 2
        ids = tok.encode("the cat sat on the mat .")
        assert ids == [3, 4, 5, 6, 3, 7, 8]
        assert tok.decode(ids) == "the cat sat on the mat ."
    other = load_tokenizer(_word_level(tmp_path / "other.json", ["a", "b"]))
    assert other.fingerprint != tok.fingerprint


def test_hf_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer(tmp_path / "missing.json")
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(tmp_path / "noeos.json"))
    with pytest.raises(ValueError, match="end-of-document"):
        load_tokenizer(tmp_path / "noeos.json")
