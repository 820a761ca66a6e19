"""Benchmarks against the baselines, each a module with `main(argv, prog) -> int` that writes JSON + PNG.

- `ramba.bench.hsa`:       HSA Triton kernels vs SDPA flash attention and fla's NSA (needs CUDA);
- `ramba.bench.hsa_cpu`:   the HSA `torch` backend vs the reference on the CPU;
- `ramba.bench.train`:     training tokens/s, RAMba vs Mamba-2 vs Transformer;
- `ramba.bench.inference`: prefill tokens/s, decode ms/token, GPU and host memory by context length;
- `ramba.bench.plot_passkey`: one heatmap from several `ramba eval passkey` results.

Run one with `ramba bench NAME ...` or `python -m ramba.bench.NAME ...`; results go to `benchmarks/results/`
under the working directory unless `--out` says otherwise.
"""
