"""benchmarks/retrieval_supervision_probe.py: its loss is the model's, each arm trains only its part, the added
encoder layer starts as the identity, and the needle metrics read the asked needle."""

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from ramba.data import ByteTokenizer, make_task
from ramba.model.loading import load_model
from ramba.model.single_file import save_model_file
from small_models import small_model

SPEC = importlib.util.spec_from_file_location(
    "retrieval_supervision_probe",
    Path(__file__).resolve().parents[2] / "benchmarks" / "retrieval_supervision_probe.py",
)
probe = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(probe)

BYTES = dict(vocab_size=260, pad_token_id=256, bos_token_id=257, eos_token_id=258)


def samples(n, length=512, seed=0):
    tok = ByteTokenizer()
    task = make_task("niah_multikey", tok, num_keys=4)
    return tok, [task.generate(length, d, seed + i) for i, d in enumerate(np.linspace(0, 1, n))]


def test_loss_is_the_models_retrieval_loss():
    tok, batch = samples(2)
    model = small_model(**BYTES)
    ids, targets = probe.batch(batch, tok, model.config.chunk_size)
    assert (targets[..., 0] >= 0).sum() == 2  # one first answer token a sample
    scores, loss = probe.scores_and_loss(model, ids, targets)
    out = model(input_ids=ids, retrieval_targets=targets)
    torch.testing.assert_close(loss, out.retrieval_loss)
    assert scores.shape[:2] == ids.shape and scores.shape[-1] == ids.shape[1] // model.config.chunk_size


@pytest.mark.parametrize("arm", probe.ARMS)
def test_each_arm_trains_only_its_part(arm):
    tok, batch = samples(2, seed=3)
    model = small_model(**BYTES)
    if arm == "encoder2":
        probe.add_encoder_layer(model)
    params = probe.trainable(model, arm)
    ids, targets = probe.batch(batch, tok, model.config.chunk_size)
    _, loss = probe.scores_and_loss(model, ids, targets)
    loss.backward()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(model.get_parameter(n).grad is not None for n in names if "q_proj" in n and "layers.0" not in n)
    encoder = any(".cls" in n for n in names)
    below = any("embeddings" in n for n in names)
    assert encoder == (arm != "query") and below == (arm == "below")
    assert not any("lm_head" in n or "norm_f" in n for n in names)


def test_added_encoder_layer_starts_as_the_identity(tmp_path):
    tok, batch = samples(2, seed=5)
    model = small_model(**BYTES)
    ids, targets = probe.batch(batch, tok, model.config.chunk_size)
    before = probe.scores_and_loss(model, ids, targets)
    layers = model.config.encoder_layers
    probe.add_encoder_layer(model)
    after = probe.scores_and_loss(model, ids, targets)
    torch.testing.assert_close(before[0], after[0])
    encoder = probe.chunk_encoders(model)[0]
    assert len(encoder.layers) == model.config.encoder_layers == layers + 1
    # the saved model loads with the new layer (its config says so)
    path = save_model_file(model, tmp_path / "m.safetensors", torch.float32)
    torch.testing.assert_close(
        probe.scores_and_loss(load_model(str(path), "cpu", torch.float32), ids, targets)[0], after[0]
    )


def test_needle_metrics_read_the_asked_needle():
    tok, batch = samples(1, length=1024, seed=7)
    s, S = batch[0], 16
    _, targets = probe.batch(batch, tok, S)
    p = int(torch.nonzero(targets[0, :, 0] >= 0)[0])
    scores = torch.zeros(1, len(s.input_ids), 1, len(s.input_ids) // S)
    asked, other = s.needles[s.answer_needles[0]], s.needles[(s.answer_needles[0] + 1) % 4]
    scores[0, p, 0, asked[0] // S] = 2.0
    scores[0, p, 0, other[0] // S] = 1.0
    assert probe.needle_metrics(scores, batch, targets, S, topk=1) == {"asked_first": 1.0, "asked_in_topk": 1.0}
    scores[0, p, 0, other[0] // S] = 3.0
    assert probe.needle_metrics(scores, batch, targets, S, topk=1) == {"asked_first": 0.0, "asked_in_topk": 0.0}
    assert probe.needle_metrics(scores, batch, targets, S, topk=2)["asked_in_topk"] == 1.0


def test_run_arm_trains_its_part_and_records_every_evaluation(tmp_path):
    tok, eval_samples = samples(2, seed=11)
    model = small_model(**BYTES)
    path = save_model_file(model, tmp_path / "m.safetensors", torch.float32)
    args = argparse.Namespace(
        model=str(path),
        fresh="",
        landmarks="cls",
        device="cpu",
        seed=0,
        lr=1e-2,
        steps=2,
        eval_every=1,
        batch=2,
        length=512,
        save_dir=tmp_path,
    )
    record, saves = {}, []
    task = make_task("niah_multikey", tok, num_keys=4)
    probe.run_arm(args, "encoder", tok, task, eval_samples, record, lambda: saves.append(len(record["curve"])))
    assert saves == [1, 2, 3] and [m["step"] for m in record["curve"]] == [0, 1, 2]
    assert record["curve"][0]["train_retrieval_loss"] is None and record["curve"][2]["train_retrieval_loss"] > 0
    trained = load_model(str(tmp_path / "encoder.safetensors"), "cpu", torch.float32)
    changed = {n for n, p in trained.named_parameters() if not torch.equal(p, model.get_parameter(n))}
    assert changed and all("layers.1." in n or "layers.2." in n for n in changed), changed


def test_fresh_model_has_the_named_layout_and_its_seed():
    args = argparse.Namespace(fresh="tiny:chunk_size=32:encoder_layers=2", model="unused", seed=4, device="cpu")
    a, b = probe.initial_model(args), probe.initial_model(args)
    assert (a.config.chunk_size, a.config.encoder_layers, a.config.d_model) == (32, 2, 256)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert next(a.parameters()).dtype == torch.float32
    args.seed = 5
    assert not torch.equal(next(probe.initial_model(args).parameters()), next(a.parameters()))


def test_key_identity_reads_the_nearest_neighbours_key():
    x = torch.tensor([[1.0, 0.0], [1.1, 0.1], [0.0, 1.0], [0.1, 1.2]])
    assert probe.same_key_neighbour(x, ["a", "a", "b", "b"]) == 1.0
    assert probe.same_key_neighbour(x, ["a", "b", "a", "b"]) == 0.0
    tok = ByteTokenizer()
    task = make_task("niah_multikey", tok, num_keys=2)
    with probe.pooled_keys(3) as pool:
        pooled = [task.generate(512, 0.5, i) for i in range(4)]
    assert all(sum(k in tok.decode(s.input_ids[a:b]) for k in pool) == 1 for s in pooled for a, b in s.needles)
    fresh = task.generate(512, 0.5, 0)  # the word maker is restored
    assert not any(k in tok.decode(fresh.input_ids[a:b]) for k in pool for a, b in fresh.needles)
    model = small_model(**BYTES)
    out = probe.key_identity(model, tok, pooled, pool, batch_size=2)
    assert set(out) == {"landmark_key_id", "query_key_id", "hidden_key_id"} and all(0 <= v <= 1 for v in out.values())


def test_token_landmarks_what_if():
    """--landmarks max: every token's landmark, [B, C, S, R, Dr]; a chunk whose tokens all had its own landmark
    would score as the model scores it; the loss trains the encoder's landmark projection; no hook is left behind."""
    tok, batch = samples(2, seed=13)
    model = small_model(**BYTES)
    ids, targets = probe.batch(batch, tok, model.config.chunk_size)
    q_r, chunk_landmarks, _ = probe.queries_and_landmarks(model, ids)
    _, token_landmarks, _ = probe.queries_and_landmarks(model, ids, token_landmarks=True)
    B, C, R, Dr = chunk_landmarks.shape
    assert token_landmarks.shape == (B, C, model.config.chunk_size, R, Dr)
    assert not probe.chunk_encoders(model)[0].norm._forward_hooks
    same = chunk_landmarks[:, :, None].expand(B, C, 3, R, Dr)
    torch.testing.assert_close(probe.probe_scores(q_r, same), probe.chunk_scores(q_r, chunk_landmarks))
    _, loss = probe.scores_and_loss(model, ids, targets, token_landmarks=True)
    loss.backward()
    assert probe.chunk_encoders(model)[0].landmark_proj.weight.grad.abs().sum() > 0
