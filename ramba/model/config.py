"""``RambaConfig``: every field of the RAMba model and its baselines, and the layer plan (docs/design.md §3, §4)."""

from __future__ import annotations

import dataclasses
import difflib
from enum import Enum

from transformers import PreTrainedConfig

from ramba.errors import ConfigError

ARCHITECTURES = ("ramba", "mamba2", "mamba2-swa", "mamba2-nsa", "transformer")
LOCAL_MIXERS = ("mamba2", "swa")
WEIGHT_NORMS = ("stick_breaking", "softmax")


class LayerKind(str, Enum):
    """The kinds of layer a layer plan is made of; each value is the ``kind`` its layer class registers under in
    ``ramba.layers`` (a ``str`` enum: ``LayerKind.HSA == "hsa"``)."""

    MAMBA2 = "mamba2"  # Mamba-2 block
    SWA = "swa"  # sliding-window attention block
    ATTENTION = "attention"  # full causal attention block
    NSA = "nsa"  # native sparse attention block
    CHUNK_ENCODER = "chunk_encoder"
    RETRIEVAL = "retrieval"
    HSA = "hsa"

    def __str__(self) -> str:
        return self.value


PRESETS: dict[str, dict] = {
    # CPU-trainable, byte vocabulary (256 bytes + <pad> <bos> <eos> <sep>), ~4.7M parameters.
    "tiny": dict(
        vocab_size=260,
        d_model=256,
        n_lower_layers=4,
        n_upper_layers=4,
        mamba_per_hsa=2,
        retrieval_groups=1,
        chunk_size=64,
        topk=8,
        n_heads=4,
        n_kv_heads=1,
        head_dim=64,
        retrieval_dim=256,
        encoder_layers=1,
        d_state=64,
        ssm_head_dim=64,
        expand=2,
        conv_kernel=4,
        window=512,
    ),
    # A middle size for benchmarks: 57M parameters with the 370M layout's proportions.
    "small": dict(
        vocab_size=50288,
        d_model=512,
        n_lower_layers=8,
        n_upper_layers=8,
        mamba_per_hsa=4,
        retrieval_groups=1,
        chunk_size=64,
        topk=8,
        n_heads=8,
        n_kv_heads=1,
        head_dim=64,
        retrieval_dim=512,
        encoder_layers=1,
        d_state=64,
        ssm_head_dim=64,
        expand=2,
        conv_kernel=4,
        window=512,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=0,
    ),
    # The paper's 370M layout: 24 lower + 24 upper Mamba-2 layers, HSA every 8 (3 HSA layers), one group.
    "370m": dict(
        vocab_size=50288,
        d_model=1024,
        n_lower_layers=24,
        n_upper_layers=24,
        mamba_per_hsa=8,
        retrieval_groups=1,
        chunk_size=64,
        topk=8,
        n_heads=16,
        n_kv_heads=1,
        head_dim=64,
        retrieval_dim=1024,
        encoder_layers=1,
        d_state=128,
        ssm_head_dim=64,
        expand=2,
        conv_kernel=4,
        window=512,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=0,
    ),
}


def json_float(value) -> float:
    """A float read back from JSON: a number, or infinity as written by transformers' ``to_json_string``
    (``{"__float__": "Infinity"}`` in transformers 5, the bare ``Infinity`` of Python's json before)."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        value = value["__float__"]
    return float(value)


class RambaConfig(PreTrainedConfig):
    """Configuration of RAMba and of the baselines built from the same parts.

    Layout (``architecture="ramba"``): embeddings -> ``n_lower_layers`` local-mixer blocks -> chunk encoder ->
    ``retrieval_groups`` x [retrieval layer -> k x (HSA layer -> ``mamba_per_hsa`` local-mixer blocks)] -> norm -> LM head,
    where ``retrieval_groups * k * mamba_per_hsa = n_upper_layers``.

    Fields:
        vocab_size: vocabulary size. d_model: model width.
        n_lower_layers / n_upper_layers: local-mixer blocks below / above the chunk encoder.
        mamba_per_hsa: local-mixer blocks after each HSA layer. retrieval_groups: groups sharing one chunk selection.
        chunk_size: tokens per chunk S (multiple of 16). topk: chunks per token K.
        n_heads / n_kv_heads / head_dim: HSA (and attention) query heads HQ, kv heads H, head dim D (default d_model // n_heads).
        retrieval_heads: retrieval heads R (1 or n_kv_heads; default n_kv_heads). retrieval_dim: Dr per retrieval head.
        encoder_layers: bidirectional layers of the chunk encoder. encoder_heads: their attention heads, of
            ``d_model // encoder_heads`` dims each (default ``max(1, d_model // 64)``).
        weight_norm: "stick_breaking" or "softmax".
        sm_n: extra softmax denominator inside each chunk (0 or 1). hsa_mlp: an MLP sub-block after each HSA layer.
        d_state / ssm_head_dim / expand / conv_kernel / n_groups / ssm_chunk_size: the Mamba-2 mixer.
        conv_bias / ssm_proj_bias: a bias in the Mamba-2 conv / in_proj and out_proj (HF's use_conv_bias / use_bias).
        dt_limit: ``(lo, hi)``, the Mamba-2 time step is clamped to it after the softplus (HF's time_step_limit).
        local_mixer: "mamba2" or "swa" (sliding-window attention with window ``window``, the SWA+HSA model).
        architecture: "ramba", or a baseline: "mamba2" (Mamba-2 only), "mamba2-swa" (SWA in place of the HSA layers),
            "mamba2-nsa" (native sparse attention in place of the HSA layers: blocks of chunk_size, topk of them,
            a window of window tokens; fla's kernels on CUDA), "transformer" (full causal attention in every layer).
        mlp_hidden: SwiGLU width (default ~8/3 d_model rounded to 64). rope_theta, rms_norm_eps, initializer_range.
        tie_embeddings: share the LM head with the embeddings.
    """

    model_type = "ramba"

    vocab_size: int = 260
    d_model: int = 256
    n_lower_layers: int = 4
    n_upper_layers: int = 4
    mamba_per_hsa: int = 2
    retrieval_groups: int = 1
    chunk_size: int = 64
    topk: int = 8
    n_heads: int = 4
    n_kv_heads: int = 1
    head_dim: int | None = None
    retrieval_heads: int | None = None
    retrieval_dim: int = 256
    encoder_layers: int = 1
    encoder_heads: int | None = None
    weight_norm: str = "stick_breaking"
    sm_n: float = 0.0
    hsa_mlp: bool = False
    d_state: int = 64
    ssm_head_dim: int = 64
    expand: int = 2
    conv_kernel: int = 4
    n_groups: int = 1
    ssm_chunk_size: int = 64
    conv_bias: bool = True
    ssm_proj_bias: bool = False
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    local_mixer: str = "mamba2"
    window: int = 512
    architecture: str = "ramba"
    mlp_hidden: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_embeddings: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 256
    bos_token_id: int | None = 257
    eos_token_id: int | None = 258

    def __post_init__(self, **kwargs):
        self._refuse_unknown(kwargs)
        self.tie_word_embeddings = self.tie_embeddings
        if self.head_dim is None:
            self.head_dim = self.d_model // self.n_heads if self.n_heads else 0
        if self.retrieval_heads is None:
            self.retrieval_heads = self.n_kv_heads
        if self.encoder_heads is None:  # what every model before the field was made with
            self.encoder_heads = max(1, self.d_model // 64) if isinstance(self.d_model, int) else None
        if self.mlp_hidden is None:
            self.mlp_hidden = 64 * -(-(8 * self.d_model // 3) // 64)
        self.dt_limit = tuple(json_float(x) for x in self.dt_limit)
        self._validate()
        super().__post_init__(**kwargs)

    @classmethod
    def _refuse_unknown(cls, kwargs: dict) -> None:
        """PreTrainedConfig keeps unknown keyword arguments as attributes; a misspelt field would be ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        for name in kwargs:
            if name in known or name.startswith("_") or hasattr(PreTrainedConfig, name) or name == "torch_dtype":
                continue
            own = known - {f.name for f in dataclasses.fields(PreTrainedConfig)}
            close = difflib.get_close_matches(name, sorted(own), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"RambaConfig: unknown field {name!r}; {hint}the fields are listed in RambaConfig's "
                "docstring (help(RambaConfig))"
            )

    def _validate(self) -> None:
        def need(ok: bool, field: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"RambaConfig.{field}: {msg} (got {getattr(self, field)!r})")

        for field in (
            "vocab_size",
            "d_model",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "topk",
            "retrieval_dim",
            "d_state",
            "ssm_head_dim",
            "expand",
            "conv_kernel",
            "n_groups",
            "ssm_chunk_size",
            "window",
            "mamba_per_hsa",
            "retrieval_groups",
            "mlp_hidden",
            "encoder_heads",
        ):
            value = getattr(self, field)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, field, "must be a positive int")
        for field in ("n_lower_layers", "n_upper_layers", "encoder_layers"):
            value = getattr(self, field)
            need(isinstance(value, int) and value >= 0, field, "must be an int >= 0")
        need(self.architecture in ARCHITECTURES, "architecture", f"must be one of {ARCHITECTURES}")
        need(self.local_mixer in LOCAL_MIXERS, "local_mixer", f"must be one of {LOCAL_MIXERS}")
        need(self.weight_norm in WEIGHT_NORMS, "weight_norm", f"must be one of {WEIGHT_NORMS}")
        need(
            isinstance(self.chunk_size, int) and self.chunk_size >= 16 and self.chunk_size % 16 == 0,
            "chunk_size",
            "must be a positive multiple of 16",
        )
        need(self.n_heads % self.n_kv_heads == 0, "n_heads", f"must be a multiple of n_kv_heads={self.n_kv_heads}")
        need(
            self.retrieval_heads in (1, self.n_kv_heads),
            "retrieval_heads",
            f"must be 1 or n_kv_heads={self.n_kv_heads}",
        )
        need(
            (self.d_model * self.expand) % self.ssm_head_dim == 0,
            "ssm_head_dim",
            f"must divide d_model * expand = {self.d_model * self.expand}",
        )
        need(self.sm_n in (0, 1, 0.0, 1.0), "sm_n", "must be 0 or 1")
        need(
            (self.d_model // self.encoder_heads) % 2 == 0 and self.d_model >= self.encoder_heads,
            "encoder_heads",
            f"must leave an even head dim d_model // encoder_heads (rotary positions), d_model={self.d_model}",
        )
        need(
            len(self.dt_limit) == 2 and 0 <= self.dt_limit[0] <= self.dt_limit[1],
            "dt_limit",
            "must be (lo, hi) with 0 <= lo <= hi",
        )
        if self.architecture in ("ramba", "mamba2-swa", "mamba2-nsa"):
            per_group = self.retrieval_groups * self.mamba_per_hsa
            need(
                self.n_upper_layers % per_group == 0 and self.n_upper_layers > 0,
                "n_upper_layers",
                f"must be a positive multiple of retrieval_groups * mamba_per_hsa = {per_group}",
            )
        if self.architecture == "ramba":
            need(self.encoder_layers >= 1, "encoder_layers", "must be >= 1 for RAMba")

    @property
    def n_hsa_layers(self) -> int:
        """HSA layers in the whole model (0 for the baselines without HSA)."""
        if self.architecture not in ("ramba", "mamba2-swa", "mamba2-nsa"):
            return 0
        return self.n_upper_layers // self.mamba_per_hsa

    def layer_plan(self) -> list[LayerKind]:
        """The :class:`LayerKind` of every layer after the embeddings, in order (docs/design.md §4)."""
        K = LayerKind
        lower, upper = self.n_lower_layers, self.n_upper_layers
        if self.architecture == "mamba2":
            return [K.MAMBA2] * (lower + upper)
        if self.architecture == "transformer":
            return [K.ATTENTION] * (lower + upper)
        if self.architecture in ("mamba2-swa", "mamba2-nsa"):
            sparse = K(self.architecture.removeprefix("mamba2-"))
            return [K.MAMBA2] * lower + ([sparse] + [K.MAMBA2] * self.mamba_per_hsa) * self.n_hsa_layers
        local = K(self.local_mixer)
        plan = [local] * lower + [K.CHUNK_ENCODER]
        per_group = self.n_hsa_layers // self.retrieval_groups
        for _ in range(self.retrieval_groups):
            plan += [K.RETRIEVAL] + ([K.HSA] + [local] * self.mamba_per_hsa) * per_group
        return plan

    @classmethod
    def preset(cls, name: str, **overrides) -> RambaConfig:
        """A named configuration (``"tiny"``, ``"small"``, ``"370m"``) with fields overridden by keyword."""
        if name not in PRESETS:
            raise ConfigError(f"RambaConfig.preset: unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})
