"""Helpers shared by the training tests (a module of its own: `conftest` names clash across folders)."""

import random

# The tiny preset shrunk further so a CPU step takes tens of milliseconds.
MODEL_OVERRIDES = dict(
    d_model=32,
    n_lower_layers=1,
    n_upper_layers=2,
    mamba_per_hsa=2,
    n_heads=2,
    head_dim=16,
    retrieval_dim=32,
    d_state=16,
    ssm_head_dim=16,
    chunk_size=16,
    topk=2,
    mlp_hidden=64,
    ssm_chunk_size=16,
)


def make_text(n_sentences: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    subjects = ["The cat", "A dog", "My friend", "The old man", "Every child", "The teacher"]
    verbs = ["sees", "likes", "finds", "reads", "paints", "remembers"]
    objects = ["the red house", "a small boat", "the green tree", "an open book", "the blue sky"]
    return "".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}.\n" for _ in range(n_sentences))
