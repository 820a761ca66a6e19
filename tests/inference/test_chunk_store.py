"""The paged chunk store (device, host and disk tiers) against a plain concatenation; the memory planner;
offload failures that must happen before any work."""

import errno
import os
import random
import subprocess
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ramba.inference.planner as planner
import ramba.model.chunk_store as chunk_store
import ramba.ops.retrieval.sketch as sketch_module
from ramba.inference import MemoryPlanError, Offload, OffloadError, prefill
from ramba.layers.hsa import ChunkMemory, ChunkSelection
from ramba.model.chunk_store import ChunkMemoryStore
from ramba.ops.retrieval.sketch import LandmarkSketch
from small_models import small_model

S, H, D, R, DR = 4, 2, 3, 1, 5


def _store(batch, page_chunks, tier, folder=None, host_budget=None):
    offload = Offload("disk", folder, host_budget) if tier == "disk" else tier == "host"
    return ChunkMemoryStore(batch, S, H, D, R, DR, torch.float64, torch.device("cpu"), offload, page_chunks)


def _check_fetch(store, k_all, v_all, selection, step=None):
    """Every selected (weight > 0) slot of every block reads its chunk's keys and values; chunks are distinct."""
    indices, weights = selection
    for t0, t1, memory, (remapped, w) in store.fetch_blocks(selection, step):
        assert torch.equal(w, weights[:, t0:t1])
        used = torch.unique(indices[:, t0:t1].masked_fill(weights[:, t0:t1] == 0, 0))
        assert memory.k.shape[1] == used.numel() * S  # deduplicated over tokens, heads and rows
        for b, t, r, j in (weights[:, t0:t1] > 0).nonzero().tolist():
            c, u = int(indices[b, t0 + t, r, j]), int(remapped[b, t, r, j])
            assert torch.equal(memory.k[b, u * S : (u + 1) * S], k_all[b, c * S : (c + 1) * S])
            assert torch.equal(memory.v[b, u * S : (u + 1) * S], v_all[b, c * S : (c + 1) * S])


@settings(max_examples=25, deadline=None)
@given(st.data(), st.integers(1, 2), st.integers(1, 4), st.sampled_from(["device", "host", "disk"]))
def test_paged_store_matches_concatenation(data, batch, page_chunks, tier):
    """Random appends and fetches: contents, landmarks and fetch results equal those of a plain concatenation."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    with tempfile.TemporaryDirectory() as folder:
        budget = data.draw(st.integers(0, 3)) * page_chunks * batch * 2 * S * H * D * 8
        store = _store(batch, page_chunks, tier, folder, budget)
        k_all = torch.zeros(batch, 0, H, D, dtype=torch.float64)
        v_all, lm_all = k_all.clone(), torch.zeros(batch, 0, R, DR, dtype=torch.float64)
        for op in data.draw(st.lists(st.sampled_from(["append", "fetch"]), min_size=1, max_size=8)):
            if op == "append":
                c = data.draw(st.integers(0, 5))
                k, v = torch.randn(2, batch, c * S, H, D, generator=gen, dtype=torch.float64)
                lm = torch.randn(batch, c, R, DR, generator=gen, dtype=torch.float64)
                store.append(ChunkMemory(k, v, lm))
                k_all, v_all, lm_all = torch.cat((k_all, k), 1), torch.cat((v_all, v), 1), torch.cat((lm_all, lm), 1)
            elif store.n_chunks:
                T, K = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 3))
                indices = torch.randint(0, store.n_chunks, (batch, T, R, K), generator=gen)
                weights = torch.rand(batch, T, R, K, generator=gen)
                weights = weights.masked_fill(torch.rand(batch, T, R, K, generator=gen) < 0.3, 0)
                _check_fetch(store, k_all, v_all, ChunkSelection(indices, weights), data.draw(st.integers(1, T)))
        assert store.n_chunks == lm_all.shape[1] and torch.equal(store.landmarks, lm_all)
        if store.n_chunks:  # every chunk, one block: the whole memory in order
            every = torch.arange(store.n_chunks).expand(batch, 1, R, -1)
            memory, _ = store.fetch(ChunkSelection(every, torch.ones(every.shape, dtype=torch.float64)))
            assert torch.equal(memory.k, k_all) and torch.equal(memory.v, v_all)
        if tier == "disk":
            host = min(budget // store.page_bytes, len(store.pages))
            assert store.page_tiers == ["host"] * host + ["disk"] * (len(store.pages) - host)


@pytest.mark.parametrize("tier", ["device", "host", "disk"])
def test_growth_never_moves_pages(tier, tmp_path):
    """Appending adds pages; a page made keeps its storage, and a full page its contents, forever."""
    store = _store(1, 3, tier, str(tmp_path), host_budget=0)
    pointers, full = {}, {}
    for _ in range(10):
        k = torch.randn(1, 2 * S, H, D, dtype=torch.float64)
        store.append(ChunkMemory(k, -k, torch.randn(1, 2, R, DR, dtype=torch.float64)))
        for i, page in enumerate(store.pages):
            assert pointers.setdefault(i, page.data_ptr()) == page.data_ptr()
            if (i + 1) * 3 <= store.n_chunks:
                assert torch.equal(full.setdefault(i, page.clone()), page)
    assert len(store.pages) == 7 and store.n_chunks == 20 and set(store.page_tiers) == {tier}


def test_fetch_dedupes_over_heads_and_rows():
    store = _store(2, 3, "host")
    for c in (3, 1, 6):
        k = torch.randn(2, c * S, H, D, dtype=torch.float64)
        store.append(ChunkMemory(k, k + 1, torch.randn(2, c, R, DR, dtype=torch.float64)))
    indices = torch.tensor([[[[7, 2]]], [[[9, 2]]]])
    weights = torch.tensor([[[[0.5, 0.25]]], [[[0.5, 0.0]]]], dtype=torch.float64)
    memory, _ = store.fetch(ChunkSelection(indices, weights))
    assert memory.k.shape[1] == 4 * S  # chunks {0 (the empty slot), 2, 7, 9}, across pages 0, 2 and 3


CONFIGS = {"ramba": {}, "ramba-gqa-mlp": dict(n_heads=4, n_kv_heads=2, retrieval_heads=1, hsa_mlp=True, topk=3)}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tiers_give_full_forward_logits_across_pages(name, tmp_path, monkeypatch):
    """Resident, offloaded and disk-tier caches (pages of 2 chunks, a one-page host budget, fetches of 8 tokens)
    give the logits of one full forward, in exact mode, prefill and decoding."""
    model = small_model(**CONFIGS[name])
    c = model.config
    chunk_bytes = 2 * 2 * c.chunk_size * c.n_kv_heads * c.head_dim * 4
    monkeypatch.setattr(chunk_store, "PAGE_BYTES", 2 * chunk_bytes)
    monkeypatch.setattr(chunk_store, "FETCH_BYTES", 8 * c.topk * chunk_bytes)  # blocks of 8 tokens
    monkeypatch.setattr(chunk_store, "SKETCH_MIN_BYTES", 0)  # offloaded decoding selects through the sketch
    ids = torch.randint(3, 64, (2, 130), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        for offload in (False, True, Offload("disk", str(tmp_path), host_budget=2 * chunk_bytes)):
            last, cache = prefill(model, ids[:, :120], segment_len=50, offload=offload)
            torch.testing.assert_close(last, full[:, 119], atol=2e-5, rtol=2e-5)
            for t in range(120, 130):
                step = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
                torch.testing.assert_close(step, full[:, t], atol=2e-5, rtol=2e-5)
            store = cache.memory
            assert len(store.pages) == 4 and store.n_chunks == 8
            assert store.nbytes()["device"] > 0  # resident pages, or (offloaded) the decoding sketch
            if isinstance(offload, Offload):  # the tiny host budget sent every page after the first to disk
                assert store.page_tiers == ["host"] + ["disk"] * 3 and store.nbytes()["disk"] == 3 * store.page_bytes


def _forbid_forward(model, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model ran before the error")

    monkeypatch.setattr(model, "forward", fail)


def test_planner_refuses_impossible_prefill(monkeypatch):
    model = small_model()
    monkeypatch.setattr(planner, "available_host_bytes", lambda: 2**30)
    tokens = 16 * 2**20  # 2 KiB of keys and values per 16-token chunk: 2 GiB of pages
    with pytest.raises(
        MemoryPlanError,
        match=r"needs 2\.\d\d GiB of pinned host memory, 1\.00 GiB available; it would "
        r"fit with the disk tier: offload='disk:PATH' \(CLI --offload-dir PATH\)",
    ):
        planner.plan_prefill(model, 1, tokens, 2048, offload=True)
    plan = planner.plan_memory(model, 1, tokens, 2048, Offload("disk", os.getcwd(), 2**28))
    assert plan.pinned_bytes < 2**29 and plan.disk_bytes >= 2**30 + 2**29
    with pytest.raises(MemoryPlanError, match="no offload or segment length fits"):
        planner.plan_prefill(model, 1, 2**28, 2048, offload=True)  # the prompt's own ids exceed the host
    _forbid_forward(model, monkeypatch)
    monkeypatch.setattr(planner, "available_host_bytes", lambda: 0)
    with pytest.raises(MemoryPlanError, match="host memory"):
        prefill(model, torch.randint(3, 64, (1, 40)), segment_len=16, offload=True)


def test_planner_counts_the_decoding_sketch_beyond_the_activations():
    """The sketch is made after the prefill, in its activations' memory: the plan adds only what exceeds them."""
    model = small_model()
    c = model.config
    key = "device: decoding's landmark sketch beyond the activations"
    for tokens, segment in ((2**26, 64), (2**26, 2**20), (2**16, 64)):
        plan = planner.plan_memory(model, 1, tokens, segment, offload=True)
        landmarks = tokens // c.chunk_size * c.retrieval_heads * c.retrieval_dim * 4
        sketch = LandmarkSketch.planned_bytes(
            1, c.retrieval_heads, c.retrieval_dim, tokens // c.chunk_size, torch.float32
        )
        activations = plan.parts["device: activations"]
        want = sketch - activations if landmarks >= chunk_store.SKETCH_MIN_BYTES else 0
        assert plan.parts.get(key, 0) == max(0, want)
    assert planner.plan_memory(model, 1, 2**26, 64, offload=True).parts[key] > 0  # a short segment, many chunks
    assert key not in planner.plan_memory(model, 1, 2**26, 64, offload=Offload("host", landmarks="host")).parts


@pytest.mark.parametrize("seed", range(6))
def test_planned_sketch_bytes_are_what_a_sketch_holds(seed, monkeypatch):
    """The plan's sketch bytes equal what a sketch allocates (whole blocks, the center), over batch rows, heads,
    widths, dtypes and chunk counts on both sides of a block boundary."""
    monkeypatch.setattr(sketch_module, "BLOCK_BYTES", 4096)
    rng = random.Random(seed)
    B, R, Dr = rng.randint(1, 3), rng.randint(1, 2), rng.choice([8, 24, 64])
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float64])
    sketch = LandmarkSketch(B, R, Dr, dtype, "cpu")
    assert LandmarkSketch.planned_bytes(B, R, Dr, 0, dtype) == sketch.nbytes() == 0
    for c in (1, sketch.block_chunks - 1, 1, rng.randint(1, 3 * sketch.block_chunks)):
        sketch.append(torch.randn(B, c, R, Dr).to(dtype))
        assert LandmarkSketch.planned_bytes(B, R, Dr, sketch.n_chunks, dtype) == sketch.nbytes()


def test_unwritable_offload_folder_fails_before_work(tmp_path, monkeypatch):
    model = small_model()
    _forbid_forward(model, monkeypatch)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    for path in (not_a_folder / "sub", tmp_path / "missing"):
        with pytest.raises(OffloadError, match="cannot create the disk tier's file"):
            prefill(model, torch.randint(3, 64, (1, 40)), segment_len=16, offload=f"disk:{path}")


@pytest.fixture
def small_filesystem(tmp_path):
    """A 1 MiB tmpfs where the machine allows mounting one, else ``None`` (the test then simulates ENOSPC)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    )
    yield folder if mounted else None
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)


def test_full_disk_fails_before_work(small_filesystem, tmp_path, monkeypatch):
    """A disk tier on a full file system fails when the store reserves its file (posix_fallocate), and a prefill
    fails before the model runs: on a real 1 MiB tmpfs the planner already sees the shortfall."""
    model = small_model()
    _forbid_forward(model, monkeypatch)
    folder = small_filesystem
    if folder is None:
        folder = tmp_path

        def no_space(fd, offset, length):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(chunk_store.os, "posix_fallocate", no_space)
    store = _store(1, 2**16, "disk", str(folder), host_budget=0)  # 6 MiB pages on a 1 MiB file system
    with pytest.raises(OffloadError, match="No space left on device"):
        store.reserve(1)
    error, message = (
        (OffloadError, "No space") if small_filesystem is None else (MemoryPlanError, "disk space for the disk")
    )
    with pytest.raises(error, match=message):
        prefill(model, torch.randint(3, 64, (1, 40)), segment_len=16, offload=Offload("disk", str(folder), 0))


def test_cli_refuses_before_the_first_cell(tmp_path, capsys, monkeypatch):
    """`ramba eval passkey` plans its longest prompt first: too little host memory ends it with the planner's
    line (needed vs available, the option that fits) and no output written."""
    import ramba.cli.main as cli

    small_model(vocab_size=260).save_pretrained(tmp_path / "model")
    args = [
        "eval",
        "passkey",
        "--model",
        str(tmp_path / "model"),
        "--tokenizer",
        "byte",
        "--lengths",
        "300,1m",
        "--samples",
        "1",
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    assert cli.main(args + ["--offload-dir", str(tmp_path / "missing"), "--host-budget", "1m"]) == 2
    assert "cannot create the disk tier's file in" in capsys.readouterr().err
    monkeypatch.setattr(planner, "available_host_bytes", lambda: 2**29)
    assert cli.main(args + ["--offload"]) == 2
    err = capsys.readouterr().err
    assert "a prefill of 1,048,6" in err and "0.50 GiB available; it would fit with the disk tier" in err
    assert not (tmp_path / "out").exists()


def test_generate_reserves_landmark_room_for_the_new_tokens(monkeypatch):
    """Decoding across a chunk boundary must not regrow the landmark buffer (a copy of all of it, twice the
    pinned memory at 256M tokens): generate() reserves for the prompt and the new tokens once."""
    from ramba.inference import generate

    model = small_model()
    S = model.config.chunk_size
    calls = []
    real = chunk_store.ChunkMemoryStore.reserve
    monkeypatch.setattr(chunk_store.ChunkMemoryStore, "reserve", lambda self, n: calls.append(n) or real(self, n))
    prompt = torch.randint(3, 64, (1, 5 * S - 1), generator=torch.Generator().manual_seed(2))
    generate(model, prompt, 2 * S, segment_len=32, offload=True)  # completes two chunks while decoding
    assert calls == [-(-(prompt.shape[1] + 2 * S) // S)]
    with pytest.raises(ValueError, match="new_tokens"):
        prefill(model, prompt, new_tokens=-1)
