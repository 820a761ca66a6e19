"""`ramba eval ranks`: the needle chunk's rank agrees with what the retrieval layer really selects."""

import json

import matplotlib.image

import ramba.cli.main as cli
from eval_helpers import tiny_model
from ramba.data import ByteTokenizer, make_task
from ramba.data.tasks import answer_token_needles
from ramba.eval.retrieval import needle_ranks
from ramba.ops.retrieval import chunk_scores


def test_ranks_agree_with_the_real_selection():
    model = tiny_model(seed=5, topk=3)
    sample = make_task("passkey", ByteTokenizer()).generate(700, 0.3, seed=1)
    layer = next(m for k, m in zip(model.model.layer_kinds, model.model.layers) if k == "retrieval")
    picked = []
    # the layer's own selection over the cache's landmarks (before any fetch re-indexes it into fetched chunks)
    handle = layer.register_forward_hook(
        lambda m, a, out: picked.append(
            m.select(m.queries(a[0]), a[1].store.landmarks, a[1].positions).indices[0, -1, 0].tolist()
        )
    )
    try:
        rows = needle_ranks(model, sample, segment_len=64, mode="exact")
    finally:
        handle.remove()
    answers = len(sample.input_ids) - 1 - sample.prompt_len
    assert [r["token"] for r in rows] == list(range(answers))
    start, end = sample.needles[0]
    needle = set(range(start // 16, (end - 1) // 16 + 1))
    for row, chosen in zip(rows, picked[-answers:]):
        assert row["chunks"] == (sample.prompt_len + row["token"] + 1) // 16
        assert row["selected"] == [bool(needle & set(chosen))]
        assert (row["rank"][0] < 3) == row["selected"][0] and (row["score"][0] >= row["kth_score"][0]) == row[
            "selected"
        ][0]


def test_eval_ranks_cli(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(
        [
            "eval",
            "ranks",
            "--model",
            str(model_dir),
            "--lengths",
            "400,900",
            "--depths",
            "0.2",
            "--segment-len",
            "128",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    data = json.loads((out / "ranks.json").read_text())
    assert data["lengths"] == [400, 900] and len(data["cells"]) == 2 and all(c["rows"] for c in data["cells"])
    assert matplotlib.image.imread(out / "ranks.png").ndim == 3
    assert "median rank" in capsys.readouterr().out


def test_ranks_follow_the_needle_of_the_answer_being_written():
    tok = ByteTokenizer()
    sample = make_task("niah_multivalue", tok, num_values=2, distractors=1).generate(900, 0.3, seed=2)
    wanted = answer_token_needles(sample, tok)
    first, second = sample.answer_needles
    assert first != second and sample.target in (first, second)
    # " v1, v2." then eos, one byte a token
    expected = [sample.target] + [first] * 7 + [sample.target] * 2 + [second] * 7 + [sample.target] * 2
    assert wanted == expected
    model = tiny_model(seed=5, topk=3)
    layer = next(m for k, m in zip(model.model.layer_kinds, model.model.layers) if k == "retrieval")
    picked = []
    handle = layer.register_forward_hook(  # as in test_ranks_agree_with_the_real_selection
        lambda m, a, out: picked.append(
            m.select(m.queries(a[0]), a[1].store.landmarks, a[1].positions).indices[0, -1, 0].tolist()
        )
    )
    try:
        rows = needle_ranks(model, sample, segment_len=64, mode="exact", tokenizer=tok)
    finally:
        handle.remove()
    assert [r["needle"] for r in rows] == wanted[1 : len(rows) + 1]
    for row, chosen in zip(rows, picked[-len(rows) :]):
        start, end = sample.needles[row["needle"]]
        assert row["selected"] == [bool(set(range(start // 16, (end - 1) // 16 + 1)) & set(chosen))]


def test_eval_ranks_cli_for_variable_tracking(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(
        [
            "eval",
            "ranks",
            "--model",
            str(model_dir),
            "--task",
            "variable_tracking:num_hops=1",
            "--lengths",
            "500",
            "--depths",
            "0.1",
            "--segment-len",
            "128",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    data = json.loads((out / "ranks.json").read_text())
    cell = data["cells"][0]
    assert data["task"] == "variable_tracking:num_hops=1" and cell["answer_needles"] and cell["rows"]
    assert {r["needle"] for r in cell["rows"]} <= set(cell["answer_needles"])  # the chain's own needles only
    assert "variable_tracking:num_hops=1: rank" in capsys.readouterr().out


def test_ranks_report_when_another_needle_outscores_the_wanted_one():
    tok = ByteTokenizer()
    sample = make_task("niah_multikey", tok, distractors=1).generate(900, 0.5, seed=3)
    model = tiny_model(seed=5, topk=3)
    layer = next(m for k, m in zip(model.model.layer_kinds, model.model.layers) if k == "retrieval")
    seen = []  # every call's scores of all complete chunks for the last token, computed here from the layer
    handle = layer.register_forward_hook(
        lambda m, a, out: seen.append(chunk_scores(m.queries(a[0][:, -1:]), a[1].store.landmarks)[0, 0, 0])
    )
    try:
        rows = needle_ranks(model, sample, segment_len=64, mode="exact", tokenizer=tok)
    finally:
        handle.remove()
    assert len(sample.needles) == 5 and rows  # 4 keys and a near-miss key
    for row, scores in zip(rows, seen[-len(rows) :]):
        start, end = sample.needles[row["needle"]]
        own = {p // 16 for p in range(start, end)}
        rivals = {p // 16 for s, e in sample.needles for p in range(s, e)} - own
        rivals = [c for c in rivals if c < len(scores)]
        assert (row["other_score"] is None) == (not rivals)
        if rivals:
            assert row["other_score"] == [max(float(scores[c]) for c in rivals)]
            assert row["other_ahead"] == [row["other_score"][0] > row["score"][0]]
    single = make_task("niah_single", tok).generate(900, 0.5, seed=3)
    assert all(r["other_score"] is None for r in needle_ranks(model, single, 64, "exact", tok))
