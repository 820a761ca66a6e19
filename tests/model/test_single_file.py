"""Single-file models: weights + config + tokenizer name in one safetensors file; clear errors for other files."""

import pytest
import torch
from safetensors.torch import save_file

from ramba.model.single_file import load_model_file, read_model_file_metadata, save_model_file
from small_models import small_model


def test_round_trip_float32_is_exact_and_bf16_close(tmp_path):
    model = small_model(seed=3, weight_norm="softmax")
    ids = torch.randint(0, 64, (2, 45))
    path = save_model_file(model, tmp_path / "m.safetensors", dtype=torch.float32, metadata={"note": "hi"})
    again = load_model_file(path)
    assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    assert again.config.weight_norm == "softmax" and not again.training
    assert again.lm_head.weight.data_ptr() == again.model.embeddings.weight.data_ptr()  # tied, stored once
    meta = read_model_file_metadata(path)
    assert meta["note"] == "hi" and meta["ramba_tokenizer"] == "byte"
    half = load_model_file(save_model_file(model, tmp_path / "h.safetensors"))  # bf16 weights, fp32 compute
    assert (tmp_path / "h.safetensors").stat().st_size < 0.6 * path.stat().st_size
    rel = (half(input_ids=ids).logits - model(input_ids=ids).logits).norm() / model(input_ids=ids).logits.norm()
    assert rel < 2e-2


def test_untied_model_keeps_its_head(tmp_path):
    model = small_model(tie_embeddings=False, tie_word_embeddings=False)
    again = load_model_file(save_model_file(model, tmp_path / "m.safetensors", dtype=torch.float32))
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    assert again.lm_head.weight.data_ptr() != again.model.embeddings.weight.data_ptr()


def test_foreign_and_broken_files_are_refused(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model_file(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="no RAMba config"):
        load_model_file(tmp_path / "plain.safetensors")
    model = small_model()
    path = save_model_file(model, tmp_path / "m.safetensors")
    meta = read_model_file_metadata(path)
    tensors = {k: v for k, v in model.state_dict().items() if k not in ("lm_head.weight", "model.norm_f.weight")}
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="missing .*norm_f"):
        load_model_file(tmp_path / "cut.safetensors")
