"""Memory-mapped token files.

A token file is a folder holding
- `tokens.bin`:  all documents' ids back to back, each document followed by the tokenizer's eos
  id (document packing), as little-endian uint8/uint16/uint32 (the smallest that fits the vocabulary);
- `offsets.npy`: `[n_docs + 1]` int64, document `i` is `tokens[offsets[i]:offsets[i+1]]` (eos included);
- `meta.json`:   format version, tokenizer name and fingerprint, vocab size, dtype, token and document counts.

`TokenFileWriter` writes into a hidden temporary folder beside the target and renames it into
place only when complete, so an interrupted `prepare` leaves nothing half-written; the temporary
folder of a killed `prepare` is removed by the next write of the same output.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ramba.errors import DataError
from ramba.files import check_output, commit_dir, new_temp_dir, remove_stale_temps

__all__ = ["DataError", "TokenFile", "TokenFileWriter", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32}


def _dtype_for(vocab_size: int) -> str:
    if vocab_size <= 1 << 8:
        return "uint8"
    if vocab_size <= 1 << 16:
        return "uint16"
    return "uint32"


class TokenFileWriter:
    """Streams documents into a new token file at `path` (a folder).

    Use as a context manager; on an exception the temporary folder is removed and `path` is untouched.
    `add(ids)` appends one document and its eos token.
    """

    def __init__(self, path: str | os.PathLike, tokenizer, overwrite: bool = False):
        self.path = check_output(path, overwrite=overwrite, folder=True)
        self.tokenizer = tokenizer
        self.dtype = _dtype_for(tokenizer.vocab_size)
        remove_stale_temps(self.path.parent, self.path.name)
        self._tmp = new_temp_dir(self.path)
        self._bin = open(self._tmp / "tokens.bin", "wb")
        self._offsets = [0]
        self._eos = np.array([tokenizer.eos_id], dtype=_DTYPES[self.dtype])

    def add(self, ids: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(ids)
        if arr.size == 0:
            return
        if arr.ndim != 1:
            raise ValueError(f"ids: expected a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.min() < 0 or arr.max() >= self.tokenizer.vocab_size:
            raise ValueError(
                f"ids: token ids must lie in [0, {self.tokenizer.vocab_size}), got [{arr.min()}, {arr.max()}]"
            )
        self._bin.write(arr.astype(_DTYPES[self.dtype], copy=False).tobytes())
        self._bin.write(self._eos.tobytes())
        self._offsets.append(self._offsets[-1] + arr.size + 1)

    @property
    def n_tokens(self) -> int:
        return self._offsets[-1]

    @property
    def n_docs(self) -> int:
        return len(self._offsets) - 1

    def close(self, extra_meta: dict | None = None) -> TokenFile:
        """Finishes the file and moves it into place; raises DataError if no document was added."""
        self._bin.close()
        if self.n_tokens == 0:
            self.abort()
            raise DataError(f"empty corpus: no text found for {self.path}")
        np.save(self._tmp / "offsets.npy", np.asarray(self._offsets, dtype=np.int64))
        meta = {
            "format_version": FORMAT_VERSION,
            "tokenizer": self.tokenizer.name,
            "tokenizer_fingerprint": self.tokenizer.fingerprint,
            "vocab_size": int(self.tokenizer.vocab_size),
            "eos_id": int(self.tokenizer.eos_id),
            "dtype": self.dtype,
            "n_tokens": int(self.n_tokens),
            "n_docs": int(self.n_docs),
            **(extra_meta or {}),
        }
        with open(self._tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=2)
        commit_dir(self._tmp, self.path)
        return TokenFile(self.path)

    def abort(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> TokenFileWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class TokenFile:
    """Read-only view of a token file: `tokens` is a `[n_tokens]` numpy memmap, `offsets` `[n_docs + 1]`.

    Opening checks the metadata against the files, so a truncated or foreign folder fails here
    with a DataError naming what is wrong, not later inside training.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"token file: no such folder: {self.path} (create it with `ramba prepare`)")
        meta_file = self.path / "meta.json"
        if not self.path.is_dir() or not meta_file.is_file():
            raise DataError(
                f"token file {self.path}: not a token file folder (no meta.json); create it with `ramba prepare`"
            )
        try:
            self.meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"token file {self.path}: meta.json is corrupt ({e})") from None
        for key in ("format_version", "tokenizer_fingerprint", "vocab_size", "dtype", "n_tokens", "n_docs"):
            if key not in self.meta:
                raise DataError(f"token file {self.path}: meta.json lacks '{key}'")
        if self.meta["format_version"] != FORMAT_VERSION:
            raise DataError(
                f"token file {self.path}: format version {self.meta['format_version']}, expected {FORMAT_VERSION}"
            )
        dtype = self.meta["dtype"]
        if dtype not in _DTYPES:
            raise DataError(f"token file {self.path}: unknown dtype {dtype!r}")
        n = int(self.meta["n_tokens"])
        bin_file = self.path / "tokens.bin"
        expected = n * np.dtype(_DTYPES[dtype]).itemsize
        actual = bin_file.stat().st_size if bin_file.is_file() else -1
        if actual != expected:
            raise DataError(
                f"token file {self.path}: tokens.bin is {actual} bytes, meta.json promises {expected} "
                f"({n} {dtype} tokens); the file is truncated or corrupt, run `ramba prepare` again"
            )
        if n == 0:
            raise DataError(f"token file {self.path}: holds no tokens")
        try:
            self.offsets = np.load(self.path / "offsets.npy")
        except (OSError, ValueError) as e:
            raise DataError(f"token file {self.path}: offsets.npy is missing or corrupt ({e})") from None
        if self.offsets.shape != (int(self.meta["n_docs"]) + 1,) or self.offsets[0] != 0 or self.offsets[-1] != n:
            raise DataError(f"token file {self.path}: offsets.npy does not match meta.json")
        self.tokens = np.memmap(bin_file, dtype=_DTYPES[dtype], mode="r", shape=(n,))

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def fingerprint(self) -> str:
        return str(self.meta["tokenizer_fingerprint"])

    def __len__(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def n_docs(self) -> int:
        return int(self.meta["n_docs"])

    def document(self, i: int) -> np.ndarray:
        """Document `i`'s ids, `[L]`, its trailing eos included."""
        return np.asarray(self.tokens[self.offsets[i] : self.offsets[i + 1]])

    def check_tokenizer(self, tokenizer) -> None:
        """Raises DataError unless this file was written by `tokenizer` (same vocabulary)."""
        if self.fingerprint != tokenizer.fingerprint or self.vocab_size != tokenizer.vocab_size:
            raise DataError(
                f"token file {self.path} was written by tokenizer {self.meta.get('tokenizer')!r} "
                f"(vocab_size {self.vocab_size}, fingerprint {self.fingerprint}), but the configured tokenizer is "
                f"{tokenizer.name!r} (vocab_size {tokenizer.vocab_size}, fingerprint {tokenizer.fingerprint}); "
                "prepare the data again with the same tokenizer"
            )
