"""linear_cross_entropy: the torch path against a per-row log-sum-exp in float64; liger-kernel's fused kernel
(under TRITON_INTERPRET=1, in a subprocess) against the torch path, loss and both gradients, alone and as the
model's loss (fused_loss); bad inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ramba.ops import linear_cross_entropy

ROOT = Path(__file__).resolve().parents[2]


def test_torch_path_is_the_mean_negative_log_likelihood_float64():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(23, 8, generator=g, dtype=torch.float64), torch.randn(31, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 31, (23,), generator=g)
    y[[0, 5, 22]] = -100
    z = h @ w.T
    rows = [torch.logsumexp(z[i], 0) - z[i, y[i]] for i in range(23) if y[i] != -100]
    torch.testing.assert_close(linear_cross_entropy(h, w, y).double(), torch.stack(rows).mean(), rtol=1e-6, atol=0)


def test_bad_inputs():
    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="must share d"):
        linear_cross_entropy(h, torch.randn(10, 7), y)
    with pytest.raises(ValueError, match=r"labels must be \[N=4\]"):
        linear_cross_entropy(h, w, y[:3])
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_cross_entropy(h, w, y, backend="fused")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            linear_cross_entropy(h, w, y, backend="liger")


_SCRIPT = r"""
import json, sys
import torch
from ramba import RambaConfig, RambaForCausalLM
from ramba.ops import linear_cross_entropy
sys.path.insert(0, sys.argv[1] + "/tests")
from small_models import SMALL

def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

out = {}
for N, d, V, ignored in [(37, 16, 50, 5), (64, 32, 300, 0), (9, 8, 1000, 8)]:
    g = torch.Generator().manual_seed(N)
    h0, w0 = torch.randn(N, d, generator=g), torch.randn(V, d, generator=g) * 0.3
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.randperm(N, generator=g)[:ignored]] = -100
    res = []
    for backend in ("torch", "liger"):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = linear_cross_entropy(h, w, y, backend=backend)
        loss.backward()
        res.append((loss.detach(), h.grad, w.grad))
    out[f"{N}x{d}x{V}"] = [rel(a, b) for a, b in zip(res[1], res[0])]
torch.manual_seed(0)
models = [RambaForCausalLM(RambaConfig(**SMALL)) for _ in range(2)]
models[1].load_state_dict(models[0].state_dict())
models[1].loss_backend = "liger"
ids = torch.randint(3, SMALL["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
labels = ids.clone()
labels[0, :10] = -100
outs = []
for m in models:
    o = m(input_ids=ids, labels=labels)
    o.loss.backward()
    outs.append(o)
out["model"] = [rel(outs[1].loss, outs[0].loss)] + [
    rel(b.grad, a.grad) for a, b in zip(models[0].parameters(), models[1].parameters()) if a.grad is not None
]
out["model_logits_none"] = outs[1].logits is None
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("liger_kernel", reason="the fused loss needs liger-kernel (in the dev extra)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(ROOT)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))[len("RESULT") :])


def test_liger_matches_the_torch_path(interpreted):
    """Loss, d hidden and d weight of the fused kernel within float32 rounding of the torch path, ignored rows included."""
    for shape, errors in interpreted.items():
        if shape.startswith("model"):
            continue
        assert max(errors) < 1e-5, (shape, errors)


def test_fused_loss_in_the_model(interpreted):
    """loss_backend='liger' gives the model's loss and every parameter's gradient, and returns no logits."""
    assert interpreted["model_logits_none"] is True
    assert len(interpreted["model"]) > 10 and max(interpreted["model"]) < 1e-4, interpreted["model"]
