"""`ramba bench` from a wheel installed outside the source checkout: the benchmarks are part of the package."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY_TRAIN = [
    "--presets",
    "tiny",
    "--set",
    "d_model=32",
    "--set",
    "n_heads=2",
    "--set",
    "n_kv_heads=1",
    "--set",
    "head_dim=16",
    "--set",
    "retrieval_dim=16",
    "--set",
    "d_state=8",
    "--set",
    "ssm_head_dim=16",
    "--set",
    "chunk_size=16",
    "--set",
    "ssm_chunk_size=16",
    "--set",
    "n_lower_layers=1",
    "--set",
    "n_upper_layers=2",
    "--set",
    "mamba_per_hsa=1",
    "--set",
    "mlp_hidden=64",
    "--architectures",
    "ramba",
    "--lengths",
    "32",
    "--batch-tokens",
    "32",
    "--steps",
    "1",
    "--warmup",
    "0",
    "--device",
    "cpu",
]


def _run(cmd, cwd, env):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd[:3]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_bench_runs_from_an_installed_wheel(tmp_path):
    # the wheel is built from a copy of the package files, so no stale build/ of the checkout can leak in
    src = tmp_path / "src"
    shutil.copytree(ROOT / "ramba", src / "ramba", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src],
        tmp_path,
        env,
    )
    (wheel,) = (tmp_path / "dist").glob("ramba-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel], tmp_path, env)
    # the dependencies (torch, transformers, ...) come from this interpreter's site-packages, added as a plain
    # path after the venv's own: its .pth files (this checkout's editable install) are not processed there
    venv_site = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).strip()
    )
    (venv_site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "cwd"
    work.mkdir()
    where = _run([python, "-c", "import ramba.bench.train, ramba; print(ramba.__file__)"], work, env).strip()
    assert Path(where).is_relative_to(venv_site), where
    _run([venv / "bin" / "ramba", "bench", "train", *TINY_TRAIN, "--out", "out"], work, env)
    rows = json.loads((work / "out" / "bench_train.json").read_text())["rows"]
    assert [(r["architecture"], r["length"]) for r in rows] == [("ramba", 32)] and rows[0]["tokens_per_s"] > 0
    assert (work / "out" / "bench_train.png").stat().st_size > 0
    _run([venv / "bin" / "ramba", "bench", "hsa-cpu", "hsa_cpu.json", "--shapes", "tiny", "--reps", "1"], work, env)
    runs = json.loads((work / "hsa_cpu.json").read_text())["runs"]
    assert [(r["shape"], r["backend"]) for r in runs] == [("tiny", "reference"), ("tiny", "torch")]
    assert all(r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 for r in runs), runs
