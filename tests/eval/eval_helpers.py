"""Shared by the evaluation tests (a module name of its own, so it never clashes with other test folders)."""

import torch

from ramba import RambaConfig, RambaForCausalLM

TINY = dict(
    vocab_size=260,
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
)
# The same tiny shapes as `--set` overrides for the benchmark scripts.
TINY_SET = [x for k, v in TINY.items() if k != "vocab_size" for x in ("--set", f"{k}={v}")]


def tiny_model(seed=0, **overrides):
    """A random `RambaForCausalLM` (byte vocabulary, chunk 16) in eval mode."""
    torch.manual_seed(seed)
    return RambaForCausalLM(RambaConfig(**{**TINY, **overrides})).eval()
