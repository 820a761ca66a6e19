"""Mamba-2 mixer and pre-norm block (docs/design.md §3).

Parameter names and shapes follow Hugging Face's ``Mamba2Mixer`` / ``Mamba2Block`` (and
mamba_ssm's ``Mamba2``), so ``backbone.layers.{i}.*`` weights load 1:1:

    in_proj.weight   [2*d_inner + 2*G*N + H, d_model]   split as z | x B C | dt
    conv1d.weight    [conv_dim, 1, d_conv]               depthwise, conv_dim = d_inner + 2*G*N
    conv1d.bias      [conv_dim]
    dt_bias, A_log, D  [H]
    norm.weight      [d_inner]                           gated RMSNorm, per group of d_inner/G
    out_proj.weight  [d_model, d_inner]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ramba.layers.base import LayerContext, RambaLayer
from ramba.layers.norm import GatedRMSNorm, RMSNorm, gated_rms_norm, glue
from ramba.ops.precision import compute_dtype
from ramba.ops.ssd import ssd, ssd_step


@dataclass
class Mamba2State:
    """Recurrent state of one Mamba-2 mixer.

    conv: ``[B, conv_dim, d_conv]`` the last ``d_conv`` inputs of the causal conv (the x|B|C
        channels before the conv), oldest first; zeros before the sequence start. Same layout
        as mamba_ssm's / Hugging Face's conv state.
    ssm: ``[B, H, P, N]`` the SSD state (float32; float64 for float64 models).
    """

    conv: torch.Tensor
    ssm: torch.Tensor


def conv_and_ssm_inputs(
    history: torch.Tensor,
    xBC: torch.Tensor,
    dt_raw: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    n_groups: int,
    head_dim: int,
    dt_limit: tuple[float, float],
):
    """The mixer's element-wise head: causal depthwise conv + SiLU, split, and the SSM parameters.

    Args: history ``[B, K, conv_dim]``, the K = d_conv inputs before xBC, oldest first (zeros at a sequence
    start); xBC ``[B, T, conv_dim]``; dt_raw ``[B, T, H]``; conv_weight ``[conv_dim, 1, K]``; conv_bias
    ``[conv_dim]`` or None; dt_bias, A_log ``[H]``.
    Returns x ``[B, T, H, P]``, B, C ``[B, T, G, N]`` (xBC's dtype); dt ``[B, T, H]`` =
    clamp(softplus(dt_raw + dt_bias)) and A ``[H]`` = -exp(A_log) in float32 (float64 for float64 input);
    and the last K inputs ``[B, K, conv_dim]`` (the next conv history).
    """
    K, T = history.shape[1], xBC.shape[1]
    acc = compute_dtype(xBC)
    window = torch.cat([history.to(xBC.dtype), xBC], dim=1)  # [B, K + T, conv_dim]
    weight = conv_weight[:, 0].to(acc)  # [conv_dim, K]
    conv = window[:, 1 : 1 + T].to(acc) * weight[:, 0]
    for k in range(1, K):
        conv = conv + window[:, 1 + k : 1 + k + T].to(acc) * weight[:, k]
    if conv_bias is not None:
        conv = conv + conv_bias.to(acc)
    xBC = F.silu(conv).to(xBC.dtype)
    H = dt_raw.shape[-1]
    N = (xBC.shape[-1] - H * head_dim) // (2 * n_groups)
    x, B, C = xBC.split([H * head_dim, n_groups * N, n_groups * N], dim=-1)
    dt = F.softplus(dt_raw.to(acc) + dt_bias.to(acc)).clamp(*dt_limit)
    A = -torch.exp(A_log.to(acc))
    lead = xBC.shape[:-1]
    return (
        x.reshape(*lead, H, head_dim),
        dt,
        A,
        B.reshape(*lead, n_groups, N),
        C.reshape(*lead, n_groups, N),
        window[:, -K:],
    )


def skip_and_norm(
    y: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    D: torch.Tensor,
    norm_weight: torch.Tensor,
    group_size: int,
    eps: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The mixer's element-wise tail: ``gated_rms_norm(y + D x, z)``. y, x ``[..., H, P]``; z ``[..., H*P]``;
    D ``[H]``; norm_weight ``[H*P]``. Returns ``[..., H*P]`` in ``dtype``."""
    acc = compute_dtype(x)
    h = y.to(acc) + x.to(acc) * D.to(acc)[:, None]
    return gated_rms_norm(h.flatten(-2), z, norm_weight, group_size, eps).to(dtype)


def set_compile_glue(model: nn.Module, enabled: bool | None = True) -> int:
    """Set ``compile_glue`` (True, False or None: automatic) in every Mamba-2 mixer and every RMSNorm of ``model``;
    returns how many modules that is."""
    modules = [m for m in model.modules() if isinstance(m, (Mamba2Mixer, RMSNorm))]
    for m in modules:
        m.compile_glue = enabled
    return len(modules)


class Mamba2Mixer(nn.Module):
    """in_proj -> causal depthwise conv + SiLU -> SSD scan (+ D skip) -> gated RMSNorm -> out_proj.

    ``forward(hidden [B, T, d_model], state=None, return_state=False)`` continues exactly from
    ``state`` (segmented prefill); ``step(hidden [B, d_model], state)`` is the one-token update.
    ``backend`` is passed to :func:`ramba.ops.ssd.ssd` (None: its :func:`~ramba.ops.ssd.default_backend`).
    ``compile_glue``: run the element-wise work around the scan (:func:`conv_and_ssm_inputs`,
    :func:`skip_and_norm`) through ``torch.compile``; None (default) does so when training on CUDA.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        head_dim: int = 64,
        n_groups: int = 1,
        chunk_size: int = 64,
        use_conv_bias: bool = True,
        use_bias: bool = False,
        rms_norm_eps: float = 1e-5,
        time_step_limit: tuple[float, float] = (0.0, float("inf")),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        layer_idx: int | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        d_inner = int(expand * d_model)
        if d_inner <= 0 or head_dim <= 0 or d_inner % head_dim != 0:
            raise ValueError(
                f"Mamba2Mixer: expand * d_model = {d_inner} must be a positive multiple of head_dim={head_dim}"
            )
        n_heads = d_inner // head_dim
        if n_groups <= 0 or n_heads % n_groups != 0:
            raise ValueError(f"Mamba2Mixer: the head count {n_heads} must be a multiple of n_groups={n_groups}")
        if d_conv < 1:
            raise ValueError(f"Mamba2Mixer: d_conv must be >= 1, got {d_conv}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"Mamba2Mixer: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = d_inner
        self.head_dim = head_dim
        self.n_heads = n_heads
        self.n_groups = n_groups
        self.chunk_size = chunk_size
        self.time_step_limit = tuple(time_step_limit)
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.layer_idx = layer_idx
        self.backend = backend
        self.compile_glue: bool | None = None
        self.conv_dim = d_inner + 2 * n_groups * d_state

        self.in_proj = nn.Linear(d_model, d_inner + self.conv_dim + n_heads, bias=use_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=d_conv,
            groups=self.conv_dim,
            padding=d_conv - 1,
            bias=use_conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.D = nn.Parameter(torch.empty(n_heads))
        self.norm = GatedRMSNorm(d_inner, group_size=d_inner // n_groups, eps=rms_norm_eps)
        self.out_proj = nn.Linear(d_inner, d_model, bias=use_bias)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # mamba_ssm's convention: the SSM scalars are not decayed
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """mamba_ssm / HF init: ``A = 1..H``, ``D = 1``, ``dt_bias = softplus^-1(dt)`` with ``dt``
        log-uniform in ``[dt_min, dt_max]`` (floored at ``dt_init_floor``)."""
        H = self.n_heads
        self.A_log.copy_(torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        lo, hi = math.log(self.dt_min), math.log(self.dt_max)
        dt = torch.exp(torch.rand(H) * (hi - lo) + lo).clamp(min=self.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) == dt

    def empty_state(self, batch: int, device=None, dtype: torch.dtype | None = None) -> Mamba2State:
        """Zero state for ``batch`` sequences; conv in ``dtype`` (default: in_proj's), ssm in float32
        (float64 when ``dtype`` is float64)."""
        w = self.in_proj.weight
        dtype = dtype or w.dtype
        device = device if device is not None else w.device
        ssm_dtype = compute_dtype(dtype)
        return Mamba2State(
            conv=torch.zeros(batch, self.conv_dim, self.d_conv, device=device, dtype=dtype),
            ssm=torch.zeros(batch, self.n_heads, self.head_dim, self.d_state, device=device, dtype=ssm_dtype),
        )

    def _check_hidden(self, hidden, rank: int, shape_doc: str) -> None:
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(f"Mamba2Mixer: hidden must be a torch.Tensor {shape_doc}, got {type(hidden).__name__}")
        if hidden.dim() != rank or hidden.shape[-1] != self.d_model:
            raise ValueError(
                f"Mamba2Mixer: hidden must be {shape_doc} with d_model={self.d_model}, got {tuple(hidden.shape)}"
            )

    def _check_state(self, state, batch: int) -> None:
        if not isinstance(state, Mamba2State):
            raise TypeError(f"Mamba2Mixer: state must be a Mamba2State, got {type(state).__name__}")
        conv = (batch, self.conv_dim, self.d_conv)
        ssm = (batch, self.n_heads, self.head_dim, self.d_state)
        if tuple(state.conv.shape) != conv:
            raise ValueError(
                f"Mamba2Mixer: state.conv must be [B, conv_dim, d_conv] = {conv}, got {tuple(state.conv.shape)}"
            )
        if tuple(state.ssm.shape) != ssm:
            raise ValueError(f"Mamba2Mixer: state.ssm must be [B, H, P, N] = {ssm}, got {tuple(state.ssm.shape)}")

    def _glue(self, fn, hidden: torch.Tensor):
        """``fn`` itself, or compiled (see ``compile_glue``)."""
        return glue(fn, hidden, self.compile_glue)

    def _ssm_inputs(self, history: torch.Tensor, xBC: torch.Tensor, dt_raw: torch.Tensor):
        """:func:`conv_and_ssm_inputs` with this mixer's parameters; history ``[B, d_conv, conv_dim]``."""
        return self._glue(conv_and_ssm_inputs, xBC)(
            history,
            xBC,
            dt_raw,
            self.conv1d.weight,
            self.conv1d.bias,
            self.dt_bias,
            self.A_log,
            self.n_groups,
            self.head_dim,
            self.time_step_limit,
        )

    def _output(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """D skip, gated RMSNorm and out_proj. y, x ``[..., H, P]``, z ``[..., d_inner]``."""
        y = self._glue(skip_and_norm, x)(y, x, z, self.D, self.norm.weight, self.norm.group_size, self.norm.eps, dtype)
        return self.out_proj(y)

    def forward(self, hidden: torch.Tensor, state: Mamba2State | None = None, return_state: bool = False):
        """Args: hidden ``[B, T, d_model]``; state to continue from (None: sequence start).
        Returns y ``[B, T, d_model]``, and the state after the last token if ``return_state``."""
        self._check_hidden(hidden, 3, "[B, T, d_model]")
        Bsz, T, _ = hidden.shape
        if state is not None:
            self._check_state(state, Bsz)
        z, xBC, dt_raw = self.in_proj(hidden).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        if state is None:  # zeros stand in for the inputs before a fresh sequence
            history = xBC.new_zeros(Bsz, self.d_conv, self.conv_dim)
        else:
            history = state.conv.transpose(1, 2)
        x, dt, A, B, C, last_inputs = self._ssm_inputs(history, xBC, dt_raw)
        out = ssd(
            x,
            dt,
            A,
            B,
            C,
            chunk_size=self.chunk_size,
            initial_state=None if state is None else state.ssm,
            return_final_state=return_state,
            backend=self.backend,
        )
        y, ssm_state = out if return_state else (out, None)
        y = self._output(y, x, z, hidden.dtype)
        if return_state:
            return y, Mamba2State(conv=last_inputs.transpose(1, 2), ssm=ssm_state)
        return y

    def step(self, hidden: torch.Tensor, state: Mamba2State) -> tuple[torch.Tensor, Mamba2State]:
        """One token. Args: hidden ``[B, d_model]``, state. Returns y ``[B, d_model]`` and the new
        state (the given one is not modified)."""
        self._check_hidden(hidden, 2, "[B, d_model]")
        self._check_state(state, hidden.shape[0])
        z, xBC, dt_raw = self.in_proj(hidden).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        x, dt, A, B, C, last_inputs = self._ssm_inputs(state.conv.transpose(1, 2), xBC[:, None], dt_raw[:, None])
        y, ssm_state = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], state.ssm)
        return self._output(y, x[:, 0], z, hidden.dtype), Mamba2State(conv=last_inputs.transpose(1, 2), ssm=ssm_state)


class Mamba2Block(RambaLayer):
    """Pre-norm residual block ``hidden + mixer(norm(hidden))``, named like HF's ``Mamba2Block``
    (``norm.weight``, ``mixer.*``). Mixer options go through ``mixer_kwargs``.

    Layer kind ``"mamba2"`` (docs/design.md §3). Its cache state is a :class:`Mamba2State` (conv ``[B, conv_dim,
    d_conv]``, ssm ``[B, H, P, N]``, zeros at the start); a forward continues from it and replaces it, a one-token
    input taking the recurrent :meth:`Mamba2Mixer.step`.
    """

    kind = "mamba2"

    def __init__(self, d_model: int, rms_norm_eps: float = 1e-5, layer_idx: int | None = None, **mixer_kwargs):
        super().__init__()
        self.layer_idx = layer_idx
        self.norm = RMSNorm(d_model, eps=rms_norm_eps)
        self.mixer = Mamba2Mixer(d_model, rms_norm_eps=rms_norm_eps, layer_idx=layer_idx, **mixer_kwargs)

    @classmethod
    def from_config(cls, config, layer_idx: int) -> Mamba2Block:
        c = config
        return cls(
            d_model=c.d_model,
            d_state=c.d_state,
            d_conv=c.conv_kernel,
            expand=c.expand,
            head_dim=c.ssm_head_dim,
            n_groups=c.n_groups,
            chunk_size=c.ssm_chunk_size,
            use_conv_bias=c.conv_bias,
            use_bias=c.ssm_proj_bias,
            time_step_limit=c.dt_limit,
            rms_norm_eps=c.rms_norm_eps,
            layer_idx=layer_idx,
        )

    def init_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype, chunk_store=None) -> Mamba2State:
        return self.mixer.empty_state(batch_size, device, dtype)

    def forward(self, hidden: torch.Tensor, ctx: LayerContext) -> tuple[torch.Tensor, LayerContext]:
        """hidden ``[B, T, d_model]`` -> ``[B, T, d_model]``, continuing from (and updating) this layer's state
        in ``ctx.states`` when there is a cache."""
        state = ctx.state(self.layer_idx)
        if state is None:
            return hidden + self.mixer(self.norm(hidden)), ctx
        if hidden.shape[1] == 1:
            y, state = self.mixer.step(self.norm(hidden[:, 0]), state)
            y = y[:, None]
        else:
            y, state = self.mixer(self.norm(hidden), state=state, return_state=True)
        ctx.states[self.layer_idx] = state
        return hidden + y, ctx
