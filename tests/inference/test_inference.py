"""Cache, segmented prefill (exact and fast), decoding, offload, ragged batches, bad caches."""

import pytest
import torch

from ramba import RambaCache
from ramba.inference import generate, prefill
from small_models import small_model

CONFIGS = {
    "ramba": {},
    "ramba-swa": dict(local_mixer="swa"),
    "ramba-gqa-mlp": dict(n_heads=4, n_kv_heads=2, retrieval_heads=1, hsa_mlp=True, weight_norm="softmax", topk=3),
    "mamba2-swa": dict(architecture="mamba2-swa"),
    "transformer": dict(architecture="transformer"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("n,m,segment_len", [(37, 12, 10), (16, 20, 16), (5, 30, 64)])
@pytest.mark.parametrize("offload", [False, True])
def test_prefill_then_decode_equals_full_forward(name, n, m, segment_len, offload):
    model = small_model(**CONFIGS[name])
    ids = torch.randint(3, 64, (2, n + m), generator=torch.Generator().manual_seed(n * m))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        last, cache = prefill(model, ids[:, :n], segment_len=segment_len, offload=offload)
        torch.testing.assert_close(last, full[:, n - 1], atol=2e-5, rtol=2e-5)
        for t in range(n, n + m):
            step = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
            torch.testing.assert_close(step, full[:, t], atol=2e-5, rtol=2e-5)
    assert cache.seen_tokens == n + m
    if cache.memory is not None:
        encoder_state = cache.layers[model.config.layer_plan().index("chunk_encoder")]
        assert cache.memory.n_chunks == (n + m) // 16 and encoder_state.pending.shape[1] == (n + m) % 16


def test_generate_equals_argmax_of_full_forwards():
    model = small_model(seed=1, eos_token_id=None)  # no early stop: compare every step
    ids = torch.randint(3, 64, (2, 40))
    seen = []
    out = generate(model, ids, max_new_tokens=8, segment_len=16, on_token=seen.append)
    seq = ids
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat((seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, seq[:, 40:]) and len(seen) == 8
    hf = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(hf, seq)


def test_sampling_is_seeded_and_in_top_k():
    model = small_model(seed=2)
    ids = torch.randint(3, 64, (1, 20))
    a = generate(model, ids, 6, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, generate(model, ids, 6))  # top_k=1 sampling is greedy
    b = generate(model, ids, 6, do_sample=True, temperature=2.0, generator=torch.Generator().manual_seed(3))
    c = generate(model, ids, 6, do_sample=True, temperature=2.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(b, c)


def test_eos_rows_stay_finished():
    model = small_model(seed=3)
    ids = torch.randint(3, 64, (2, 10))
    first = generate(model, ids, 1)[:, 0]
    out = generate(model, ids, 5, eos_token_id=int(first[0]))
    assert (out[0] == first[0]).all()


def test_fast_mode_is_exact_mode_without_early_hsa():
    """fast = exact with the HSA attention term removed for the tokens of every segment but the last."""
    model = small_model(seed=4)
    ids = torch.randint(3, 64, (1, 70))
    exact, _ = prefill(model, ids, segment_len=32, mode="exact")
    fast, fast_cache = prefill(model, ids, segment_len=32, mode="fast")
    assert not torch.allclose(exact, fast)
    one_segment, _ = prefill(model, ids, segment_len=128, mode="fast")
    torch.testing.assert_close(one_segment, exact, atol=2e-5, rtol=2e-5)
    # the chunk memory depends only on the lower layers, so it is the same in both modes
    _, exact_cache = prefill(model, ids, segment_len=32, mode="exact")
    torch.testing.assert_close(fast_cache.memory.landmarks, exact_cache.memory.landmarks)
    # segments are cut back from the end (70 = 6 + 32 + 32): only the final 32 tokens get HSA
    cache = RambaCache(model.config, 1, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for start, end in ((0, 6), (6, 38), (38, 70)):
            manual = model(input_ids=ids[:, start:end], past_key_values=cache, use_cache=True, skip_hsa=end < 70)
    torch.testing.assert_close(fast, manual.logits[:, -1], atol=2e-5, rtol=2e-5)
    # with the HSA outputs zeroed, skipping them changes nothing
    with torch.no_grad():
        for kind, layer in zip(model.model.layer_kinds, model.model.layers):
            if kind == "hsa":
                layer.o_proj.weight.zero_()
    torch.testing.assert_close(prefill(model, ids, 32, "fast")[0], prefill(model, ids, 32, "exact")[0])


def test_left_padded_batch_matches_rows_alone():
    model = small_model(seed=5)
    a = torch.randint(3, 64, (1, 30))
    b = torch.randint(3, 64, (1, 19))
    batch = torch.cat((a, torch.cat((torch.zeros(1, 11, dtype=torch.long), b), dim=1)))
    mask = torch.ones_like(batch)
    mask[1, :11] = 0
    out = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    alone_a = model.generate(a, max_new_tokens=5, do_sample=False, pad_token_id=0)
    alone_b = model.generate(b, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0, 30:], alone_a[0, 30:]) and torch.equal(out[1, 30:], alone_b[0, 19:])
    with pytest.raises(ValueError, match="left padding"):
        model(input_ids=batch, attention_mask=mask.flip(1))


def test_bad_cache_use():
    model = small_model()
    ids = torch.randint(3, 64, (2, 20))
    cache = model(input_ids=ids, use_cache=True).past_key_values
    assert isinstance(cache, RambaCache)
    with pytest.raises(ValueError, match="batch size"):
        model(input_ids=ids[:1, :1], past_key_values=cache)
    other = small_model(topk=3)
    with pytest.raises(ValueError, match="different configuration"):
        other(input_ids=ids[:, :1], past_key_values=cache)
    with pytest.raises(ValueError, match="dtype"):
        model.double()(input_ids=ids[:, :1], past_key_values=cache)
    with pytest.raises(TypeError, match="RambaCache"):
        small_model()(input_ids=ids[:, :1], past_key_values=(1, 2))
    with pytest.raises(ValueError, match="mode"):
        prefill(small_model(), ids, mode="quick")


@pytest.mark.parametrize("name", ["ramba", "ramba-gqa-mlp"])
def test_offloaded_long_segment_fetches_block_by_block(name, monkeypatch):
    """With a fetch budget of a few chunks, the HSA layers of one long exact segment attend in blocks of
    tokens, each copying in only its own chunks: the logits stay those of one full forward."""
    import ramba.model.chunk_store as cache_module

    model = small_model(**CONFIGS[name])
    ids = torch.randint(3, 64, (2, 150), generator=torch.Generator().manual_seed(5))
    store_blocks, copied = cache_module.ChunkMemoryStore.fetch_blocks, []

    def counting_blocks(store, selection, step=None):
        for t0, t1, memory, remapped in store_blocks(store, selection, step):
            copied.append((t1 - t0, memory.k.shape[1] // store.chunk_size))
            yield t0, t1, memory, remapped

    monkeypatch.setattr(cache_module.ChunkMemoryStore, "fetch_blocks", counting_blocks)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        _, cache = prefill(model, ids[:, :100], segment_len=100, offload=True)
        monkeypatch.setattr(cache_module, "FETCH_BYTES", 1)  # one token per fetch
        copied.clear()
        last, _ = prefill(model, ids[:, 100:], segment_len=50, offload=True, cache=cache)
        blocks = list(copied)
        copied.clear()
        model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)  # a decoding step: one block
    torch.testing.assert_close(last, full[:, -1], atol=2e-5, rtol=2e-5)
    plan = model.config.layer_plan()
    assert len(blocks) == 50 * plan.count("hsa") and all(t == 1 for t, _ in blocks)
    assert len(copied) == plan.count("retrieval")  # decoding: one fetch serves the group's HSA layers
    k, r = model.config.topk, model.config.retrieval_heads
    assert all(u <= 2 * r * k for _, u in blocks + copied)  # 2 rows x R heads x K slots, whatever the chunk count
