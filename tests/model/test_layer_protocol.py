"""The layer protocol (docs/design.md §3): kinds registered by their classes, forward(hidden, ctx), each layer's
init_cache asked by RambaCache, a layer kind added without editing the model or the cache; encoder_heads."""

import json
from pathlib import Path

import pytest
import torch

from ramba import RambaCache, RambaConfig, RambaForCausalLM
from ramba.layers import (
    LAYER_CLASSES,
    AttentionBlock,
    ChunkEncoder,
    ChunkEncoderState,
    KVCache,
    LayerContext,
    Mamba2State,
    RambaLayer,
)
from ramba.model.config import LayerKind
from ramba.model.modeling import CACHE_FIELD
from small_models import SMALL, small_model


def test_every_kind_has_its_layer_class():
    assert {kind.value for kind in LayerKind} <= set(LAYER_CLASSES)
    for kind, cls in LAYER_CLASSES.items():
        assert issubclass(cls, RambaLayer) and cls.kind == kind
    with pytest.raises(ValueError, match="no layer class registered for layer kind 'lstm'"):
        from ramba.layers import build_layer

        build_layer("lstm", RambaConfig(**SMALL), 0)


@pytest.mark.parametrize("overrides", [{}, dict(local_mixer="swa"), dict(architecture="transformer")])
def test_cache_holds_what_each_layer_keeps(overrides):
    """RambaCache.layers[i] is layer i's init_cache state, with the shapes of docs/design.md §5."""
    model = small_model(**overrides)
    cache = RambaCache(model.config, 3, torch.device("cpu"), torch.float32)
    built_from_model = RambaCache(model.config, 3, torch.device("cpu"), torch.float32, layers=model.model.layers)
    c = model.config
    for kind, state, other in zip(model.model.layer_kinds, cache.layers, built_from_model.layers):
        assert type(state) is type(other)
        if kind == "mamba2":
            conv_dim = c.expand * c.d_model + 2 * c.n_groups * c.d_state
            assert isinstance(state, Mamba2State) and state.conv.shape == (3, conv_dim, c.conv_kernel)
            assert state.ssm.shape == (3, c.expand * c.d_model // c.ssm_head_dim, c.ssm_head_dim, c.d_state)
            assert state.conv.device.type == "cpu" and not state.ssm.any()
        elif kind in ("swa", "attention"):
            assert isinstance(state, KVCache) and state.k is None
        elif kind == "chunk_encoder":
            assert isinstance(state, ChunkEncoderState) and state.pending is None and state.store is cache.memory
            assert cache.memory.n_chunks == 0 and cache.memory.landmarks.shape == (
                3,
                0,
                c.retrieval_heads,
                c.retrieval_dim,
            )
        else:
            assert state is None, kind
    ids = torch.randint(3, 64, (3, 21))
    with torch.no_grad():
        model(input_ids=ids, cache=cache)
    if "swa" in model.model.layer_kinds:
        swa = cache.layers[model.model.layer_kinds.index("swa")]
        assert swa.k.shape == (3, c.window - 1, c.n_kv_heads, c.head_dim)  # only what later positions can see
    if cache.memory is not None:
        encoder = cache.layers[model.model.layer_kinds.index("chunk_encoder")]
        assert cache.memory.n_chunks == 1 and encoder.pending.shape == (3, 5, c.d_model)


class ScaledSkip(RambaLayer):
    """A layer kind defined outside ramba: ``hidden * scale``, counting the tokens it saw in its cache state."""

    kind = "test_scaled_skip"

    def __init__(self, scale: float, layer_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.scale = torch.nn.Parameter(torch.tensor(scale))

    @classmethod
    def from_config(cls, config, layer_idx):
        return cls(scale=0.5, layer_idx=layer_idx)

    def init_cache(self, batch_size, device, dtype, chunk_store=None):
        return {"tokens": 0}

    def forward(self, hidden, ctx):
        state = ctx.state(self.layer_idx)
        if state is not None:
            state["tokens"] += hidden.shape[1]
        return hidden * self.scale, ctx


def test_a_new_layer_kind_needs_only_its_class_and_the_plan(monkeypatch):
    plan = RambaConfig.layer_plan
    monkeypatch.setattr(RambaConfig, "layer_plan", lambda self: [*plan(self), "test_scaled_skip"])
    model = small_model(seed=1)
    assert isinstance(model.model.layers[-1], ScaledSkip)
    ids = torch.randint(3, 64, (2, 30))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        cache = getattr(model(input_ids=ids[:, :20], use_cache=True), CACHE_FIELD)
        steps = [model(input_ids=ids[:, t : t + 1], cache=cache).logits for t in range(20, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 20:], atol=2e-5, rtol=2e-5)
    assert cache.layers[-1] == {"tokens": 30}
    with torch.no_grad():
        model.model.layers[-1].scale.fill_(1.0)
        unscaled = model(input_ids=ids).logits
    assert not torch.allclose(unscaled, full)


def test_encoder_heads_default_keeps_old_models_and_the_field_is_used(tmp_path):
    old = RambaConfig(**SMALL)
    assert old.encoder_heads == max(1, old.d_model // 64) == 1
    config = RambaConfig(**{**SMALL, "d_model": 128, "encoder_heads": 4, "head_dim": 16})
    encoder = next(m for m in RambaForCausalLM(config).modules() if isinstance(m, ChunkEncoder))
    attn = encoder.layers[0].attn
    assert (attn.n_heads, attn.head_dim) == (4, 32) and attn.q_proj.weight.shape == (128, 128)
    assert RambaConfig(**{**SMALL, "d_model": 128, "head_dim": 16}).encoder_heads == 2
    # a config saved before the field existed loads with the heads it was made with
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["encoder_heads"] == 4
    del saved["encoder_heads"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert RambaConfig.from_pretrained(tmp_path).encoder_heads == 2
    with pytest.raises(ValueError, match="RambaConfig.encoder_heads"):
        RambaConfig(**{**SMALL, "encoder_heads": 0})
    with pytest.raises(ValueError, match="RambaConfig.encoder_heads"):
        RambaConfig(**{**SMALL, "d_model": 96, "encoder_heads": 32, "head_dim": 48})  # odd head dim 3


# logits[0, positions, :4] of the shipped model on TEXT, computed at commit 9efe38d (before the layer protocol)
SHIPPED_POSITIONS = [0, 63, 64, 150, 215]
SHIPPED_LOGITS = [
    [-5.538644, -5.53817, -5.453707, -5.634221],
    [-11.068869, -10.943249, -11.081148, -11.104422],
    [-7.30524, -7.217826, -7.366158, -7.256777],
    [-8.168337, -8.06003, -8.056698, -8.145735],
    [-13.455696, -13.37079, -13.460111, -13.333775],
]


def test_shipped_model_keeps_its_encoder_heads_and_logits():
    import ramba
    from ramba.model.single_file import load_model_file

    model = load_model_file(Path(ramba.__file__).parent / "pretrained" / "tiny-ruler.safetensors")
    encoder = next(m for m in model.modules() if isinstance(m, ChunkEncoder))
    assert model.config.encoder_heads == model.config.d_model // 64 == encoder.layers[0].attn.n_heads
    ids = torch.tensor([list(b"The pass key is 71432. Remember it. " * 6)])
    with torch.no_grad():
        full = model(input_ids=ids).logits
        cache = RambaCache(model.config, 1, torch.device("cpu"), torch.float32)
        model(input_ids=ids[:, :150], cache=cache)
        step = model(input_ids=ids[:, 150:151], cache=cache).logits
    torch.testing.assert_close(full[0, SHIPPED_POSITIONS, :4], torch.tensor(SHIPPED_LOGITS), atol=1e-4, rtol=0)
    torch.testing.assert_close(step[0, 0], full[0, 150], atol=2e-5, rtol=2e-5)


def test_chunk_encoder_blocks_speak_the_protocol():
    """The encoder's bidirectional blocks are AttentionBlocks run with a context of in-chunk positions: any
    token of a chunk changes every output of that chunk, and nothing of another chunk."""
    model = small_model(seed=3)
    encoder = next(m for m in model.modules() if isinstance(m, ChunkEncoder))
    assert all(isinstance(b, AttentionBlock) for b in encoder.layers)
    x = torch.randn(1, 32, SMALL["d_model"])
    changed = x.clone()
    changed[0, 20] += 1.0
    with torch.no_grad():
        _, a = encoder(x, LayerContext(positions=torch.arange(32)))
        _, b = encoder(changed, LayerContext(positions=torch.arange(32)))
    torch.testing.assert_close(a.memory.k[:, :16], b.memory.k[:, :16], atol=0, rtol=0)
    assert (a.memory.k[0, 16:] - b.memory.k[0, 16:]).abs().amax(dim=(-1, -2)).min() > 0
    assert not torch.allclose(a.memory.landmarks[:, 1], b.memory.landmarks[:, 1])
