"""The small model layout the GPU tests share: CUDA-sized heads (D=64, S=64) at a tiny width."""

CONFIG = dict(
    vocab_size=260,
    d_model=128,
    n_heads=4,
    n_kv_heads=1,
    head_dim=64,
    retrieval_dim=64,
    d_state=32,
    ssm_head_dim=32,
    chunk_size=64,
    topk=4,
    n_lower_layers=2,
    n_upper_layers=2,
    mamba_per_hsa=1,
    window=64,
    mlp_hidden=256,
)
