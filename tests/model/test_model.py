"""RambaForCausalLM: causality, save/load, Auto classes, training, gradient checkpointing, Mamba-2 import, config errors."""

import pytest
import torch

from ramba import RambaConfig, RambaForCausalLM
from ramba.layers import HSALayer
from small_models import SMALL, small_model

VARIANTS = {
    "ramba": {},
    "ramba-swa": dict(local_mixer="swa"),
    "ramba-gqa-softmax-mlp": dict(
        n_heads=4, n_kv_heads=2, retrieval_heads=1, weight_norm="softmax", hsa_mlp=True, sm_n=1.0
    ),
    "ramba-2groups": dict(n_upper_layers=4, retrieval_groups=2, encoder_layers=2),
    "mamba2": dict(architecture="mamba2"),
    "mamba2-swa": dict(architecture="mamba2-swa"),
    "mamba2-nsa": dict(architecture="mamba2-nsa", topk=2),
    "mamba2-nsa-gqa": dict(architecture="mamba2-nsa", n_heads=4, n_kv_heads=2, topk=3),
    "transformer": dict(architecture="transformer"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("T", [48, 53])
def test_causal(variant, T):
    """Changing tokens after position p never changes the logits at positions <= p."""
    model = small_model(**VARIANTS[variant])
    g = torch.Generator().manual_seed(T)
    ids = torch.randint(3, 64, (2, T), generator=g)
    with torch.no_grad():
        base = model(input_ids=ids).logits
        for p in (0, 15, 16, 31, 40, T - 2):
            changed = ids.clone()
            changed[:, p + 1 :] = torch.randint(3, 64, (2, T - p - 1), generator=g)
            out = model(input_ids=changed).logits
            torch.testing.assert_close(out[:, : p + 1], base[:, : p + 1], atol=1e-5, rtol=1e-5)
            assert not torch.allclose(out[:, p + 1 :], base[:, p + 1 :]), "later tokens should matter"


def test_retrieval_reaches_far_chunks():
    """A token's logits depend on a chunk far behind it only through HSA (the SWA local mixer cannot see it)."""
    model = small_model(local_mixer="swa", window=4)
    ids = torch.randint(3, 64, (1, 64))
    changed = ids.clone()
    changed[0, :16] = torch.randint(3, 64, (16,))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    assert not torch.allclose(a[:, 40:], b[:, 40:])
    # with every HSA output zeroed, the change no longer reaches them: three SWA layers see 9 tokens back
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, HSALayer):
                m.o_proj.weight.zero_()
        a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    torch.testing.assert_close(a[:, 40:], b[:, 40:], atol=0, rtol=0)
    assert not torch.allclose(a[:, 16:24], b[:, 16:24]), "the local mixer's reach"


def test_nsa_baseline_reaches_far_blocks_and_has_no_cache():
    """The first NSA layer's output (its input: the embeddings) at positions 40+ depends on tokens 0-15, far
    behind its 4-token window: the compressed and selected branches reach them. Decoding with a cache is refused."""
    from ramba.layers.attention import NativeSparseAttention

    model = small_model(architecture="mamba2-nsa", window=4, n_lower_layers=0)
    layers = [m for m in model.modules() if isinstance(m, NativeSparseAttention)]
    assert len(layers) == model.config.n_hsa_layers == 2
    outputs = []
    layers[0].register_forward_hook(lambda module, args, out: outputs.append(out))
    ids = torch.randint(3, 64, (1, 64))
    changed = ids.clone()
    changed[0, :16] = torch.randint(3, 64, (16,))
    with torch.no_grad():
        model(input_ids=ids), model(input_ids=changed)
    assert not torch.allclose(outputs[0][:, 40:], outputs[1][:, 40:])
    with pytest.raises(ValueError, match="NSA baseline .* has no cached decoding"):
        model(input_ids=ids, use_cache=True)


def test_short_and_ragged_lengths():
    model = small_model()
    for T in (1, 5, 16, 17, 33):
        assert model(input_ids=torch.randint(0, 64, (2, T))).logits.shape == (2, T, 64)


def test_save_load_and_auto(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = small_model(seed=3)
    ids = torch.randint(0, 64, (2, 40))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    for loaded in (RambaForCausalLM.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert isinstance(loaded, RambaForCausalLM)
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    assert AutoConfig.from_pretrained(tmp_path).chunk_size == 16


def test_tied_embeddings():
    model = small_model()
    assert model.lm_head.weight.data_ptr() == model.model.embeddings.weight.data_ptr()
    untied = small_model(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.model.embeddings.weight.data_ptr()


def test_tiny_model_trains_on_cpu():
    """Loss on a fixed batch with learnable structure falls clearly within 100 steps."""
    model = small_model(seed=1).train()
    g = torch.Generator().manual_seed(0)
    pattern = torch.randint(3, 64, (4, 8), generator=g)
    ids = pattern.repeat(1, 8)  # [4, 64]: a repeated 8-token pattern
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


@pytest.mark.parametrize("variant", ["ramba", "ramba-2groups"])
def test_gradient_checkpointing_same_gradients(variant):
    """Checkpointed layers (transformers' GradientCheckpointingLayer) give the plain gradients, also with two
    retrieval groups (each HSA layer's recompute sees its own group's selection)."""
    model = small_model(seed=2, **VARIANTS[variant]).train()
    ids = torch.randint(0, 64, (2, 40))
    model(input_ids=ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    model(input_ids=ids, labels=ids).loss.backward()
    assert plain.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if n in plain:
            torch.testing.assert_close(p.grad, plain[n], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(input_ids=ids, use_cache=True)
    with pytest.raises(ValueError, match="use_reentrant=False"):
        enable({"use_reentrant": True})


def test_hsa_gets_gradient_through_retrieval():
    """The LM loss reaches the landmarks and retrieval queries (through the chunk weights)."""
    model = small_model(seed=4).train()
    ids = torch.randint(0, 64, (2, 64))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    lm = [n for n in grads if n.endswith("landmark_proj.weight")][0]
    rq = [n for n in grads if ".q_proj.weight" in n and "retrieval" not in n]
    assert grads[lm] is not None and grads[lm].abs().sum() > 0
    retrieval_q = [
        n
        for i, kind in enumerate(model.model.layer_kinds)
        if kind == "retrieval"
        for n in [f"model.layers.{i}.q_proj.weight"]
    ]
    assert all(grads[n].abs().sum() > 0 for n in retrieval_q) and rq


def test_generate_greedy_matches_argmax():
    model = small_model(seed=5)
    ids = torch.randint(3, 64, (2, 20))
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat((seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(n_heads=3, n_kv_heads=2), "n_heads"),
        (dict(chunk_size=24), "chunk_size"),
        (dict(n_upper_layers=3, mamba_per_hsa=2), "n_upper_layers"),
        (dict(local_mixer="lstm"), "local_mixer"),
        (dict(architecture="rnn"), "architecture"),
        (dict(weight_norm="sum"), "weight_norm"),
        (dict(retrieval_heads=3, n_heads=4, n_kv_heads=2), "retrieval_heads"),
        (dict(d_model=0), "d_model"),
        (dict(ssm_head_dim=24), "ssm_head_dim"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"RambaConfig.{field}"):
        RambaConfig(**{**SMALL, **overrides})


def test_presets():
    tiny = RambaConfig.preset("tiny")
    n_params = sum(p.numel() for p in RambaForCausalLM(tiny).parameters())
    assert n_params <= 10_000_000 and tiny.vocab_size >= 256 + 3
    big = RambaConfig.preset("370m")
    assert (big.d_model, big.n_lower_layers, big.n_upper_layers, big.n_hsa_layers) == (1024, 24, 24, 3)
    assert (big.chunk_size, big.topk, big.n_heads, big.n_kv_heads, big.head_dim, big.retrieval_dim) == (
        64,
        8,
        16,
        1,
        64,
        1024,
    )
    assert RambaConfig.preset("tiny", topk=4).topk == 4
    with pytest.raises(ValueError, match="unknown preset"):
        RambaConfig.preset("huge")


def test_bad_input_ids():
    model = small_model()
    with pytest.raises(ValueError, match="input_ids"):
        model(input_ids=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one"):
        model()
