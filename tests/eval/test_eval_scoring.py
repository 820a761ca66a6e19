"""Task scoring by generation, on hand-made cases whose right answer is known.

`ramba.inference.generate` is replaced by oracles that answer from the prompt (exactly like a model
that solved the task, or one that fails on a known set of cells), so the expected scores are known.
One test runs the real tiny model and checks the continuation against greedy decoding by full forwards.
"""

import numpy as np
import pytest
import torch

import ramba.inference
from eval_helpers import tiny_model
from ramba.data import ByteTokenizer, make_task
from ramba.eval.passkey import evaluate_passkey, passkey_table
from ramba.eval.results import EvalError
from ramba.eval.tasks import (
    GenerationSettings,
    build_task,
    continue_prompts,
    evaluate_task,
    evaluate_tasks,
    interval_bound,
    load_haystacks,
    other_needle_answers,
    over_haystacks,
    parse_task_spec,
    samples_per_length,
    tasks_tables,
)

TOK = ByteTokenizer()


class Oracle:
    """Stands in for `ramba.inference.generate`: looks the prompt up among known samples and writes
    `answer(sample)` (its ids, then eos padding), recording the shape of every call."""

    def __init__(self, samples, answer=lambda s: s.answer):
        self.by_prompt = {tuple(s.input_ids[: s.prompt_len].tolist()): s for s in samples}
        self.answer = answer
        self.calls = []

    def __call__(self, model, input_ids, max_new_tokens, **kw):
        self.calls.append((tuple(input_ids.shape), max_new_tokens, kw))
        rows = []
        for row in input_ids.tolist():
            ids = TOK.encode(self.answer(self.by_prompt[tuple(row)]))[:max_new_tokens]
            rows.append(ids + [TOK.eos_id] * (max_new_tokens - len(ids)))
        return torch.tensor(rows)


def _samples(task, lengths, depths, n, seed=0):
    return [task.generate(L, d, seed=seed + i) for L in lengths for d in depths for i in range(n)]


def test_passkey_oracle_scores_one_and_known_failures(monkeypatch):
    lengths, depths = [256, 301], [0.0, 0.5, 1.0]
    task = make_task("passkey", TOK)
    samples = _samples(task, lengths, depths, 3)
    # Right only in the shorter context, or at depth <= 0.5: the expected matrix is known cell by cell.
    oracle = Oracle(samples, lambda s: s.answer if len(s.input_ids) == 256 or s.depth <= 0.5 else " 00000.")
    monkeypatch.setattr(ramba.inference, "generate", oracle)
    result = evaluate_passkey(tiny_model(), TOK, lengths, depths, 3, GenerationSettings(segment_len=64, batch_size=2))
    np.testing.assert_array_equal(result["accuracy"], [[1, 1, 1], [1, 1, 0]])
    assert result["mean"] == pytest.approx(5 / 6)
    assert result["mean_by_length"] == {"256": 1.0, "301": pytest.approx(2 / 3)}
    # 3 samples per cell in batches of 2 -> shapes [2, T] and [1, T]; T is the prompt length, not the sample length.
    shapes = [c[0] for c in oracle.calls]
    assert shapes == [(2, 256 - 8), (1, 256 - 8)] * 3 + [(2, 301 - 8), (1, 301 - 8)] * 3
    assert all(c[1] == 8 + 8 and c[2]["segment_len"] == 64 and c[2]["mode"] == "exact" for c in oracle.calls)
    cell = result["cells"][-1]
    assert (cell["length"], cell["depth"]) == (301, 1.0)
    assert [r["prediction"] for r in cell["samples"]] == [" 00000."] * 3
    table = passkey_table(over_haystacks(lambda hay: result, {"template": None}))
    assert "301" in table and "haystack template, mean 0.833" in table


@pytest.mark.parametrize(
    "prediction, expected",
    [
        (" {key}.", 1.0),
        ("{key}", 1.0),
        ("key: {key}!", 1.0),
        (" {key}1", 0.0),
        (" 1{key}", 0.0),
        ("", 0.0),
        (" 12 {key}", 0.0),
        (" {key} 12", 1.0),
    ],
)
def test_passkey_hand_made_predictions(monkeypatch, prediction, expected):
    task = make_task("passkey", TOK)
    samples = _samples(task, [240], [0.5], 1)
    key = samples[0].answers[0]
    monkeypatch.setattr(ramba.inference, "generate", Oracle(samples, lambda s: prediction.format(key=key)))
    cells = evaluate_task(tiny_model(), task, [240], [0.5], 1)
    assert cells[0].score == expected


def test_needle_and_variable_tracking_partial_credit(monkeypatch):
    specs = ["niah_multivalue:num_values=2", "variable_tracking:num_hops=1"]
    tasks = {s: make_task(parse_task_spec(s)[0], TOK, **parse_task_spec(s)[1]) for s in specs}
    samples = [x for t in tasks.values() for x in _samples(t, [520], [0.25, 0.75], 2)]

    def half(s):  # the first of the two expected strings only -> 0.5 everywhere
        return " " + s.answers[0] + "."

    monkeypatch.setattr(ramba.inference, "generate", Oracle(samples, half))
    result = evaluate_tasks(tiny_model(), TOK, specs, [520], [0.25, 0.75], 2)
    for spec in specs:
        assert len(tasks[spec].generate(520, 0.25).answers) == 2
        np.testing.assert_array_equal(result["tasks"][spec]["scores"], [[0.5, 0.5]])
    monkeypatch.setattr(ramba.inference, "generate", Oracle(samples))
    result = evaluate_tasks(tiny_model(), TOK, specs, [520], [0.25, 0.75], 2)
    assert all(r["mean"] == 1.0 for r in result["tasks"].values())


def test_records_keep_answers_and_needle_positions(monkeypatch):
    task = make_task("niah_multivalue", TOK, num_values=2, distractors=1)
    samples = _samples(task, [600], [0.0, 1.0], 2)
    monkeypatch.setattr(ramba.inference, "generate", Oracle(samples, lambda s: " " + s.answers[1] + "."))
    cells = evaluate_task(tiny_model(), task, [600], [0.0, 1.0], 2)
    for cell in cells:
        for record in cell.samples:
            s = task.generate(600, cell.depth, seed=record["seed"])
            assert record["expected"] == s.answers and record["answer"] == s.answer
            assert record["prediction"] == " " + s.answers[1] + "." and record["score"] == 0.5
            assert record["needle_position"] == s.needles[s.target][0] and record["depth"] == cell.depth
            assert len(record["needles"]) == 3 and record["options"]["value_format"] == "number"
            # the prediction holds the second expected value only: traced to that one needle of the two wanted
            assert record["wanted_needles"] == s.answer_needles and record["answered_needles"] == [s.answer_needles[1]]
            for answer, position in zip(record["expected"], record["answer_positions"]):  # each answer's needle
                assert answer in TOK.decode(s.input_ids[position : position + 80]).split(".")[0]
    assert cells[0].samples[0]["needle_position"] == s.haystack_span[0]  # depth 0: the haystack's first token


def test_wrong_answers_are_traced_to_other_needles(monkeypatch):
    task = make_task("niah_multikey", TOK)
    samples = _samples(task, [700], [0.2, 0.8], 3)

    def answer(s):  # seed 0: right; seed 1: another key's value; seed 2: no needle's answer
        seed = next(i for i, x in enumerate(samples) if x is s) % 3
        other = next(i for i in range(len(s.needles)) if i not in s.answer_needles)
        return [s.answer, f" {s.needle_answers[other]}.", " 1234."][seed]

    monkeypatch.setattr(ramba.inference, "generate", Oracle(samples, answer))
    result = over_haystacks(
        lambda hay: evaluate_tasks(tiny_model(), TOK, ["niah_multikey"], [700], [0.2, 0.8], 3), {"template": None}
    )
    records = [r for c in result["haystacks"]["template"]["tasks"]["niah_multikey"]["cells"] for r in c["samples"]]
    assert [r["answered_needles"] == r["wanted_needles"] for r in records] == [True, False, False] * 2
    assert other_needle_answers(result["haystacks"]["template"]["tasks"]["niah_multikey"]) == (2, 4)
    assert tasks_tables(result).endswith("wrong answers holding another needle's answer: niah_multikey 2 of 4")
    old = {"cells": [{"samples": [{k: v for k, v in r.items() if "needles" not in k} for r in records]}]}
    assert other_needle_answers(old) == (0, 0)  # records from before the fields: not counted


def test_long_samples_above_1m(monkeypatch):
    calls = []
    monkeypatch.setattr(
        "ramba.eval.tasks.cell_samples", lambda task, length, depth, n, seed: calls.append((length, n)) or []
    )
    monkeypatch.setattr("ramba.eval.tasks._predict", lambda *a: [])
    monkeypatch.setattr("numpy.mean", lambda x: 0.0)
    evaluate_task(tiny_model(), make_task("passkey", TOK), [1 << 20, (1 << 20) + 1], [0.5], 2, long_samples=1)
    assert calls == [(1 << 20, 2), ((1 << 20) + 1, 1)]


def test_over_haystacks_names_each_and_the_held_out(monkeypatch, token_file):
    hays = load_haystacks(f"template,{token_file.path}", TOK)
    assert list(hays) == ["template", token_file.path.name] and hays["template"] is None
    specs = ["niah_single", "variable_tracking:num_hops=1"]
    samples = []
    for hay in hays.values():
        for spec in specs:
            samples += _samples(
                make_task(parse_task_spec(spec)[0], TOK, hay, **parse_task_spec(spec)[1]), [520, 700], [0.5], 1
            )
    monkeypatch.setattr(
        ramba.inference, "generate", Oracle(samples, lambda s: s.answer if len(s.input_ids) == 520 else "")
    )
    result = over_haystacks(
        lambda hay: evaluate_tasks(tiny_model(), TOK, specs, [520, 700], [0.5], 1, haystack=hay),
        hays,
        held_out=[token_file.path.name, "elsewhere"],
    )
    assert result["held_out"] == [token_file.path.name]
    assert [(r["source"], r["held_out"]) for r in result["haystacks"].values()] == [
        ("template", False),
        (str(token_file.path), True),
    ]
    table = tasks_tables(result)
    assert f"haystack {token_file.path.name} (held out)" in table
    assert table.count("n = 1 samples a table cell (95% interval within ±0.98)") == 2
    assert [line.split() for line in table.splitlines() if line.strip().startswith("niah_single")] == [
        ["niah_single", "|", "1.000", "0.000", "|", "0.500"]
    ] * 2
    with pytest.raises(EvalError, match="no such token file"):
        load_haystacks("template,nowhere/x", TOK)
    with pytest.raises(EvalError, match="given twice"):
        load_haystacks("template,template", TOK)


def test_bad_inputs_name_the_problem():
    task = make_task("passkey", TOK)
    with pytest.raises(EvalError, match="too short"):
        evaluate_task(tiny_model(), task, [100], [0.5], 1)
    with pytest.raises(EvalError, match="samples"):
        evaluate_task(tiny_model(), task, [300], [0.5], 0)
    with pytest.raises(EvalError, match="mode"):
        GenerationSettings(mode="slow")
    with pytest.raises(EvalError, match="key=value"):
        parse_task_spec("niah_single:num_keys")
    with pytest.raises(EvalError, match="unknown task"):
        evaluate_tasks(tiny_model(), TOK, ["nope"], [300], [0.5], 1)


def test_continuation_matches_greedy_full_forward():
    """The real inference path on prompt lengths that are not multiples of the chunk size (16)."""
    model = tiny_model(seed=1).double()
    prompts = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(0))
    ids = prompts.clone()
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = ids[:, 37:].tolist()
    for segment_len in (16, 20, 64):
        got = continue_prompts(model, prompts.numpy(), 5, GenerationSettings(segment_len=segment_len), eos_id=None)
        assert got == expected
    eos = expected[0][2]
    cut = continue_prompts(model, prompts.numpy(), 5, GenerationSettings(segment_len=20), eos_id=eos)
    assert cut[0] == expected[0][: expected[0].index(eos)]


def test_task_specs_take_every_option_type():
    assert parse_task_spec("passkey:key_format=uuid:vary=true:edge_depths=0.5:distractors=2") == (
        "passkey",
        {"key_format": "uuid", "vary": True, "edge_depths": 0.5, "distractors": 2},
    )
    task = build_task("niah_multikey:key_format=number:value_format=word:phrasing=3", TOK)
    s = task.generate(900, 0.5, seed=0)
    assert s.metadata == {"key_format": "number", "value_format": "word", "digits": 7, "phrasing": 3}
    with pytest.raises(EvalError, match="key_format: expected one of"):
        build_task("niah_single:key_format=hex", TOK)


def test_samples_per_length_and_the_interval_bound(monkeypatch):
    """Lengths with different sample counts (as --long-samples gives above 1M) show as a range; the bound is
    1.96 x the largest standard error of a mean of n scores in [0, 1] (0.5 / sqrt(n))."""
    specs = ["niah_single"]
    task = make_task("niah_single", TOK)
    lengths = [520, 700]
    samples = _samples(task, lengths, [0.0, 1.0], 3)
    monkeypatch.setattr(ramba.inference, "generate", Oracle(samples, lambda s: s.answer))
    r = evaluate_tasks(tiny_model(), TOK, specs, lengths, [0.0, 1.0], 3)
    assert samples_per_length(r) == [6, 6]
    r["tasks"]["niah_single"]["cells"][0]["samples"].pop()  # as if the first length had fewer samples
    assert samples_per_length(r) == [5, 6]
    table = tasks_tables({"haystacks": {"template": {**r, "held_out": False}}})
    assert "n = 5-6 samples a table cell (95% interval within ±0.44)" in table
    assert interval_bound(48) == pytest.approx(1.96 * np.std([0.0, 1.0]) / np.sqrt(48))
