"""Does a model's retrieval query encode the key it is asked about? A diagnosis of multi-key misses (issue 22).

Usage: python benchmarks/multikey_query_probe.py [--model tiny-ruler] [--haystack data/python-doc]
       [--task niah_multikey] [--seeds 4] [--length 4096] [--out PATH]

For each multi-key sample (seeds x depths 0, 0.5, 1) the question is asked once for every key of the sample:
the same haystack and needles, only the key named in the question changes (the keys are pseudo-words of one
length, so no position moves). At the token that predicts the answer's first character (the prompt and the
answer's leading space: the query that selects the chunks that character is read from, where
`ramba.data.retrieval_targets` puts the retrieval loss's target) the first retrieval layer's scores of each
needle's chunks (the best chunk of each needle, head 0) are read, giving a [asked key, needle] matrix per sample. A query that encodes the asked key puts each row's maximum on
its own needle (`asked_first`, chance 1 / keys) and raises a needle's score when that needle is the one asked
(`asked_gain`: the diagonal minus its column's mean, in score units), against `needle_spread`, how far the
needles' scores lie apart within a row. CPU fp32, exact prefill; about 15 s a sample on 2 cores. Writes JSON.

`--fit N`: which side lacks the key? For every ask of N seeds more (x 3 depths; one forward without a cache) it
keeps, at the retrieval layer's normed input, that token's state, each needle's state right after its
key, and each needle's landmark (the mean over the needle's complete chunks). A bilinear match of rank 64 between
that token and each needle side is fitted (Adam, cross-entropy over the sample's needles, inputs standardised)
on the even seeds' asks and scored on the odd seeds' (`fit` in the JSON: asked needle first, chance 1 / keys).
Above chance on unseen samples means both sides carry the key in a form a retrieval query could learn to match.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch

from ramba.data import ByteTokenizer
from ramba.data.tasks import answer_token_spans
from ramba.eval.retrieval import span_chunks
from ramba.eval.tasks import build_task, load_haystacks
from ramba.inference import prefill
from ramba.model.loading import load_model
from ramba.ops.retrieval import chunk_scores

ROOT = Path(__file__).resolve().parents[1]
KEY = re.compile(r"(?:for|of|Note:) (\w+)(?: is|:)")  # the key in a needle of any phrasing


def asks(tok, sample) -> tuple[list[str], list[torch.Tensor]]:
    """The needles' keys and, per key, the sample's input asking for it, up to the token that predicts the answer's
    first character (prompt + leading space): ``[T]`` int64 each."""
    keys = [KEY.search(tok.decode(sample.input_ids[a:b].tolist())).group(1) for a, b in sample.needles]
    q0, end = sample.haystack_span[1], sample.prompt_len + answer_token_spans(sample, tok).index(0)
    question = tok.decode(sample.input_ids[q0:end].tolist())
    inputs = []
    for key in keys:
        x = torch.as_tensor(sample.input_ids[:end]).clone()
        x[q0:] = torch.as_tensor(tok.encode(question.replace(keys[sample.target], key)))
        inputs.append(x)
    return keys, inputs


def probe_sample(model, tok, sample) -> np.ndarray:
    """``[keys, needles]`` retrieval scores at the token that predicts the answer, one row per key asked."""
    layer = next(m for kind, m in zip(model.model.layer_kinds, model.model.layers) if kind == "retrieval")
    S = model.config.chunk_size
    captured = {}

    def hook(module, args, _out):
        hidden, ctx = args
        captured["scores"] = chunk_scores(module.queries(hidden[:, -1:]), ctx.store.landmarks)[0, 0, 0]

    chunks = [span_chunks(n, S) for n in sample.needles]
    rows = []
    handle = layer.register_forward_hook(hook)
    try:
        for x in asks(tok, sample)[1]:
            with torch.no_grad():
                _, cache = prefill(model, x[None, :-1], 2048, "exact")
                model(input_ids=x[None, -1:], past_key_values=cache, use_cache=True)
            rows.append([float(captured["scores"][c].max()) for c in chunks])
    finally:
        handle.remove()
    return np.array(rows)


def match_features(model, tok, sample) -> list[tuple]:
    """Per key asked: ``(the token that predicts the answer [d], key states [needles, d], needle landmarks
    [needles, R * Dr], asked needle)``, all at the first retrieval layer's normed input (one forward without a cache)."""
    layer = next(m for kind, m in zip(model.model.layer_kinds, model.model.layers) if kind == "retrieval")
    S = model.config.chunk_size
    captured = {}

    def hook(module, args, _out):
        hidden, ctx = args
        captured["hidden"], captured["landmarks"] = module.norm(hidden[0]), ctx.memory.landmarks[0]

    keys, inputs = asks(tok, sample)
    texts = [tok.decode(sample.input_ids[a:b].tolist()) for a, b in sample.needles]
    key_ends = [a + len(tok.encode(t[: t.index(k) + len(k)])) - 1 for (a, _), t, k in zip(sample.needles, texts, keys)]
    out = []
    handle = layer.register_forward_hook(hook)
    try:
        for i, x in enumerate(inputs):
            with torch.no_grad():
                model(input_ids=x[None])
            hidden, landmarks = captured["hidden"], captured["landmarks"]
            marks = []
            for needle in sample.needles:
                chunks = span_chunks(needle, S)
                marks.append(landmarks[chunks[chunks < len(landmarks)]].mean(0).reshape(-1))
            out.append((hidden[-1], hidden[key_ends], torch.stack(marks), i))
    finally:
        handle.remove()
    return out


def fit_match(train: list, test: list, rank: int = 64, steps: int = 300, lr: float = 1e-2) -> tuple[float, float]:
    """Asked-needle-first rate on ``train`` and ``test`` of a bilinear match ``(W q) · (V n)`` fitted on ``train``;
    each item ``(q [dq], needles [n, dn], asked index)``; inputs standardised by ``train``'s mean and spread."""
    g = torch.Generator().manual_seed(0)
    qs, ns = torch.stack([t[0] for t in train]), torch.cat([t[1] for t in train])
    mq, sq, mn, sn = qs.mean(0), qs.std(0).clamp_min(1e-6), ns.mean(0), ns.std(0).clamp_min(1e-6)
    w = (torch.randn(rank, qs.shape[1], generator=g) * 0.05).requires_grad_(True)
    v = (torch.randn(rank, ns.shape[1], generator=g) * 0.05).requires_grad_(True)
    opt = torch.optim.Adam([w, v], lr=lr, weight_decay=1e-4)

    def logits(item):
        return ((item[1] - mn) / sn) @ v.T @ (w @ ((item[0] - mq) / sq))

    for _ in range(steps):
        loss = sum(torch.nn.functional.cross_entropy(logits(t)[None], torch.tensor([t[2]])) for t in train)
        opt.zero_grad()
        (loss / len(train)).backward()
        opt.step()
    with torch.no_grad():
        return tuple(float(np.mean([int(logits(t).argmax()) == t[2] for t in part])) for part in (train, test))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-ruler")
    ap.add_argument("--haystack", default="data/python-doc")
    ap.add_argument("--task", default="niah_multikey", help="a task spec, e.g. niah_multikey:phrasing=1")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "multikey_query_probe.json"))
    ap.add_argument("--fit", type=int, default=0, help="also fit the match probes on this many more seeds")
    args = ap.parse_args()
    tok = ByteTokenizer()
    model = load_model(args.model, "cpu", torch.float32).eval()
    task = build_task(args.task, tok, next(iter(load_haystacks(args.haystack, tok).values())))
    samples = []
    for seed in range(args.seeds):
        for depth in (0.0, 0.5, 1.0):
            m = probe_sample(model, tok, task.generate(args.length, depth, seed))
            n = len(m)
            samples.append(
                {
                    "seed": seed,
                    "depth": depth,
                    "scores": m.tolist(),
                    "asked_first": float(np.mean(m.argmax(1) == np.arange(n))),
                    "asked_gain": float(np.mean(np.diag(m) - m.mean(0))),
                    "needle_spread": float(np.mean(np.ptp(m, 1))),
                }
            )
            print(
                f"seed {seed} depth {depth}: " + ", ".join(f"{k} {samples[-1][k]:.4g}" for k in list(samples[-1])[3:])
            )
    summary = {k: float(np.mean([s[k] for s in samples])) for k in ("asked_first", "asked_gain", "needle_spread")}
    print("mean:", summary, f"(asked_first by chance: {1 / n:.2f})")
    result = {"model": args.model, "haystack": args.haystack, "task": args.task, "length": args.length, **summary}
    if args.fit:
        train, test = [], []
        for seed in range(args.seeds, args.seeds + args.fit):
            for depth in (0.0, 0.5, 1.0):
                (train if seed % 2 == 0 else test).extend(
                    match_features(model, tok, task.generate(args.length, depth, seed))
                )
        result["fit"] = {"train_asks": len(train), "test_asks": len(test)}
        for name, side in (("key_states", 1), ("landmarks", 2)):
            acc = fit_match(*([(a[0], a[side], a[3]) for a in part] for part in (train, test)))
            result["fit"][name] = {"train": acc[0], "test": acc[1]}
        print("fit:", result["fit"])
    Path(args.out).write_text(json.dumps({**result, "samples": samples}, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
