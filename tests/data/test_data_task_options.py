"""Task options: key/value formats, phrasings, near-miss distractors, edge depths, `vary`, mixed haystacks."""

import hashlib
import re

import numpy as np
import pytest

from ramba.data import TASKS, ByteTokenizer, MixedHaystack, TokenFileHaystack, TokenFileWriter, make_task
from ramba.data.tasks import _PATTERNS, FORMATS

TOK = ByteTokenizer()
NEEDLE_TASKS = [n for n in TASKS if n.startswith("niah")]


def _text(s, span):
    return TOK.decode(s.input_ids[span[0] : span[1]])


def _question(s):
    """The text between the last needle and the answer."""
    return TOK.decode(s.input_ids[s.needles[-1][1] : s.prompt_len])


def _one_off(a: str, b: str) -> bool:
    return len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1


# sha256[:16] of input_ids made by the first version of the generators (before the options existed): the
# defaults must keep giving the same samples, seed for seed (recorded results and recipes rely on them).
GOLDEN = {
    ("passkey", (), 3000, None, 7): "f8a4b238baa9fc37",
    ("niah_multikey", (), 1000, 0.3, 0): "ed3e9e3b36a6cb5d",
    ("niah_multivalue", (), 4096, 1.0, 123): "93b484aad9d78a30",
    ("niah_multiquery", (("num_keys", 8), ("num_queries", 8)), 3000, None, 7): "f3c9a186a40a5138",
    ("variable_tracking", (("num_chains", 2), ("num_hops", 3)), 1000, 0.3, 0): "6c080c98725d19b5",
    ("passkey", (("distractors", 4),), 4096, 1.0, 123): "caf64581c80b6038",
}


@pytest.mark.parametrize("case", list(GOLDEN), ids=lambda c: c[0])
def test_defaults_give_the_first_versions_samples(case):
    name, params, length, depth, seed = case
    s = make_task(name, TOK, **dict(params)).generate(length, depth, seed)
    assert hashlib.sha256(s.input_ids.tobytes()).hexdigest()[:16] == GOLDEN[case]


@pytest.mark.parametrize("name", list(TASKS))
def test_every_format_and_phrasing(name):
    task_formats = make_task(name, TOK).formats
    for phrasing in range(len(make_task(name, TOK).phrasings)):
        for fmt in FORMATS:
            params = {f: fmt for f in task_formats}
            task = make_task(name, TOK, phrasing=phrasing, digits=6, **params)
            s = task.generate(1500, 0.4, seed=phrasing)
            assert len(s.input_ids) == 1500 and s.metadata["phrasing"] == phrasing
            # the values asked for (variable tracking: the value its chain starts from)
            asked = (
                s.answers
                if name != "variable_tracking"
                else [_text(s, s.needles[s.answer_needles[0]]).split()[-1].rstrip(".;")]
            )
            for a in asked:
                assert re.fullmatch(_PATTERNS[fmt], a), (fmt, a)
                if fmt == "number":
                    assert len(a) == 6
            # every answer sits in the needle `answer_needles` names
            for a, i in zip(s.answers, s.answer_needles):
                assert re.search(rf"(?<!\w){re.escape(a)}(?!\w)", _text(s, s.needles[i]))
            assert s.target in s.answer_needles
            assert task.score(s, s.answer) == 1.0
            assert TOK.decode(s.answer_ids[:-1]) == s.answer


@pytest.mark.parametrize("name", list(TASKS))
def test_vary_reaches_every_option(name):
    task = make_task(name, TOK, vary=True)
    seen = {f: set() for f in task.formats}
    phrasings, digits = set(), set()
    for seed in range(120):
        s = task.generate(1200, None, seed)
        assert len(s.input_ids) == 1200 and task.score(s, s.answer) == 1.0
        for f in task.formats:
            seen[f].add(s.metadata[f])
        phrasings.add(s.metadata["phrasing"])
        digits.add(s.metadata["digits"])
    assert all(v == set(FORMATS) for v in seen.values()), seen
    assert phrasings == set(range(len(task.phrasings)))
    assert digits == set(range(3, 11))
    # still a pure function of the seed
    np.testing.assert_array_equal(
        task.generate(1200, None, 5).input_ids,
        make_task(name, ByteTokenizer(), vary=True).generate(1200, None, 5).input_ids,
    )


@pytest.mark.parametrize("name", list(TASKS))
def test_depth_zero_and_one_are_the_haystack_edges(name):
    task = make_task(name, TOK, vary=True, distractors=2)
    for seed in range(4):
        first = task.generate(2000, 0.0, seed)
        assert first.needles[first.target][0] == first.haystack_span[0]  # the needle opens the haystack
        last = task.generate(2000, 1.0, seed)
        # at depth 1 the asked needle (and, for variable tracking, its whole chain) is right before the question
        end = last.needles[max(last.answer_needles)][1]
        assert end == last.haystack_span[1] and TOK.decode(last.input_ids[end : end + 1]) == "\n"


@pytest.mark.parametrize("name", list(TASKS))
def test_edge_depths_reach_the_last_tokens(name):
    task = make_task(name, TOK, edge_depths=1.0, edge_tokens=256)
    depths = [task.generate(4096, None, seed).depth for seed in range(60)]
    assert 0.0 in depths and 1.0 in depths
    inner = [d for d in depths if 0.0 < d < 1.0]
    assert inner and all(d >= 1 - 256 / 4096 for d in inner)
    for seed in range(10):  # so the asked needle starts within the last 256 tokens before the question
        s = task.generate(4096, None, seed)
        if 0.0 < s.depth:
            assert s.haystack_span[1] - s.needles[s.target][0] <= 256 + sum(b - a for a, b in s.needles)
    # without edge depths the draw is the first version's uniform one
    assert (
        make_task(name, TOK).generate(4096, None, 3).depth
        == make_task(name, TOK, edge_depths=0.0).generate(4096, None, 3).depth
    )


@pytest.mark.parametrize("name", NEEDLE_TASKS)
@pytest.mark.parametrize("key_format", FORMATS)
def test_needle_distractors_are_near_miss_keys(name, key_format):
    for seed in range(3):
        plain = make_task(name, TOK, key_format=key_format).generate(3000, 0.5, seed)
        hard_task = make_task(name, TOK, key_format=key_format, distractors=3)
        hard = hard_task.generate(3000, 0.5, seed)
        assert hard.answers == plain.answers and len(hard.needles) == len(plain.needles) + 3
        asked = set(re.findall(_PATTERNS[key_format] if key_format != "word" else r"\b[a-z]{6}\b", _question(hard)))
        keys = {re.search(r"for (\S+) is:", _text(hard, n))[1] for n in hard.needles}
        fakes = keys - set(re.findall(r"for (\S+) is:", "".join(_text(plain, n) for n in plain.needles)))
        assert len(fakes) >= 1
        assert all(any(_one_off(f, k) for k in asked) for f in fakes), (fakes, asked)
        # a prediction naming a distractor's value instead of the asked one scores 0 (single answer) or less
        fake_values = [
            re.search(r"is: (\S+)\.", _text(hard, n))[1]
            for i, n in enumerate(hard.needles)
            if i not in hard.answer_needles and re.search(r"for (\S+) is:", _text(hard, n))[1] in fakes
        ]
        wrong = " " + ", ".join(fake_values[:1] + hard.answers[1:]) + "."
        assert hard_task.score(hard, wrong) == (len(hard.answers) - 1) / len(hard.answers)


@pytest.mark.parametrize("value_format", FORMATS)
def test_variable_tracking_distractors_are_near_miss_values(value_format):
    task = make_task("variable_tracking", TOK, value_format=value_format, distractors=2, num_hops=2)
    plain = make_task("variable_tracking", TOK, value_format=value_format, num_hops=2).generate(2500, 0.3, seed=1)
    s = task.generate(2500, 0.3, seed=1)
    assert s.answers == plain.answers and len(s.needles) == 3 * 3
    value = re.search(r"value (\S+) in", _question(s))[1]
    starts = [re.search(r"= (\S+)\.", _text(s, n))[1] for n in s.needles]
    fakes = [v for v in starts if not v.isupper() and v != value]
    assert len(fakes) == 2 and all(_one_off(f, value) for f in fakes)
    # the fake chains' variables are not the answer
    fake_vars = [
        re.search(r"VAR (\S+) =", _text(s, n))[1] for n in s.needles if re.search(r"= (\S+)\.", _text(s, n))[1] in fakes
    ]
    assert task.score(s, " " + " ".join(fake_vars) + ".") == 0.0


@pytest.mark.parametrize("key_format", FORMATS)
def test_scorers_reject_near_misses(key_format):
    pk = make_task("passkey", TOK, key_format=key_format, distractors=3)
    niah = make_task("niah_single", TOK, value_format=key_format)
    rng = __import__("random").Random(0)
    for seed in range(5):
        for task in (pk, niah):
            s = task.generate(1500, 0.5, seed)
            right = s.answers[0]
            assert task.score(s, f" {right}.") == 1.0
            near = right[:-1] + ("x" if key_format == "word" else "0" if right[-1] != "0" else "1")
            assert task.score(s, f" {near}.") == 0.0
            assert task.score(s, f" {right}{'7' if key_format == 'number' else 'a'}.") == 0.0
            from ramba.data.tasks import _near_miss

            assert task.score(s, f" {_near_miss(right, key_format, rng)}.") == 0.0


def test_passkey_key_of_any_format():
    s = make_task("passkey", TOK, key_format="word", key="bakudo", vary=True).generate(900, 0.5, seed=3)
    assert s.answers == ["bakudo"] and s.metadata["key_format"] == "word"
    with pytest.raises(ValueError, match="key: expected a word"):
        make_task("passkey", TOK, key_format="word", key="123")


def test_mixed_haystack(tmp_path):
    files = []
    for i, word in enumerate(["alpha ", "omega "]):
        with TokenFileWriter(tmp_path / f"t{i}", TOK) as w:
            w.add(TOK.encode(word * 500))
            files.append(w.close())
    hay = MixedHaystack([TokenFileHaystack(f, TOK) for f in files])
    task = make_task("niah_single", TOK, hay)
    texts = [TOK.decode(task.generate(800, 0.5, seed).input_ids) for seed in range(12)]
    assert any("alpha" in t and "omega" not in t for t in texts) and any(
        "omega" in t and "alpha" not in t for t in texts
    )
    assert texts[3] == TOK.decode(make_task("niah_single", TOK, hay).generate(800, 0.5, 3).input_ids)
    with pytest.raises(ValueError, match="at least one haystack"):
        MixedHaystack([])


def test_bad_options():
    for bad, match in [
        ({"key_format": "hex"}, "key_format: expected one of number, word, uuid"),
        ({"value_format": "x"}, "value_format"),
        ({"phrasing": 9}, "phrasing: expected one of"),
        ({"edge_depths": 2.0}, "edge_depths"),
        ({"digits": 0}, "digits"),
        ({"distractors": -1}, "distractors"),
    ]:
        for name in TASKS:
            with pytest.raises(ValueError, match=match):
                make_task(name, TOK, **bad)
    with pytest.raises(ValueError, match="cannot draw"):  # 1-digit keys have too few near misses
        make_task("niah_single", TOK, key_format="number", value_format="number", digits=1, distractors=12).generate(
            2000, 0.5
        )


def test_vary_draws_again_until_the_sample_fits():
    task = make_task("niah_multivalue", TOK, vary=True, distractors=2)
    samples = [task.generate(900, None, seed) for seed in range(30)]  # 4 UUID values and keys need more than 900
    assert all(len(s.input_ids) == 900 for s in samples)
    assert {s.metadata["value_format"] for s in samples} >= {"number", "word"}
    with pytest.raises(ValueError, match="too short"):  # without vary the options are fixed, so it fails
        make_task("niah_multivalue", TOK, key_format="uuid", value_format="uuid").generate(900, 0.5)


def test_training_config_takes_a_list_of_haystacks(tmp_path):
    from ramba.train.config import config_from_dict
    from ramba.train.loop import build_data

    paths = []
    for i, word in enumerate(["alpha ", "omega "]):
        with TokenFileWriter(tmp_path / f"t{i}", TOK) as w:
            w.add(TOK.encode(word * 2000))
            paths.append(str(w.close().path))
    cfg = config_from_dict(
        {
            "data": {
                "seq_len": 1024,
                "sources": [
                    {
                        "task": "niah_multikey",
                        "haystack": paths,
                        "params": {"vary": True, "distractors": 2, "edge_depths": 0.5},
                    },
                    {"task": "passkey", "haystack": paths[0]},
                ],
            }
        }
    )
    mixture, _ = build_data(cfg, TOK)
    stream = mixture.sources[0]
    assert isinstance(stream.task.haystack, MixedHaystack)
    # each haystack stops before its file's held-out tail (data.holdout)
    assert all(0 < len(h.file) - h.end == round(len(h.file) * 0.01) for h in stream.task.haystack.haystacks)
    texts = [TOK.decode(stream.example(i)[0]) for i in range(10)]
    assert any("alpha" in t for t in texts) and any("omega" in t for t in texts)


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("value_format", FORMATS)
def test_needle_answers_trace_an_answer_to_its_needle(name, value_format):
    fmt = "key_format" if name == "passkey" else "value_format"
    task = make_task(name, TOK, distractors=2, **{fmt: value_format})
    for seed in range(3):
        s = task.generate(2500, 0.3, seed)
        assert len(s.needle_answers) == len(s.needles)
        for span, held in zip(s.needles, s.needle_answers):  # each needle's text holds its answer string
            assert re.search(rf"(?<![\w]){re.escape(held)}(?![\w])", _text(s, span)), (held, _text(s, span))
        assert [s.needle_answers[i] for i in s.answer_needles] == s.answers
        assert s.needles_answered(s.answer) == sorted(set(s.answer_needles))
        # an answer taken from another needle (another key's value, a distractor, another chain's name)
        others = [i for i in range(len(s.needles)) if i not in s.answer_needles]
        assert others, "distractors give every task a needle that is not asked for"
        assert s.needles_answered(f" {s.needle_answers[others[-1]]}.") == [others[-1]]
        assert s.needles_answered(" nothing here.") == []
