"""fla-core's NSA kernels (the CUDA fast path of ramba.ops.nsa) against the torch path, forward and backward;
the mamba2-nsa baseline model on CUDA with them against itself on the torch path."""

import pytest
import torch

from ramba import RambaConfig, RambaForCausalLM
from ramba.ops.nsa import nsa, nsa_torch

pytestmark = pytest.mark.gpu
pytest.importorskip("fla.ops.nsa", reason="the NSA fast path needs fla-core")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("B, T, HQ, H", [(2, 700, 16, 1), (1, 1024, 32, 2)])
def test_fla_nsa_matches_torch(B, T, HQ, H):
    """bf16 (models train in it; fla's fp32 kernels take minutes to tune). T = 700 is not a multiple of the
    block; GQA 16 and 32 (fla needs a power of 2 >= 16)."""
    torch.manual_seed(0)
    D, S, K, dtype, tol = 64, 64, 8, torch.bfloat16, 5e-2
    q = torch.randn(B, T, HQ, D, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, T, H, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    gates = [torch.rand(B, T, HQ, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2)]
    inputs = (q, k, v, *gates)
    fast = nsa(*inputs, K, S, backend="fla")
    ref = nsa_torch(*inputs, K, S, D**-0.5)
    assert rel_err(fast, ref) < tol
    grad = torch.randn_like(ref)
    got = torch.autograd.grad((fast.float() * grad.float()).sum(), inputs)
    want = torch.autograd.grad((ref.float() * grad.float()).sum(), inputs)
    for name, a, b in zip(("q", "k", "v", "g_cmp", "g_slc"), got, want):
        assert rel_err(a, b) < 2 * tol, name


def test_mamba2_nsa_model_on_fla_matches_torch_path(monkeypatch):
    """The baseline's NSA layers through fla vs through the torch path, same weights, bf16 autocast."""
    import ramba.layers.attention as attention

    torch.manual_seed(1)
    # the kernel shapes of test_fla_nsa_matches_torch's first case (HQ 16, H 1, D 64, block 64, K 8), compiled there
    config = RambaConfig(
        vocab_size=260,
        d_model=256,
        n_heads=16,
        n_kv_heads=1,
        head_dim=64,
        d_state=64,
        ssm_head_dim=64,
        chunk_size=64,
        topk=8,
        n_lower_layers=1,
        n_upper_layers=2,
        mamba_per_hsa=1,
        window=128,
        architecture="mamba2-nsa",
    )
    model = RambaForCausalLM(config).cuda()
    ids = torch.randint(0, 256, (2, 700), device="cuda")

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logits, grads = run()
    plain = attention.nsa
    monkeypatch.setattr(attention, "nsa", lambda *a, **kw: plain(*a, **kw, backend="torch"))
    logits_ref, grads_ref = run()
    assert rel_err(logits, logits_ref) < 2e-2
    for name, g in grads_ref.items():
        assert rel_err(grads[name], g) < 1e-1, name
