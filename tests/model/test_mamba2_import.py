"""Mamba-2 import with HF's non-default mixer options: biases and the time-step limit reach RAMba's mixer."""

import json

import pytest
import torch

from ramba import RambaForCausalLM
from ramba.model.mamba2_import import load_mamba2_weights, ramba_config_from_mamba2

SMALL_HSA = dict(
    n_heads=2, n_kv_heads=1, head_dim=16, retrieval_dim=16, chunk_size=16, topk=2, mamba_per_hsa=1, mlp_hidden=64
)


def _save_hf_mamba2(path, layers: int = 2, **options):
    """A random HF ``Mamba2ForCausalLM`` with every parameter (biases included) away from its init, saved in ``path``."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    cfg = Mamba2Config(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=layers,
        state_size=8,
        head_dim=16,
        num_heads=4,
        n_groups=1,
        expand=2,
        conv_kernel=4,
        chunk_size=16,
        tie_word_embeddings=False,
        **options,
    )
    hf = Mamba2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D", "dt_bias", ".bias")):
                p.add_(0.5 * torch.randn_like(p))
    hf.save_pretrained(path)
    return hf


@pytest.mark.parametrize(
    "options",
    [
        dict(use_conv_bias=False),
        dict(use_bias=True),
        dict(time_step_limit=(0.02, 0.08)),
        dict(use_conv_bias=False, use_bias=True, time_step_limit=(0.0, 0.05)),
    ],
)
def test_non_default_mixer_options_give_hf_logits(tmp_path, options):
    hf = _save_hf_mamba2(tmp_path, **options)
    cfg = ramba_config_from_mamba2(tmp_path, **SMALL_HSA)
    assert cfg.conv_bias == options.get("use_conv_bias", True) and cfg.ssm_proj_bias == options.get("use_bias", False)
    assert tuple(cfg.dt_limit) == tuple(options.get("time_step_limit", (0.0, float("inf"))))
    model = RambaForCausalLM(cfg).eval()
    report = load_mamba2_weights(model, tmp_path)
    assert report.unused == []
    ids = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
        if "time_step_limit" in options:  # the limit matters for these weights: without it the logits differ
            for layer in model.model.layers:
                if hasattr(layer, "mixer"):
                    layer.mixer.time_step_limit = (0.0, float("inf"))
            assert (model(input_ids=ids).logits - expected).abs().max() > 1e-2


@pytest.mark.parametrize("limit", [(0.01, 0.2), (0.01, float("inf"))])
def test_saved_models_keep_the_options(tmp_path, limit):
    """Through save_pretrained / from_pretrained and the single-file format (infinity included)."""
    from ramba.model.single_file import load_model_file, save_model_file

    _save_hf_mamba2(tmp_path / "hf", use_conv_bias=False, use_bias=True, time_step_limit=limit)
    model = RambaForCausalLM(ramba_config_from_mamba2(tmp_path / "hf", **SMALL_HSA))
    model.save_pretrained(tmp_path / "ramba")
    save_model_file(model, tmp_path / "model.safetensors", dtype=torch.float32)
    for again in (
        RambaForCausalLM.from_pretrained(tmp_path / "ramba"),
        load_model_file(tmp_path / "model.safetensors"),
    ):
        assert (again.config.conv_bias, again.config.ssm_proj_bias, again.config.dt_limit) == (False, True, limit)
        mixer = again.model.layers[0].mixer
        assert mixer.conv1d.bias is None and mixer.in_proj.bias is not None and mixer.time_step_limit == limit


def test_mismatched_bias_and_unsupported_activation_are_refused(tmp_path):
    _save_hf_mamba2(tmp_path, use_conv_bias=False)
    default = RambaForCausalLM(ramba_config_from_mamba2(tmp_path, conv_bias=True, **SMALL_HSA))
    with pytest.raises(ValueError, match="has no conv1d.bias.*conv_bias=True"):
        load_mamba2_weights(default, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        ramba_config_from_mamba2(tmp_path, **SMALL_HSA)


def test_load_mamba2_weights_matches_hf(tmp_path):
    """A random HF Mamba2ForCausalLM, loaded into RAMba (new residual outputs zeroed), gives HF's logits."""
    hf = _save_hf_mamba2(tmp_path, layers=4)
    cfg = ramba_config_from_mamba2(
        tmp_path,
        n_heads=2,
        n_kv_heads=1,
        head_dim=16,
        retrieval_dim=16,
        chunk_size=16,
        topk=2,
        mamba_per_hsa=1,
        mlp_hidden=64,
        hsa_mlp=True,
    )
    model = RambaForCausalLM(cfg).eval()
    report = load_mamba2_weights(model, tmp_path)
    assert len(report.loaded) == 3 + 4 * 9  # embeddings, norm_f, lm_head; 4 layers x 9 tensors
    assert any("landmark_proj" in n for n in report.new) and report.unused == []
    assert len(report.zeroed) == 2 * cfg.n_hsa_layers
    ids = torch.randint(0, 64, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, hf(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    too_big = RambaForCausalLM(
        ramba_config_from_mamba2(
            tmp_path,
            n_lower_layers=4,
            n_upper_layers=2,
            n_heads=2,
            head_dim=16,
            retrieval_dim=16,
            chunk_size=16,
            mamba_per_hsa=1,
        )
    )
    with pytest.raises(ValueError, match="Mamba-2 layers"):
        load_mamba2_weights(too_big, tmp_path)
