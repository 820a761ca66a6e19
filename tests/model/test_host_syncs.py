"""A training step asks the device nothing: no `.item()`, no boolean masks, no data-dependent shapes.

That is what lets `ramba.train.cuda_graph.GraphedLoss` capture it (a capture fails at the first sync) and keeps
eager CUDA steps from stalling. Checked here on the CPU, at the dispatcher, for every architecture; the CPU-only
HSA backend (the GPU runs the Triton one, sync-free, tested on the GPU) is the one place allowed to sync.
"""

import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ramba import RambaConfig, RambaForCausalLM
from small_models import SMALL

aten = torch.ops.aten
SYNCING = {
    aten._local_scalar_dense,
    aten.nonzero,
    aten.masked_select,
    aten._unique2,
    aten.unique_consecutive,
    aten.unique_dim,
}
CPU_ONLY = Path(__file__).resolve().parents[2] / "ramba" / "ops" / "hsa"


class ForbidHostSyncs(TorchDispatchMode):
    """Raises at any op that makes the host wait for the device's data, unless it runs in the CPU-only
    HSA backend."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        boolean_index = packet in (aten.index, aten.index_put, aten.index_put_) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())
        )
        needs_size = packet is aten.repeat_interleave and kwargs.get("output_size") is None
        if packet in SYNCING or needs_size or boolean_index:
            frames = [Path(f.filename).resolve() for f in traceback.extract_stack()]
            if not any(CPU_ONLY in f.parents for f in frames):
                raise AssertionError(f"host sync: {func}\n" + "".join(traceback.format_stack(limit=12)))
        return func(*args, **kwargs)


@pytest.mark.parametrize(
    "sync",
    [
        lambda x: x.sum().item(),
        lambda x: bool(x.sum() > 0),
        lambda x: x[x > 0],
        lambda x: x.nonzero(),
        lambda x: int(x.argmax()),
        lambda x: x.unique(),
    ],
)
def test_the_checker_catches_syncs(sync):
    with pytest.raises(AssertionError, match="host sync"), ForbidHostSyncs():
        sync(torch.randn(8))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(architecture="ramba"),
        dict(architecture="ramba", local_mixer="swa"),
        dict(
            architecture="ramba", n_heads=4, n_kv_heads=2, retrieval_groups=2, n_upper_layers=4, weight_norm="softmax"
        ),
        dict(architecture="mamba2"),
        dict(architecture="mamba2-swa"),
        dict(architecture="mamba2-nsa"),
        dict(architecture="transformer"),
    ],
    ids=["ramba", "ramba-swa", "ramba-gqa-groups", "mamba2", "mamba2-swa", "mamba2-nsa", "transformer"],
)
@pytest.mark.parametrize("length", [64, 75])
def test_training_step_has_no_host_sync(overrides, length):
    """Forward, loss and backward (T a multiple of the chunk and not) never sync outside the CPU HSA backend."""
    torch.manual_seed(0)
    model = RambaForCausalLM(RambaConfig(**{**SMALL, **overrides})).train()
    ids = torch.randint(0, SMALL["vocab_size"], (2, length))
    with ForbidHostSyncs():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
