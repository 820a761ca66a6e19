"""The `ramba` command line: subcommands, help, `--fields`, `--print-config`, `prepare` output."""

import json
import subprocess
import sys

from ramba.cli.main import COMMANDS, build_parser, main


def test_commands_and_module_entry_point():
    assert {"prepare", "train"} <= set(COMMANDS)
    help_text = build_parser().format_help()
    assert all(c in help_text for c in COMMANDS)
    r = subprocess.run([sys.executable, "-m", "ramba", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "prepare" in r.stdout and "train" in r.stdout


def test_prepare_prints_a_summary(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello world")
    assert main(["prepare", str(tmp_path / "a.txt"), "-o", str(tmp_path / "tf"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "1 documents, 12 tokens (byte tokenizer, vocab 260)" in out


def test_fields_and_print_config(tmp_path, capsys):
    assert main(["train", "--fields"]) == 0
    out = capsys.readouterr().out
    assert "optim.lr  (float, default 0.0003)" in out and "data.sources.*.task" in out
    (tmp_path / "c.yaml").write_text("data:\n  sources: [{task: passkey}]\n")
    assert main(["train", str(tmp_path / "c.yaml"), "--set", "optim.lr=2e-4", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["optim"]["lr"] == 2e-4 and cfg["data"]["sources"][0]["task"] == "passkey"
    assert main(["train"]) == 2
    assert "give a config file" in capsys.readouterr().err
