"""Every command end to end on a tiny random model at tiny lengths: valid JSON with its metadata, PNGs that open."""

import json
import statistics

import matplotlib.image
import pytest

import ramba.cli.main as cli
from eval_helpers import TINY_SET
from ramba.cli.generate import StreamDecoder
from ramba.data import ByteTokenizer


def _check_outputs(out, name, seed=0):
    data = json.loads((out / f"{name}.json").read_text())
    meta = data["meta"]
    assert meta["seed"] == seed and meta["config"] and meta["versions"]["torch"] and meta["machine"]["host"] is not None
    img = matplotlib.image.imread(out / f"{name}.png")
    assert img.ndim == 3 and min(img.shape[:2]) > 100
    return data


def test_eval_passkey(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(
        [
            "eval",
            "passkey",
            "--model",
            str(model_dir),
            "--lengths",
            "256,300",
            "--depths",
            "0,1",
            "--samples",
            "1",
            "--segment-len",
            "48",
            "--extra-tokens",
            "0",
            "--out",
            str(out),
            "--seed",
            "3",
            "--no-progress",
        ]
    )
    assert rc == 0
    data = _check_outputs(out, "passkey", seed=3)
    assert data["held_out"] == [] and list(data["haystacks"]) == ["template"]
    data = data | data["haystacks"]["template"]
    assert data["lengths"] == [256, 300] and len(data["accuracy"]) == 2 and len(data["accuracy"][0]) == 2
    assert data["meta"]["config"]["model"]["chunk_size"] == 16 and data["meta"]["config"]["eval"]["segment_len"] == 48
    assert [c["samples"][0]["seed"] for c in data["cells"]] == [3, 3, 3, 3]
    assert all(c["seconds"] > 0 and c["peak_gpu_gib"] is None for c in data["cells"])  # CPU: no GPU memory
    printed = capsys.readouterr().out
    assert "100%" in printed and "mean accuracy" in printed and "passkey.png" in printed


def test_eval_tasks(model_dir, token_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(
        [
            "eval",
            "tasks",
            "--model",
            str(model_dir),
            "--tasks",
            "niah_single,variable_tracking:num_hops=1",
            "--lengths",
            "350",
            "--depths",
            "0.5",
            "--samples",
            "2",
            "--batch-size",
            "2",
            "--segment-len",
            "64",
            "--mode",
            "fast",
            "--extra-tokens",
            "0",
            "--out",
            str(out),
            "--name",
            "t",
            "--no-progress",
            "--haystack",
            f"template,{token_file.path}",
            "--held-out",
            token_file.path.name,
        ]
    )
    assert rc == 0
    data = _check_outputs(out, "t")
    assert data["held_out"] == [token_file.path.name] and list(data["haystacks"]) == ["template", token_file.path.name]
    for hay in data["haystacks"].values():
        assert set(hay["tasks"]) == {"niah_single", "variable_tracking:num_hops=1"}
        assert all(0.0 <= r["mean"] <= 1.0 for r in hay["tasks"].values())
        record = hay["tasks"]["niah_single"]["cells"][0]["samples"][0]
        assert {"expected", "prediction", "needle_position", "answer_positions"} <= set(record)
    assert f"haystack {token_file.path.name} (held out)" in capsys.readouterr().out


def test_eval_ppl(model_dir, token_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(
        [
            "eval",
            "ppl",
            "--model",
            str(model_dir),
            "--data",
            str(token_file.path),
            "--lengths",
            "64,150",
            "--windows",
            "2",
            "--buckets",
            "4",
            "--segment-len",
            "40",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    data = _check_outputs(out, "ppl")
    assert [r["length"] for r in data["by_length"]] == [64, 150]
    assert all(1.0 < r["ppl"] < 1e4 for r in data["by_length"])
    assert "ppl" in capsys.readouterr().out


def test_generate_streams(model_dir, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Once upon a time")
    rc = cli.main(
        [
            "generate",
            "--model",
            str(model_dir),
            "--prompt-file",
            str(prompt),
            "--max-new-tokens",
            "6",
            "--segment-len",
            "8",
            "--ignore-eos",
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    assert "6 new tokens" in captured.err and "17 prompt tokens" in captured.err
    assert captured.out.endswith("\n")


def test_stream_decoder_prints_what_decoding_all_gives():
    tok = ByteTokenizer()
    text = "naïve café — 日本語 ok"
    ids = tok.encode(text)
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text
    assert "\ufffd" not in "".join(pieces)
    cut = StreamDecoder(tok)
    assert cut.push(tok.encode("日")[0]) == ""
    assert cut.flush() == "\ufffd"


def test_bench_train_and_inference(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = cli.main(
        [
            "bench",
            "train",
            "--presets",
            "tiny",
            *TINY_SET,
            "--architectures",
            "ramba,mamba2",
            "--lengths",
            "32",
            "--batch-tokens",
            "64",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = _check_outputs(out, "bench_train")
    assert [(r["architecture"], r["length"], r["batch"]) for r in data["rows"]] == [("ramba", 32, 2), ("mamba2", 32, 2)]
    assert all(r["tokens_per_s"] > 0 and "error" not in r for r in data["rows"])
    ratio = data["ratios"][0]
    assert ratio["baseline"] == "mamba2"
    assert ratio["ramba_over_baseline"] == pytest.approx(
        data["rows"][0]["tokens_per_s"] / data["rows"][1]["tokens_per_s"]
    )
    rc = cli.main(
        [
            "bench",
            "inference",
            "--preset",
            "tiny",
            *TINY_SET,
            "--architectures",
            "ramba,transformer",
            "--lengths",
            "40,70",
            "--segment-len",
            "32",
            "--decode-tokens",
            "4",
            "--no-offload",
            "--profile",
            str(out / "profile"),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = _check_outputs(out, "bench_inference")
    assert [(r["model"], r["length"]) for r in data["rows"]] == [
        ("ramba", 40),
        ("ramba", 70),
        ("transformer", 40),
        ("transformer", 70),
    ]
    assert all(
        r["prefill_tokens_per_s"] > 0 and r["decode_ms_per_token"] > 0 < r["first_decode_ms"] and r["peak_rss_gib"] > 0
        for r in data["rows"]
    )
    for r in data["rows"]:  # every timed step after the first; no sketch without offload
        assert len(r["decode_step_ms"]) == 3 and r["decode_ms_per_token"] == pytest.approx(sum(r["decode_step_ms"]) / 3)
        assert r["sketch_candidates"] == [None] * 4
        assert r["reference_tokens"] == 40 and len(r["reference_step_ms"]) == 3  # interleaved with the row's steps
        ratio = statistics.median(r["decode_step_ms"]) / statistics.median(r["reference_step_ms"])
        assert r["decode_vs_reference"] == pytest.approx(ratio) and ratio > 0
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "decode ms/tok" in printed
    tables = sorted(p.name for p in (out / "profile").iterdir())
    assert tables == [f"{m}-{n}.decode.txt" for m in ("ramba", "transformer") for n in (40, 70)]
    assert "aten::" in (out / "profile" / "ramba-70.decode.txt").read_text()  # the decoding steps' ops


def test_bench_kernels_needs_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU machine `ramba bench kernels` runs the real benchmark (scripts/device_run.sh hsa)")
    assert cli.main(["bench", "kernels"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bad", [["--offload-dir", "DIR", "--host-budget", "8x"], ["--host-budget", "8g"]], ids=["bad size", "no disk tier"]
)
def test_bench_inference_refuses_bad_offload_options_before_work(bad, tmp_path, capsys):
    """One line, exit 2 and no results file, instead of every row recorded as a failed warm-up."""
    args = ["bench", "inference", "--preset", "tiny", "--lengths", "64", "--out", str(tmp_path / "out")]
    assert cli.main(args + [str(tmp_path) if a == "DIR" else a for a in bad]) == 2
    assert "--host-budget" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bench_inference_offload_options_give_the_placement(tmp_path):
    """The same options as `ramba eval` (shared parsing), plus where the offloaded landmarks live."""
    from ramba.bench.inference import build_parser, offload_spec
    from ramba.model.chunk_store import Offload

    def spec(*argv):
        return offload_spec(build_parser().parse_args(list(argv)))

    assert spec() == Offload("host", landmarks="sketch") and spec("--no-offload") is False
    assert spec("--landmarks", "device") == Offload("host", landmarks="device")
    disk = spec("--offload-dir", str(tmp_path), "--host-budget", "1m", "--landmarks", "host")
    assert disk == Offload("disk", str(tmp_path), 2**20, "host")


@pytest.mark.parametrize("bad", ["3", "0", "2,x"])
def test_bench_kernels_refuses_bad_block_tokens(bad, capsys):
    assert cli.main(["bench", "kernels", "--block-tokens", bad]) == 2
    err = capsys.readouterr().err
    assert "--block-tokens" in err and len(err.strip().splitlines()) == 1


def test_bad_arguments_are_usage_errors(model_dir, capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "passkey", "--model", str(model_dir), "--lengths", "4x"])
    assert "lengths" in capsys.readouterr().err
    assert cli.main(["eval", "passkey", "--model", "/nonexistent/model", "--lengths", "300"]) == 2
    assert "no such folder or file: /nonexistent/model" in capsys.readouterr().err


def test_model_folder_checkpoint_or_run(model_dir, tmp_path):
    """`--model` finds the weights in a model folder, a checkpoint folder or a run's newest checkpoint,
    and the tokenizer the run was configured with."""
    import shutil

    from ramba.errors import ModelLoadError
    from ramba.eval.loading import load_model_tokenizer, resolve_model_dir

    run = tmp_path / "run"
    for step in (9, 10):
        shutil.copytree(model_dir, run / "checkpoints" / f"step-{step:08d}" / "model")
    (run / "config.json").write_text(json.dumps({"data": {"tokenizer": "byte"}}))
    newest = run / "checkpoints" / "step-00000010" / "model"
    assert resolve_model_dir(run) == newest
    assert resolve_model_dir(newest.parent) == newest
    assert resolve_model_dir(model_dir) == model_dir
    (run / "config.json").write_text(json.dumps({"data": {"tokenizer": str(tmp_path / "missing.json")}}))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_model_tokenizer(run)
    model, tok = load_model_tokenizer(run, tokenizer="byte")
    assert tok.vocab_size == 260 and not model.training
    with pytest.raises(ModelLoadError, match="not a model folder"):
        resolve_model_dir(tmp_path)


def test_bench_inference_records_the_sketch_candidates(tmp_path, monkeypatch):
    from ramba.model import chunk_store

    monkeypatch.setattr(chunk_store, "SKETCH_MIN_BYTES", 0)  # sketch even these few landmarks
    args = ["bench", "inference", "--preset", "tiny", *TINY_SET, "--architectures", "ramba", "--lengths", "300"]
    args += ["--segment-len", "64", "--decode-tokens", "3", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    (row,) = _check_outputs(tmp_path, "bench_inference")["rows"]
    assert len(row["sketch_candidates"]) == 3 and all(isinstance(n, int) and n >= 1 for n in row["sketch_candidates"])
