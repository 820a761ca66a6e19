"""The model's retrieval loss (docs/design.md §6): each retrieval layer's loss on its own queries and landmarks,
averaged over the layers; it leaves the logits alone, trains the query and the landmarks, and is refused where it
cannot apply."""

import pytest
import torch

from ramba.ops.retrieval import retrieval_target_loss
from small_models import SMALL, small_model

S = SMALL["chunk_size"]


def _targets(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    targets = torch.full((B, T, 2), -1, dtype=torch.long)
    for b in range(B):
        for t in torch.randint(2 * S, T, (6,), generator=g).tolist():
            lo = int(torch.randint(t // S - 1, (1,), generator=g))
            targets[b, t] = torch.tensor([lo, lo + int(torch.randint(2, (1,), generator=g))])
    return targets


@pytest.mark.parametrize("layout", [dict(), dict(n_upper_layers=4, retrieval_groups=2)])
def test_loss_is_the_mean_of_each_retrieval_layers_loss(layout):
    model = small_model(**layout).double()
    ids = torch.randint(3, SMALL["vocab_size"], (2, 96), generator=torch.Generator().manual_seed(1))
    targets = _targets(2, 96, seed=2)
    seen = []

    def hook(module, args, _out):
        hidden, ctx = args
        seen.append(retrieval_target_loss(module.queries(hidden), ctx.memory.landmarks, targets, S))

    layers = [m for kind, m in zip(model.model.layer_kinds, model.model.layers) if kind == "retrieval"]
    handles = [m.register_forward_hook(hook) for m in layers]
    out = model(input_ids=ids, retrieval_targets=targets)
    for h in handles:
        h.remove()
    assert len(seen) == len(layers) == (2 if layout else 1)
    torch.testing.assert_close(out.retrieval_loss, torch.stack(seen).mean(), rtol=1e-12, atol=0)
    assert out.retrieval_loss.item() > 0
    plain = model(input_ids=ids)
    assert plain.retrieval_loss is None
    torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=0)


def test_loss_trains_the_query_and_the_landmarks_only_through_retrieval():
    model = small_model().double().train()
    ids = torch.randint(3, SMALL["vocab_size"], (2, 96), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids, retrieval_targets=_targets(2, 96, seed=4)).retrieval_loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    retrieval = [n for n in grads if ".q_proj." in n and grads[n] is not None and "layers.2." in n]
    assert retrieval and all(grads[n].abs().sum() > 0 for n in retrieval)  # layer 2: the retrieval layer
    encoder = [n for n, g in grads.items() if "layers.1." in n and g is not None]  # layer 1: the chunk encoder
    assert encoder and any(grads[n].abs().sum() > 0 for n in encoder)
    above = [n for n in grads if n.startswith("model.layers.") and int(n.split(".")[2]) > 2]  # HSA and after
    assert above and all(grads[n] is None or not grads[n].any() for n in above)


def test_refused_where_it_cannot_apply():
    ids = torch.randint(3, SMALL["vocab_size"], (1, 64))
    targets = torch.full((1, 64, 2), -1, dtype=torch.long)
    with pytest.raises(ValueError, match="need a retrieval layer; architecture 'mamba2'"):
        small_model(architecture="mamba2")(input_ids=ids, retrieval_targets=targets)
    model = small_model()
    with pytest.raises(ValueError, match="for training: pass them without a cache"):
        model(input_ids=ids, retrieval_targets=targets, use_cache=True)
    with pytest.raises(ValueError, match=r"int64 \[B=1, T=64, 2\]"):
        model(input_ids=ids, retrieval_targets=targets.int())
    with pytest.raises(ValueError, match="not with left padding"):
        mask = torch.ones(1, 64, dtype=torch.long)
        mask[0, :3] = 0
        model(input_ids=ids, attention_mask=mask, retrieval_targets=targets)
