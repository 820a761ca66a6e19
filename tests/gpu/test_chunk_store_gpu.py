"""The paged chunk store on CUDA: pinned pages, the side-stream copies and host landmarks streamed by the
selection give what the resident cache gives (bit for bit) and what one full forward gives (bf16 tolerance)."""

import pytest
import torch
from gpu_models import CONFIG

import ramba.model.chunk_store as chunk_store
from ramba import RambaConfig, RambaForCausalLM
from ramba.inference import Offload, prefill
from ramba.layers.hsa import ChunkMemory, ChunkSelection
from ramba.model.chunk_store import ChunkMemoryStore
from ramba.ops.retrieval import select_chunks

pytestmark = pytest.mark.gpu


def test_cuda_fetch_blocks_match_concatenation(tmp_path):
    """Pinned and disk pages, fetched block by block through the side stream, equal a plain concatenation."""
    gen = torch.Generator().manual_seed(0)
    for offload in (True, Offload("disk", str(tmp_path), host_budget=0)):
        store = ChunkMemoryStore(2, 64, 1, 64, 1, 64, torch.bfloat16, torch.device("cuda"), offload, page_chunks=5)
        k_all = torch.randn(2, 37 * 64, 1, 64, generator=gen).bfloat16()
        for c0, c1 in ((0, 3), (3, 4), (4, 20), (20, 37)):
            k = k_all[:, c0 * 64 : c1 * 64].cuda()
            store.append(ChunkMemory(k, -k, torch.randn(2, c1 - c0, 1, 64, generator=gen).bfloat16().cuda()))
        indices = torch.randint(0, 37, (2, 300, 1, 4), generator=gen).cuda()
        weights = torch.rand(2, 300, 1, 4, generator=gen).cuda()
        for t0, t1, memory, (remapped, _) in store.fetch_blocks(ChunkSelection(indices, weights), step=7):
            torch.cuda.synchronize()
            want = k_all.view(2, 37, 64, 1, 64)[torch.arange(2)[:, None, None, None], indices[:, t0:t1].cpu()]
            got = memory.k.view(2, -1, 64, 1, 64)[torch.arange(2)[:, None, None, None].cuda(), remapped]
            assert torch.equal(got.cpu(), want) and torch.equal(
                memory.v.view(2, -1, 64, 1, 64)[torch.arange(2)[:, None, None, None].cuda(), remapped].cpu(), -want
            )


def test_cuda_tiers_match_resident_and_full_forward(tmp_path, monkeypatch):
    torch.manual_seed(1)
    model = RambaForCausalLM(RambaConfig(**CONFIG)).cuda().bfloat16().eval()
    chunk_bytes = 2 * 2 * 64 * 64 * 2
    monkeypatch.setattr(chunk_store, "PAGE_BYTES", 3 * chunk_bytes)
    monkeypatch.setattr(chunk_store, "FETCH_BYTES", 16 * 4 * chunk_bytes)  # blocks of 16 tokens
    ids = torch.randint(0, 256, (2, 1000), device="cuda")
    offloads = [False, True, Offload("host", landmarks="device"), Offload("disk", str(tmp_path), 3 * chunk_bytes)]
    with torch.no_grad():
        full = model(input_ids=ids).logits
        runs = []
        for offload in offloads:
            last, cache = prefill(model, ids[:, :900], segment_len=256, offload=offload)
            steps = [last] + [
                model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
                for t in range(900, 1000)
            ]
            runs.append(torch.stack(steps, 1))
            if isinstance(offload, Offload) and offload.tier == "disk":
                assert "disk" in cache.memory.page_tiers
    for run in runs[1:]:
        assert torch.equal(run, runs[0])  # the same chunks reach the same kernels, wherever they were kept
    err = ((runs[0][:, 1:].double() - full[:, 900:1000].double()).norm() / full[:, 900:1000].double().norm()).item()
    assert err < 2e-2


def test_select_chunks_streams_host_landmarks():
    """Landmarks in pinned host memory, streamed in block by block, select what device landmarks select."""
    gen = torch.Generator().manual_seed(2)
    q_r = torch.randn(2, 300, 1, 64, generator=gen).bfloat16().cuda()
    landmarks = torch.randn(2, 40_000, 1, 64, generator=gen).bfloat16().pin_memory()
    positions = torch.arange(40_000 * 64, 40_000 * 64 + 300, device="cuda")
    on_host = select_chunks(q_r, landmarks, 64, 8, positions)
    on_device = select_chunks(q_r, landmarks.cuda(), 64, 8, positions)
    assert torch.equal(on_host[0], on_device[0]) and torch.equal(on_host[1], on_device[1])
