"""Config parsing: YAML/JSON, --set overrides, unknown keys and wrong types raise clear errors."""

import json
from pathlib import Path

import pytest
import yaml

from ramba.train.config import ConfigError, TrainConfig, apply_overrides, config_from_dict, describe, load_config

REPO = Path(__file__).resolve().parents[2]
BASE = {"data": {"sources": [{"task": "passkey"}]}}


def test_yaml_and_json_give_the_same_config(tmp_path):
    d = {
        "max_steps": 7,
        "optim": {"lr": 1e-3, "betas": [0.9, 0.99]},
        "data": {"seq_len": 256, "sources": [{"path": "x", "weight": 2}]},
    }
    (tmp_path / "c.json").write_text(json.dumps(d))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d).replace("0.001", "1e-3"))
    a, b = load_config(tmp_path / "c.json"), load_config(tmp_path / "c.yaml")
    assert a == b
    assert a.optim.lr == 1e-3 and isinstance(a.optim.lr, float)
    assert a.data.sources[0].weight == 2.0 and isinstance(a.data.sources[0].weight, float)
    assert a.eval.every == TrainConfig().eval.every


def test_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  sources:\n    - {task: passkey}\n    - {path: a}\n")
    cfg = load_config(
        tmp_path / "c.yaml",
        [
            "optim.lr=5e-4",
            "data.sources.1.weight=0.5",
            "model.overrides.d_model=64",
            "eval.tasks=[passkey, niah_single]",
            "model.preset=null",
            "log.progress=false",
        ],
    )
    assert cfg.optim.lr == 5e-4 and cfg.data.sources[1].weight == 0.5
    assert cfg.model.overrides == {"d_model": 64} and cfg.model.preset is None
    assert cfg.eval.tasks == ["passkey", "niah_single"] and cfg.log.progress is False
    for bad, match in [
        ("optim.lr", "key=value"),
        ("data.sources.5.weight=1", "index"),
        ("max_steps.x=1", "max_steps': expected int"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(tmp_path / "c.yaml", [bad])


@pytest.mark.parametrize(
    "patch, key",
    [
        ({"max_step": 3}, "max_step"),
        ({"optim": {"learning_rate": 1}}, "optim.learning_rate"),
        ({"data": {"sources": [{"task": "passkey", "wieght": 1}]}}, "data.sources.0.wieght"),
    ],
)
def test_unknown_keys(patch, key):
    d = {**BASE, **patch}
    if "data" in patch:
        d = patch
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        config_from_dict(d)


@pytest.mark.parametrize(
    "patch, key, expected",
    [
        ({"max_steps": "10"}, "max_steps", "int"),
        ({"max_steps": 1.5}, "max_steps", "int"),
        ({"grad_checkpointing": 1}, "grad_checkpointing", "bool"),
        ({"optim": {"betas": 0.9}}, "optim.betas", "list"),
        ({"optim": {"lr": "fast"}}, "optim.lr", "float"),
        ({"model": {"overrides": [1]}}, "model.overrides", "mapping"),
        ({"eval": "often"}, "eval", "a mapping"),
    ],
)
def test_wrong_types(patch, key, expected):
    with pytest.raises(TypeError, match=rf"config key '{key}': expected {expected}"):
        config_from_dict({**BASE, **patch})


@pytest.mark.parametrize(
    "d, match",
    [
        ({"data": {"sources": []}}, "at least one"),
        ({"data": {"sources": [{"task": "passkey", "path": "x"}]}}, "exactly one"),
        ({"data": {"sources": [{"task": "passkey", "weight": 0}]}}, "sum to 0"),
        ({**BASE, "precision": "fp16"}, "precision"),
        ({**BASE, "max_steps": 0}, "max_steps"),
        ({"data": {"holdout": 1.0, "sources": [{"task": "passkey"}]}}, "holdout"),
        ({**BASE, "cuda_graph": True, "grad_checkpointing": True}, "'cuda_graph' and 'grad_checkpointing'"),
        ({**BASE, "cuda_graph": True, "fused_loss": True}, "'cuda_graph' and 'fused_loss'"),
        ({**BASE, "fused_loss": True, "loss_average": "sequence"}, "'fused_loss' and 'loss_average'"),
        ({**BASE, "data": {**BASE["data"], "workers": -1}}, "data.workers"),
    ],
)
def test_bad_values(d, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(d)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(TypeError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_every_field_is_documented():
    rows = describe()
    keys = {r[0] for r in rows}
    assert {"optim.lr", "data.sources.*.path", "checkpoint.keep", "distributed.strategy"} <= keys
    assert all(len(r[3]) > 10 for r in rows), [r[0] for r in rows if len(r[3]) <= 10]
    doc = (REPO / "docs" / "training.md").read_text()
    missing = [k for k in keys if f"`{k}`" not in doc]
    assert not missing, f"docs/training.md does not document {missing}"


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_load(recipe):
    cfg = load_config(recipe)
    assert cfg.data.sources
    assert apply_overrides({}, ["a.b=1"]) == {"a": {"b": 1}}
