"""Tokenizers, memory-mapped token files, corpus preparation, synthetic long-context tasks, mixtures."""

from ramba.data.mixture import DistributedSampler, Mixture, TaskStream, TokenWindows, collate
from ramba.data.prepare import prepare
from ramba.data.tasks import (
    TASKS,
    MixedHaystack,
    TaskSample,
    TemplateHaystack,
    TokenFileHaystack,
    make_task,
    retrieval_targets,
)
from ramba.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from ramba.data.tokens import DataError, TokenFile, TokenFileWriter

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "TokenFile",
    "TokenFileWriter",
    "DataError",
    "prepare",
    "TASKS",
    "TaskSample",
    "TemplateHaystack",
    "TokenFileHaystack",
    "MixedHaystack",
    "make_task",
    "retrieval_targets",
    "Mixture",
    "TaskStream",
    "TokenWindows",
    "DistributedSampler",
    "collate",
]
