"""Training end to end on the CPU: the loss falls; kill -9 then --resume reproduces the uninterrupted
losses exactly; SIGTERM stops after the current step with a checkpoint; torchrun with 2 gloo ranks trains and checkpoints; bad inputs fail with clear errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ramba.cli.main import main
from ramba.data import ByteTokenizer, make_task, prepare
from ramba.errors import ConfigError, ModelLoadError
from ramba.train import CheckpointError, load_config, train
from ramba.train.config import config_from_dict
from ramba.train.evaluate import eval_task, teacher_forced_answers

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def losses(out_dir) -> dict[int, float]:
    """step -> loss; a later line for the same step (after a resume) wins."""
    out = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def test_training_lowers_the_loss(config_dict, tmp_path):
    config_dict.update(max_steps=30, eval={"every": 15, "batches": 2})
    config_dict["log"]["tensorboard"] = True
    final = train(config_from_dict(config_dict))
    run = Path(config_dict["out_dir"])
    curve = losses(run)
    assert sorted(curve) == list(range(1, 31))
    first, last = curve[1], np.mean([curve[s] for s in (28, 29, 30)])
    assert first > 5.0  # about ln(260) at initialisation
    assert last < first - 1.5, (first, last)
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval/loss" in line]
    assert [e["step"] for e in evals] == [15, 30] and evals[1]["eval/loss"] < evals[0]["eval/loss"] < first
    assert final["eval/loss"] == evals[1]["eval/loss"]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-00000028", "step-00000030"]  # every 4, keep 2, plus the end
    assert json.loads((run / "config.json").read_text())["max_steps"] == 30
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_gradient_checkpointing_and_accumulation(config_dict, tmp_path):
    config_dict.update(max_steps=3)
    config_dict["checkpoint"] = {"every": 0, "keep": 1}
    base = losses_of(config_dict, tmp_path / "base")
    assert losses_of({**config_dict, "grad_checkpointing": True}, tmp_path / "ckpt") == base
    # Two micro-batches of 2 see the same 4 sequences as one of 4: same losses up to float rounding.
    accum = losses_of({**config_dict, "micro_batch": 2, "grad_accum": 2}, tmp_path / "accum")
    assert np.allclose(list(accum.values()), list(base.values()), rtol=1e-5, atol=1e-6)


def test_dataloader_workers_give_the_in_process_batches(config_dict, tmp_path):
    """Batches built by 2 DataLoader workers (the default) or in the main process: the same losses, bit for bit."""
    config_dict.update(max_steps=4)
    config_dict["checkpoint"] = {"every": 0, "keep": 1}
    config_dict["data"]["seq_len"] = 256
    config_dict["data"]["sources"].append({"task": "passkey", "weight": 0.5})
    workers = losses_of(config_dict, tmp_path / "workers")
    config_dict["data"]["workers"] = 0
    assert losses_of(config_dict, tmp_path / "main") == workers


@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on the CPU needs a C++ compiler"
)
def test_compile_glue_gives_the_eager_losses(config_dict, tmp_path):
    config_dict.update(max_steps=3)
    config_dict["checkpoint"] = {"every": 0, "keep": 1}
    base = losses_of(config_dict, tmp_path / "base")
    fused = losses_of({**config_dict, "compile_glue": True}, tmp_path / "fused")
    assert np.allclose(list(fused.values()), list(base.values()), rtol=1e-5, atol=1e-6)


def test_sequence_mean_loss():
    """Each sequence's mean over its labelled tokens, averaged over the sequences with labels."""
    from ramba.train.step import sequence_mean_loss

    logits = torch.randn(3, 6, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, 1:4] = -100  # row 0: 2 labelled targets, row 1: 5, row 2: none
    labels[2, 1:] = -100
    nll = -logits[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:].clamp_min(0)[..., None])[..., 0]
    expected = (nll[0, 3:].mean() + nll[1].mean()) / 2
    torch.testing.assert_close(sequence_mean_loss(logits, labels), expected.float())
    full = torch.randint(0, 11, (3, 6))  # equal counts per row: the same as the mean over tokens
    token_mean = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), full[:, 1:].reshape(-1))
    torch.testing.assert_close(sequence_mean_loss(logits, full), token_mean.float())


def test_sequence_average_trains(config_dict, tmp_path):
    config_dict.update(max_steps=2, loss_average="sequence")
    assert all(np.isfinite(v) for v in losses_of(config_dict, tmp_path / "seq").values())


def test_retrieval_loss_trains_on_task_targets(config_dict, tmp_path):
    """A run with a task source and retrieval_loss > 0 trains (the step gets retrieval targets); a model without
    a retrieval layer is refused with one line."""
    config_dict["data"]["sources"].append({"task": "niah_multikey", "weight": 1.0})
    config_dict.update(max_steps=2, retrieval_loss=1.0)
    config_dict["data"]["seq_len"] = 512
    config_dict["micro_batch"] = 2
    assert all(np.isfinite(v) for v in losses_of(config_dict, tmp_path / "rl").values())
    config_dict["model"]["overrides"]["architecture"] = "mamba2"
    with pytest.raises(ConfigError, match="'retrieval_loss': the model .architecture 'mamba2'. has no retrieval layer"):
        train(config_from_dict({**config_dict, "out_dir": str(tmp_path / "rl-mamba2")}))
    with pytest.raises(ConfigError, match="'retrieval_loss': expected >= 0"):
        config_from_dict({**config_dict, "retrieval_loss": -1.0})


def test_init_from_a_run_a_model_file_or_nothing(config_dict, tmp_path):
    """A second stage starts from the first stage's weights, given as its run folder or an exported file."""
    from ramba.model.single_file import load_model_file, save_model_file
    from ramba.train.loop import build_model

    config_dict.update(max_steps=2)
    train(config_from_dict(config_dict))
    first = load_model_file(
        save_model_file(
            build_model(
                config_from_dict({**config_dict, "model": {"init_from": config_dict["out_dir"]}}), ByteTokenizer()
            ),
            tmp_path / "m.safetensors",
            dtype=torch.float32,
        )
    )
    second = build_model(
        config_from_dict({**config_dict, "model": {"init_from": str(tmp_path / "m.safetensors")}}), ByteTokenizer()
    )
    fresh = build_model(config_from_dict(config_dict), ByteTokenizer())
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(first.state_dict().values(), fresh.state_dict().values()))
    with pytest.raises(ModelLoadError, match="has weights but no config.json"):
        build_model(config_from_dict({**config_dict, "model": {"init_from": str(tmp_path)}}), ByteTokenizer())


def test_init_from_with_overrides_keeps_the_weights(config_dict, tmp_path):
    """A continuation may change fields that keep the weights' shapes (sm_n, weight_norm); others stop it."""
    from ramba.model.single_file import save_model_file
    from ramba.train.loop import build_model

    start = build_model(config_from_dict(config_dict), ByteTokenizer())
    path = save_model_file(start, tmp_path / "m.safetensors", dtype=torch.float32)
    changed = {"sm_n": 1.0 - start.config.sm_n, "weight_norm": "softmax"}
    cont = build_model(
        config_from_dict({**config_dict, "model": {"init_from": str(path), "overrides": changed}}), ByteTokenizer()
    )
    assert (cont.config.sm_n, cont.config.weight_norm) == (changed["sm_n"], "softmax") and cont.training
    for (name, a), b in zip(start.state_dict().items(), cont.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 256, (1, 3 * start.config.chunk_size + 5))
    assert not torch.allclose(start.eval()(ids).logits, cont.eval()(ids).logits)  # sm_n reaches the HSA layers
    for bad, match in (
        ({"d_model": 2 * start.config.d_model}, "change the weights of model.init_from"),
        ({"sm_n": 3}, "sm_n"),
    ):
        with pytest.raises(ConfigError, match=match):
            build_model(
                config_from_dict({**config_dict, "model": {"init_from": str(path), "overrides": bad}}), ByteTokenizer()
            )


def losses_of(config: dict, out_dir) -> dict[int, float]:
    train(config_from_dict({**config, "out_dir": str(out_dir)}))
    return losses(out_dir)


def _cli(config_file, *args):
    return [sys.executable, "-m", "ramba", "train", str(config_file), "--set", "log.progress=false", *args]


def _train_until(config_file, out_dir, logged_lines: int, **popen_args) -> subprocess.Popen:
    """`ramba train` in a subprocess, returned once its metrics.jsonl has `logged_lines` lines (or it ended)."""
    proc = subprocess.Popen(_cli(config_file, "--set", f"out_dir={out_dir}"), env=ENV, cwd=out_dir.parent, **popen_args)
    deadline = time.time() + 120
    metrics = out_dir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= logged_lines:
            break
        time.sleep(0.01)
    return proc


def test_kill9_then_resume_gives_the_uninterrupted_losses(config_dict, tmp_path):
    config_dict.update(max_steps=16, eval={"every": 0})
    config_dict["checkpoint"] = {"every": 3, "keep": 2}
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps(config_dict))

    killed = tmp_path / "killed"
    proc = _train_until(config_file, killed, 8, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    reached = max(losses(killed))
    assert 8 <= reached < 16, reached

    r = subprocess.run(
        _cli(config_file, "--set", f"out_dir={killed}", "--resume"),
        env=ENV,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    start = int(r.stderr.split("at step ")[1].split()[0])
    assert 6 <= start <= reached and start % 3 == 0
    # The uninterrupted run, in this process (one thread, like the subprocesses).
    config_dict["out_dir"] = str(tmp_path / "full")
    train(config_from_dict(config_dict))
    a, b = losses(tmp_path / "full"), losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 17))
    for step in range(1, 17):
        assert a[step] == b[step], (step, a[step], b[step])  # bit-identical, not approximately equal


@pytest.mark.parametrize("group", [False, True], ids=["process", "process-group"])
def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resume_continues(config_dict, tmp_path, group):
    """`timeout`, Slurm and Ctrl-C signal the whole process group: the DataLoader workers (2 here) must outlive
    the signal so that the step ends and the checkpoint is written."""
    config_dict.update(max_steps=400, eval={"every": 0})
    config_dict["checkpoint"] = {"every": 1000, "keep": 2}  # no periodic checkpoint before the signal
    config_dict["log"]["every"] = 1
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps(config_dict))
    run = tmp_path / "run"
    proc = _train_until(
        config_file, run, 3, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=group
    )
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr[-3000:]
    assert "SIGTERM received" in stderr and "continue with --resume" in stdout
    stopped = max(losses(run))
    assert 3 <= stopped < 400
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step-{stopped:08d}"]
    config_dict.update(max_steps=stopped + 2, out_dir=str(run))
    final = train(config_from_dict(config_dict), resume=True)
    assert "stopped_at_step" not in final and max(losses(run)) == stopped + 2


def test_torchrun_two_gloo_ranks_ddp_then_fsdp(config_dict, tmp_path):
    config_dict.update(max_steps=4, micro_batch=2)
    config_dict["checkpoint"] = {"every": 2, "keep": 3}
    config_dict["distributed"] = {"backend": "gloo"}
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps(config_dict))
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "ramba",
        "train",
    ]
    r = subprocess.run(
        [*torchrun, str(config_file)], env=ENV, capture_output=True, text=True, cwd=tmp_path, timeout=240
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run = Path(config_dict["out_dir"])
    # data parallel = one process at twice the micro-batch: the same sequences a step, the same loss curve
    single = losses_of({**config_dict, "micro_batch": 4, "distributed": {}}, tmp_path / "single")
    assert np.allclose(list(losses(run).values()), list(single.values()), rtol=1e-5, atol=1e-6)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]  # rank 0 alone logs
    assert json.loads(lines[-1])["tokens"] == 4 * 2 * 2 * 64  # steps * ranks * micro_batch * seq_len
    state = torch.load(run / "checkpoints" / "step-00000004" / "trainer.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["examples"] == 16
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    # FSDP continues the DDP run (checkpoints hold full, unsharded state), then a single process continues that.
    r = subprocess.run(
        [*torchrun, str(config_file), "--resume", "--set", "distributed.strategy=fsdp", "--set", "max_steps=6"],
        env=ENV,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 4" in r.stderr and (run / "checkpoints" / "step-00000006").is_dir()
    config_dict.update(max_steps=7)
    final = train(config_from_dict(config_dict), resume=True)
    curve = losses(run)
    assert sorted(curve) == list(range(1, 8)) and np.isfinite(final["loss"])
    assert all(4.0 < curve[s] < 6.0 for s in curve)


def test_eval_task_scores_a_perfect_predictor():
    tok = ByteTokenizer()
    task = make_task("passkey", tok)
    samples = [task.generate(300, d, seed=10**6 + i) for i, d in enumerate(np.linspace(0, 1, 3))]

    class Oracle(torch.nn.Module):
        """Puts all mass on the true next token (plus `shift`) of whatever it reads; records what it read."""

        def __init__(self, shift=0):
            super().__init__()
            self.shift, self.seen = shift, []

        def forward(self, input_ids):
            self.seen.extend(input_ids)
            logits = torch.zeros(*input_ids.shape, 260)
            logits[:, :-1].scatter_(2, (input_ids[:, 1:, None] + self.shift) % 260, 1.0)
            return type("Out", (), {"logits": logits})()

    oracle = Oracle()
    assert eval_task(oracle, task, 300, 3, 2, "cpu") == 1.0
    # the fixed samples at depths 0, 0.5 and 1, in batches of 2
    assert [row[: len(s.input_ids)].tolist() for row, s in zip(oracle.seen, samples, strict=True)] == [
        s.input_ids.tolist() for s in samples
    ]
    assert eval_task(Oracle(shift=1), task, 300, 3, 2, "cpu") == 0.0  # every answer token wrong
    logits = torch.zeros(1, 6, 260)
    logits[0, torch.arange(6), torch.tensor([10, 11, 12, 13, 14, 15])] = 1
    assert teacher_forced_answers(logits, [3])[0].tolist() == [12, 13, 14]


def _run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def test_bad_inputs_give_clear_errors(config_dict, tmp_path, capsys):
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps(config_dict))
    cases = [
        (["--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["--set", "max_steps=many"], "config key 'max_steps': expected int"),
        (["--set", "model.overrides.d_modle=8"], "unknown field 'd_modle'; did you mean 'd_model'"),
        (["--set", "model.overrides.vocab_size=200"], "smaller than the tokenizer's 260"),
        (["--set", f"data.sources.0.path={tmp_path / 'nope'}"], "no such token file"),
        (["--set", "data.seq_len=100000"], "fewer than one sequence of 100000"),
        (["--set", "eval.tasks=[passkey]"], "too short for task passkey"),
        (["--resume", str(tmp_path / "nothing")], "no such checkpoint folder"),
    ]
    for extra, message in cases:
        code, err = _run_cli(["train", str(config_file), *extra], capsys)
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)
        assert not Path(config_dict["out_dir"]).exists()
    code, err = _run_cli(["train", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "no such file" in err


def test_token_file_from_another_tokenizer(config_dict, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "a": 2, "b": 3}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "words.json"))
    (tmp_path / "ab.txt").write_text("a b " * 500)
    prepare(
        [tmp_path / "ab.txt"],
        tmp_path / "ab",
        __import__("ramba.data", fromlist=["x"]).load_tokenizer(tmp_path / "words.json"),
        progress=False,
    )
    config_dict["data"]["sources"] = [{"path": str(tmp_path / "ab")}]
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps(config_dict))
    code, err = _run_cli(["train", str(config_file)], capsys)
    assert code == 2 and "was written by tokenizer" in err and "vocab_size 4" in err
    code, err = _run_cli(
        [
            "train",
            str(config_file),
            "--set",
            f"data.tokenizer={tmp_path / 'words.json'}",
            "--set",
            "max_steps=1",
            "--set",
            "checkpoint.every=0",
        ],
        capsys,
    )
    assert code == 0, err


def test_empty_corpus_and_corrupt_checkpoint_via_cli(config_dict, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = _run_cli(["prepare", str(tmp_path / "empty"), "-o", str(tmp_path / "out"), "--no-progress"], capsys)
    assert code == 2 and "empty corpus" in err and not (tmp_path / "out").exists()

    config_dict.update(max_steps=2)
    config_dict["checkpoint"] = {"every": 1, "keep": 2}
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps(config_dict))
    assert main(["train", str(config_file)]) == 0
    newest = Path(config_dict["out_dir"]) / "checkpoints" / "step-00000002"
    weights = newest / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, err = _run_cli(["train", str(config_file), "--resume"], capsys)
    assert code == 2 and "step-00000002" in err and "truncated or corrupt" in err
    code, err = _run_cli(["train", str(config_file)], capsys)  # a fresh run must not mix with the old one
    assert code == 2 and "already holds checkpoints (step-00000002); pass --resume" in err
    with pytest.raises(CheckpointError):
        train(load_config(config_file), resume=str(newest))
    # The previous checkpoint is still good: resuming from it explicitly works.
    assert (
        main(["train", str(config_file), "--resume", str(newest.parent / "step-00000001"), "--set", "max_steps=3"]) == 0
    )


def test_ranks_beyond_the_gpus_share_them_through_gloo():
    from ramba.train.distributed import rank_device, resolve_backend

    assert [rank_device(r, None, 1) for r in range(3)] == [torch.device("cuda:0")] * 3
    assert [rank_device(r, None, 2) for r in range(4)] == [torch.device(f"cuda:{r % 2}") for r in range(4)]
    assert rank_device(3, None, 0) == torch.device("cpu") and rank_device(1, "cpu", 8) == torch.device("cpu")
    assert rank_device(1, "cuda", 0) == torch.device("cuda:0") and rank_device(1, "cuda:5", 8) == torch.device("cuda:5")
    gpu = torch.device("cuda:0")
    assert resolve_backend("auto", gpu, local_world=2, gpus=2) == "nccl"
    assert resolve_backend("auto", gpu, local_world=2, gpus=1) == "gloo"
    assert resolve_backend("auto", torch.device("cpu"), local_world=2, gpus=0) == "gloo"
    assert resolve_backend("gloo", gpu, local_world=4, gpus=1) == "gloo"
    with pytest.raises(ConfigError, match="2 ranks on this node share 1 GPU.*distributed.backend=gloo"):
        resolve_backend("nccl", gpu, local_world=2, gpus=1)


def test_the_cuda_graph_default_is_one_cuda_process_without_checkpointing_or_fused_loss():
    from ramba.train.cuda_graph import use_cuda_graph

    gpu, cpu = torch.device("cuda:0"), torch.device("cpu")
    assert use_cuda_graph(None, gpu) is True and use_cuda_graph(None, cpu) is False
    assert not use_cuda_graph(None, gpu, world_size=2)
    assert not use_cuda_graph(None, gpu, grad_checkpointing=True) and not use_cuda_graph(None, gpu, fused_loss=True)
    assert use_cuda_graph(True, cpu) is True and use_cuda_graph(False, gpu) is False  # an explicit choice stands
