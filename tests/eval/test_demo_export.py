"""`ramba export` (a model as one file, usable wherever --model is) and `ramba demo` (the shipped model
retrieving a pass key on the CPU)."""

import json

import matplotlib.image
import pytest

import ramba.cli.main as cli
from ramba.cli.demo import SHIPPED_MODEL, SUITE
from ramba.model.single_file import TRAIN_CONFIG_KEY, read_model_file_metadata


@pytest.fixture
def run_dir(tmp_path, model_dir):
    """A training run's layout: its config.json above checkpoints/step-N/model."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000007").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"data": {"seq_len": 512, "tokenizer": "byte"}}))
    (run / "checkpoints" / "step-00000007" / "model").symlink_to(model_dir)
    return run


def test_export_a_run_then_use_the_file(run_dir, tmp_path, capsys):
    out = tmp_path / "tiny.safetensors"
    assert cli.main(["export", "--model", str(run_dir), "-o", str(out)]) == 0
    assert "tiny.safetensors" in capsys.readouterr().out
    meta = read_model_file_metadata(out)
    assert json.loads(meta[TRAIN_CONFIG_KEY])["data"]["seq_len"] == 512 and meta["ramba_tokenizer"] == "byte"
    again = tmp_path / "fp32.safetensors"  # re-exported from the file: the training config stays
    assert cli.main(["export", "--model", str(out), "-o", str(again), "--dtype", "fp32"]) == 0
    assert read_model_file_metadata(again)[TRAIN_CONFIG_KEY] == meta[TRAIN_CONFIG_KEY]
    rc = cli.main(
        [
            "eval",
            "passkey",
            "--model",
            str(out),
            "--lengths",
            "300",
            "--depths",
            "0.5",
            "--samples",
            "1",
            "--extra-tokens",
            "0",
            "--out",
            str(tmp_path / "ev"),
            "--no-progress",
        ]
    )
    assert rc == 0 and (tmp_path / "ev" / "passkey.json").is_file()
    assert (
        cli.main(
            [
                "demo",
                "--model",
                str(out),
                "--lengths",
                "300",
                "--depths",
                "0",
                "--passkey",
                "4242",
                "--suite-lengths",
                "700",
                "--out",
                str(tmp_path / "demo"),
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "trained on contexts of 512 tokens" in printed and "your pass key 4242" in printed
    assert "RULER-style suite" in printed and "variable_tracking |" in printed
    suite = json.loads((tmp_path / "demo" / "demo_tasks.json").read_text())["haystacks"]["template"]
    assert list(suite["tasks"]) == SUITE.split(",") and suite["lengths"] == [700]


def test_bad_export_and_demo_arguments(model_dir, tmp_path, capsys):
    assert cli.main(["export", "--model", str(model_dir), "-o", str(tmp_path / "m.bin")]) == 2
    assert "ending in .safetensors" in capsys.readouterr().err
    assert cli.main(["demo", "--passkey", "12ab", "--out", str(tmp_path)]) == 2
    assert "passkey: key: expected a string of digits" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert cli.main(["demo", "--model", str(tmp_path / "junk.safetensors"), "--out", str(tmp_path)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


# The shipped model's mean score per task over the suite's 2K and 8K cells (template haystack, depths 0, 0.5 and 1,
# one sample each, fast mode, CPU). tiny-ruler scored 1.000, 1.000, 0.958, 0.958 and 0.933 (in this order;
# 2026-12-01, the 2-core CPU box); the passkey-only model it replaced 1.000, 0.667, 0.000, 0.333 and 0.000. The
# thresholds are issue 22's 80% goal for long contexts.
SUITE_THRESHOLD = {
    "niah_single": 0.8,
    "niah_multikey": 0.8,
    "niah_multivalue": 0.8,
    "niah_multiquery": 0.8,
    "variable_tracking": 0.8,
}


def test_the_shipped_model_finds_the_pass_key_and_runs_the_suite(tmp_path, capsys):
    """The checkpoint in the package, on the CPU, at and beyond its 4K training length."""
    assert SHIPPED_MODEL.stat().st_size < 16 * 2**20
    assert (
        cli.main(
            [
                "demo",
                "--lengths",
                "2k,8k",
                "--depths",
                "0,1",
                "--passkey",
                "90210",
                "--suite-lengths",
                "2k,8k",
                "--suite-depths",
                "0,0.5,1",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "demo_passkey.json").read_text())["haystacks"]["template"]
    assert data["accuracy"] == [[1.0, 1.0], [1.0, 1.0]]
    suite = json.loads((tmp_path / "demo_tasks.json").read_text())["haystacks"]["template"]["tasks"]
    means = {task: suite[task]["mean"] for task in SUITE_THRESHOLD}
    assert all(means[t] >= SUITE_THRESHOLD[t] for t in means), means
    assert matplotlib.image.imread(tmp_path / "demo_tasks.png").ndim == 3
    assert "trained on contexts of 4,096 tokens" in printed
    assert "model: 90210." in printed and "found the pass key" in printed
    assert matplotlib.image.imread(tmp_path / "demo_passkey.png").ndim == 3
