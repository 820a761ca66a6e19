"""Synthetic long-context tasks (RULER-style), generated on the fly at any length and needle depth.

Every task builds a sample of exactly `length` tokens:

    [bos] intro  haystack-with-needles  question  answer  eos
    `---------------- prompt ----------------'  `- answer_ids -'

The haystack is real text from a token file (`TokenFileHaystack`) or a repeated template
(`TemplateHaystack`). A needle at depth `d` starts `round(d * H)` haystack tokens into the haystack,
`H` the number of haystack tokens (needles excluded). Everything is drawn from `random.Random(seed)`,
so a (task, length, depth, seed) gives the same sample on every machine.

Tasks (`make_task(name, tokenizer, haystack, **params)`):
- `passkey`: a 5-digit pass key hidden in the haystack;
- `niah_single`, `niah_multikey`, `niah_multivalue`, `niah_multiquery`: "special magic numbers" for
  word keys, with distractor keys, several values per key, or several keys asked at once;
- `variable_tracking`: chains `VAR A = 12345`, `VAR B = A`, ...; name every variable holding the value.
Each task's `score(sample, prediction)` returns a float in [0, 1].

Options every task takes (their defaults give the samples of the first versions, seed for seed):
- `distractors`: near-miss needles (a key, name or value one character off the asked one) at random depths;
- `key_format` / `value_format`: "number" (of `digits` digits), "word" (a pronounceable pseudo-word) or
  "uuid" (`8-4-4-4-12` hex digits); `phrasing`: an index into the task's needle and question wordings;
- `vary`: draw the formats, the number of digits and the phrasing per sample instead (again while the
  sample would not fit its length, so short contexts get the shorter formats more often);
- `edge_depths`: when the depth is drawn (depth None), the probability of an edge depth instead of a
  uniform one: 0, 1 (the needle right before the question) or inside the last `edge_tokens` haystack
  tokens (the last chunks, the local mixer's window), where a model trained on uniform depths is weakest.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ramba.data.tokens import TokenFile

__all__ = [
    "TaskSample",
    "TemplateHaystack",
    "TokenFileHaystack",
    "MixedHaystack",
    "FORMATS",
    "PasskeyTask",
    "NeedleTask",
    "VariableTrackingTask",
    "TASKS",
    "make_task",
    "answer_token_needles",
    "answer_token_spans",
    "retrieval_targets",
]

IGNORE_INDEX = -100
DEFAULT_TEMPLATE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass
class TaskSample:
    """One generated example.

    input_ids:  `[length]` int64, prompt followed by the answer and eos.
    prompt_len: number of prompt tokens; `input_ids[prompt_len:]` is the answer (eos included).
    answers:    the strings a correct prediction must contain (key, values or variable names).
    answer:     the answer text the sample ends with.
    needles:    `(start, end)` token spans of the needles in `input_ids`, in order of position.
    target:     index into `needles` of the needle asked about (placed at `depth`).
    haystack_span: `(start, end)` of the region holding haystack and needles.
    answer_needles: per answer, the index into `needles` of the needle that holds it.
    needle_answers: per needle (in the order of `needles`), the string an answer read from it would hold (its
                    value, pass key or variable name; distractors' too), so a wrong answer can be traced to a needle.
    metadata:   the sample's options (formats, digits, phrasing), drawn per sample with `vary`.
    """

    task: str
    input_ids: np.ndarray
    prompt_len: int
    answers: list[str]
    answer: str
    needles: list[tuple[int, int]]
    target: int
    depth: float
    haystack_span: tuple[int, int]
    answer_needles: list[int] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    needle_answers: list[str] = field(default_factory=list)

    @property
    def answer_ids(self) -> np.ndarray:
        return self.input_ids[self.prompt_len :]

    def needles_answered(self, prediction: str) -> list[int]:
        """Indices into `needles` of the needles whose answer string (`needle_answers`) `prediction` holds as a
        whole word: the asked ones when it is right, another key's, chain's or a distractor's when it is not."""
        return [i for i, a in enumerate(self.needle_answers) if _contains_word(prediction, a)]

    def labels(self) -> np.ndarray:
        """`[length]` int64: the answer tokens, IGNORE_INDEX (-100) on the prompt."""
        labels = self.input_ids.copy()
        labels[: self.prompt_len] = IGNORE_INDEX
        return labels


def answer_token_spans(sample: TaskSample, tokenizer) -> list[int | None]:
    """Per answer token of `sample`: the index into `sample.answers` of the expected answer the token spells, or
    None for tokens of none (spaces, commas, the final period, eos)."""
    spans, cursor = [], 0
    for answer in sample.answers:  # the answers appear in the answer text in order
        start = sample.answer.index(answer, cursor)
        spans.append((start, start + len(answer)))
        cursor = start + len(answer)
    ids = sample.answer_ids.tolist()
    out = []
    for t in range(len(ids)):
        a, b = len(tokenizer.decode(ids[:t])), len(tokenizer.decode(ids[: t + 1]))
        hit = [k for k, (s, e) in enumerate(spans) if a < e and s < b]
        out.append(hit[0] if hit else None)
    return out


def answer_token_needles(sample: TaskSample, tokenizer) -> list[int]:
    """Per answer token of `sample`: the index into `sample.needles` of the needle holding the expected answer
    the token spells, or `sample.target` for tokens of none (spaces, commas, the final period, eos)."""
    return [
        sample.answer_needles[k] if k is not None and sample.answer_needles else sample.target
        for k in answer_token_spans(sample, tokenizer)
    ]


def retrieval_targets(sample: TaskSample, tokenizer, chunk_size: int) -> np.ndarray:
    """`[len(input_ids), 2]` int64: at position `p` whose token predicts the first token of an expected answer
    (answer token `j = p + 1 - prompt_len`), the first and last chunk of the needle that answer is read from, among
    the chunks complete before `p` (chunk `c` is visible at `p` iff `(c + 1) * chunk_size <= p`, as in chunk
    selection); `-1, -1` at every other position and where none of the needle's chunks is visible yet
    (docs/design.md §6). Only first tokens: once an answer's first tokens are in the input, its needle can be found
    by them, not by the key the question asks."""
    out = np.full((len(sample.input_ids), 2), -1, dtype=np.int64)
    if not sample.needles:
        return out
    spans = answer_token_spans(sample, tokenizer)
    for j, span in enumerate(spans):
        if span is None or (j > 0 and spans[j - 1] == span):
            continue
        p = sample.prompt_len + j - 1
        start, end = sample.needles[sample.answer_needles[span] if sample.answer_needles else sample.target]
        first, last = start // chunk_size, min((end - 1) // chunk_size, p // chunk_size - 1)
        if first <= last:
            out[p] = first, last
    return out


class TemplateHaystack:
    """A short text repeated as often as needed."""

    def __init__(self, tokenizer, text: str = DEFAULT_TEMPLATE):
        self.ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
        if self.ids.size == 0:
            raise ValueError("text: the haystack template is empty")

    def tokens(self, n: int, rng: random.Random) -> np.ndarray:
        """`[n]` int64 ids."""
        reps = -(-n // self.ids.size)
        return np.tile(self.ids, max(reps, 1))[:n]


class TokenFileHaystack:
    """Contiguous spans of real text from a token file (a random span per sample)."""

    def __init__(self, token_file: TokenFile | str, tokenizer=None, start: int = 0, end: int | None = None):
        self.file = token_file if isinstance(token_file, TokenFile) else TokenFile(token_file)
        if tokenizer is not None:
            self.file.check_tokenizer(tokenizer)
        self.start = start
        self.end = len(self.file) if end is None else end
        if not 0 <= self.start < self.end <= len(self.file):
            raise ValueError(f"start, end: need 0 <= start < end <= {len(self.file)}, got {start}, {end}")

    def tokens(self, n: int, rng: random.Random) -> np.ndarray:
        """`[n]` int64 ids; a corpus shorter than `n` is repeated."""
        size = self.end - self.start
        if n <= size:
            off = self.start + rng.randrange(size - n + 1)
            return np.asarray(self.file.tokens[off : off + n], dtype=np.int64)
        region = np.asarray(self.file.tokens[self.start : self.end], dtype=np.int64)
        return np.tile(region, -(-n // size))[:n]


class MixedHaystack:
    """One of several haystacks, drawn per sample (e.g. spans of several corpora)."""

    def __init__(self, haystacks: Sequence):
        if not haystacks:
            raise ValueError("haystacks: need at least one haystack")
        self.haystacks = list(haystacks)

    def tokens(self, n: int, rng: random.Random) -> np.ndarray:
        """`[n]` int64 ids from a haystack drawn with `rng`."""
        return rng.choice(self.haystacks).tokens(n, rng)


_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
FORMATS = ("number", "word", "uuid")
_VARY_DIGITS = (3, 10)  # `vary`: numbers of 3 to 10 digits
_EDGE_DEPTHS = (0.2, 0.3)  # of the edge depths: the share of depth 0, of depth 1; the rest lie in the last tokens


def _pseudo_word(rng: random.Random, syllables: int = 3) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


def _draw(fmt: str, rng: random.Random, digits: int) -> str:
    """A random key or value of format `fmt` (see FORMATS)."""
    if fmt == "number":
        return str(rng.randrange(10 ** (digits - 1), 10**digits))
    if fmt == "word":
        return _pseudo_word(rng)
    return str(uuid.UUID(int=rng.getrandbits(128)))


def _near_miss(text: str, fmt: str, rng: random.Random) -> str:
    """`text` with one character replaced by another of its kind (digit, vowel, consonant, hex digit)."""
    spots = [i for i, c in enumerate(text) if c != "-"]
    i = rng.choice(spots)
    c = text[i]
    if fmt == "uuid":
        pool = "0123456789abcdef"
    elif c.isdigit():
        pool = "123456789" if i == 0 else "0123456789"
    else:
        pool = _VOWELS if c in _VOWELS else _CONSONANTS
    return text[:i] + rng.choice(pool.replace(c, "")) + text[i + 1 :]


# What a key of each format looks like in a prediction (a longer run of digits or letters is not the key).
_PATTERNS = {
    "number": r"\d+",
    "word": r"[A-Za-z]+",
    "uuid": r"(?<![\w-])[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}(?![\w-])",
}


def _unique(draw: Callable[[], str], n: int, taken: Sequence[str] = ()) -> list[str]:
    """`n` distinct draws, none of them in `taken`."""
    out: list[str] = []
    for _ in range(1000 * (n + 1)):
        if len(out) == n:
            return out
        x = draw()
        if x not in out and x not in taken:
            out.append(x)
    if len(out) == n:
        return out
    raise ValueError(f"cannot draw {n} distinct keys or values (e.g. {out[:3]}); use more digits or fewer needles")


def _check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(str, choices))}, got {value!r}")


def _contains_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", text) is not None


class _TooShort(ValueError):
    """The needles, question and answer of a sample need more tokens than its length."""


_VARY_ATTEMPTS = 100  # `vary`: options are drawn again (up to this often) until the sample fits its length


class Task:
    """Base class: subclasses draw the needles, question and answer; `_assemble` lays them out."""

    name = "task"
    intro = (
        "There is important information hidden inside a lot of irrelevant text. "
        "Find it and memorize it. I will quiz you about it.\n"
    )

    # The (needle, question, ...) wordings `phrasing` picks from; index 0 is the first version's.
    phrasings: tuple = ()
    formats: tuple = ("key_format", "value_format")  # the format options the task uses

    def __init__(
        self,
        tokenizer,
        haystack=None,
        distractors: int = 0,
        key_format: str = "number",
        value_format: str = "number",
        digits: int = 5,
        phrasing: int = 0,
        vary: bool = False,
        edge_depths: float = 0.0,
        edge_tokens: int = 512,
    ):
        self.tokenizer = tokenizer
        self.haystack = haystack if haystack is not None else TemplateHaystack(tokenizer)
        if not isinstance(distractors, int) or distractors < 0:
            raise ValueError(f"distractors: expected an int >= 0, got {distractors!r}")
        _check_choice("key_format", key_format, FORMATS)
        _check_choice("value_format", value_format, FORMATS)
        if not isinstance(digits, int) or digits < 1:
            raise ValueError(f"digits: expected an int >= 1, got {digits!r}")
        _check_choice("phrasing", phrasing, range(len(self.phrasings)))
        if not 0.0 <= edge_depths <= 1.0 or edge_tokens < 1:
            raise ValueError(
                f"edge_depths, edge_tokens: need a probability in [0, 1] and >= 1, got {edge_depths}, {edge_tokens}"
            )
        self.distractors, self.key_format, self.value_format = distractors, key_format, value_format
        self.digits, self.phrasing, self.vary = digits, phrasing, bool(vary)
        self.edge_depths, self.edge_tokens = edge_depths, edge_tokens

    def options(self, rng: random.Random) -> dict:
        """The sample's formats (those in `self.formats`), digits and phrasing: the task's own, or with
        `vary` drawn from `rng`."""
        if not self.vary:
            return {**{f: getattr(self, f) for f in self.formats}, "digits": self.digits, "phrasing": self.phrasing}
        return {
            **{f: rng.choice(FORMATS) for f in self.formats},
            "digits": rng.randint(*_VARY_DIGITS),
            "phrasing": rng.randrange(len(self.phrasings)),
        }

    def _edge_depth(self, length: int, rng: random.Random) -> float:
        u, near = rng.random(), min(1.0, self.edge_tokens / length)
        zero, one = _EDGE_DEPTHS
        return 0.0 if u < zero else 1.0 if u < zero + one else 1.0 - near * rng.random()

    def generate(self, length: int, depth: float | None = None, seed: int = 0) -> TaskSample:
        """A sample of exactly `length` tokens; `depth` in [0, 1] (None: drawn from the seed)."""
        if not isinstance(length, (int, np.integer)) or length <= 0:
            raise ValueError(f"length: expected a positive int, got {length!r}")
        if depth is not None and not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth: expected a float in [0, 1] or None, got {depth!r}")
        rng = random.Random(f"{self.name}:{seed}")
        if depth is None:
            depth = rng.random()
            if self.edge_depths and rng.random() < self.edge_depths:
                depth = self._edge_depth(int(length), rng)
        for attempt in range(_VARY_ATTEMPTS):
            try:
                return self._generate(int(length), float(depth), rng, self.options(rng))
            except _TooShort:
                if not self.vary or attempt == _VARY_ATTEMPTS - 1:
                    raise

    def _generate(self, length: int, depth: float, rng: random.Random, opt: dict) -> TaskSample:
        raise NotImplementedError

    def score(self, sample: TaskSample, prediction: str) -> float:
        """Fraction of `sample.answers` found as whole words in `prediction`."""
        return sum(_contains_word(prediction, a) for a in sample.answers) / len(sample.answers)

    def _assemble(
        self,
        length: int,
        rng: random.Random,
        needles: Sequence[str],
        needle_answers: Sequence[str],
        depths: Sequence[float],
        target: int,
        question: str,
        answer: str,
        answers: list[str],
        answer_needles: list[int],
        metadata: dict,
    ) -> TaskSample:
        """Lays out `needles` (the i-th at `depths[i]`, holding the answer string `needle_answers[i]`) in the haystack;
        `target` and `answer_needles` index `needles` as given, the sample's fields index them in order of position."""
        tok = self.tokenizer
        head = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(self.intro)
        needle_ids = [tok.encode(" " + n + " ") for n in needles]
        question_ids = tok.encode("\n" + question)
        answer_ids = tok.encode(answer) + [tok.eos_id]
        fixed = len(head) + sum(map(len, needle_ids)) + len(question_ids) + len(answer_ids)
        n_hay = length - fixed
        if n_hay < 0:
            raise _TooShort(f"length: {length} tokens is too short for task {self.name}; it needs at least {fixed}")
        hay = self.haystack.tokens(n_hay, rng)
        positions = [round(d * n_hay) for d in depths]
        order = sorted(range(len(needles)), key=lambda i: (positions[i], i))
        pieces = [np.asarray(head, dtype=np.int64)]
        spans: dict[int, tuple[int, int]] = {}
        cursor, pos = len(head), 0
        for i in order:
            pieces.append(hay[pos : positions[i]])
            cursor += positions[i] - pos
            pos = positions[i]
            pieces.append(np.asarray(needle_ids[i], dtype=np.int64))
            spans[i] = (cursor, cursor + len(needle_ids[i]))
            cursor += len(needle_ids[i])
        pieces.append(hay[pos:])
        hay_end = cursor + n_hay - pos
        pieces += [np.asarray(question_ids, dtype=np.int64), np.asarray(answer_ids, dtype=np.int64)]
        ids = np.concatenate(pieces)
        assert ids.size == length
        return TaskSample(
            task=self.name,
            input_ids=ids,
            prompt_len=length - len(answer_ids),
            answers=answers,
            answer=answer,
            needles=[spans[i] for i in order],
            target=order.index(target),
            depth=depths[target],
            haystack_span=(len(head), hay_end),
            answer_needles=[order.index(i) for i in answer_needles],
            metadata=metadata,
            needle_answers=[needle_answers[i] for i in order],
        )


# Near misses of "The pass key is N.": names and numbers that a retrieval trained on the plain task scores
# like the pass key (a byte-level model found "the net mask ``255.255.255.0``" in python-doc as close).
DISTRACTOR_NAMES = (
    "pass code",
    "pass word",
    "past key",
    "mass key",
    "pass kit",
    "bass key",
    "glass key",
    "class key",
    "master key",
    "net mask",
    "mask",
    "key pass",
    "passport number",
    "access key",
    "gas meter",
)


class PasskeyTask(Task):
    """Find a random pass key of `digits` digits (or always the same `key`); with `key_format` a word or
    UUID-like string instead. `distractors` near-miss sentences (another name, another number or a near miss
    of the key: "The net mask is 255.255.255.0.") go at random depths, for training a retrieval that tells
    the pass key from look-alikes."""

    name = "passkey"
    formats = ("key_format",)
    # (needle, question); the answer is " KEY."
    phrasings = (
        ("The pass key is {key}. Remember it. {key} is the pass key.", "What is the pass key? The pass key is"),
        (
            "Remember this pass key: {key}. The pass key is {key}.",
            "Question: which pass key was given in the text? Answer: the pass key is",
        ),
        (
            "Here is the pass key you will need later: {key}.",
            "Tell me the pass key from the text above. The pass key is",
        ),
        ("Pass key = {key}.", "Recall the pass key. Pass key ="),
    )

    def __init__(
        self, tokenizer, haystack=None, digits: int = 5, key: str | None = None, distractors: int = 0, **options
    ):
        super().__init__(tokenizer, haystack, distractors, digits=digits, **options)
        if key is not None and not (
            isinstance(key, str) and key.isascii() and re.fullmatch(_PATTERNS[self.key_format], key)
        ):
            kind = "a string of digits" if self.key_format == "number" else f"a {self.key_format} (key_format)"
            raise ValueError(f"key: expected {kind}, got {key!r}")
        self.key = key

    def _generate(self, length, depth, rng, opt):
        if self.key is not None:
            opt["key_format"] = self.key_format  # a fixed key keeps its format
        fmt, digits = opt["key_format"], opt["digits"]
        key = _draw(fmt, rng, digits)
        key = self.key or key  # the draw happens either way, so the haystack of a seed does not depend on `key`
        needle, question = self.phrasings[opt["phrasing"]]
        needles, needle_answers = [needle.format(key=key)], [key]
        depths = [depth]
        for _ in range(self.distractors):  # drawn after the key: a seed's sample without distractors is unchanged
            name = rng.choice(DISTRACTOR_NAMES)
            if fmt != "number":
                number = _near_miss(key, fmt, rng) if rng.random() < 0.3 else _draw(fmt, rng, digits)
            elif rng.random() < 0.3:
                number = ".".join(str(rng.choice((255, 0, rng.randrange(256)))) for _ in range(4))
            else:
                number = _draw(fmt, rng, digits)
            needles.append(f"The {name} is {number}. {number} is the {name}.")
            needle_answers.append(number)
            depths.append(rng.random())
        return self._assemble(length, rng, needles, needle_answers, depths, 0, question, f" {key}.", [key], [0], opt)

    def score(self, sample, prediction):
        """1 when the first number (word, UUID: the key's format) in `prediction` is the pass key, else 0."""
        m = re.search(_PATTERNS[sample.metadata.get("key_format", "number")], prediction)
        return float(m is not None and m.group() == sample.answers[0])


_NOUNS = {"number": "number", "word": "word", "uuid": "UUID"}


class NeedleTask(Task):
    """RULER needle-in-a-haystack: `num_keys` keys (`key_format`, default pseudo-words) each with
    `num_values` "special magic numbers" (`value_format`, default numbers of `digits` = 7 digits); the
    question asks for the values of `num_queries` of the keys. The first value of the first queried key is
    placed at `depth`, every other needle at a random depth; the `distractors` give a near miss of a
    queried key (one letter or digit off) a value of its own."""

    # (needle, question for one value, question for several); {noun}: number, word or UUID
    phrasings = (
        (
            "One of the special magic {noun}s for {key} is: {value}.",
            "What is the special magic {noun} for {who} mentioned in the provided text? "
            "The special magic {noun} for {who} mentioned in the provided text is",
            "What are all the special magic {noun}s for {who} mentioned in the provided text? "
            "The special magic {noun}s for {who} mentioned in the provided text are",
        ),
        (
            "The secret {noun} of {key} is {value}.",
            "Which secret {noun} belongs to {who}? The secret {noun} of {who} is",
            "Which secret {noun}s belong to {who}? The secret {noun}s of {who} are",
        ),
        (
            "Note: {key} is linked to the {noun} {value}.",
            "Which {noun} is linked to {who}? Answer:",
            "List every {noun} linked to {who}, in order. Answer:",
        ),
        (
            "Record for {key}: {value}.",
            "Look up {who} in the records above. The {noun} recorded for {who} is",
            "Look up {who} in the records above. The {noun}s recorded for {who} are",
        ),
    )

    def __init__(
        self,
        tokenizer,
        haystack=None,
        num_keys=1,
        num_values=1,
        num_queries=1,
        name="niah",
        key_format="word",
        digits=7,
        **options,
    ):
        super().__init__(tokenizer, haystack, key_format=key_format, digits=digits, **options)
        if not (num_keys >= 1 and num_values >= 1 and 1 <= num_queries <= num_keys):
            raise ValueError(
                f"num_keys, num_values, num_queries: need >= 1 and num_queries <= num_keys, "
                f"got {num_keys}, {num_values}, {num_queries}"
            )
        self.num_keys, self.num_values, self.num_queries = num_keys, num_values, num_queries
        self.name = name

    def _generate(self, length, depth, rng, opt):
        kf, vf, digits = opt["key_format"], opt["value_format"], opt["digits"]
        needle, ask_one, ask_many = self.phrasings[opt["phrasing"]]
        noun = _NOUNS[vf]
        keys = _unique(lambda: _draw(kf, rng, digits), self.num_keys)
        values = _unique(lambda: _draw(vf, rng, digits), self.num_keys * self.num_values, keys)
        needles, needle_answers, depths, owner = [], [], [], []
        for k, key in enumerate(keys):
            for v in range(self.num_values):
                value = values[k * self.num_values + v]
                needles.append(needle.format(noun=noun, key=key, value=value))
                needle_answers.append(value)
                depths.append(rng.random())
                owner.append(k)
        depths[0] = depth
        queried = sorted(rng.sample(range(self.num_keys), self.num_queries))
        if 0 not in queried:
            queried[0] = 0
            queried.sort()
        if self.distractors:  # drawn last: a seed's sample without distractors is unchanged
            near = [keys[rng.choice(queried)] for _ in range(self.distractors)]
            fake_keys = [_unique(lambda k=k: _near_miss(k, kf, rng), 1, keys)[0] for k in near]
            fake_values = _unique(lambda: _draw(vf, rng, digits), self.distractors, keys + values + fake_keys)
            for key, value in zip(fake_keys, fake_values):
                needles.append(needle.format(noun=noun, key=key, value=value))
                needle_answers.append(value)
                depths.append(rng.random())
                owner.append(-1)
        # Values are listed per queried key in order of appearance (depth), as a reader would find them.
        answers, answer_needles = [], []
        for k in queried:
            idx = [i for i in range(len(needles)) if owner[i] == k]
            for i in sorted(idx, key=lambda i: (depths[i], i)):
                answers.append(values[i])
                answer_needles.append(i)
        names = [keys[k] for k in queried]
        who = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        question = (ask_one if len(answers) == 1 else ask_many).format(noun=noun, who=who)
        return self._assemble(
            length,
            rng,
            needles,
            needle_answers,
            depths,
            0,
            question,
            " " + ", ".join(answers) + ".",
            answers,
            answer_needles,
            opt,
        )


class VariableTrackingTask(Task):
    """RULER variable tracking: `num_chains` chains of `num_hops + 1` assignments
    (`VAR A = 12345`, `VAR B = A`, ...); name every variable of the chain holding the asked value
    (`value_format`, default numbers of `digits` = 5 digits). The asked chain's first assignment is placed
    at `depth`, its later ones after it; the `distractors` are more chains whose value is a near miss of
    the asked one (a digit or letter off). The variables' names are 5 capital letters."""

    name = "variable_tracking"
    formats = ("value_format",)
    # (assignment, question); the answer lists the chain's variables
    phrasings = (
        (
            "VAR {cur} = {prev}.",
            "Question: Find all variables that are assigned the value {value} in the text above. "
            "Answer: The variables assigned the value {value} are:",
        ),
        (
            "Set {cur} to {prev}.",
            "Question: Which variables hold the value {value} after the steps above? Answer: The variables are:",
        ),
        ("let {cur} := {prev};", "Which variables end up equal to {value}? They are:"),
    )

    def __init__(self, tokenizer, haystack=None, num_chains=1, num_hops=4, digits=5, **options):
        super().__init__(tokenizer, haystack, digits=digits, **options)
        if num_chains < 1 or num_hops < 0:
            raise ValueError(f"num_chains, num_hops: need >= 1 and >= 0, got {num_chains}, {num_hops}")
        self.num_chains, self.num_hops = num_chains, num_hops

    def _generate(self, length, depth, rng, opt):
        upper = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        assign, question = self.phrasings[opt["phrasing"]]
        hops = self.num_hops + 1
        names = _unique(lambda: "".join(rng.choice(upper) for _ in range(5)), self.num_chains * hops)
        values = _unique(lambda: _draw(opt["value_format"], rng, opt["digits"]), self.num_chains)
        if self.distractors:  # drawn here but laid out last: a seed's sample without distractors is unchanged
            fake = _unique(lambda: _near_miss(values[0], opt["value_format"], rng), self.distractors, values)
            names += _unique(lambda: "".join(rng.choice(upper) for _ in range(5)), self.distractors * hops, names)
            values += fake
        needles, needle_answers, depths = [], [], []
        for c in range(len(values)):
            chain = names[c * hops : (c + 1) * hops]
            start = depth if c == 0 else rng.random()
            later = sorted(rng.uniform(start, 1.0) for _ in range(self.num_hops))
            needles.append(assign.format(cur=chain[0], prev=values[c]))
            depths.append(start)
            for prev, cur, d in zip(chain, chain[1:], later):
                needles.append(assign.format(cur=cur, prev=prev))
                depths.append(d)
            needle_answers += chain
        answers = names[:hops]
        return self._assemble(
            length,
            rng,
            needles,
            needle_answers,
            depths,
            0,
            question.format(value=values[0]),
            " " + " ".join(answers) + ".",
            answers,
            list(range(hops)),
            opt,
        )


TASKS: dict[str, Callable[..., Task]] = {
    "passkey": PasskeyTask,
    "niah_single": lambda tok, hay=None, **kw: NeedleTask(tok, hay, **{"name": "niah_single", **kw}),
    "niah_multikey": lambda tok, hay=None, **kw: NeedleTask(tok, hay, **{"num_keys": 4, "name": "niah_multikey", **kw}),
    "niah_multivalue": lambda tok, hay=None, **kw: NeedleTask(
        tok, hay, **{"num_values": 4, "name": "niah_multivalue", **kw}
    ),
    "niah_multiquery": lambda tok, hay=None, **kw: NeedleTask(
        tok, hay, **{"num_keys": 4, "num_queries": 4, "name": "niah_multiquery", **kw}
    ),
    "variable_tracking": VariableTrackingTask,
}


def make_task(name: str, tokenizer, haystack=None, **params) -> Task:
    """Builds the task `name` (a key of TASKS); `params` are the task's options (e.g. num_keys)."""
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r}; choose one of {', '.join(TASKS)}")
    try:
        return TASKS[name](tokenizer, haystack, **params)
    except TypeError as e:
        raise TypeError(f"task {name}: bad parameters {params} ({e})") from None
