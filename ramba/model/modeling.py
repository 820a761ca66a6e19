"""RAMba as a Hugging Face model: ``RambaModel`` and ``RambaForCausalLM`` (DESIGN §4)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ramba.layers.attention import Attention, AttentionBlock
from ramba.layers.hsa import ChunkEncoder, ChunkMemory, ChunkSelection, HSALayer, RetrievalLayer
from ramba.layers.mamba2 import Mamba2Block
from ramba.layers.norm import RMSNorm
from ramba.model.config import RambaConfig


def build_layer(kind: str, config: RambaConfig, layer_idx: int) -> nn.Module:
    """The module for one entry of :meth:`RambaConfig.layer_plan`."""
    c = config
    if kind == "mamba2":
        return Mamba2Block(
            c.d_model, d_state=c.d_state, d_conv=c.conv_kernel, expand=c.expand, head_dim=c.ssm_head_dim,
            n_groups=c.n_groups, chunk_size=c.ssm_chunk_size, rms_norm_eps=c.rms_norm_eps, layer_idx=layer_idx,
        )
    if kind in ("swa", "attention"):
        window = c.window if kind == "swa" else None
        attn = Attention(c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, window=window, rope_theta=c.rope_theta)
        return AttentionBlock(c.d_model, attn, c.mlp_hidden, c.rms_norm_eps)
    if kind == "chunk_encoder":
        return ChunkEncoder(
            c.d_model, c.chunk_size, c.encoder_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.retrieval_heads,
            c.retrieval_dim, c.mlp_hidden, c.rms_norm_eps, c.rope_theta,
        )
    if kind == "retrieval":
        return RetrievalLayer(c.d_model, c.retrieval_heads, c.retrieval_dim, c.chunk_size, c.topk, c.weight_norm, c.rms_norm_eps)
    if kind == "hsa":
        return HSALayer(c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.chunk_size, c.sm_n,
                        c.mlp_hidden if c.hsa_mlp else None, c.rms_norm_eps)
    raise ValueError(f"unknown layer kind {kind!r}")


@dataclass
class ForwardContext:
    """What flows beside the hidden states through one forward: positions, the chunk memory, the selection."""

    positions: torch.Tensor  # [T]
    memory: ChunkMemory | None = None
    selection: ChunkSelection | None = None


class RambaPreTrainedModel(PreTrainedModel):
    config_class = RambaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Mamba2Block", "AttentionBlock", "HSALayer", "ChunkEncoder"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, ChunkEncoder):
            nn.init.normal_(module.cls, mean=0.0, std=std)


class RambaModel(RambaPreTrainedModel):
    """Embeddings -> the layers of ``config.layer_plan()`` -> final norm. Returns the last hidden states."""

    def __init__(self, config: RambaConfig):
        super().__init__(config)
        self.layer_kinds = config.layer_plan()
        self.embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(build_layer(kind, config, i) for i, kind in enumerate(self.layer_kinds))
        self.norm_f = RMSNorm(config.d_model, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def _run_layer(self, kind: str, layer: nn.Module, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if kind == "chunk_encoder":
            ctx.memory = layer(hidden)
            return hidden
        if kind == "retrieval":
            ctx.selection = layer(hidden, ctx.memory.landmarks, ctx.positions)
            return hidden
        if kind == "hsa":
            args = (hidden, ctx.memory, ctx.selection)
        elif kind == "mamba2":
            args = (hidden,)
        else:
            args = (hidden, ctx.positions)
        if self.gradient_checkpointing and self.training:
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """``input_ids [B, T]`` (or ``inputs_embeds [B, T, d]``) -> ``last_hidden_state [B, T, d]``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("RambaModel: pass exactly one of input_ids [B, T] or inputs_embeds [B, T, d_model]")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"RambaModel: input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
            inputs_embeds = self.embeddings(input_ids)
        hidden = inputs_embeds
        ctx = ForwardContext(positions=torch.arange(hidden.shape[1], device=hidden.device))
        for kind, layer in zip(self.layer_kinds, self.layers):
            hidden = self._run_layer(kind, layer, hidden, ctx)
        return BaseModelOutputWithPast(last_hidden_state=self.norm_f(hidden))


class RambaForCausalLM(RambaPreTrainedModel, GenerationMixin):
    """:class:`RambaModel` with a language-model head (tied to the embeddings by default)."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # RAMba keeps its own state; generate must not build a key/value DynamicCache

    def __init__(self, config: RambaConfig):
        super().__init__(config)
        self.model = RambaModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``input_ids [B, T]`` -> ``logits [B, T, V]``; with ``labels [B, T]`` also the mean next-token loss
        (labels are shifted inside; -100 is ignored)."""
        hidden = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds).last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)
