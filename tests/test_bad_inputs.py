"""The catalogue of bad inputs (docs/design.md §8): every one raises its documented error type with the words a
user needs, and no output file is created or changed. Python API cases first, then the command line (exit
status 2, one `ramba <command>: error: ...` line, no traceback)."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import ramba.cli.main as cli
from ramba import RambaConfig, RambaForCausalLM
from ramba.data import ByteTokenizer, TokenFile, prepare
from ramba.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    EvalError,
    InputError,
    ModelLoadError,
    OutputPathError,
    RambaUserError,
)
from ramba.eval.results import parse_depths, parse_lengths, write_results
from ramba.files import check_output
from ramba.inference import generate, prefill
from ramba.model.loading import load_model, resolve_device, resolve_dtype
from ramba.model.single_file import save_model_file
from ramba.ops import hsa
from ramba.ops.nsa import nsa
from ramba.ops.ssd import ssd
from ramba.train.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint
from ramba.train.config import ConfigTypeError, config_from_dict, load_config
from ramba.train.lock import RunLock
from small_models import SMALL, small_model

BYTE = dict(SMALL, vocab_size=260, pad_token_id=256, bos_token_id=257, eos_token_id=258)


def _flip(path: Path, at: float = 0.9) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x40
    path.write_bytes(bytes(data))


def _nan_model() -> RambaForCausalLM:
    model = small_model(**BYTE)
    with torch.no_grad():
        model.model.norm_f.weight[0] = float("nan")
    return model


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The inputs every case may read: good and damaged models, checkpoints, token files, odd paths."""
    root = tmp_path_factory.mktemp("inputs")
    w = {"root": root}
    small_model(**BYTE).save_pretrained(root / "model")
    w["model"] = root / "model"
    w["file"] = save_model_file(small_model(**BYTE), root / "m.safetensors", dtype=torch.float32)
    w["nan_file"] = save_model_file(_nan_model(), root / "nan.safetensors", dtype=torch.float32)
    _nan_model().save_pretrained(root / "nan_model")
    w["nan_model"] = root / "nan_model"
    w["flipped_file"] = root / "flipped.safetensors"
    w["flipped_file"].write_bytes(w["file"].read_bytes())
    _flip(w["flipped_file"])
    w["cut_file"] = root / "cut.safetensors"
    w["cut_file"].write_bytes(w["file"].read_bytes()[:2000])
    model = small_model(**BYTE)
    opt = torch.optim.AdamW(model.parameters())
    w["ckpt"] = save_checkpoint(root / "run" / "checkpoints", 3, model, opt, {"step": 3}, keep=2)
    w["bad_ckpt"] = save_checkpoint(root / "badrun" / "checkpoints", 3, model, opt, {"step": 3}, keep=2)
    _flip(w["bad_ckpt"] / "model" / "model.safetensors")
    (root / "noconfig").mkdir()
    (root / "noconfig" / "model.safetensors").write_bytes(w["file"].read_bytes())
    (root / "noweights").mkdir()
    (root / "noweights" / "config.json").write_text(RambaConfig(**BYTE).to_json_string())
    (root / "emptyrun" / "checkpoints").mkdir(parents=True)
    (root / "text.txt").write_text("some text to tokenize. " * 50)
    w["data"] = prepare([root / "text.txt"], root / "data", ByteTokenizer(), progress=False).path
    (root / "cut_data").mkdir()
    for name in ("meta.json", "offsets.npy"):
        (root / "cut_data" / name).write_bytes((w["data"] / name).read_bytes())
    (root / "cut_data" / "tokens.bin").write_bytes((w["data"] / "tokens.bin").read_bytes()[:10])
    (root / "a_file").write_text("not a folder")
    (root / "old.json").write_text("{}")
    w["binary"] = root / "prompt.bin"
    w["binary"].write_bytes(bytes(range(256)))
    (root / "bad.jsonl").write_text("{not json\n")
    (root / "empty_corpus").mkdir()
    (root / "empty_corpus" / "blank.txt").write_text("   \n")
    w["ro"] = _read_only_dir(root / "ro")
    yield w
    if w["ro"] is not None and os.path.ismount(w["ro"]):
        subprocess.run(["umount", str(w["ro"])], check=False)


def _read_only_dir(path: Path) -> Path | None:
    """A folder this process cannot write: a read-only tmpfs as root (root ignores permission bits), else 0555."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return path
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(path)], capture_output=True)
    return path if done.returncode == 0 else None


def _snapshot(*folders: Path) -> dict:
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            st = p.lstat()
            out[str(p)] = (st.st_size, st.st_mtime_ns) if p.is_file() else "dir"
    return out


def _fmt(arg, w, out: Path):
    if isinstance(arg, str):
        return arg.format(out=out, **{k: v for k, v in w.items() if v is not None})
    return arg


def _tensors(B=1, T=32, HQ=2, H=1, D=16, S=16, K=2):
    q, k, v = torch.randn(B, T, HQ, D), torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    return q, k, v, torch.rand(B, T, H, K), torch.zeros(B, T, H, K, dtype=torch.long), S


def _ssd_inputs():
    return (
        torch.randn(1, 8, 2, 4),
        torch.rand(1, 8, 2),
        -torch.rand(2),
        torch.randn(1, 8, 1, 3),
        torch.randn(1, 8, 1, 3),
    )


def _nsa_inputs():
    q, k, v = torch.randn(1, 32, 2, 16), torch.randn(1, 32, 1, 16), torch.randn(1, 32, 1, 16)
    return q, k, v, torch.rand(1, 32, 2), torch.rand(1, 32, 2)


SOURCE = [{"path": "{data}"}]

# (case id, function of (workspace, output folder), error type, words the message must hold)
API = [
    ("config-unknown-field", lambda w, o: RambaConfig(chunk_sise=128), ConfigError, "did you mean 'chunk_size'"),
    (
        "config-unknown-preset-field",
        lambda w, o: RambaConfig.preset("tiny", d_modle=3),
        ConfigError,
        "did you mean 'd_model'",
    ),
    ("config-unknown-preset", lambda w, o: RambaConfig.preset("huge"), ConfigError, "unknown preset"),
    ("config-chunk-size", lambda w, o: RambaConfig(chunk_size=20), ValueError, "multiple of 16"),
    ("config-architecture", lambda w, o: RambaConfig(architecture="rnn"), ValueError, "architecture"),
    ("config-heads", lambda w, o: RambaConfig(n_heads=3, n_kv_heads=2), ValueError, "multiple of n_kv_heads"),
    ("config-width", lambda w, o: RambaConfig(d_model=0), ValueError, "positive int"),
    (
        "train-lr-nan",
        lambda w, o: config_from_dict({"optim": {"lr": float("nan")}, "data": {"sources": SOURCE}}),
        ConfigError,
        "optim.lr': expected a finite number",
    ),
    ("train-unknown-key", lambda w, o: config_from_dict({"optimm": {}}), ConfigError, "unknown config key 'optimm'"),
    ("train-wrong-type", lambda w, o: config_from_dict({"max_steps": "ten"}), ConfigTypeError, "expected int"),
    ("train-set-no-equals", lambda w, o: load_config(None, ["optim.lr"]), ConfigError, "key=value"),
    (
        "train-set-bad-index",
        lambda w, o: load_config(None, ["data.sources=[{task: passkey}]", "data.sources.5.weight=1"]),
        ConfigError,
        "index",
    ),
    ("train-no-sources", lambda w, o: config_from_dict({"data": {"sources": []}}), ConfigError, "at least one"),
    ("hsa-numpy", lambda w, o: hsa(np.zeros((1, 32, 2, 16)), *_tensors()[1:]), TypeError, "torch.Tensor"),
    ("hsa-triton-on-cpu", lambda w, o: hsa(*_tensors(), backend="triton"), ValueError, "needs CUDA tensors"),
    ("hsa-unknown-backend", lambda w, o: hsa(*_tensors(), backend="cuda"), ValueError, "backend must be one of"),
    ("ssd-old-backend-name", lambda w, o: ssd(*_ssd_inputs(), backend="naive"), ValueError, "backend must be one of"),
    ("ssd-mamba-on-cpu", lambda w, o: ssd(*_ssd_inputs(), backend="mamba_ssm"), ValueError, "needs CUDA tensors"),
    (
        "nsa-unknown-backend",
        lambda w, o: nsa(*_nsa_inputs(), topk=2, block_size=16, backend="flash"),
        ValueError,
        "backend must be one of",
    ),
    (
        "forward-empty-batch",
        lambda w, o: small_model()(input_ids=torch.zeros(0, 40, dtype=torch.long)),
        InputError,
        "the batch is empty (B=0)",
    ),
    (
        "forward-id-out-of-range",
        lambda w, o: small_model()(input_ids=torch.tensor([[1, 64]])),
        InputError,
        "outside [0, vocab_size=64)",
    ),
    (
        "prefill-id-out-of-range",
        lambda w, o: prefill(small_model(), torch.tensor([[1, 99]]), 16),
        InputError,
        "vocab_size=64",
    ),
    (
        "generate-top-k-0",
        lambda w, o: generate(small_model(), torch.tensor([[1, 2]]), 2, do_sample=True, top_k=0),
        InputError,
        "top_k",
    ),
    (
        "generate-temperature-0",
        lambda w, o: generate(small_model(), torch.tensor([[1]]), 2, do_sample=True, temperature=0.0),
        InputError,
        "temperature",
    ),
    ("load-missing", lambda w, o: load_model(w["root"] / "nope"), ModelLoadError, "no such folder or file"),
    ("load-no-config", lambda w, o: load_model(w["root"] / "noconfig"), ModelLoadError, "no config.json"),
    ("load-no-weights", lambda w, o: load_model(w["root"] / "noweights"), ModelLoadError, "no *.safetensors"),
    (
        "load-run-without-checkpoint",
        lambda w, o: load_model(w["root"] / "emptyrun"),
        ModelLoadError,
        "no complete checkpoint",
    ),
    ("load-nan-file", lambda w, o: load_model(w["nan_file"]), ModelLoadError, "non-finite"),
    ("load-nan-folder", lambda w, o: load_model(w["nan_model"]), ModelLoadError, "model.norm_f.weight"),
    ("load-flipped-file", lambda w, o: load_model(w["flipped_file"]), ModelLoadError, "checksum"),
    ("load-truncated-file", lambda w, o: load_model(w["cut_file"]), ModelLoadError, "truncated"),
    (
        "load-flipped-checkpoint",
        lambda w, o: load_model(w["bad_ckpt"]),
        CheckpointError,
        "model/model.safetensors does not match its checksum",
    ),
    (
        "from-pretrained-flipped-checkpoint",
        lambda w, o: RambaForCausalLM.from_pretrained(w["bad_ckpt"] / "model"),
        CheckpointError,
        "checksum",
    ),
    ("device-missing", lambda w, o: resolve_device("cuda:99"), InputError, "device cuda:99"),
    ("device-unreadable", lambda w, o: resolve_device("tpu9"), InputError, "cannot read 'tpu9'"),
    ("dtype-unknown", lambda w, o: resolve_dtype("fp8", torch.device("cpu")), InputError, "fp32, bf16 or fp16"),
    ("token-file-missing", lambda w, o: TokenFile(w["root"] / "nope"), FileNotFoundError, "ramba prepare"),
    ("token-file-not-one", lambda w, o: TokenFile(w["model"]), DataError, "not a token file"),
    ("token-file-truncated", lambda w, o: TokenFile(w["root"] / "cut_data"), DataError, "truncated"),
    (
        "prepare-existing",
        lambda w, o: prepare([w["root"] / "text.txt"], w["data"], ByteTokenizer(), progress=False),
        OutputPathError,
        "exists; pass --overwrite",
    ),
    (
        "prepare-empty-corpus",
        lambda w, o: prepare([w["root"] / "empty_corpus"], o / "d", ByteTokenizer(), progress=False),
        DataError,
        "empty corpus",
    ),
    (
        "prepare-bad-jsonl",
        lambda w, o: prepare([w["root"] / "bad.jsonl"], o / "d", ByteTokenizer(), progress=False),
        DataError,
        "bad.jsonl:1: not valid JSON",
    ),
    (
        "prepare-under-a-file",
        lambda w, o: prepare([w["root"] / "text.txt"], w["root"] / "a_file" / "d", ByteTokenizer(), progress=False),
        OutputPathError,
        "is a file, not a folder",
    ),
    (
        "prepare-read-only",
        lambda w, o: prepare([w["root"] / "text.txt"], w["ro"] / "d", ByteTokenizer(), progress=False),
        OutputPathError,
        "cannot write in",
    ),
    (
        "save-model-read-only",
        lambda w, o: save_model_file(small_model(), w["ro"] / "m.safetensors"),
        OutputPathError,
        "read-only",
    ),
    (
        "results-under-a-file",
        lambda w, o: write_results(w["root"] / "a_file" / "r.json", {}),
        OutputPathError,
        "not a folder",
    ),
    ("output-too-big", lambda w, o: check_output(o / "big.bin", size=1 << 62), OutputPathError, "MiB are free"),
    (
        "run-folder-locked",
        lambda w, o: RunLock(w["root"] / "locked").acquire(),
        CheckpointError,
        "in use by another run (host",
    ),
    (
        "checkpoint-missing-manifest",
        lambda w, o: verify_checkpoint(w["root"] / "run"),
        CheckpointError,
        "manifest.json is missing",
    ),
    (
        "checkpoint-flipped",
        lambda w, o: load_checkpoint(w["bad_ckpt"], small_model(**BYTE)),
        CheckpointError,
        "does not match its checksum",
    ),
    ("lengths-unreadable", lambda w, o: parse_lengths("4x"), EvalError, "cannot read '4x'"),
    ("depths-out-of-range", lambda w, o: parse_depths("2"), EvalError, "[0, 1]"),
]


@pytest.fixture(scope="module")
def held_lock(ws):
    lock = RunLock(ws["root"] / "locked").acquire()
    yield
    lock.release()


@pytest.mark.parametrize("case, call, error, words", API, ids=[c[0] for c in API])
def test_api_bad_input(ws, held_lock, tmp_path, case, call, error, words):
    if "read-only" in case and ws["ro"] is None:
        pytest.skip("no read-only folder on this machine (not root and no tmpfs mount)")
    before = _snapshot(ws["root"], tmp_path)
    with pytest.raises(error) as info:
        call(ws, tmp_path)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert _snapshot(ws["root"], tmp_path) == before


TRAIN = [
    "train",
    "--set",
    "data.sources=[{{path: {data}}}]",
    "--set",
    "out_dir={out}/run",
    "--set",
    "max_steps=1",
    "--set",
    "log.tensorboard=false",
    "--set",
    "log.progress=false",
    "--set",
    "data.seq_len=64",
    "--set",
    "micro_batch=1",
]
GEN = ["generate", "--model", "{model}", "--prompt", "hi", "--max-new-tokens", "2"]
PASSKEY = [
    "eval",
    "passkey",
    "--model",
    "{model}",
    "--lengths",
    "300",
    "--samples",
    "1",
    "--depths",
    "0",
    "--no-progress",
]

CLI = [
    ("train-lr-nan", TRAIN + ["--set", "optim.lr=.nan"], "optim.lr': expected a finite number"),
    ("train-unknown-key", TRAIN + ["--set", "chunk_sise=128"], "unknown config key 'chunk_sise'"),
    ("train-unknown-model-field", TRAIN + ["--set", "model.overrides.chunk_sise=128"], "did you mean 'chunk_size'"),
    ("train-device-missing", TRAIN + ["--set", "device=cuda:99"], "config key 'device'"),
    ("train-out-under-a-file", TRAIN + ["--set", "out_dir={root}/a_file/run"], "is a file, not a folder"),
    ("train-out-read-only", TRAIN + ["--set", "out_dir={ro}/run"], "cannot write in"),
    ("train-missing-config", ["train", "{root}/nope.yaml"], "no such file"),
    ("train-negative-steps", TRAIN + ["--set", "max_steps=-1"], "max_steps': expected > 0"),
    ("train-init-from-missing", TRAIN + ["--set", "model.init_from={root}/nope"], "model.init_from"),
    ("train-init-from-nan", TRAIN + ["--set", "model.init_from={nan_file}"], "non-finite"),
    ("train-bad-set-syntax", TRAIN + ["--set", "optim.lr"], "key=value"),
    ("train-token-file-missing", TRAIN + ["--set", "data.sources=[{{path: {root}/nope}}]"], "ramba prepare"),
    ("generate-top-k-0", GEN + ["--sample", "--top-k", "0"], "--top-k"),
    ("generate-temperature-0", GEN + ["--sample", "--temperature", "0"], "--temperature"),
    ("generate-binary-prompt", ["generate", "--model", "{model}", "--prompt-file", "{binary}"], "not UTF-8 text"),
    ("generate-missing-prompt", ["generate", "--model", "{model}", "--prompt-file", "{root}/nope.txt"], "No such file"),
    ("generate-device-missing", GEN + ["--device", "cuda:99"], "device cuda:99"),
    ("generate-nan-model", ["generate", "--model", "{nan_file}", "--prompt", "hi"], "non-finite"),
    ("generate-flipped-checkpoint", ["generate", "--model", "{bad_ckpt}", "--prompt", "hi"], "checksum"),
    ("generate-no-config", ["generate", "--model", "{root}/noconfig", "--prompt", "hi"], "no config.json"),
    ("generate-no-tokens", GEN + ["--max-new-tokens", "0"], ">= 1"),
    ("generate-segment-0", GEN + ["--segment-len", "0"], "--segment-len"),
    ("eval-batch-size-0", PASSKEY + ["--out", "{out}", "--batch-size", "0"], "--batch-size"),
    ("eval-digits-0", PASSKEY + ["--out", "{out}", "--digits", "0"], "--digits"),
    ("eval-samples-not-a-number", PASSKEY + ["--out", "{out}", "--samples", "two"], "--samples"),
    (
        "eval-ranks-no-samples",
        ["eval", "ranks", "--model", "{model}", "--lengths", "300", "--samples", "0", "--out", "{out}"],
        "--samples",
    ),
    (
        "bench-inference-batch-0",
        ["bench", "inference", "--preset", "tiny", "--lengths", "64", "--batch", "0", "--out", "{out}"],
        "--batch",
    ),
    (
        "bench-inference-segment-0",
        ["bench", "inference", "--preset", "tiny", "--lengths", "64", "--segment-len", "0", "--out", "{out}"],
        "--segment-len",
    ),
    ("bench-train-no-steps", ["bench", "train", "--presets", "tiny", "--steps", "0", "--out", "{out}"], "--steps"),
    ("export-existing", ["export", "--model", "{model}", "-o", "{file}"], "exists; pass --overwrite"),
    ("export-under-a-file", ["export", "--model", "{model}", "-o", "{root}/a_file/m.safetensors"], "not a folder"),
    ("export-read-only", ["export", "--model", "{model}", "-o", "{ro}/m.safetensors"], "cannot write in"),
    ("export-suffix", ["export", "--model", "{model}", "-o", "{out}/m.bin"], ".safetensors"),
    ("export-flipped-checkpoint", ["export", "--model", "{bad_ckpt}", "-o", "{out}/m.safetensors"], "checksum"),
    ("export-nan", ["export", "--model", "{nan_model}", "-o", "{out}/m.safetensors"], "non-finite"),
    ("eval-out-is-a-file", PASSKEY + ["--out", "{root}/a_file"], "is a file"),
    ("eval-out-read-only", PASSKEY + ["--out", "{ro}"], "cannot write in"),
    ("eval-results-exist", PASSKEY + ["--out", "{root}", "--name", "old"], "exists; pass --overwrite"),
    ("eval-device-missing", PASSKEY + ["--out", "{out}", "--device", "cuda:99"], "device cuda:99"),
    (
        "eval-ppl-missing-data",
        ["eval", "ppl", "--model", "{model}", "--lengths", "64", "--data", "{root}/nope", "--out", "{out}"],
        "ramba prepare",
    ),
    ("prepare-existing", ["prepare", "{root}/text.txt", "-o", "{data}"], "exists; pass --overwrite"),
    ("prepare-under-a-file", ["prepare", "{root}/text.txt", "-o", "{root}/a_file/d"], "is a file, not a folder"),
    ("prepare-read-only", ["prepare", "{root}/text.txt", "-o", "{ro}/d"], "cannot write in"),
    ("prepare-missing-input", ["prepare", "{root}/nope.txt", "-o", "{out}/d"], "no such file or folder"),
    (
        "prepare-missing-tokenizer",
        ["prepare", "{root}/text.txt", "-o", "{out}/d", "--tokenizer", "{root}/nope.json"],
        "tokenizer",
    ),
    ("demo-out-is-a-file", ["demo", "--model", "{file}", "--out", "{root}/a_file"], "is a file"),
    (
        "bench-train-unknown-field",
        ["bench", "train", "--presets", "tiny", "--set", "chunk_sise=128", "--out", "{out}"],
        "did you mean 'chunk_size'",
    ),
]


@pytest.mark.parametrize("case, argv", [(c[0], c[1]) for c in CLI], ids=[c[0] for c in CLI])
def test_cli_bad_input(ws, tmp_path, capsys, case, argv):
    words = dict((c[0], c[2]) for c in CLI)[case]
    if "read-only" in case and ws["ro"] is None:
        pytest.skip("no read-only folder on this machine (not root and no tmpfs mount)")
    argv = [_fmt(a, ws, tmp_path) for a in argv]
    before = _snapshot(ws["root"], tmp_path)
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as e:  # an argument's own check: argparse's usage error
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    # "ramba eval: error: ..." from a command, "ramba eval passkey: error: ..." from its argument parser
    errors = [line for line in err.splitlines() if line.startswith(f"ramba {argv[0]}") and ": error: " in line]
    assert len(errors) == 1 and words in errors[0] and "Traceback" not in err, err
    assert _snapshot(ws["root"], tmp_path) == before


def test_catalogue_size():
    assert len(API) + len(CLI) >= 60
    assert all(issubclass(e, (RambaUserError, TypeError, ValueError, FileNotFoundError)) for _, _, e, _ in API)


def test_selection_on_an_empty_batch():
    """An empty batch is not an error: the streaming selection sizes its tiles as for a batch of one."""
    from ramba.ops.retrieval import select_chunks

    indices, weights = select_chunks(torch.randn(0, 40, 1, 8), torch.randn(0, 2, 1, 8), chunk_size=16, topk=2)
    assert indices.shape == weights.shape == (0, 40, 1, 2)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_output_files_follow_the_umask(ws, tmp_path, umask, mode):
    """Exported models and results JSON are written with 0666 minus the user's umask, not mkstemp's 0600."""
    old = os.umask(umask)
    try:
        assert cli.main(["export", "--model", str(ws["root"] / "model"), "-o", str(tmp_path / "m.safetensors")]) == 0
        results = write_results(tmp_path / "r.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == mode
    assert Path(results).stat().st_mode & 0o777 == mode
