"""Faults (docs/design.md §8): two runs on one folder, kill -9 during a checkpoint save and during `prepare`,
a full disk (a small tmpfs where the machine allows mounting one), a closed pipe."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ramba.data import ByteTokenizer, TokenFile, prepare
from ramba.errors import CheckpointError, OutputPathError
from ramba.train.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint, verify_checkpoint
from small_models import small_model

ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), str(Path(__file__).parents[1])]),
}


def _cli(config_file, *args):
    return [sys.executable, "-m", "ramba", "train", str(config_file), "--set", "log.progress=false", *args]


def _wait_for(predicate, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not predicate():
        time.sleep(0.02)
    assert predicate(), "the subprocess ended or timed out first"


def test_two_runs_on_one_folder_then_resume_after_kill9(config_dict, tmp_path):
    """The second run refuses at once naming the first; after the first is killed the lock is taken over."""
    config_dict.update(max_steps=400, eval={"every": 0})
    config_dict["checkpoint"] = {"every": 2, "keep": 2}
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps(config_dict))
    run = Path(config_dict["out_dir"])
    first = subprocess.Popen(_cli(config_file), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: len(list_checkpoints(run / "checkpoints")) >= 1, first)
        metrics = (run / "metrics.jsonl").read_text()
        second = subprocess.run(_cli(config_file, "--set", "seed=1"), env=ENV, capture_output=True, text=True)
        assert second.returncode == 2
        assert f"is in use by another run (host {socket.gethostname()}, pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert (run / "metrics.jsonl").read_text().startswith(metrics)  # only the first run appends
        assert json.loads((run / "config.json").read_text())["seed"] == 0
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    step = int(latest_checkpoint(run / "checkpoints").name.split("-")[1])
    resumed = subprocess.run(
        _cli(config_file, "--resume", "--set", f"max_steps={step + 1}"), env=ENV, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (
        f"taking over the lock left by a run that ended without releasing it (host {socket.gethostname()}, "
        f"pid {first.pid}" in resumed.stderr
    )
    assert (run / "run.lock").read_text() == ""  # released


SAVE_THEN_HANG = """
import sys, time, torch
from small_models import small_model
from ramba.train.checkpoint import save_checkpoint
model = small_model(); opt = torch.optim.AdamW(model.parameters())
save_checkpoint(sys.argv[1], 1, model, opt, {"step": 1}, keep=3)
real = torch.save
def hang(obj, f, *a, **kw):
    real(obj, f, *a, **kw)
    print("saving", flush=True)
    time.sleep(600)
torch.save = hang
save_checkpoint(sys.argv[1], 2, model, opt, {"step": 2}, keep=3)
"""


def test_kill9_during_a_checkpoint_save(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVE_THEN_HANG, str(tmp_path)], env=ENV, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "saving"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stale = list(tmp_path.glob(".step-00000002.tmp-*"))
    assert len(stale) == 1 and (stale[0] / "optimizer.pt").is_file()
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    verify_checkpoint(latest_checkpoint(tmp_path))
    model = small_model()
    save_checkpoint(tmp_path, 3, model, torch.optim.AdamW(model.parameters()), {"step": 3}, keep=3)
    assert not stale[0].exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001", "step-00000003"]


HOLD_PREPARE = """
import sys, time
from ramba.data import ByteTokenizer, TokenFileWriter
w = TokenFileWriter(sys.argv[1], ByteTokenizer())
w.add([1, 2, 3])
print("writing", flush=True)
time.sleep(600)
"""


def test_interrupted_prepare_is_cleaned_up_by_the_next(tmp_path):
    out = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-c", HOLD_PREPARE, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list(tmp_path.glob(".data.tmp-*"))) == 1 and not out.exists()
    (tmp_path / "a.txt").write_text("hello")
    prepare([tmp_path / "a.txt"], out, ByteTokenizer(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "data"]
    assert len(TokenFile(out)) == 6


@pytest.fixture
def small_disk(tmp_path):
    """Mounts a tmpfs of the given size (bytes) under tmp_path; skips where mounting is not allowed."""
    mounts = []

    def make(size: int) -> Path:
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip("cannot mount a small file system here (not root?); the simulated ENOSPC test covers it")
        mounts.append(path)
        return path

    yield make
    for path in mounts:
        subprocess.run(["umount", str(path)], check=False)


def test_full_disk_during_checkpoints_keeps_the_previous_one(tmp_path, small_disk, monkeypatch):
    model = small_model()
    opt = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()  # an optimizer state to save
    one = save_checkpoint(tmp_path / "probe", 1, model, opt, {"step": 1}, keep=1)
    size = sum(p.stat().st_size for p in one.rglob("*") if p.is_file())
    disk = small_disk(int(size * 1.6) // 4096 * 4096)
    good = save_checkpoint(disk, 1, model, opt, {"step": 1}, keep=3)
    with pytest.raises(CheckpointError, match=r"MiB are free.*nothing was written.*step-00000001"):
        save_checkpoint(disk, 2, model, opt, {"step": 2}, keep=3)  # refused before writing: too little room
    monkeypatch.setattr("ramba.train.checkpoint.check_free_space", lambda *a: None)
    with pytest.raises(
        CheckpointError, match=r"No space left on device.*newest complete checkpoint is .*step-00000001"
    ):
        save_checkpoint(disk, 2, model, opt, {"step": 2}, keep=3)  # the disk fills up while writing
    assert sorted(p.name for p in disk.iterdir()) == ["step-00000001"]
    verify_checkpoint(good)


def test_full_disk_during_prepare(tmp_path, small_disk):
    disk = small_disk(64 * 1024)
    (tmp_path / "big.txt").write_text("lots of text\n" * 20_000)
    with pytest.raises(OutputPathError, match="no space left on device; free some space.*nothing was written"):
        prepare([tmp_path / "big.txt"], disk / "data", ByteTokenizer(), progress=False)
    assert list(disk.iterdir()) == []


def test_closed_pipe_is_quiet(tmp_path):
    done = subprocess.run(
        f"{sys.executable} -m ramba train --fields | head -1", shell=True, env=ENV, capture_output=True, text=True
    )
    assert done.stdout.startswith("out_dir") and done.stderr == "", done.stderr


def test_export_refuses_a_disk_too_small(tmp_path, small_disk, capsys):
    from ramba.cli.main import main

    small_model(vocab_size=260, pad_token_id=256, bos_token_id=257, eos_token_id=258).save_pretrained(
        tmp_path / "model"
    )
    disk = small_disk(8192)
    assert main(["export", "--model", str(tmp_path / "model"), "-o", str(disk / "m.safetensors")]) == 2
    assert "MiB are free" in capsys.readouterr().err
    assert list(disk.iterdir()) == []
