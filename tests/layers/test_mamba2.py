"""Mamba-2 mixer/block: equal to Hugging Face's Mamba2 with the same weights; segmented prefill,
full forward and the one-token step agree."""

import math
import shutil

import pytest
import torch
from transformers import Mamba2Config
from transformers.models.mamba2.modeling_mamba2 import Mamba2Block as HFBlock
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMixer

from ramba.layers.base import LayerContext
from ramba.layers.mamba2 import Mamba2Block, Mamba2Mixer, Mamba2State, skip_and_norm
from ramba.layers.norm import GatedRMSNorm, RMSNorm

D_MODEL = 16


def mixer_kwargs(n_groups=1, use_bias=False, use_conv_bias=True, limit=(0.0, float("inf")), d_conv=4):
    return dict(
        d_state=8,
        d_conv=d_conv,
        expand=2,
        head_dim=8,
        n_groups=n_groups,
        chunk_size=8,
        use_conv_bias=use_conv_bias,
        use_bias=use_bias,
        time_step_limit=limit,
    )


def hf_config(kw):
    return Mamba2Config(
        hidden_size=D_MODEL,
        state_size=kw["d_state"],
        expand=kw["expand"],
        head_dim=kw["head_dim"],
        num_heads=kw["expand"] * D_MODEL // kw["head_dim"],
        n_groups=kw["n_groups"],
        chunk_size=kw["chunk_size"],
        conv_kernel=kw["d_conv"],
        use_conv_bias=kw["use_conv_bias"],
        use_bias=kw["use_bias"],
        layer_norm_epsilon=1e-5,
        time_step_limit=kw["time_step_limit"],
        num_hidden_layers=1,
        vocab_size=8,
    )


def randomize(module, seed):
    """Random weights everywhere (norm weights and biases included) so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "weight" in name else 0.5))
            if name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 - 1.0)
    return module


HF_CASES = [
    dict(),
    dict(n_groups=2, use_bias=True),
    dict(n_groups=4, use_conv_bias=False, limit=(0.05, 0.8)),
    dict(n_groups=2, d_conv=2),
]


@pytest.mark.parametrize("case", HF_CASES)
@pytest.mark.parametrize("T", [5, 21])
def test_mixer_matches_hugging_face(case, T):
    kw = mixer_kwargs(**case)
    ours = randomize(Mamba2Mixer(D_MODEL, **kw), seed=T).eval()
    hf = HFMixer(hf_config(kw), layer_idx=0).eval()
    assert {k: v.shape for k, v in hf.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    hf.load_state_dict(ours.state_dict())
    x = torch.randn(2, T, D_MODEL, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_hf, y = hf(x), ours(x)
    assert y.abs().max() > 0.1
    torch.testing.assert_close(y, y_hf, rtol=1e-4, atol=1e-5)


def test_block_matches_hugging_face():
    kw = mixer_kwargs(n_groups=2)
    ours = randomize(Mamba2Block(D_MODEL, **kw), seed=3).eval()
    hf = HFBlock(hf_config(kw), layer_idx=0).eval()
    assert {k: v.shape for k, v in hf.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    hf.load_state_dict(ours.state_dict())
    x = torch.randn(2, 13, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, LayerContext(positions=torch.arange(13)))[0], hf(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_groups", [1, 2])
@pytest.mark.parametrize("cuts", [(10,), (1, 2, 3, 17), (8, 16)])
def test_segmented_full_and_step_agree(n_groups, cuts):
    m = randomize(Mamba2Mixer(D_MODEL, **mixer_kwargs(n_groups=n_groups, use_bias=True)), seed=7).double()
    x = torch.randn(2, 21, D_MODEL, dtype=torch.float64)
    y_full, s_full = m(x, return_state=True)
    assert m(x).shape == y_full.shape == (2, 21, D_MODEL)
    # segmented prefill, segments shorter than d_conv included
    state, ys = None, []
    for a, b in zip((0,) + cuts, cuts + (21,)):
        y, state = m(x[:, a:b], state, return_state=True)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), y_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.ssm, s_full.ssm, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.conv, s_full.conv, rtol=1e-12, atol=1e-12)
    # token by token
    state, ys = m.empty_state(2), []
    for t in range(21):
        y, state = m.step(x[:, t], state)
        assert y.shape == (2, D_MODEL)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, 1), y_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.ssm, s_full.ssm, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.conv, s_full.conv, rtol=1e-12, atol=1e-12)


def test_block_segmented_and_step():
    """Through the layer protocol: a cache state from init_cache, continued by segments and a one-token step."""
    blk = randomize(Mamba2Block(D_MODEL, layer_idx=0, **mixer_kwargs(n_groups=2)), seed=2).double()
    x = torch.randn(1, 12, D_MODEL, dtype=torch.float64)
    y_full, _ = blk(x, LayerContext(positions=torch.arange(12)))
    states = [blk.init_cache(1, torch.device("cpu"), torch.float64)]
    assert isinstance(states[0], Mamba2State) and not states[0].conv.any() and not states[0].ssm.any()
    ys = []
    for a, b in ((0, 7), (7, 11), (11, 12)):
        y, _ = blk(x[:, a:b], LayerContext(positions=torch.arange(a, b), states=states))
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), y_full, rtol=1e-10, atol=1e-10)
    _, s_full = blk.mixer(blk.norm(x), return_state=True)
    torch.testing.assert_close(states[0].ssm, s_full.ssm, rtol=1e-10, atol=1e-10)


def test_gradients_through_segment_state():
    m = randomize(Mamba2Mixer(D_MODEL, **mixer_kwargs(n_groups=2)), seed=4).double()
    x = torch.randn(2, 19, D_MODEL, dtype=torch.float64)
    w = torch.randn(2, 19, D_MODEL, dtype=torch.float64)
    (m(x) * w).sum().backward()
    full = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    y1, s = m(x[:, :9], return_state=True)
    y2 = m(x[:, 9:], s)
    (torch.cat([y1, y2], 1) * w).sum().backward()
    for k, p in m.named_parameters():
        assert full[k].abs().max() > 0, k
        torch.testing.assert_close(p.grad, full[k], rtol=1e-9, atol=1e-10, msg=k)


def test_shapes_state_and_init():
    m = Mamba2Mixer(32, d_state=16, head_dim=16, n_groups=2, dt_min=0.01, dt_max=0.05)
    H, P, N = 4, 16, 16
    conv_dim = 64 + 2 * 2 * N
    assert (m.n_heads, m.conv_dim) == (H, conv_dim)
    assert m.in_proj.weight.shape == (64 + conv_dim + H, 32)
    assert m.conv1d.weight.shape == (conv_dim, 1, 4)
    assert m.norm.weight.shape == (64,) and m.out_proj.weight.shape == (32, 64)
    torch.testing.assert_close(m.A_log.data, torch.log(torch.arange(1.0, H + 1)))
    torch.testing.assert_close(m.D.data, torch.ones(H))
    dt = torch.nn.functional.softplus(m.dt_bias.data)
    assert ((dt >= 0.01 * (1 - 1e-5)) & (dt <= 0.05 * (1 + 1e-5))).all()
    s = m.empty_state(3)
    assert isinstance(s, Mamba2State)
    assert s.conv.shape == (3, conv_dim, 4) and s.ssm.shape == (3, H, P, N)
    assert s.ssm.dtype == torch.float32 and not s.conv.any() and not s.ssm.any()
    y, s2 = m(torch.randn(3, 2, 32), return_state=True)  # shorter than d_conv: state zero-padded on the left
    assert y.shape == (3, 2, 32) and s2.conv.shape == (3, conv_dim, 4) and not s2.conv[..., :2].any()
    assert all(getattr(p, "_no_weight_decay", False) for p in (m.A_log, m.D, m.dt_bias))


def test_bfloat16_close_to_float32():
    m = randomize(Mamba2Mixer(D_MODEL, **mixer_kwargs(n_groups=2)), seed=5)
    x = torch.randn(2, 13, D_MODEL)
    with torch.no_grad():
        y32 = m(x)
        y16 = m.to(torch.bfloat16)(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert (y16.float() - y32).norm() / y32.norm() < 3e-2


def test_norms():
    x = torch.randn(3, 8, dtype=torch.float64)
    n = RMSNorm(8, eps=1e-6).double()
    torch.testing.assert_close(n(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    z = torch.randn(3, 8, dtype=torch.float64)
    gn = GatedRMSNorm(8, group_size=4, eps=1e-6).double()
    h = (x * torch.sigmoid(z) * z).view(3, 2, 4)
    torch.testing.assert_close(gn(x, z), (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).view(3, 8))
    with pytest.raises(ValueError, match="RMSNorm"):
        n(torch.randn(3, 7))
    with pytest.raises(ValueError, match="group_size"):
        GatedRMSNorm(8, group_size=3)


def test_bad_inputs():
    with pytest.raises(ValueError, match="head_dim"):
        Mamba2Mixer(16, head_dim=5)
    with pytest.raises(ValueError, match="n_groups"):
        Mamba2Mixer(16, head_dim=8, n_groups=3)
    m = Mamba2Mixer(D_MODEL, **mixer_kwargs())
    with pytest.raises(ValueError, match=r"\[B, T, d_model\]"):
        m(torch.randn(2, 5, D_MODEL + 1))
    with pytest.raises(ValueError, match=r"\[B, T, d_model\]"):
        m(torch.randn(5, D_MODEL))
    with pytest.raises(TypeError, match="Mamba2State"):
        m(torch.randn(2, 5, D_MODEL), state=(1, 2))
    with pytest.raises(ValueError, match="state.conv"):
        m(torch.randn(2, 5, D_MODEL), state=m.empty_state(3))
    bad = m.empty_state(2)
    bad.ssm = bad.ssm[..., :-1]
    with pytest.raises(ValueError, match="state.ssm"):
        m.step(torch.randn(2, D_MODEL), bad)
    with pytest.raises(ValueError, match=r"\[B, d_model\]"):
        m.step(torch.randn(2, 1, D_MODEL), m.empty_state(2))
    assert math.isinf(m.time_step_limit[1])


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd keeps for the backward of ``fn()``, and its output."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on the CPU needs a C++ compiler"
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_compiled_glue_matches_eager(dtype):
    """compile_glue: the element-wise head and tail through torch.compile equal the eager ones (forward, all
    gradients, the final state, a second length without recompiling trouble) and keep fewer bytes for the
    backward. float64: compiled vs eager to rounding; bfloat16 (whose rounding points inductor may move):
    both within a relative error of 2e-2 of a float64 twin with the same weights."""
    torch.manual_seed(0)
    mixer = Mamba2Mixer(64, d_state=16, head_dim=16, n_groups=2, chunk_size=16).to(dtype)
    with torch.no_grad():
        mixer.D.normal_()
        mixer.norm.weight.normal_()
    twin = Mamba2Mixer(64, d_state=16, head_dim=16, n_groups=2, chunk_size=16).double()
    twin.load_state_dict({k: v.double() for k, v in mixer.state_dict().items()})
    twin.compile_glue = False

    def run(m, x, t_dtype):
        m.zero_grad()
        leaf = x.to(t_dtype).clone().requires_grad_()
        saved, (y, state) = _saved_bytes(lambda: m(leaf, return_state=True))
        w = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)
        ((y.double() * w).sum() + state.ssm.double().square().sum()).backward()
        grads = {"x": leaf.grad, "ssm": state.ssm.detach(), "conv": state.conv.detach()}
        return saved, y.detach(), {**grads, **{n: p.grad.clone() for n, p in m.named_parameters()}}

    for T in (37, 20):
        x = torch.randn(2, T, 64, dtype=torch.float64)
        _, y_ref, g_ref = run(twin, x, torch.float64)
        results = {}
        for compiled in (False, True):
            mixer.compile_glue = compiled
            results[compiled] = run(mixer, x, dtype)
        (saved_e, y_e, g_e), (saved_c, y_c, g_c) = results[False], results[True]
        assert y_c.dtype == y_e.dtype == dtype
        if dtype == torch.float64:
            torch.testing.assert_close(y_c, y_e, rtol=1e-9, atol=1e-9)
            for name in g_e:
                torch.testing.assert_close(g_c[name], g_e[name], rtol=1e-9, atol=1e-9, msg=name)
        else:
            for y, g in ((y_e, g_e), (y_c, g_c)):
                assert rel_err(y, y_ref) < 2e-2
                for name in g_ref:
                    assert rel_err(g[name], g_ref[name]) < 2e-2, (name, rel_err(g[name], g_ref[name]))
        assert saved_c < saved_e


@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on the CPU needs a C++ compiler"
)
def test_compiled_glue_step_and_auto():
    """compile_glue in the one-token step equals eager; None (automatic) stays eager on the CPU."""
    torch.manual_seed(1)
    mixer = Mamba2Mixer(64, d_state=16, head_dim=16, chunk_size=16).double()
    state = mixer.empty_state(2)
    _, state = mixer(torch.randn(2, 9, 64, dtype=torch.float64), return_state=True)
    h = torch.randn(2, 64, dtype=torch.float64)
    outs = {}
    for compiled in (False, True):
        mixer.compile_glue = compiled
        outs[compiled] = mixer.step(h, state)
    torch.testing.assert_close(outs[True][0], outs[False][0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(outs[True][1].conv, outs[False][1].conv, rtol=0, atol=0)
    torch.testing.assert_close(outs[True][1].ssm, outs[False][1].ssm, rtol=1e-9, atol=1e-9)
    assert mixer._glue(skip_and_norm, h) is not skip_and_norm  # compile_glue=True
    mixer.compile_glue = None
    assert mixer._glue(skip_and_norm, h) is skip_and_norm


@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on the CPU needs a C++ compiler"
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_compiled_block_norm_matches_eager(dtype):
    """compile_glue in the block norms: RMSNorm through torch.compile equals the eager one, forward and both
    gradients, at two lengths; bf16 within 1e-2 of a float64 twin. set_compile_glue reaches every RMSNorm."""
    from ramba.layers.mamba2 import set_compile_glue

    torch.manual_seed(2)
    norm = RMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    twin = RMSNorm(48, eps=1e-5).double()
    twin.load_state_dict({k: v.double() for k, v in norm.state_dict().items()})

    def run(m, x):
        m.zero_grad()
        leaf = x.clone().requires_grad_()
        y = m(leaf)
        (y.double() * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)).sum().backward()
        return y.detach(), leaf.grad, m.weight.grad.clone()

    for T in (37, 20):
        x = 3 * torch.randn(2, T, 48, dtype=torch.float64)
        want = run(twin, x)
        got = {}
        for compiled in (False, True):
            norm.compile_glue = compiled
            got[compiled] = run(norm, x.to(dtype))
        for a, b, ref in zip(got[True], got[False], want, strict=True):
            assert a.dtype == b.dtype
            if dtype == torch.float64:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
            else:
                assert rel_err(a, ref) < 1e-2 and rel_err(b, ref) < 1e-2
    block = Mamba2Block(48, d_state=16, head_dim=16, chunk_size=16)
    assert set_compile_glue(block, None) == 2 and block.norm.compile_glue is None  # the mixer and the block norm
