"""Tokenizers, memory-mapped token files, corpus preparation, synthetic long-context tasks, mixtures."""

from .mixture import DistributedSampler, Mixture, TaskStream, TokenWindows, collate
from .prepare import prepare
from .tasks import TASKS, MixedHaystack, TaskSample, TemplateHaystack, TokenFileHaystack, make_task
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from .tokens import DataError, TokenFile, TokenFileWriter

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
    "Mixture",
    "TaskStream",
    "TokenWindows",
    "DistributedSampler",
    "collate",
]
