"""The model on CUDA: the fast paths (Triton HSA, the default Triton SSD, compile_glue) against the CPU torch
paths; cache and offload on CUDA.

Run under bf16 autocast, the way models train and serve on GPUs (fp32 SSD kernels take minutes to compile and
tune), so tolerances are bf16 ones.
"""

import pytest
import torch
from gpu_models import CONFIG

from ramba import RambaConfig, RambaForCausalLM
from ramba.inference import prefill

pytestmark = pytest.mark.gpu


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _loss_and_grads(model, ids, autocast_device=None):
    if autocast_device is None:
        out = model(input_ids=ids, labels=ids)
    else:
        with torch.autocast(autocast_device, dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.float().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("overrides", [{}, dict(local_mixer="swa"), dict(n_kv_heads=2, n_heads=8, retrieval_heads=1)])
def test_cuda_forward_backward_matches_cpu(overrides):
    """CUDA fast paths under bf16 autocast vs the CPU torch paths in fp32. bf16 rounding alone (the CPU
    paths under CPU bf16 autocast) moves some gradients by ~9% (near-tied chunk scores change the top-K), so
    each gradient may differ from fp32 by at most twice what bf16 on the CPU gives, plus 2%."""
    torch.manual_seed(0)
    config = RambaConfig(**{**CONFIG, **overrides})
    models = [RambaForCausalLM(config).float() for _ in range(2)] + [RambaForCausalLM(config).cuda()]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    ids = torch.randint(0, 256, (2, 700))
    logits, grads = _loss_and_grads(models[0], ids)
    logits_bf16, grads_bf16 = _loss_and_grads(models[1], ids, "cpu")
    logits_gpu, grads_gpu = _loss_and_grads(models[2], ids.cuda(), "cuda")
    assert rel_err(logits_gpu, logits) < 2 * rel_err(logits_bf16, logits) + 1e-2
    for name, g in grads.items():
        if g.norm() > 0:
            assert rel_err(grads_gpu[name], g) < 2 * rel_err(grads_bf16[name], g) + 2e-2, name


def test_cuda_prefill_decode_offload_matches_full_forward():
    torch.manual_seed(1)
    model = RambaForCausalLM(RambaConfig(**CONFIG)).cuda().bfloat16().eval()
    ids = torch.randint(0, 256, (2, 1000), device="cuda")
    with torch.no_grad():
        full = model(input_ids=ids).logits
        for offload in (False, True):
            last, cache = prefill(model, ids[:, :900], segment_len=256, offload=offload)
            assert rel_err(last, full[:, 899]) < 2e-2
            for t in range(900, 1000):
                step = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
                assert rel_err(step, full[:, t]) < 2e-2


def test_bf16_autocast_training_step():
    """A training step at a training length (4K: 64 chunks to select from) stays finite. The shared layout, whose
    kernels the tests above already compiled and tuned (the tiny preset's own shapes cost 90 s of it cold)."""
    torch.manual_seed(2)
    model = RambaForCausalLM(RambaConfig(**CONFIG)).cuda()
    ids = torch.randint(0, 256, (2, 4096), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
