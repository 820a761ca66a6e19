"""Synthetic tasks: exact lengths, needles where the depth says, answers recoverable by the scorer, determinism."""

import numpy as np
import pytest

from ramba.data import TASKS, ByteTokenizer, TemplateHaystack, TokenFileHaystack, load_tokenizer, make_task, prepare
from ramba.data.tasks import DISTRACTOR_NAMES

TOK = ByteTokenizer()
LENGTHS = [600, 1024, 3001]
DEPTHS = [0.0, 0.1, 0.5, 0.77, 1.0]


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("length", LENGTHS)
def test_length_depth_and_answer(name, length):
    task = make_task(name, TOK)
    for depth in DEPTHS:
        s = task.generate(length, depth, seed=3)
        assert s.input_ids.shape == (length,) and s.input_ids.dtype == np.int64
        assert s.input_ids[0] == TOK.bos_id and s.input_ids[-1] == TOK.eos_id
        # The needle asked about starts round(depth * H) haystack tokens in, H = haystack tokens without needles.
        h0, h1 = s.haystack_span
        needle_tokens = sum(e - b for b, e in s.needles)
        n_hay = (h1 - h0) - needle_tokens
        start, end = s.needles[s.target]
        before = sum(e - b for b, e in s.needles[: s.target])
        assert start - h0 - before == round(depth * n_hay)
        assert s.depth == depth
        needle_text = TOK.decode(s.input_ids[start:end])
        assert any(a in needle_text for a in s.answers)
        # Needles do not overlap and lie inside the haystack region, before the question.
        for (_, end0), (start1, _) in zip(s.needles, s.needles[1:]):
            assert end0 <= start1
        assert h0 <= s.needles[0][0] and s.needles[-1][1] <= h1 <= s.prompt_len
        # The answer the sample ends with scores 1; a wrong one scores less.
        answer = TOK.decode(s.answer_ids)
        assert answer == s.answer
        assert task.score(s, answer) == 1.0
        assert task.score(s, " 0000000.") == 0.0
        labels = s.labels()
        assert (labels[: s.prompt_len] == -100).all()
        np.testing.assert_array_equal(labels[s.prompt_len :], s.answer_ids)


@pytest.mark.parametrize("name", list(TASKS))
def test_deterministic_given_seed(name):
    task = make_task(name, TOK)
    a, b, c = task.generate(800, None, seed=5), task.generate(800, None, seed=5), task.generate(800, None, seed=6)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    assert a.depth == b.depth
    assert not np.array_equal(a.input_ids, c.input_ids)
    again = make_task(name, ByteTokenizer()).generate(800, None, seed=5)
    np.testing.assert_array_equal(a.input_ids, again.input_ids)


def test_partial_scores_and_prompt_hides_answer():
    task = make_task("niah_multivalue", TOK)
    s = task.generate(1500, 0.4, seed=0)
    assert len(s.answers) == 4
    assert task.score(s, " " + ", ".join(s.answers[:2]) + ".") == 0.5
    prompt = TOK.decode(s.input_ids[s.needles[-1][1] : s.prompt_len])
    assert not any(a in prompt for a in s.answers)
    vt = make_task("variable_tracking", TOK, num_chains=2, num_hops=3)
    s = vt.generate(2000, 0.2, seed=1)
    assert len(s.answers) == 4 and len(s.needles) == 8
    assert vt.score(s, " ".join(s.answers[:3])) == 0.75
    # Chain order: each variable is assigned before it is used.
    text = TOK.decode(s.input_ids[: s.prompt_len])
    positions = [text.index(f"VAR {v} =") for v in s.answers]
    assert positions == sorted(positions)
    pk = make_task("passkey", TOK, digits=7)
    s = pk.generate(500, 0.5, seed=2)
    assert len(s.answers[0]) == 7
    assert pk.score(s, f"{s.answers[0]}1") == 0.0 and pk.score(s, f" {s.answers[0]} is it") == 1.0
    # a fixed key replaces only the key: the haystack and the needle's place stay those of the seed
    fixed = make_task("passkey", TOK, digits=7, key="31415").generate(500, 0.5, seed=2)
    assert fixed.answers == ["31415"] and TOK.decode(fixed.answer_ids[:-1]) == " 31415."
    assert fixed.input_ids[: s.needles[0][0]].tolist() == s.input_ids[: s.needles[0][0]].tolist()
    # near-miss distractors: the pass key stays the one asked, each look-alike names something else
    for seed in range(5):
        hard = make_task("passkey", TOK, distractors=6).generate(1500, 0.5, seed=seed)
        plain = make_task("passkey", TOK).generate(1500, 0.5, seed=seed)
        assert hard.answers == plain.answers and len(hard.needles) == 7
        target = TOK.decode(hard.input_ids[slice(*hard.needles[hard.target])])
        assert target.strip() == f"The pass key is {hard.answers[0]}. Remember it. {hard.answers[0]} is the pass key."
        others = [TOK.decode(hard.input_ids[a:b]) for i, (a, b) in enumerate(hard.needles) if i != hard.target]
        assert all("pass key" not in o and any(f"The {n} is " in o for n in DISTRACTOR_NAMES) for o in others)


def test_real_text_haystack(tmp_path):
    (tmp_path / "a.txt").write_text("Call me Ishmael. Some years ago, never mind how long precisely. " * 40)
    tf = prepare([tmp_path / "a.txt"], tmp_path / "tf", TOK, progress=False)
    hay = TokenFileHaystack(tf, TOK)
    task = make_task("passkey", TOK, hay)
    s = task.generate(1200, 0.5, seed=0)
    assert len(s.input_ids) == 1200
    text = TOK.decode(s.input_ids)
    assert "Ishmael" in text and "The pass key is " + s.answers[0] in text
    long = task.generate(5000, 0.9, seed=0)  # longer than the corpus: the text repeats
    assert len(long.input_ids) == 5000
    assert TemplateHaystack(TOK).tokens(10, None).tolist() == TOK.encode("The grass ")


def test_tasks_with_a_subword_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = __import__("tokenizers").decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["[UNK]", "</s>", "<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["The grass is green. The sky is blue. One of the special magic numbers for key is: 12345."] * 20
    t.train_from_iterator(corpus, trainer)
    t.save(str(tmp_path / "bpe.json"))
    tok = load_tokenizer(tmp_path / "bpe.json")
    for name in TASKS:
        task = make_task(name, tok)
        s = task.generate(900, 0.3, seed=4)
        assert len(s.input_ids) == 900 and s.input_ids[0] == tok.bos_id
        assert task.score(s, tok.decode(s.answer_ids)) == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_task("nope", TOK)
    with pytest.raises(TypeError, match="bad parameters"):
        make_task("passkey", TOK, num_keys=3)
    with pytest.raises(ValueError, match="distractors: expected an int >= 0"):
        make_task("passkey", TOK, distractors=-1)
    with pytest.raises(ValueError, match="key: expected a string of digits"):
        make_task("passkey", TOK, key="12a")
    with pytest.raises(ValueError, match="num_queries"):
        make_task("niah_single", TOK, num_keys=1, num_queries=2)
    task = make_task("passkey", TOK)
    with pytest.raises(ValueError, match="too short"):
        task.generate(100, 0.5)
    with pytest.raises(ValueError, match="depth"):
        task.generate(1000, 1.5)
    with pytest.raises(ValueError, match="length"):
        task.generate(0, 0.5)
