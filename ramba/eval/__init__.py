"""Evaluation: passkey retrieval over lengths x depths, synthetic long-context tasks, perplexity by
context length, the needle chunk's retrieval rank, results files with their provenance, and plots.
See docs/evaluation.md."""

from ramba.eval.passkey import evaluate_passkey, save_passkey
from ramba.eval.ppl import evaluate_ppl, save_ppl
from ramba.eval.results import EvalError, environment, write_results
from ramba.eval.retrieval import evaluate_needle_ranks, save_needle_ranks
from ramba.eval.tasks import GenerationSettings, evaluate_task, evaluate_tasks, save_tasks

__all__ = [
    "EvalError",
    "GenerationSettings",
    "environment",
    "write_results",
    "evaluate_passkey",
    "save_passkey",
    "evaluate_task",
    "evaluate_tasks",
    "save_tasks",
    "evaluate_ppl",
    "save_ppl",
    "evaluate_needle_ranks",
    "save_needle_ranks",
]
