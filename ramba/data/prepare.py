"""Text files, folders and JSONL -> one memory-mapped token file (see `ramba.data.tokens`).

Every plain text file is one document; every line of a JSONL file is one document (its `text`
field, or another named by `jsonl_field`). Files ending in `.gz` are decompressed on the fly.
Folders are walked recursively in sorted order, keeping files whose extension is in `extensions`.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ramba.data.tokenizer import ByteTokenizer
from ramba.data.tokens import DataError, TokenFile, TokenFileWriter
from ramba.errors import OutputPathError, RambaUserError
from ramba.files import WRITE_ERRNOS, describe_os_error

__all__ = ["prepare", "iter_documents", "DEFAULT_EXTENSIONS"]

logger = logging.getLogger(__name__)

DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".text", ".jsonl", ".json")
# Long texts go to a `tokenizers` tokenizer in pieces of about this many characters, cut at line ends.
_PIECE_CHARS = 1 << 20


def _strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def _is_jsonl(path: Path) -> bool:
    return _strip_gz(path.name).endswith((".jsonl", ".json"))


def _collect_files(inputs: Sequence[str | os.PathLike], extensions: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise FileNotFoundError(f"input: no such file or folder: {p}")
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
                and _strip_gz(f.name).endswith(tuple(extensions))
            )
            if not found:
                logger.warning("no files with extensions %s under %s", ", ".join(extensions), p)
            files.extend(found)
        else:
            files.append(p)
    return files


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def iter_documents(path: Path, jsonl_field: str = "text") -> Iterator[str]:
    """The documents of one input file, as strings."""
    with _open_text(path) as f:
        if not _is_jsonl(path):
            yield f.read()
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(jsonl_field), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string field '{jsonl_field}'")
            yield record[jsonl_field]


def _encode(tokenizer, text: str) -> np.ndarray:
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode_array(text)
    if len(text) <= _PIECE_CHARS or not hasattr(tokenizer, "encode_batch"):
        return np.asarray(tokenizer.encode(text), dtype=np.int64)
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + _PIECE_CHARS)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return np.concatenate([np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(pieces)])


def prepare(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    tokenizer,
    jsonl_field: str = "text",
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    overwrite: bool = False,
    progress: bool = True,
) -> TokenFile:
    """Tokenizes `inputs` (files and folders) into the token file `output` and returns it opened.

    Raises FileNotFoundError for a missing input and DataError when the inputs hold no text.
    """
    if not inputs:
        raise ValueError("inputs: give at least one file or folder")
    files = _collect_files(inputs, extensions)
    if not files:
        raise DataError(f"empty corpus: no input files found in {', '.join(map(str, inputs))}")
    try:
        return _write(files, output, tokenizer, jsonl_field, overwrite, progress)
    except OSError as e:
        ours = e.filename is None or Path(e.filename).parent == Path(output).parent  # not an unreadable input
        if isinstance(e, RambaUserError) or e.errno not in WRITE_ERRNOS or not ours:
            raise
        raise OutputPathError(f"output {describe_os_error(e, output)}; nothing was written") from None


def _write(files, output, tokenizer, jsonl_field, overwrite, progress) -> TokenFile:
    with TokenFileWriter(output, tokenizer, overwrite=overwrite) as writer:
        # Counts the tokens written, separators included (their total is not known before tokenizing); files
        # and documents so far follow after each file.
        with tqdm(unit="tok", unit_scale=True, desc="prepare", disable=not progress) as bar:
            for i, path in enumerate(files, 1):
                for text in iter_documents(path, jsonl_field):
                    if text.strip():
                        writer.add(_encode(tokenizer, text))
                        bar.update(writer.n_tokens - bar.n)
                bar.set_postfix(files=f"{i}/{len(files)}", docs=writer.n_docs)
        tf = writer.close(extra_meta={"sources": [str(f) for f in files[:1000]], "n_files": len(files)})
    logger.info("wrote %s: %d documents, %d tokens", output, tf.n_docs, len(tf))
    return tf
