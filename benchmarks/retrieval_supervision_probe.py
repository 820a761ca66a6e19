"""Can a model's retrieval learn the key-to-needle match when told it directly? A diagnosis of multi-key (issue 22).

Usage: python benchmarks/retrieval_supervision_probe.py [--model tiny-ruler | --fresh tiny:chunk_size=32]
       [--arms query,encoder,below] [--task niah_multikey] [--landmarks cls|max] [--steps 300] [--length 2048]
       [--batch 8] [--lr 1e-3] [--device cpu] [--out PATH]

From a trained model, each arm trains one part of the model with the retrieval loss alone (docs/design.md §6: at
the token that predicts an answer's first character, the cross-entropy of the first retrieval layer's chunk scores
against the chunks of the needle that answer is read from), everything else frozen, on multi-key samples drawn
from the training haystacks:

- ``query``: the retrieval layer's query (its norm and ``q_proj``): is the key already in the landmarks?
- ``encoder``: the query and the chunk encoder (the landmarks' side): can one encoder layer put it there?
- ``encoder2``: the same with a second encoder layer appended (its output projections zero, so it starts as
  the identity): does a deeper encoder help?
- ``below``: the query, the chunk encoder and every layer below the retrieval layer, embeddings included: is the
  key in the hidden states at all, at the needle and at the question?

``--landmarks max`` asks a what-if of the layout: a chunk scores the best of its tokens' landmarks (the landmark
projection applied to every token's encoder output, not only the summary token's), so a key's own token can match.
``--fresh PRESET[:key=value...]`` starts every arm from a freshly initialised model of that layout instead (with
``below``: can this layout learn the match from the retrieval loss alone, without features trained for the LM?).

Every ``--eval-every`` steps it scores fixed samples of an unseen haystack (default python-doc, other seeds):
``asked_first`` (at the answer's first token the asked needle's best chunk scores above every other needle's;
chance 1 / keys), ``asked_in_topk`` (it is among the model's top-K visible chunks, as selection would read it)
and the retrieval loss, beside the mean training retrieval loss since the last evaluation. And where the key is
lost: on samples whose keys come from a pool of ``KEY_POOL`` words, how often the nearest other landmark of a
needle's key chunk (``landmark_key_id``), the nearest other query at an answer (``query_key_id``) and the nearest
other hidden state at a needle key's last byte, the retrieval layer's input (``hidden_key_id``) have the same key
(centred cosine; chance about 1 / ``KEY_POOL``). A match needs the key on both sides. Only the part below
the retrieval layer runs (no LM head, no HSA). float32 on the CPU (about 3 s a step of 8 x 2K for ``encoder``,
10 s for ``below``, on 2 cores) or ``--device cuda``. Writes JSON (per arm, the curve, rewritten at every
evaluation) and a PNG beside it; ``--save-dir`` keeps each arm's model for `ramba eval tasks` (only the arm's
part differs from ``--model``, so the rest of the model reads the new selection unchanged).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

import ramba.data.tasks as tasks
from ramba import RambaConfig, RambaForCausalLM
from ramba.data import ByteTokenizer
from ramba.data.tasks import MixedHaystack, TokenFileHaystack, make_task, retrieval_targets
from ramba.eval.tasks import parse_task_spec
from ramba.layers.attention import Attention, AttentionBlock
from ramba.layers.base import LayerContext
from ramba.model.loading import load_model
from ramba.model.single_file import save_model_file
from ramba.ops.retrieval import chunk_scores, scores_target_loss

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("query", "encoder", "encoder2", "below")
KEY_POOL = 8


def retrieval_index(model) -> int:
    """Index in ``model.model.layers`` of the first retrieval layer."""
    return model.model.layer_kinds.index("retrieval")


def chunk_encoders(model) -> list:
    """The model's chunk encoder layers (one per retrieval group)."""
    return [m for kind, m in zip(model.model.layer_kinds, model.model.layers) if kind == "chunk_encoder"]


def add_encoder_layer(model) -> None:
    """Append one bidirectional block to the chunk encoder that starts as the identity (output projections 0)."""
    c = model.config
    encoder = chunk_encoders(model)[0]
    enc_dim = c.d_model // c.encoder_heads
    block = AttentionBlock(
        c.d_model,
        Attention(c.d_model, c.encoder_heads, c.encoder_heads, enc_dim, causal=False, rope_theta=c.rope_theta),
        c.mlp_hidden,
        c.rms_norm_eps,
    )
    torch.nn.init.zeros_(block.attn.o_proj.weight)
    torch.nn.init.zeros_(block.mlp.down_proj.weight)
    encoder.layers.append(block)
    c.encoder_layers += 1


def initial_model(args):
    """The model every arm starts from: ``--model`` loaded, or a fresh one of the layout ``--fresh`` names (seeded
    by ``--seed``), float32 on ``--device``."""
    if not args.fresh:
        return load_model(args.model, args.device, torch.float32)
    preset, overrides = parse_task_spec(args.fresh)
    torch.manual_seed(args.seed)
    return RambaForCausalLM(RambaConfig.preset(preset, **overrides)).to(args.device, torch.float32)


def trainable(model, arm: str) -> list[torch.nn.Parameter]:
    """The parameters ``arm`` trains (see the module docstring); the rest get ``requires_grad = False``."""
    r = retrieval_index(model)
    layers = model.model.layers
    if arm == "query":
        parts = [layers[r]]
    elif arm in ("encoder", "encoder2"):
        parts = [layers[r], *chunk_encoders(model)]
    elif arm == "below":
        parts = [model.model.embeddings, *layers[: r + 1]]
    else:
        raise ValueError(f"arm: expected one of {ARMS}, got {arm!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for m in parts for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def queries_and_landmarks(
    model, input_ids: torch.Tensor, token_landmarks: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids [B, T]`` -> the first retrieval layer's queries ``q_r [B, T, R, Dr]``, the landmarks ``[B, C, R,
    Dr]`` it scores and its input ``hidden [B, T, d]``; runs only the layers up to it (under bf16 autocast on CUDA, as
    training does). ``token_landmarks``: instead of the chunk's landmark, the landmark projection of every token's
    encoder output ``[B, C, S, R, Dr]`` (the ``--landmarks max`` what-if)."""
    r = retrieval_index(model)
    encoder = chunk_encoders(model)[0]
    outputs = []  # the encoder's normed outputs [B * C, S + 1, d]
    hook = encoder.norm.register_forward_hook(lambda m, i, out: outputs.append(out)) if token_landmarks else None
    cuda = input_ids.device.type == "cuda"
    try:
        with torch.autocast("cuda", torch.bfloat16) if cuda else contextlib.nullcontext():
            hidden = model.model.embeddings(input_ids)
            ctx = LayerContext(positions=torch.arange(input_ids.shape[1], device=input_ids.device))
            for layer in model.model.layers[:r]:
                hidden, ctx = layer(hidden, ctx)
            landmarks = ctx.memory.landmarks
            if token_landmarks:
                B, C, R, Dr = landmarks.shape
                landmarks = encoder.landmark_proj(outputs[0][:, :-1]).view(B, C, -1, R, Dr)
            return model.model.layers[r].queries(hidden), landmarks, hidden
    finally:
        if hook is not None:
            hook.remove()


def probe_scores(q_r: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
    """Chunk scores ``[B, T, R, C]`` (float32): the model's (:func:`chunk_scores`) for chunk landmarks ``[B, C, R,
    Dr]``; for token landmarks ``[B, C, S, R, Dr]`` a chunk scores its best token's ``q_r · landmark / sqrt(Dr)``."""
    if landmarks.dim() == 4:
        return chunk_scores(q_r, landmarks)
    with torch.autocast(q_r.device.type, enabled=False):
        products = torch.einsum("btrd,bcsrd->btrcs", q_r.float(), landmarks.float())
    return products.amax(-1) / q_r.shape[-1] ** 0.5


def scores_and_loss(
    model, input_ids: torch.Tensor, targets: torch.Tensor, token_landmarks: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids [B, T]``, ``targets [B, T, 2]`` -> the first retrieval layer's chunk scores ``[B, T, R, C]`` and
    its retrieval loss ``[]`` (both float32; see :func:`queries_and_landmarks` for ``token_landmarks``)."""
    q_r, landmarks, _ = queries_and_landmarks(model, input_ids, token_landmarks)
    scores = probe_scores(q_r, landmarks)
    return scores, scores_target_loss(scores, targets, model.config.chunk_size)


def batch(samples: list, tok, chunk_size: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Samples of one length -> ``input_ids [B, T]``, retrieval ``targets [B, T, 2]`` on ``device``."""
    ids = torch.as_tensor(np.stack([s.input_ids for s in samples]), device=device)
    targets = torch.as_tensor(np.stack([retrieval_targets(s, tok, chunk_size) for s in samples]), device=device)
    return ids, targets


def needle_metrics(scores: torch.Tensor, samples: list, targets: torch.Tensor, chunk_size: int, topk: int) -> dict:
    """``asked_first`` and ``asked_in_topk`` (head 0) at each sample's target positions, averaged."""
    first, in_topk = [], []
    for b, s in enumerate(samples):
        for p in torch.nonzero(targets[b, :, 0] >= 0).flatten().tolist():
            visible = scores[b, p, 0, : p // chunk_size]
            best = []
            for start, end in s.needles:
                chunks = torch.arange(start // chunk_size, min((end - 1) // chunk_size + 1, visible.numel()))
                best.append(visible[chunks].max() if chunks.numel() else torch.tensor(-torch.inf))
            asked = s.answer_needles[0] if s.answer_needles else s.target
            lo, hi = targets[b, p].tolist()
            first.append(float(int(torch.stack(best).argmax()) == asked))
            top = visible.topk(min(topk, visible.numel())).indices
            in_topk.append(float(bool(((top >= lo) & (top <= hi)).any())))
    return {"asked_first": float(np.mean(first)), "asked_in_topk": float(np.mean(in_topk))}


@contextlib.contextmanager
def pooled_keys(n: int):
    """Word keys drawn from ``n`` fixed pseudo-words while inside (the tasks module's word maker swapped)."""
    make = tasks._pseudo_word
    pool = [make(random.Random(i)) for i in range(n)]
    tasks._pseudo_word = lambda rng: rng.choice(pool)
    try:
        yield pool
    finally:
        tasks._pseudo_word = make


def same_key_neighbour(x: torch.Tensor, keys: list[str]) -> float:
    """``x [N, Dr]``: how often each row's nearest other row (cosine, after centring) has the row's key."""
    x = torch.nn.functional.normalize(x - x.mean(0), dim=-1)
    sim = x @ x.T
    sim.fill_diagonal_(-torch.inf)
    return float(np.mean([keys[j] == keys[i] for i, j in enumerate(sim.argmax(1).tolist())]))


def key_identity(model, tok, samples: list, pool: list[str], batch_size: int, token_landmarks: bool = False) -> dict:
    """``landmark_key_id``, ``query_key_id`` (head 0) and ``hidden_key_id`` (the retrieval layer's input at each
    needle key's last byte) on pooled-key ``samples`` (see the module docstring)."""
    S = model.config.chunk_size
    landmarks, landmark_keys, queries, query_keys, at_keys, at_key_keys = [], [], [], [], [], []
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            part = samples[i : i + batch_size]
            ids, targets = batch(part, tok, S, model.device)
            q_r, lm, hidden = queries_and_landmarks(model, ids, token_landmarks)
            for b, s in enumerate(part):
                needle_keys = []
                for start, end in s.needles:
                    text = tok.decode(s.input_ids[start:end])
                    key = next(k for k in pool if k in text)  # byte tokens: characters are positions
                    needle_keys.append(key)
                    last = start + text.index(key) + len(key) - 1  # the key's last byte
                    at_keys.append(hidden[b, last].float().cpu())
                    at_key_keys.append(key)
                    c = last // S
                    if c < lm.shape[1]:  # the chunk's landmark, or the token landmark of the key's last byte
                        landmarks.append((lm[b, c, last % S] if token_landmarks else lm[b, c])[0].float().cpu())
                        landmark_keys.append(key)
                for p in torch.nonzero(targets[b, :, 0] >= 0).flatten().tolist()[:1]:
                    queries.append(q_r[b, p, 0].float().cpu())
                    query_keys.append(needle_keys[s.answer_needles[0] if s.answer_needles else s.target])
    return {
        "landmark_key_id": same_key_neighbour(torch.stack(landmarks), landmark_keys),
        "query_key_id": same_key_neighbour(torch.stack(queries), query_keys),
        "hidden_key_id": same_key_neighbour(torch.stack(at_keys), at_key_keys),
    }


def evaluate(model, tok, samples: list, batch_size: int, token_landmarks: bool = False) -> dict:
    """Mean ``asked_first``, ``asked_in_topk`` and retrieval loss over ``samples`` (no gradients)."""
    c = model.config
    rows, losses = [], []
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            part = samples[i : i + batch_size]
            ids, targets = batch(part, tok, c.chunk_size, model.device)
            scores, loss = scores_and_loss(model, ids, targets, token_landmarks)
            rows.append((needle_metrics(scores.cpu(), part, targets.cpu(), c.chunk_size, c.topk), len(part)))
            losses.append((float(loss), len(part)))
    n = sum(k for _, k in rows)
    out = {key: sum(m[key] * k for m, k in rows) / n for key in rows[0][0]}
    out["retrieval_loss"] = sum(v * k for v, k in losses) / n
    return out


def run_arm(args, arm: str, tok, train_task, eval_samples: list, record: dict, save, identity=None) -> None:
    """Train ``arm`` for ``args.steps`` steps; ``record`` gets the trained parameter count and the evaluation curve,
    and ``save()`` runs after every evaluation (a run cut short keeps its curve so far). ``identity``: (pooled-key
    samples, the pool) for :func:`key_identity` at every evaluation too."""
    model = initial_model(args)
    torch.manual_seed(args.seed)
    tokens = args.landmarks == "max"
    if arm == "encoder2":
        add_encoder_layer(model)
    params = trainable(model, arm)
    model.eval()  # no dropout; gradients still flow
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    curve, seed, train_losses = [], 0, []  # every arm sees the same training samples
    record.update(trained_parameters=sum(p.numel() for p in params), curve=curve)
    t0 = time.time()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0:
            m = {
                "step": step,
                "seconds": round(time.time() - t0, 1),
                **evaluate(model, tok, eval_samples, args.batch, tokens),
            }
            if identity is not None:
                m.update(key_identity(model, tok, *identity, args.batch, tokens))
            m["train_retrieval_loss"] = float(np.mean(train_losses)) if train_losses else None
            train_losses = []
            curve.append(m)
            save()
            print(arm, json.dumps(m), flush=True)
        if step == args.steps:
            break
        samples = []
        for _ in range(args.batch):
            samples.append(train_task.generate(args.length, None, seed))
            seed += 1
        ids, targets = batch(samples, tok, model.config.chunk_size, args.device)
        _, loss = scores_and_loss(model, ids, targets, tokens)
        train_losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    if args.save_dir:
        Path(args.save_dir).mkdir(parents=True, exist_ok=True)
        save_model_file(model, Path(args.save_dir) / f"{arm}.safetensors", torch.float32)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    for arm, r in result["arms"].items():
        steps = [m["step"] for m in r["curve"]]
        line = axes[0].plot(steps, [m["asked_first"] for m in r["curve"]], marker="o", label=arm)[0]
        axes[1].plot(steps, [m["retrieval_loss"] for m in r["curve"]], marker="o", label=arm)
        if "landmark_key_id" in r["curve"][0]:
            for key, style in (("landmark_key_id", "-"), ("query_key_id", ":"), ("hidden_key_id", "--")):
                values = [m.get(key) for m in r["curve"]]
                axes[2].plot(steps, values, style, color=line.get_color(), label=f"{arm}: {key.split('_')[0]}")
    axes[2].axhline(1 / KEY_POOL, color="grey", ls="--", lw=1)
    axes[2].set(xlabel="step", ylabel="nearest other has the same key", ylim=(0, 1), title="key identity")
    axes[2].legend(fontsize=7)
    axes[0].axhline(1 / result["num_keys"], color="grey", ls="--", lw=1, label="chance")
    axes[0].set(xlabel="step", ylabel="asked needle first", ylim=(0, 1), title=f"unseen {result['eval_haystack']}")
    axes[1].set(xlabel="step", ylabel="retrieval loss", title="retrieval loss (unseen haystack)")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"retrieval loss alone, one part trained ({result['model']}, {result.get('task', 'niah_multikey')}, "
        f"{result['length']} tokens, landmarks {result.get('landmarks', 'cls')}, lr {result['lr']:g})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-ruler", help="a shipped model's name or a model file or run folder")
    ap.add_argument(
        "--fresh", default="", help="start from a fresh model of this layout instead: PRESET[:key=value...]"
    )
    ap.add_argument("--arms", default="query,encoder,encoder2,below")
    ap.add_argument("--train-haystacks", default="data/linux-doc,data/gcide,data/shakespeare")
    ap.add_argument("--eval-haystack", default="data/python-doc")
    ap.add_argument(
        "--task", default="niah_multikey", help="a task spec (4 keys unless it says), e.g. niah_multikey:phrasing=1"
    )
    ap.add_argument(
        "--landmarks",
        default="cls",
        choices=("cls", "max"),
        help="cls: the model's chunk landmarks; max: a what-if, a chunk scores its best token (the landmark projection "
        "of every token's encoder output), not what the model does",
    )
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-samples", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu (float32) or cuda (bf16 autocast, as training)")
    ap.add_argument("--save-dir", default="", help="also save each arm's model there (ARM.safetensors, float32)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "retrieval_supervision_probe.json"))
    args = ap.parse_args()
    arms = args.arms.split(",")
    for arm in arms:
        if arm not in ARMS:
            ap.error(f"--arms: unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    tok = ByteTokenizer()
    train_hay = MixedHaystack([TokenFileHaystack(p, tok) for p in args.train_haystacks.split(",")])
    name, params = parse_task_spec(args.task)
    params = {"num_keys": 4, **params}
    train_task = make_task(name, tok, train_hay, **params)
    eval_task = make_task(name, tok, TokenFileHaystack(args.eval_haystack, tok), **params)
    depths = (0.0, 0.25, 0.5, 0.75, 1.0)
    eval_samples = [
        eval_task.generate(args.length, depths[i % len(depths)], 10_000_000 + i) for i in range(args.eval_samples)
    ]
    identity = None
    if eval_task.key_format == "word" and not eval_task.vary:
        with pooled_keys(KEY_POOL) as pool:
            identity = [eval_task.generate(args.length, None, 20_000_000 + i) for i in range(args.eval_samples)], pool
    result = {
        "model": f"fresh {args.fresh}" if args.fresh else args.model,
        "length": args.length,
        "task": args.task,
        "num_keys": params["num_keys"],
        "batch": args.batch,
        "lr": args.lr,
        "landmarks": args.landmarks,
        "train_haystacks": args.train_haystacks,
        "eval_haystack": Path(args.eval_haystack).name,
        "date": time.strftime("%Y-%m-%d"),
        "machine": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} threads",
        "dtype": "bf16 autocast" if args.device.startswith("cuda") else "float32",
        "arms": {},
    }
    out = Path(args.out)

    def save():
        out.write_text(json.dumps(result, indent=1))
        plot(result, out.with_suffix(".png"))

    for arm in arms:
        run_arm(args, arm, tok, train_task, eval_samples, result["arms"].setdefault(arm, {}), save, identity)
    print("wrote", out)


if __name__ == "__main__":
    main()
