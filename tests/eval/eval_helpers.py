"""Shared by the evaluation tests (a module name of its own, so it never clashes with other test folders)."""

import torch

from ramba import RambaConfig, RambaForCausalLM
from small_models import SMALL

# small_models.SMALL with the byte vocabulary and its default special ids
TINY = {**{k: v for k, v in SMALL.items() if not k.endswith("_token_id")}, "vocab_size": 260}
# The same tiny shapes as `--set` overrides for the benchmark scripts.
TINY_SET = [x for k, v in TINY.items() if k != "vocab_size" for x in ("--set", f"{k}={v}")]


def tiny_model(seed=0, **overrides):
    """A random `RambaForCausalLM` (byte vocabulary, chunk 16) in eval mode."""
    torch.manual_seed(seed)
    return RambaForCausalLM(RambaConfig(**{**TINY, **overrides})).eval()
