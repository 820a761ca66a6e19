"""Checkpoints: round trip, keep-last-N, atomic under a full disk, corrupt/truncated ones raise CheckpointError."""

import errno
import json
import os
import socket
import subprocess

import pytest
import torch

from ramba import RambaConfig, RambaForCausalLM
from ramba.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from train_helpers import MODEL_OVERRIDES


def _model_and_optimizer(seed=0, steps=1):
    torch.manual_seed(seed)
    model = RambaForCausalLM(RambaConfig.preset("tiny", **MODEL_OVERRIDES))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        ids = torch.randint(0, 256, (2, 32))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _state(step):
    return {
        "step": step,
        "examples": step * 8,
        "rng": [{"torch": torch.get_rng_state()}],
        "scheduler": {"last_epoch": step},
    }


def test_round_trip_and_keep_last(tmp_path):
    model, opt = _model_and_optimizer(steps=2)
    for step in (1, 2, 3):
        path = save_checkpoint(tmp_path, step, model, opt, _state(step), keep=2)
    assert path == tmp_path / "step-00000003" and list_checkpoints(tmp_path) == [tmp_path / "step-00000002", path]
    assert (path / "model" / "model.safetensors").is_file() and (path / "model" / "config.json").is_file()
    fresh, fresh_opt = _model_and_optimizer(seed=1, steps=1)
    state = load_checkpoint(path, fresh, fresh_opt)
    assert state["step"] == 3 and state["examples"] == 24
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n
    assert fresh.lm_head.weight is fresh.model.embeddings.weight or torch.equal(
        fresh.lm_head.weight, fresh.model.embeddings.weight
    )
    sa, sb = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[k][name], sb[k][name])
    # The weights folder is a regular Hugging Face model folder.
    loaded = RambaForCausalLM.from_pretrained(path / "model")
    assert torch.equal(loaded.model.embeddings.weight, model.model.embeddings.weight)


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = _model_and_optimizer()
    good = save_checkpoint(tmp_path, 1, model, opt, _state(1), keep=3)
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        if str(f).endswith("trainer.pt"):
            with open(f, "wb") as fh:
                fh.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(
        CheckpointError, match=r"No space left on device.*newest complete checkpoint is .*step-00000001"
    ):
        save_checkpoint(tmp_path, 2, model, opt, _state(2), keep=3)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]
    assert latest_checkpoint(tmp_path) == good
    verify_checkpoint(good)
    assert load_checkpoint(good, *_model_and_optimizer(seed=2))["step"] == 1


def test_unfinished_save_is_ignored(tmp_path):
    model, opt = _model_and_optimizer()
    good = save_checkpoint(tmp_path, 4, model, opt, _state(4), keep=3)
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".step-00000008.tmp-{host}-{dead.pid}-x1y2"  # what a kill -9 during a save leaves
    (stale / "model").mkdir(parents=True)
    (stale / "optimizer.pt").write_bytes(b"half")
    alive = tmp_path / f".step-00000009.tmp-{host}-{os.getpid()}-x3y4"  # a save in progress in a live process
    alive.mkdir()
    assert latest_checkpoint(tmp_path) == good
    save_checkpoint(tmp_path, 5, model, opt, _state(5), keep=3)
    assert not stale.exists() and alive.exists()


@pytest.mark.parametrize(
    "damage, match",
    [
        ("truncate_weights", "model.safetensors is .* bytes, expected"),
        ("flip_optimizer", "optimizer.pt does not match its checksum"),
        ("remove_manifest", "manifest.json is missing"),
        ("corrupt_manifest", "manifest.json is corrupt"),
        ("remove_trainer", "trainer.pt is missing"),
    ],
)
def test_corrupt_checkpoint_raises(tmp_path, damage, match):
    model, opt = _model_and_optimizer()
    path = save_checkpoint(tmp_path, 1, model, opt, _state(1), keep=3)
    if damage == "truncate_weights":
        f = path / "model" / "model.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
    elif damage == "flip_optimizer":
        f = path / "optimizer.pt"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "remove_manifest":
        (path / "manifest.json").unlink()
    elif damage == "corrupt_manifest":
        (path / "manifest.json").write_text("{")
    else:
        (path / "trainer.pt").unlink()
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path, *_model_and_optimizer(seed=1))
    with pytest.raises(CheckpointError, match="no such folder"):
        verify_checkpoint(tmp_path / "step-00000099")


def test_checkpoint_of_another_model_is_refused(tmp_path):
    model, opt = _model_and_optimizer()
    path = save_checkpoint(tmp_path, 1, model, opt, _state(1), keep=3)
    other = RambaForCausalLM(RambaConfig.preset("tiny", **{**MODEL_OVERRIDES, "n_lower_layers": 2}))
    with pytest.raises(CheckpointError, match="do not fit the model"):
        load_checkpoint(path, other, None)
    assert json.loads((path / "manifest.json").read_text())["step"] == 1
