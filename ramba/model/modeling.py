"""RAMba as a Hugging Face model: ``RambaModel`` and ``RambaForCausalLM`` (docs/design.md §4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ramba.errors import InputError
from ramba.layers.base import LAYER_CLASSES, LayerContext, build_layer
from ramba.layers.hsa import ChunkEncoder
from ramba.layers.mamba2 import Mamba2Mixer
from ramba.layers.norm import GatedRMSNorm, RMSNorm
from ramba.model.cache import RambaCache
from ramba.model.config import RambaConfig
from ramba.ops.loss import linear_cross_entropy

# The name of the cache in model inputs and outputs: ``cache`` in current transformers, ``past_key_values`` before.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class RambaModelOutput(BaseModelOutputWithPast):
    """``BaseModelOutputWithPast`` and ``retrieval_loss []``: the mean over retrieval layers of the retrieval loss
    (docs/design.md §6), when ``retrieval_targets`` were given."""

    retrieval_loss: torch.FloatTensor | None = None


@dataclass
class RambaCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` and ``retrieval_loss []`` (see :class:`RambaModelOutput`)."""

    retrieval_loss: torch.FloatTensor | None = None


class RambaPreTrainedModel(PreTrainedModel):
    config_class = RambaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = sorted(layer.__name__ for layer in LAYER_CLASSES.values())

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=checkpoint, **kwargs):
        # the layer context carries tensors (chunk memory, selection) that reentrant checkpointing cuts off from autograd
        if enable and getattr(gradient_checkpointing_func, "keywords", {}).get("use_reentrant", False):
            raise ValueError(
                f"{type(self).__name__}: gradient checkpointing needs use_reentrant=False (the default); "
                "drop use_reentrant=True from the checkpointing kwargs"
            )
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, **kwargs)

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
    """Embeddings -> the layers of ``config.layer_plan()`` -> final norm. Returns the last hidden states.

    Every layer speaks one protocol (docs/design.md §3): ``hidden, ctx = layer(hidden, ctx)``.
    """

    def __init__(self, config: RambaConfig):
        super().__init__(config)
        self.layer_kinds = config.layer_plan()
        self.embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(build_layer(kind, config, i) for i, kind in enumerate(self.layer_kinds))
        self.norm_f = RMSNorm(config.d_model, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: RambaCache | None = None,
        use_cache: bool | None = None,
        skip_hsa: bool = False,
        past_key_values: RambaCache | None = None,
        retrieval_targets: torch.Tensor | None = None,
        **kwargs,
    ) -> RambaModelOutput:
        """``input_ids [B, T]`` (or ``inputs_embeds [B, T, d]``) -> ``last_hidden_state [B, T, d]``.

        With ``use_cache`` (or a ``cache``) the tokens continue the cached sequence and the cache is updated in
        place and returned (``past_key_values``: the same, the name older transformers use). ``skip_hsa`` leaves
        out retrieval and the HSA attention term for these tokens (the chunk memory is still built): the fast
        prefill mode. ``retrieval_targets [B, T, 2]`` (training, no cache; see ``ramba.data.retrieval_targets``)
        also returns ``retrieval_loss`` (docs/design.md §6).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("RambaModel: pass exactly one of input_ids [B, T] or inputs_embeds [B, T, d_model]")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"RambaModel: input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
            try:
                inputs_embeds = self.embeddings(input_ids)
            except IndexError:  # on the CPU; checking the range up front would cost a host sync on the GPU
                raise InputError(
                    f"RambaModel: input_ids hold ids outside [0, vocab_size={self.config.vocab_size}); "
                    "encode the text with the tokenizer the model was trained with"
                ) from None
        hidden = inputs_embeds
        B, T = hidden.shape[:2]
        if B == 0:
            raise InputError("RambaModel: the batch is empty (B=0); pass at least one sequence [B >= 1, T]")
        cache = past_key_values if cache is None else cache
        if cache is None and use_cache:
            cache = RambaCache(self.config, B, hidden.device, hidden.dtype, layers=self.layers)
        if cache is not None:
            if not isinstance(cache, RambaCache):
                raise TypeError(f"RambaModel: the cache must be a RambaCache, got {type(cache).__name__}")
            cache.check(self.config, B, hidden.device, hidden.dtype)
            if (
                self.training
                and torch.is_grad_enabled()
                and any(getattr(m, "gradient_checkpointing", False) for m in self.layers)
            ):
                raise ValueError(
                    "RambaModel: a cache cannot be updated under gradient checkpointing (the backward "
                    "would replay its updates); call model.eval() or turn checkpointing off"
                )
        if retrieval_targets is not None:
            self._check_retrieval_targets(retrieval_targets, B, T, hidden.device, cache is not None or skip_hsa)
        start = 0 if cache is None else cache.seen_tokens
        ctx = LayerContext(
            positions=torch.arange(start, start + T, device=hidden.device),
            states=None if cache is None else cache.layers,
            skip_hsa=skip_hsa,
            retrieval_targets=retrieval_targets,
        )
        for layer in self.layers:
            hidden, ctx = layer(hidden, ctx)
        if cache is not None:
            cache.seen_tokens += T
        retrieval_loss = torch.stack(ctx.retrieval_losses).mean() if ctx.retrieval_losses else None
        return RambaModelOutput(
            last_hidden_state=self.norm_f(hidden), retrieval_loss=retrieval_loss, **{CACHE_FIELD: cache}
        )

    def _check_retrieval_targets(self, targets: torch.Tensor, B: int, T: int, device, cached: bool) -> None:
        if "retrieval" not in self.layer_kinds:
            raise ValueError(
                f"RambaModel: retrieval_targets need a retrieval layer; architecture "
                f"{self.config.architecture!r} has none"
            )
        if cached:
            raise ValueError("RambaModel: retrieval_targets are for training: pass them without a cache or skip_hsa")
        if targets.shape != (B, T, 2) or targets.dtype != torch.long or targets.device != device:
            raise ValueError(
                f"RambaModel: retrieval_targets must be int64 [B={B}, T={T}, 2] on {device}, "
                f"got {targets.dtype} {tuple(targets.shape)} on {targets.device}"
            )


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
        # with labels: None computes the logits and F.cross_entropy; "liger" the fused LM head + cross-entropy
        # (ramba.ops.linear_cross_entropy), which returns no logits
        self.loss_backend: str | None = None
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
        cache: RambaCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        skip_hsa: bool = False,
        past_key_values: RambaCache | None = None,
        retrieval_targets: torch.Tensor | None = None,
        **kwargs,
    ) -> RambaCausalLMOutput:
        """``input_ids [B, T]`` -> ``logits [B, T, V]``; with ``labels [B, T]`` also the mean next-token loss
        (labels are shifted inside; -100 is ignored); with ``loss_backend`` set, the loss alone (logits None).

        ``attention_mask [B, T_total]`` with zeros marks left padding: each row then runs on its own tokens
        only (its own cache row), so rows of different lengths give what they give alone.
        ``cache`` (or ``past_key_values``) / ``use_cache`` / ``skip_hsa`` / ``retrieval_targets`` (the
        ``retrieval_loss`` of the output): see :meth:`RambaModel.forward`.
        """
        cache = past_key_values if cache is None else cache
        retrieval_loss = None
        if attention_mask is not None and not bool(attention_mask.all()):
            if retrieval_targets is not None:
                raise ValueError("RambaForCausalLM: retrieval_targets are for training, not with left padding")
            hidden, cache = self._ragged_hidden(input_ids, attention_mask, cache, skip_hsa)
            if labels is not None:
                labels = labels.masked_fill(attention_mask[:, -labels.shape[1] :] == 0, -100)
        else:
            out = self.model(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                cache=cache,
                use_cache=use_cache,
                skip_hsa=skip_hsa,
                retrieval_targets=retrieval_targets,
            )
            hidden, cache, retrieval_loss = out.last_hidden_state, getattr(out, CACHE_FIELD), out.retrieval_loss
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        if labels is not None and self.loss_backend is not None:
            h, y = hidden[:, :-1].reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1)
            loss = linear_cross_entropy(h, self.lm_head.weight, y, backend=self.loss_backend)
            return RambaCausalLMOutput(loss=loss, logits=None, retrieval_loss=retrieval_loss, **{CACHE_FIELD: cache})
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return RambaCausalLMOutput(loss=loss, logits=logits, retrieval_loss=retrieval_loss, **{CACHE_FIELD: cache})

    def _ragged_hidden(self, input_ids, attention_mask, cache, skip_hsa):
        """Left-padded rows, each through the model alone: hidden ``[B, T, d]`` (zeros at padding) and a cache
        whose ``rows`` are one-row caches."""
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("RambaForCausalLM: a padding attention_mask needs input_ids [B, T]")
        mask = attention_mask[:, -input_ids.shape[1] :].bool()
        if bool((attention_mask.long().diff(dim=1) < 0).any()):
            raise ValueError(
                "RambaForCausalLM: only left padding is supported (attention_mask rows must be 0...0 1...1)"
            )
        B, T = input_ids.shape
        dtype = self.model.embeddings.weight.dtype
        if cache is None:
            cache = RambaCache(self.config, B, input_ids.device, dtype, layers=self.model.layers)
            cache.rows = [None] * B
        elif cache.rows is None:
            raise ValueError("RambaForCausalLM: a padding attention_mask needs the cache made with that mask")
        hidden = self.model.embeddings.weight.new_zeros(B, T, self.config.d_model)
        for b in range(B):
            ids = input_ids[b, mask[b]][None]
            if ids.shape[1] == 0:
                continue
            if cache.rows[b] is None:
                cache.rows[b] = RambaCache(self.config, 1, input_ids.device, dtype, layers=self.model.layers)
            hidden[b, mask[b]] = self.model(input_ids=ids, cache=cache.rows[b], skip_hsa=skip_hsa).last_hidden_state[0]
        cache.seen_tokens += T
        return hidden, cache

    def prepare_inputs_for_generation(
        self, input_ids, cache=None, attention_mask=None, use_cache=True, past_key_values=None, **kwargs
    ):
        """The next step's model inputs: the tokens the cache has not seen (``past_key_values``: the cache's name
        in older transformers)."""
        cache = past_key_values if cache is None else cache
        if cache is not None:
            input_ids = input_ids[:, cache.seen_tokens :]
        return {
            "input_ids": input_ids,
            "cache": cache,
            "attention_mask": attention_mask,
            "use_cache": use_cache,
            "logits_to_keep": 1,
        }
