"""Retrieval targets of task samples (ramba.data.retrieval_targets, docs/design.md §6) and how a mixture carries
them: the query position of each answer's first token points at the chunks of the needle it is read from."""

import numpy as np
import pytest

from ramba.data import ByteTokenizer, Mixture, TaskStream, TokenWindows, collate, make_task, prepare, retrieval_targets
from ramba.data.tasks import answer_token_needles, answer_token_spans

TOK = ByteTokenizer()


@pytest.mark.parametrize(
    "task", ["passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking"]
)
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_targets_point_at_the_needle_of_each_answer_at_its_first_token(task, chunk_size):
    sample = make_task(task, TOK).generate(2048, 0.3, seed=3)
    targets = retrieval_targets(sample, TOK, chunk_size)
    assert targets.shape == (len(sample.input_ids), 2) and targets.dtype == np.int64
    spans, needles = answer_token_spans(sample, TOK), answer_token_needles(sample, TOK)
    firsts = [j for j, k in enumerate(spans) if k is not None and (j == 0 or spans[j - 1] != k)]
    assert len(firsts) == len(sample.answers)  # one target per expected answer
    rows = np.flatnonzero(targets[:, 0] >= 0)
    assert rows.tolist() == [sample.prompt_len - 1 + j for j in firsts]  # depth 0.3: all visible
    for j in firsts:
        p = sample.prompt_len - 1 + j
        start, end = sample.needles[needles[j]]
        assert sample.needle_answers[needles[j]] == sample.answers[spans[j]]  # the needle holding that answer
        lo, hi = targets[p]
        assert lo == start // chunk_size and hi == (end - 1) // chunk_size  # the needle's chunks, all of them
        assert (hi + 1) * chunk_size <= p  # complete before the query's position
    assert (targets[targets[:, 0] < 0] == -1).all()


def test_targets_keep_only_the_needle_chunks_complete_before_the_answer():
    sample = make_task("passkey", TOK).generate(1024, 1.0, seed=0)  # the needle right before the question
    (start, end), p = sample.needles[sample.target], sample.prompt_len  # the answer " 51573.": p predicts its "5"
    assert (start, end) == (918, 978) and p == 1016  # chunks of 64: 14 and 15; of 512: 1
    assert (retrieval_targets(sample, TOK, 512) == -1).all()  # chunk 1 ends at 1024 > 1016: nothing to retrieve
    targets = retrieval_targets(sample, TOK, 64)
    assert targets[p].tolist() == [14, 14]  # chunk 15 ends at 1024: only chunk 14 is visible


def test_a_mixture_with_targets_gives_every_example_three_fields(tmp_path):
    (tmp_path / "a.txt").write_text("".join(f"line {i} of the text.\n" for i in range(300)))
    tf = prepare([tmp_path / "a.txt"], tmp_path / "tf", TOK, progress=False)
    task = make_task("niah_multikey", TOK)
    mix = Mixture([TokenWindows(tf, 512, 0), TaskStream(task, 512, 1, retrieval_chunk_size=16)], [1, 1], 0, True)
    examples = [mix.example(i) for i in range(12)]
    assert {len(e) for e in examples} == {3}
    kinds = {mix.source_of(i) for i in range(12)}
    assert kinds == {0, 1}
    for i, (_, _, targets) in enumerate(examples):
        if mix.source_of(i) == 0:
            assert (targets == -1).all()
        else:
            sample = task.generate(512, None, seed=1 * 1_000_003 + i)
            assert np.array_equal(targets, retrieval_targets(sample, TOK, 16)) and (targets >= 0).any()
    ids, labels, targets = collate(examples[:4])
    assert ids.shape == (4, 512) and targets.shape == (4, 512, 2)
    plain = TaskStream(task, 512, 1)
    assert len(plain.example(0)) == 2 and len(collate([plain.example(0)])) == 2
