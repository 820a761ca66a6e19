"""Tokenizers: a built-in byte-level tokenizer and any `tokenizers`/Hugging Face tokenizer on disk.

Both expose the same small interface (`Tokenizer`): `encode(text) -> list[int]`, `decode(ids) -> str`,
`vocab_size`, the special ids `bos_id`/`eos_id`/`pad_id`/`sep_id`, a `name` and a `fingerprint` that
identifies the vocabulary, so a token file records which tokenizer wrote it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer"]


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    fingerprint: str
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    sep_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then the specials 256 <pad>, 257 <bos>, 258 <eos>, 259 <sep>.

    Needs no files; `vocab_size` is 260, the `vocab_size` of the tiny model preset. Encoding and
    decoding round-trip any text exactly (invalid UTF-8 from a cut byte sequence decodes to U+FFFD).
    """

    name = "byte"
    fingerprint = "byte-v1"
    vocab_size = 260
    pad_id = 256
    bos_id = 257
    eos_id = 258
    sep_id = 259
    specials = {256: "<pad>", 257: "<bos>", 258: "<eos>", 259: "<sep>"}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Fast path for long texts: `[N]` uint8 ids."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        out = bytearray()
        parts: list[str] = []
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif i in self.specials:
                if not skip_special:
                    parts.append(out.decode("utf-8", errors="replace"))
                    out.clear()
                    parts.append(self.specials[i])
            else:
                raise ValueError(f"ids: {i} is outside the byte tokenizer's vocabulary [0, {self.vocab_size})")
        parts.append(out.decode("utf-8", errors="replace"))
        return "".join(parts)


class HFTokenizer:
    """A tokenizer loaded from a local path: a `tokenizer.json` file (the `tokenizers` library) or a
    folder with one, or any folder that `transformers.AutoTokenizer` reads offline."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer: no such file or folder: {path}")
        json_file = path if path.is_file() else path / "tokenizer.json"
        self.name = str(path)
        if json_file.is_file():
            from tokenizers import Tokenizer as _Tok

            self._tok = _Tok.from_file(str(json_file))
            self._hf = None
            vocab = self._tok.get_vocab(with_added_tokens=True)
            self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        else:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self._tok = None
            vocab = self._hf.get_vocab()
            self.vocab_size = len(self._hf)
        digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
        self.fingerprint = f"vocab-{self.vocab_size}-{digest}"
        self.eos_id = self._special(vocab, ["</s>", "<|endoftext|>", "<eos>", "[SEP]", "<|end_of_text|>"], "eos_token")
        self.bos_id = self._special(vocab, ["<s>", "<|begin_of_text|>", "<bos>", "[CLS]"], "bos_token")
        self.pad_id = self._special(vocab, ["<pad>", "[PAD]", "<|pad|>"], "pad_token")
        self.sep_id = self._special(vocab, ["<sep>", "[SEP]"], "sep_token")
        if self.eos_id is None:
            raise ValueError(
                f"tokenizer {path}: no end-of-document token found (looked for </s>, <|endoftext|>, <eos>, [SEP]); "
                "documents are separated by it, so add one to the tokenizer"
            )
        if self.pad_id is None:
            self.pad_id = self.eos_id

    def _special(self, vocab: dict, candidates: Sequence[str], attr: str) -> int | None:
        if self._hf is not None and getattr(self._hf, attr, None) is not None:
            return int(getattr(self._hf, f"{attr}_id"))
        for tok in candidates:
            if tok in vocab:
                return int(vocab[tok])
        return None

    def encode(self, text: str) -> list[int]:
        if self._tok is not None:
            return self._tok.encode(text, add_special_tokens=False).ids
        return self._hf.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._tok is not None:
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        return [self._hf.encode(t, add_special_tokens=False) for t in texts]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self._tok is not None:
            return self._tok.decode(ids, skip_special_tokens=skip_special)
        return self._hf.decode(ids, skip_special_tokens=skip_special)


def load_tokenizer(spec: str | os.PathLike | None) -> ByteTokenizer | HFTokenizer:
    """`"byte"` (or None) gives the built-in byte tokenizer; anything else is a local path to a
    `tokenizer.json` or a tokenizer folder."""
    if spec is None or str(spec) == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)
