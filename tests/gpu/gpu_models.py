"""The small model layout the GPU tests share: CUDA-sized heads (D=64, S=64) and the tiny preset's SSD shapes
(head dim 64, state 64: tests/gpu/test_ssd_gpu.py tunes the same kernels) at a tiny width. One layout, so a cold
run compiles and tunes each kernel once."""

CONFIG = dict(
    vocab_size=260,
    d_model=128,
    n_heads=4,
    n_kv_heads=1,
    head_dim=64,
    retrieval_dim=64,
    d_state=64,
    ssm_head_dim=64,
    chunk_size=64,
    topk=4,
    n_lower_layers=2,
    n_upper_layers=2,
    mamba_per_hsa=1,
    window=64,
    mlp_hidden=256,
)
