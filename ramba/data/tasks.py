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
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .tokens import TokenFile

__all__ = [
    "TaskSample",
    "TemplateHaystack",
    "TokenFileHaystack",
    "PasskeyTask",
    "NeedleTask",
    "VariableTrackingTask",
    "TASKS",
    "make_task",
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
    metadata: dict = field(default_factory=dict)

    @property
    def answer_ids(self) -> np.ndarray:
        return self.input_ids[self.prompt_len :]

    def labels(self) -> np.ndarray:
        """`[length]` int64: the answer tokens, IGNORE_INDEX (-100) on the prompt."""
        labels = self.input_ids.copy()
        labels[: self.prompt_len] = IGNORE_INDEX
        return labels


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


def _pseudo_word(rng: random.Random) -> str:
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    return "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(3))


def _unique(draw: Callable[[], str], n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        x = draw()
        if x not in out:
            out.append(x)
    return out


def _contains_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", text) is not None


class Task:
    """Base class: subclasses draw the needles, question and answer; `_assemble` lays them out."""

    name = "task"
    intro = (
        "There is important information hidden inside a lot of irrelevant text. "
        "Find it and memorize it. I will quiz you about it.\n"
    )

    def __init__(self, tokenizer, haystack=None):
        self.tokenizer = tokenizer
        self.haystack = haystack if haystack is not None else TemplateHaystack(tokenizer)

    def generate(self, length: int, depth: float | None = None, seed: int = 0) -> TaskSample:
        """A sample of exactly `length` tokens; `depth` in [0, 1] (None: drawn from the seed)."""
        if not isinstance(length, (int, np.integer)) or length <= 0:
            raise ValueError(f"length: expected a positive int, got {length!r}")
        if depth is not None and not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth: expected a float in [0, 1] or None, got {depth!r}")
        rng = random.Random(f"{self.name}:{seed}")
        if depth is None:
            depth = rng.random()
        return self._generate(int(length), float(depth), rng)

    def _generate(self, length: int, depth: float, rng: random.Random) -> TaskSample:
        raise NotImplementedError

    def score(self, sample: TaskSample, prediction: str) -> float:
        """Fraction of `sample.answers` found as whole words in `prediction`."""
        return sum(_contains_word(prediction, a) for a in sample.answers) / len(sample.answers)

    def _assemble(
        self,
        length: int,
        rng: random.Random,
        needles: Sequence[str],
        depths: Sequence[float],
        target: int,
        question: str,
        answer: str,
        answers: list[str],
    ) -> TaskSample:
        tok = self.tokenizer
        head = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(self.intro)
        needle_ids = [tok.encode(" " + n + " ") for n in needles]
        question_ids = tok.encode("\n" + question)
        answer_ids = tok.encode(answer) + [tok.eos_id]
        fixed = len(head) + sum(map(len, needle_ids)) + len(question_ids) + len(answer_ids)
        n_hay = length - fixed
        if n_hay < 0:
            raise ValueError(f"length: {length} tokens is too short for task {self.name}; it needs at least {fixed}")
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
        )


# Near misses of "The pass key is N.": names and numbers that a retrieval trained on the plain task scores
# like the pass key (a byte-level model found "the net mask ``255.255.255.0``" in python-doc as close).
DISTRACTOR_NAMES = (
    "pass code", "pass word", "past key", "mass key", "pass kit", "bass key", "glass key", "class key",
    "master key", "net mask", "mask", "key pass", "passport number", "access key", "gas meter",
)


class PasskeyTask(Task):
    """Find a random pass key of `digits` digits (or always the same `key`, a string of digits).
    `distractors` near-miss sentences (another name, another number: "The net mask is 255.255.255.0.")
    go at random depths, for training a retrieval that tells the pass key from look-alikes."""

    name = "passkey"

    def __init__(self, tokenizer, haystack=None, digits: int = 5, key: str | None = None, distractors: int = 0):
        super().__init__(tokenizer, haystack)
        if digits < 1:
            raise ValueError(f"digits: expected >= 1, got {digits}")
        if key is not None and not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise ValueError(f"key: expected a string of digits, got {key!r}")
        if not isinstance(distractors, int) or distractors < 0:
            raise ValueError(f"distractors: expected an int >= 0, got {distractors!r}")
        self.digits, self.key, self.distractors = digits, key, distractors

    def _generate(self, length, depth, rng):
        key = str(rng.randrange(10 ** (self.digits - 1), 10**self.digits))
        key = self.key or key  # the draw happens either way, so the haystack of a seed does not depend on `key`
        needles = [f"The pass key is {key}. Remember it. {key} is the pass key."]
        depths = [depth]
        for _ in range(self.distractors):  # drawn after the key: a seed's sample without distractors is unchanged
            name = rng.choice(DISTRACTOR_NAMES)
            if rng.random() < 0.3:
                number = ".".join(str(rng.choice((255, 0, rng.randrange(256)))) for _ in range(4))
            else:
                number = str(rng.randrange(10 ** (self.digits - 1), 10**self.digits))
            needles.append(f"The {name} is {number}. {number} is the {name}.")
            depths.append(rng.random())
        return self._assemble(
            length, rng, needles, depths, 0, "What is the pass key? The pass key is", f" {key}.", [key]
        )

    def score(self, sample, prediction):
        """1 when the first number in `prediction` is the pass key, else 0."""
        m = re.search(r"\d+", prediction)
        return float(m is not None and m.group() == sample.answers[0])


class NeedleTask(Task):
    """RULER needle-in-a-haystack: `num_keys` keys each with `num_values` "special magic numbers"
    (7 digits); the question asks for the values of `num_queries` of the keys. The first value of
    the first queried key is placed at `depth`, every other needle at a random depth."""

    def __init__(self, tokenizer, haystack=None, num_keys=1, num_values=1, num_queries=1, name="niah"):
        super().__init__(tokenizer, haystack)
        if not (num_keys >= 1 and num_values >= 1 and 1 <= num_queries <= num_keys):
            raise ValueError(
                f"num_keys, num_values, num_queries: need >= 1 and num_queries <= num_keys, "
                f"got {num_keys}, {num_values}, {num_queries}"
            )
        self.num_keys, self.num_values, self.num_queries = num_keys, num_values, num_queries
        self.name = name

    def _generate(self, length, depth, rng):
        keys = _unique(lambda: _pseudo_word(rng), self.num_keys)
        values = _unique(lambda: str(rng.randrange(1_000_000, 10_000_000)), self.num_keys * self.num_values)
        needles, depths, owner = [], [], []
        for k, key in enumerate(keys):
            for v in range(self.num_values):
                needles.append(f"One of the special magic numbers for {key} is: {values[k * self.num_values + v]}.")
                depths.append(rng.random())
                owner.append(k)
        depths[0] = depth
        queried = sorted(rng.sample(range(self.num_keys), self.num_queries))
        if 0 not in queried:
            queried[0] = 0
            queried.sort()
        # Values are listed per queried key in order of appearance (depth), as a reader would find them.
        answers = []
        for k in queried:
            idx = [i for i in range(len(needles)) if owner[i] == k]
            answers += [values[i] for i in sorted(idx, key=lambda i: (depths[i], i))]
        names = [keys[k] for k in queried]
        who = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        if len(answers) == 1:
            question = (
                f"What is the special magic number for {who} mentioned in the provided text? "
                f"The special magic number for {who} mentioned in the provided text is"
            )
        else:
            question = (
                f"What are all the special magic numbers for {who} mentioned in the provided text? "
                f"The special magic numbers for {who} mentioned in the provided text are"
            )
        return self._assemble(length, rng, needles, depths, 0, question, " " + ", ".join(answers) + ".", answers)


class VariableTrackingTask(Task):
    """RULER variable tracking: `num_chains` chains of `num_hops + 1` assignments
    (`VAR A = 12345`, `VAR B = A`, ...); name every variable of the chain holding the asked value.
    The asked chain's first assignment is placed at `depth`, its later ones after it."""

    name = "variable_tracking"

    def __init__(self, tokenizer, haystack=None, num_chains=1, num_hops=4):
        super().__init__(tokenizer, haystack)
        if num_chains < 1 or num_hops < 0:
            raise ValueError(f"num_chains, num_hops: need >= 1 and >= 0, got {num_chains}, {num_hops}")
        self.num_chains, self.num_hops = num_chains, num_hops

    def _generate(self, length, depth, rng):
        upper = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        names = _unique(lambda: "".join(rng.choice(upper) for _ in range(5)), self.num_chains * (self.num_hops + 1))
        values = _unique(lambda: str(rng.randrange(10_000, 100_000)), self.num_chains)
        needles, depths = [], []
        for c in range(self.num_chains):
            chain = names[c * (self.num_hops + 1) : (c + 1) * (self.num_hops + 1)]
            start = depth if c == 0 else rng.random()
            later = sorted(rng.uniform(start, 1.0) for _ in range(self.num_hops))
            needles.append(f"VAR {chain[0]} = {values[c]}.")
            depths.append(start)
            for prev, cur, d in zip(chain, chain[1:], later):
                needles.append(f"VAR {cur} = {prev}.")
                depths.append(d)
        answers = names[: self.num_hops + 1]
        question = (
            f"Question: Find all variables that are assigned the value {values[0]} in the text above. "
            f"Answer: The variables assigned the value {values[0]} are:"
        )
        return self._assemble(length, rng, needles, depths, 0, question, " " + " ".join(answers) + ".", answers)


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
