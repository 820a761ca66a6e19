"""Does a model's retrieval query encode the key it is asked about? A diagnosis of multi-key misses (issue 22).

Usage: python benchmarks/multikey_query_probe.py [--model tiny-ruler] [--haystack data/python-doc]
       [--task niah_multikey] [--seeds 4] [--length 4096] [--out PATH]

For each multi-key sample (seeds x depths 0, 0.5, 1) the question is asked once for every key of the sample:
the same haystack and needles, only the key named in the question changes (the keys are pseudo-words of one
length, so no position moves). At the last prompt token (the query that selects the chunks for the first answer
token) the first retrieval layer's scores of each needle's chunks (the best chunk of each needle, head 0) are
read, giving a [asked key, needle] matrix per sample. A query that encodes the asked key puts each row's maximum on
its own needle (`asked_first`, chance 1 / keys) and raises a needle's score when that needle is the one asked
(`asked_gain`: the diagonal minus its column's mean, in score units), against `needle_spread`, how far the
needles' scores lie apart within a row. CPU fp32, exact prefill; about 15 s a sample on 2 cores. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch

from ramba.data import ByteTokenizer
from ramba.eval.retrieval import span_chunks
from ramba.eval.tasks import build_task, load_haystacks
from ramba.inference import prefill
from ramba.model.loading import load_model
from ramba.ops.retrieval import chunk_scores

ROOT = Path(__file__).resolve().parents[1]
KEY = re.compile(r"(?:for|of|Note:) (\w+)(?: is|:)")  # the key in a needle of any phrasing


def probe_sample(model, tok, sample) -> np.ndarray:
    """``[keys, needles]`` retrieval scores at the last prompt token, one row per key asked."""
    layer = next(m for kind, m in zip(model.model.layer_kinds, model.model.layers) if kind == "retrieval")
    S = model.config.chunk_size
    captured = {}

    def hook(module, args, _out):
        hidden, ctx = args
        captured["scores"] = chunk_scores(module.queries(hidden[:, -1:]), ctx.store.landmarks)[0, 0, 0]

    texts = [tok.decode(sample.input_ids[a:b].tolist()) for a, b in sample.needles]
    keys = [KEY.search(t).group(1) for t in texts]
    asked = keys[sample.target]
    q0 = sample.haystack_span[1]
    question = tok.decode(sample.input_ids[q0 : sample.prompt_len].tolist())
    chunks = [span_chunks(n, S) for n in sample.needles]
    ids = torch.as_tensor(sample.input_ids[: sample.prompt_len])
    rows = []
    handle = layer.register_forward_hook(hook)
    try:
        for key in keys:
            x = ids.clone()
            x[q0:] = torch.as_tensor(tok.encode(question.replace(asked, key)))
            with torch.no_grad():
                _, cache = prefill(model, x[None, :-1], 2048, "exact")
                model(input_ids=x[None, -1:], past_key_values=cache, use_cache=True)
            rows.append([float(captured["scores"][c].max()) for c in chunks])
    finally:
        handle.remove()
    return np.array(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-ruler")
    ap.add_argument("--haystack", default="data/python-doc")
    ap.add_argument("--task", default="niah_multikey", help="a task spec, e.g. niah_multikey:phrasing=1")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "multikey_query_probe.json"))
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
    Path(args.out).write_text(json.dumps({**result, "samples": samples}, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
