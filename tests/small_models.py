"""A very small RAMba configuration shared by the model and inference tests (importable because
tests/conftest.py puts this folder on sys.path)."""

import torch

from ramba import RambaConfig, RambaForCausalLM

SMALL = dict(
    vocab_size=64,
    d_model=32,
    n_heads=2,
    n_kv_heads=1,
    head_dim=16,
    retrieval_dim=16,
    d_state=8,
    ssm_head_dim=16,
    chunk_size=16,
    topk=2,
    n_lower_layers=1,
    n_upper_layers=2,
    mamba_per_hsa=1,
    window=8,
    mlp_hidden=64,
    ssm_chunk_size=16,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def small_model(seed=0, **overrides) -> RambaForCausalLM:
    """A freshly seeded small model in eval mode; ``overrides`` are RambaConfig fields."""
    torch.manual_seed(seed)
    return RambaForCausalLM(RambaConfig(**{**SMALL, **overrides})).eval()
