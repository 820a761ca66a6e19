"""Dump the chunk selection a trained model makes on real text, for ramba/bench/hsa.py's "trained" pattern.

Usage: python benchmarks/dump_selection.py [--corpus corpus/python-doc] [--tokens 65536] [--out PATH]

Runs the shipped model ``ramba/pretrained/tiny-ruler.safetensors`` (chunk_size 64, topk 8, one
retrieval head) on the first ``--tokens`` bytes of the Python documentation (scripts/get_corpus.sh's
python-doc: its ``*.txt`` files in sorted path order, joined), records the indices its first HSA
layer receives and writes them as int16 ``[T, K]`` (empty slots, weight 0, as -1) with the source
description to ``benchmarks/results/selection_tiny_passkey.pt`` (1 MB at 64K tokens). CPU, ~1 min.
The committed file was dumped from the model shipped before 2026-12-01, tiny-passkey (in git history),
which the GPU results of that day used; --out another path to dump the present model's selection.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "ramba" / "pretrained" / "tiny-ruler.safetensors"
OUT = ROOT / "benchmarks" / "results" / "selection_tiny_passkey.pt"


def corpus_bytes(folder: Path, n: int) -> bytes:
    """The first ``n`` bytes of the folder's ``*.txt`` files, sorted by path, joined."""
    out = bytearray()
    for path in sorted(folder.rglob("*.txt")):
        out += path.read_bytes()
        if len(out) >= n:
            return bytes(out[:n])
    raise SystemExit(f"dump_selection: {folder} holds only {len(out)} bytes of *.txt, need {n}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=ROOT / "corpus" / "python-doc")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    import ramba.layers.hsa as hsa_layer
    from ramba.eval.loading import load_model

    model = load_model(MODEL, device="cpu", dtype=torch.float32)
    ids = torch.frombuffer(bytearray(corpus_bytes(args.corpus, args.tokens)), dtype=torch.uint8).long()[None]
    seen = []
    real_hsa = hsa_layer.hsa

    def recording_hsa(q, k, v, weights, indices, *rest, **kw):
        if not seen:
            seen.append(torch.where(weights > 0, indices, -1)[0, :, 0].to(torch.int16).clone())
        return real_hsa(q, k, v, weights, indices, *rest, **kw)

    hsa_layer.hsa = recording_hsa
    try:
        with torch.no_grad():
            model.model(input_ids=ids)
    finally:
        hsa_layer.hsa = real_hsa
    cfg = model.config
    torch.save(
        {
            "indices": seen[0],
            "chunk_size": cfg.chunk_size,
            "topk": cfg.topk,
            "source": f"{MODEL.name} on the first {args.tokens} bytes of python-doc (*.txt, sorted paths)",
        },
        args.out,
    )
    print(f"wrote {args.out}: indices {tuple(seen[0].shape)}")


if __name__ == "__main__":
    main()
