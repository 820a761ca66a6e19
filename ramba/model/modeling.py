"""RAMba as a Hugging Face model: ``RambaModel`` and ``RambaForCausalLM`` (DESIGN §4)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ramba.errors import InputError
from ramba.layers.attention import Attention, AttentionBlock, NativeSparseAttention
from ramba.layers.hsa import ChunkEncoder, ChunkMemory, ChunkSelection, HSALayer, RetrievalLayer
from ramba.layers.mamba2 import Mamba2Block, Mamba2Mixer
from ramba.layers.norm import GatedRMSNorm, RMSNorm
from ramba.model.cache import RambaCache
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
    if kind == "nsa":
        attn = NativeSparseAttention(c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.chunk_size, c.topk, c.window,
                                     c.rope_theta)
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

    positions: torch.Tensor  # [T] absolute positions of the input tokens
    cache: RambaCache | None = None
    skip_hsa: bool = False  # fast prefill: no retrieval and no HSA attention for these tokens
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
        elif isinstance(module, Mamba2Mixer):
            module.reset_ssm_parameters()
        elif isinstance(module, (RMSNorm, GatedRMSNorm)):
            nn.init.ones_(module.weight)
        elif isinstance(module, nn.Conv1d):
            module.reset_parameters()


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

    def _run_layer(self, i: int, kind: str, layer: nn.Module, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        cache = ctx.cache
        if kind == "chunk_encoder":
            if cache is None:
                ctx.memory = layer(hidden)
            else:  # complete chunks from the pending tail plus the new tokens go to the memory store
                full = hidden if cache.pending is None else torch.cat((cache.pending, hidden), dim=1)
                n = full.shape[1] // self.config.chunk_size * self.config.chunk_size
                if n:  # CUDA's SDPA returns None, not an empty tensor, for an empty batch of chunks
                    cache.memory.append(layer(full[:, :n]))
                cache.pending = full[:, n:]
            return hidden
        if kind == "retrieval":
            if not ctx.skip_hsa:
                landmarks = ctx.memory.landmarks if cache is None else cache.memory.landmarks
                # without a cache the positions are 0 .. T-1, select_chunks' default, which it bounds without a sync
                ctx.selection = layer(hidden, landmarks, None if cache is None else ctx.positions)
                if cache is not None and cache.memory.fetch_tokens(ctx.selection) >= hidden.shape[1]:
                    # one fetch serves every HSA layer of the group; a longer offloaded segment leaves
                    # ctx.memory None and its HSA layers fetch block by block (_hsa_over_cache)
                    ctx.memory, ctx.selection = cache.memory.fetch(ctx.selection)
            return hidden
        if kind == "mamba2" and cache is not None:
            state = cache.states[i]
            if hidden.shape[1] == 1:
                if state is None:
                    state = layer.empty_state(hidden.shape[0], hidden.device, hidden.dtype)
                out, cache.states[i] = layer.step(hidden[:, 0], state)
                return out[:, None]
            out, cache.states[i] = layer(hidden, state, return_state=True)
            return out
        if kind == "hsa" and cache is not None and not ctx.skip_hsa and ctx.memory is None:
            return self._hsa_over_cache(layer, hidden, cache.memory, ctx.selection)
        if kind == "hsa":
            args = (hidden, None, None) if ctx.skip_hsa else (hidden, ctx.memory, ctx.selection)
        elif kind == "mamba2":
            args = (hidden,)
        else:
            args = (hidden, ctx.positions, None if cache is None else cache.states[i])
        if self.gradient_checkpointing and self.training:
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    @staticmethod
    def _hsa_over_cache(layer: nn.Module, hidden: torch.Tensor, store, selection: ChunkSelection) -> torch.Tensor:
        """An HSA layer over offloaded chunk memory, one block of ``store.fetch_tokens`` tokens at a time:
        each block copies in only the chunks it selected. HSA layers act on each token alone, so the blocks
        give exactly the output of one call."""
        T = hidden.shape[1]
        step = store.fetch_tokens(selection)
        outputs = []
        for t0 in range(0, T, step):
            block = ChunkSelection(selection.indices[:, t0 : t0 + step], selection.weights[:, t0 : t0 + step])
            outputs.append(layer(hidden[:, t0 : t0 + step], *store.fetch(block)))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: RambaCache | None = None,
        use_cache: bool | None = None,
        skip_hsa: bool = False,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """``input_ids [B, T]`` (or ``inputs_embeds [B, T, d]``) -> ``last_hidden_state [B, T, d]``.

        With ``use_cache`` (or a ``past_key_values`` cache) the tokens continue the cached sequence and the
        cache is updated in place and returned. ``skip_hsa`` leaves out retrieval and the HSA attention term
        for these tokens (the chunk memory is still built): the fast prefill mode.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("RambaModel: pass exactly one of input_ids [B, T] or inputs_embeds [B, T, d_model]")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"RambaModel: input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
            try:
                inputs_embeds = self.embeddings(input_ids)
            except IndexError:  # on the CPU; checking the range up front would cost a host sync on the GPU
                raise InputError(f"RambaModel: input_ids hold ids outside [0, vocab_size={self.config.vocab_size}); "
                                 "encode the text with the tokenizer the model was trained with") from None
        hidden = inputs_embeds
        B, T = hidden.shape[:2]
        cache = past_key_values
        if cache is None and use_cache:
            cache = RambaCache(self.config, B, hidden.device, hidden.dtype)
        if cache is not None:
            if not isinstance(cache, RambaCache):
                raise TypeError(f"RambaModel: past_key_values must be a RambaCache, got {type(cache).__name__}")
            cache.check(self.config, B, hidden.device, hidden.dtype)
        start = 0 if cache is None else cache.seen_tokens
        ctx = ForwardContext(positions=torch.arange(start, start + T, device=hidden.device), cache=cache, skip_hsa=skip_hsa)
        for i, (kind, layer) in enumerate(zip(self.layer_kinds, self.layers)):
            hidden = self._run_layer(i, kind, layer, hidden, ctx)
        if cache is not None:
            cache.seen_tokens += T
        return BaseModelOutputWithPast(last_hidden_state=self.norm_f(hidden), past_key_values=cache)


class RambaForCausalLM(RambaPreTrainedModel, GenerationMixin):
    """:class:`RambaModel` with a language-model head (tied to the embeddings by default)."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # RAMba keeps its own state; generate must not build a key/value DynamicCache

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, verify: bool = True, **kwargs):
        """As in transformers; with ``verify`` a folder inside a training checkpoint must match the checkpoint's
        manifest and no weight may be NaN or inf (ModelLoadError / CheckpointError otherwise; docs/design.md §8)."""
        from ramba.model.loading import check_finite, verify_model_folder

        if verify:
            verify_model_folder(pretrained_model_name_or_path)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if verify:
            check_finite(model.state_dict().items(), pretrained_model_name_or_path)
        return model

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
        past_key_values: RambaCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        skip_hsa: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``input_ids [B, T]`` -> ``logits [B, T, V]``; with ``labels [B, T]`` also the mean next-token loss
        (labels are shifted inside; -100 is ignored).

        ``attention_mask [B, T_total]`` with zeros marks left padding: each row then runs on its own tokens
        only (its own cache row), so rows of different lengths give what they give alone.
        ``past_key_values`` / ``use_cache`` / ``skip_hsa``: see :meth:`RambaModel.forward`.
        """
        if attention_mask is not None and not bool(attention_mask.all()):
            hidden, cache = self._ragged_hidden(input_ids, attention_mask, past_key_values, skip_hsa)
            if labels is not None:
                labels = labels.masked_fill(attention_mask[:, -labels.shape[1]:] == 0, -100)
        else:
            out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, past_key_values=past_key_values,
                             use_cache=use_cache, skip_hsa=skip_hsa)
            hidden, cache = out.last_hidden_state, out.past_key_values
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    def _ragged_hidden(self, input_ids, attention_mask, cache, skip_hsa):
        """Left-padded rows, each through the model alone: hidden ``[B, T, d]`` (zeros at padding) and a cache
        whose ``rows`` are one-row caches."""
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("RambaForCausalLM: a padding attention_mask needs input_ids [B, T]")
        mask = attention_mask[:, -input_ids.shape[1]:].bool()
        if bool((attention_mask.long().diff(dim=1) < 0).any()):
            raise ValueError("RambaForCausalLM: only left padding is supported (attention_mask rows must be 0...0 1...1)")
        B, T = input_ids.shape
        if cache is None:
            cache = RambaCache(self.config, B, input_ids.device, self.model.embeddings.weight.dtype)
            cache.rows = [None] * B
        elif cache.rows is None:
            raise ValueError("RambaForCausalLM: a padding attention_mask needs the cache made with that mask")
        hidden = self.model.embeddings.weight.new_zeros(B, T, self.config.d_model)
        for b in range(B):
            ids = input_ids[b, mask[b]][None]
            if ids.shape[1] == 0:
                continue
            out = self.model(input_ids=ids, past_key_values=cache.rows[b], use_cache=True, skip_hsa=skip_hsa)
            cache.rows[b] = out.past_key_values
            hidden[b, mask[b]] = out.last_hidden_state[0]
        cache.seen_tokens += T
        return hidden, cache

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, use_cache=True, **kwargs):
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values.seen_tokens :]
        return {"input_ids": input_ids, "past_key_values": past_key_values, "attention_mask": attention_mask,
                "use_cache": use_cache, "logits_to_keep": 1}
