"""RambaCache follows the installed transformers' cache API: a ``transformers.Cache``, the cache under the name
the version uses, and no deprecation warning (Python warning or transformers log line) from ramba's own calls."""

import contextlib
import logging
import warnings

import pytest
import torch
import transformers
from transformers.cache_utils import Cache

from ramba import RambaCache
from ramba.inference import generate, prefill
from ramba.model.modeling import CACHE_FIELD
from small_models import small_model


@contextlib.contextmanager
def deprecations_caught():
    """Yields the list of deprecation messages emitted inside: Python Deprecation/FutureWarnings, and lines that
    transformers' logger says contain "deprecat" (its warning_once memory cleared first, so nothing hides)."""
    found = []

    class Catch(logging.Handler):
        def emit(self, record):
            if "deprecat" in record.getMessage().lower():
                found.append(record.getMessage())

    logger = transformers.utils.logging.get_logger("transformers")
    for once in (transformers.utils.logging.warning_once, getattr(transformers.utils.logging, "info_once", None)):
        if hasattr(once, "cache_clear"):
            once.cache_clear()
    handler = Catch(level=logging.DEBUG)
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
        found += [
            str(w.message)
            for w in caught
            if issubclass(w.category, (DeprecationWarning, FutureWarning)) or "deprecat" in str(w.message).lower()
        ]
    finally:
        logger.removeHandler(handler)


def test_the_catcher_sees_transformers_deprecations():
    with deprecations_caught() as found:
        transformers.utils.logging.get_logger("transformers.test").warning_once("`x` is deprecated. Use `y`.")
        warnings.warn("old", FutureWarning, stacklevel=2)
    assert len(found) == 2


@pytest.mark.parametrize("overrides", [{}, dict(architecture="transformer")])
def test_no_deprecation_from_ramba_calls(overrides):
    model = small_model(seed=1, eos_token_id=None, **overrides)
    ids = torch.randint(3, 64, (2, 20))
    with deprecations_caught() as found, torch.no_grad():
        model(input_ids=ids)
        out = model(input_ids=ids[:, :12], use_cache=True)
        cache = getattr(out, CACHE_FIELD)
        model(input_ids=ids[:, 12:13], cache=cache)
        model(input_ids=ids[:, 13:14], past_key_values=cache)  # the older name is still taken, silently
        hf = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # left padding: each row through its own one-row cache
        padded = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
        last, prefilled = prefill(model, ids, segment_len=8)
        ours = generate(model, ids, 3, segment_len=8)
    assert found == []
    assert isinstance(cache, RambaCache) and isinstance(cache, Cache) and cache.get_seq_length() == 14
    assert torch.equal(hf[:, 20:], ours) and padded.shape == (2, 22)
    torch.testing.assert_close(last, model(input_ids=ids).logits[:, -1], atol=2e-5, rtol=2e-5)
    assert prefilled.seen_tokens == 20


def test_no_deprecation_from_gradient_checkpointing_or_training():
    model = small_model(seed=2).train()
    ids = torch.randint(3, 64, (2, 20))
    with deprecations_caught() as found:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model(input_ids=ids, labels=ids).loss.backward()
    assert found == []


def test_transformers_whole_cache_edits_are_refused_clearly():
    model = small_model()
    cache = RambaCache(model.config, 1, torch.device("cpu"), torch.float32)
    assert not cache.is_compileable and cache.batch_size == 1 and len(cache) == len(model.model.layers)
    for edit in (
        lambda: cache.reorder_cache(torch.tensor([0])),
        lambda: cache.crop(1),
        cache.reset,
        lambda: cache.batch_repeat_interleave(2),
    ):
        with pytest.raises(NotImplementedError, match="RambaCache: reordering, cropping"):
            edit()
