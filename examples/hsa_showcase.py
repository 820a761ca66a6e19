"""Run HSA on random data on whatever device there is and compare it with the reference.

python examples/hsa_showcase.py [--tokens 2048] [--backend torch|triton]
"""

from __future__ import annotations

import argparse
import time

import torch

from ramba.ops import hsa, select_chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--backend", default=None, help="default: triton on CUDA, torch elsewhere")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    B, T, HQ, H, D, S, K = 1, args.tokens, 16, 1, 64, 64, 8
    g = torch.Generator(device).manual_seed(0)
    q = torch.randn(B, T, HQ, D, device=device, dtype=dtype, generator=g)
    k = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=g)
    v = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=g)
    # chunk choice as the model makes it: retrieval queries against one landmark per complete chunk
    q_r = torch.randn(B, T, H, 32, device=device, generator=g)
    landmarks = torch.randn(B, T // S, H, 32, device=device, generator=g)
    indices, weights = select_chunks(q_r, landmarks, S, K)
    t0 = time.perf_counter()
    out = hsa(q, k, v, weights, indices, S, backend=args.backend)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    ref = hsa(q.double(), k.double(), v.double(), weights.double(), indices, S, backend="reference")
    err = (out.double() - ref).norm() / ref.norm()
    backend = args.backend or ("triton" if device == "cuda" else "torch")
    print(f"device {device}, dtype {dtype}, B={B} T={T} HQ={HQ} H={H} D={D} S={S} K={K}")
    print(f"hsa backend={backend}: output {tuple(out.shape)} in {elapsed * 1e3:.1f} ms (first call, includes warm-up)")
    print(f"relative error against the float64 reference: {err:.2e}")
    print(
        "tokens in the first chunk see no chunk: output there is", "zero" if out[0, :S].abs().max() == 0 else "NONZERO"
    )


if __name__ == "__main__":
    main()
