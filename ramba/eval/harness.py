"""The `ramba` model of lm-evaluation-harness (`pip install "ramba[eval]"`; docs/evaluation.md).

    ramba-lm-eval --model ramba --model_args pretrained=PATH[,offload=True,segment_len=2048,mode=exact|fast] ...

`ramba-lm-eval` (or `python -m ramba.eval.harness`) is lm-eval's own command line with this model
registered: lm-eval 0.4.x finds models only in its registry (`@register_model`), with no plugin entry
points, so the module that registers a model must be imported before the CLI runs.
`lm_eval.simple_evaluate(model=RambaLM(...))` works from Python as well.

Every request runs through ramba's segmented prefill and cache (`ramba.inference.prefill`,
`RambaCache`), so contexts of any length work, far beyond the training length and, with `offload`,
beyond GPU memory: nothing is truncated to a maximum length.
- `loglikelihood(context, continuation)`: the context is prefilled (in `mode`), then the continuation is
  scored segment by segment with the cache (`ramba.eval.ppl.token_nll`).
- `loglikelihood_rolling(text)`: the whole text after one prefix token (bos, else eos), in one pass.
- `generate_until(context, gen_kwargs)`: `ramba.inference.generate` (greedy unless `do_sample`), cut at
  eos and at the first `until` string; prompts of one token length are batched up to `batch_size`.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

try:
    import lm_eval.models  # noqa: F401  (registers the built-in models; the registry imports them only when empty)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ImportError(f"ramba.eval.harness needs lm-eval ({e}); install it with: pip install 'ramba[eval]'") from None

from ramba.eval.loading import load_model_tokenizer
from ramba.eval.ppl import token_nll
from ramba.inference import PREFILL_MODES, generate, prefill

__all__ = ["RambaLM", "main"]

logger = logging.getLogger(__name__)

_GENERATION_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k")


@register_model("ramba")
class RambaLM(TemplateLM):
    """A RAMba model for lm-evaluation-harness.

    Args (the harness's `--model_args`, plus its `--device` and `--batch_size`):
        pretrained: anything `ramba eval --model` takes (model folder, checkpoint, run, single
            `.safetensors` file, shipped model name). tokenizer: `byte` or a tokenizer path (default: the
            model's own, as for `ramba eval`). dtype: auto, fp32, bf16 or fp16.
        segment_len, mode, offload: the prefill's (see `ramba.inference.prefill`).
        max_gen_toks: new tokens when a task does not say. add_bos_token: start every text with bos
            (default: when the tokenizer has one, as ramba's training and task samples do).
    """

    def __init__(
        self,
        pretrained: str,
        tokenizer: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        segment_len: int = 2048,
        mode: str = "exact",
        offload: bool = False,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
    ):
        super().__init__()
        if mode not in PREFILL_MODES:
            raise ValueError(f"ramba: mode must be one of {', '.join(PREFILL_MODES)}, got {mode!r}")
        if int(segment_len) < 1 or int(max_gen_toks) < 1:
            raise ValueError(f"ramba: segment_len and max_gen_toks must be >= 1, got {segment_len}, {max_gen_toks}")
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            logger.warning("ramba: device %s is not available (lm-eval's default is cuda:0); using the CPU", device)
            device = "cpu"
        self.model, self.ramba_tokenizer = load_model_tokenizer(pretrained, tokenizer, device, dtype)
        self._device = next(self.model.parameters()).device
        self.segment_len, self.mode, self.offload = int(segment_len), mode, bool(offload)
        self.max_gen_toks = int(max_gen_toks)
        size = str(batch_size)
        self.batch_size = int(size) if size.isdigit() else 1  # "auto": one prompt at a time
        tok = self.ramba_tokenizer
        self.add_bos_token = tok.bos_id is not None if add_bos_token is None else bool(add_bos_token)
        if self.add_bos_token and tok.bos_id is None:
            raise ValueError(f"ramba: add_bos_token=True, but tokenizer {tok.name!r} has no bos token")

    @property
    def eot_token_id(self) -> int:
        return self.ramba_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.ramba_tokenizer.bos_id
        return bos if self.add_bos_token else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.ramba_tokenizer.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.ramba_tokenizer.encode(string)
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens and self.add_bos_token
        return [self.ramba_tokenizer.bos_id] + ids if add_bos else ids

    def tok_decode(self, ids) -> str:
        return self.ramba_tokenizer.decode(ids)

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """`(log P(continuation | context), whether greedy decoding gives the continuation)`."""
        if not continuation:
            return 0.0, True
        ids = torch.tensor([context + continuation], dtype=torch.long, device=self._device)
        cache = None
        if len(context) > 1:  # prefill all but the last context token; it feeds the first prediction below
            _, cache = prefill(self.model, ids[:, : len(context) - 1], self.segment_len, self.mode, self.offload)
        nll, greedy = token_nll(
            self.model, ids[:, len(context) - 1 :], self.segment_len, self.offload, cache=cache, greedy=True
        )
        return -float(nll.double().sum()), bool(greedy.all())

    def _bar(self, total: int, desc: str, disable: bool):
        return tqdm(total=total, desc=desc, unit="request", disable=disable or self.rank != 0)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        with self._bar(len(requests), "ramba loglikelihood", disable_tqdm) as bar:
            for key, context, continuation in requests:
                answer = self._score(list(context), list(continuation))
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                out.append(answer)
                bar.update(1)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        with self._bar(len(requests), "ramba loglikelihood_rolling", disable_tqdm) as bar:
            for request in requests:
                (text,) = request.args
                logprob, _ = self._score([self.prefix_token_id], self.tok_encode(text, add_special_tokens=False))
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), logprob)
                out.append(logprob)
                bar.update(1)
        return out

    def _generation_settings(self, gen_kwargs: dict) -> dict:
        unknown = sorted(set(gen_kwargs) - set(_GENERATION_KWARGS))
        if unknown:
            raise ValueError(
                f"ramba: unsupported generation_kwargs {unknown}; supported: {', '.join(_GENERATION_KWARGS)}"
            )
        until = gen_kwargs.get("until") or []
        temperature = float(gen_kwargs.get("temperature", 1.0))
        return {
            "until": [until] if isinstance(until, str) else list(until),
            "max_new_tokens": int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)),
            "do_sample": bool(gen_kwargs.get("do_sample", False)) and temperature > 0,
            "temperature": temperature,
            "top_k": gen_kwargs.get("top_k"),
        }

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prompts = [self.tok_encode(r.args[0]) or [self.prefix_token_id] for r in requests]
        settings = [self._generation_settings(dict(r.args[1])) for r in requests]
        groups: dict[tuple, list[int]] = {}
        for i, (ids, s) in enumerate(zip(prompts, settings)):
            groups.setdefault((len(ids), repr(s)), []).append(i)
        out: list[str | None] = [None] * len(requests)
        eos = self.eot_token_id
        with self._bar(len(requests), "ramba generate_until", disable_tqdm) as bar:
            for members in groups.values():
                for start in range(0, len(members), self.batch_size):
                    part = members[start : start + self.batch_size]
                    s = settings[part[0]]
                    ids = torch.tensor([prompts[i] for i in part], dtype=torch.long)
                    new = generate(
                        self.model,
                        ids,
                        s["max_new_tokens"],
                        segment_len=self.segment_len,
                        mode=self.mode,
                        offload=self.offload,
                        do_sample=s["do_sample"],
                        temperature=s["temperature"],
                        top_k=s["top_k"],
                        eos_token_id=eos,
                    )
                    for i, row in zip(part, new.tolist()):
                        text = self.tok_decode(row[: row.index(eos)] if eos in row else row)
                        for stop in s["until"]:
                            text = text.split(stop)[0]
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(part))
        return out


def main() -> None:
    """lm-eval's command line (`lm_eval ...`) with the `ramba` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
