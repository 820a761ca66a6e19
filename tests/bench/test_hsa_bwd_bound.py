"""benchmarks/hsa_bwd_bound.py: each variant removes exactly the part of the backward it names from today's kernel."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "hsa_bwd_bound.py"

_SCRIPT = r"""
import importlib.util, json, sys, tempfile
from pathlib import Path
import torch
from ramba.bench.hsa import draw_indices
spec = importlib.util.spec_from_file_location("hsa_bwd_bound", sys.argv[1])
bound = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bound)
folder = Path(tempfile.mkdtemp())
fns = {"v3": bound.hsa_module.hsa_triton} | {n: bound.variant(n, e, folder) for n, e in bound.VARIANTS.items()}
B, T, HQ, H, D, S, K = 1, 96, 4, 1, 16, 16, 3
gen = torch.Generator().manual_seed(0)
idx, w = draw_indices(B, T, "cpu", gen, "uniform", h=H, k=K, s=S)
q = torch.randn(B, T, HQ, D, generator=gen, requires_grad=True)
k = torch.randn(B, T, H, D, generator=gen, requires_grad=True)
v = torch.randn(B, T, H, D, generator=gen, requires_grad=True)
w.requires_grad_(True)
do = torch.randn(B, T, HQ, D, generator=gen)
grads = {}
for name, fn in fns.items():
    for t in (q, k, v, w):
        t.grad = None
    fn(q, k, v, w, idx, S, D**-0.5, 0.0).backward(do)
    grads[name] = [t.grad.clone() for t in (q, k, v, w)]
ref = grads["v3"]
out = {name: [[bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6)), bool((a == 0).all())] for a, b in zip(g, ref)]
       for name, g in grads.items()}
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def variants():
    pytest.importorskip("triton", reason="the benchmark's kernels need triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(BENCH)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


# per variant and gradient (dq, dk, dv, dw): (equal to today's kernel, all zero)
EXPECTED = {
    "v3": [(True, False)] * 4,
    "no_dq": [(False, True), (True, False), (True, False), (True, False)],
    "store_dq": [(False, False), (True, False), (True, False), (True, False)],
    "no_dkdv": [(True, False), (False, True), (False, True), (True, False)],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_variant_removes_what_it_names(variants, name):
    assert [tuple(x) for x in variants[name]] == EXPECTED[name]


def test_stale_edit_is_refused():
    spec = importlib.util.spec_from_file_location("hsa_bwd_bound", BENCH)
    bound = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bound)
    with pytest.raises(ValueError, match="no longer contains"):
        bound.variant("stale", [("tl.atomic_add(nowhere)", "pass")], Path("/nonexistent"))
