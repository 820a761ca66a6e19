"""lm-evaluation-harness: the `ramba` model against ramba's own scoring, the exported tasks against
`ramba eval tasks`, and the harness's three request types against a plain full forward."""

import json

import lm_eval
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from ramba.data.tokenizer import ByteTokenizer, load_tokenizer
from ramba.eval.harness import RambaLM
from ramba.eval.harness_tasks import export_harness_tasks, harness_task_name, process_results, sample_from_doc
from ramba.eval.loading import load_model_tokenizer
from ramba.eval.tasks import GenerationSettings, build_task, evaluate_task


def _harness(model, names, task_dir, **model_args):
    """`{task: [(doc, prediction, score)]}` and `{task: mean score}` from lm-eval over the exported tasks."""
    lm = model if isinstance(model, RambaLM) else None
    out = lm_eval.simple_evaluate(
        model=lm or "ramba",
        model_args=None if lm else {"pretrained": str(model), **model_args},
        tasks=names,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
    )
    samples = {n: [(s["doc"], s["filtered_resps"][0], s["score"]) for s in out["samples"][n]] for n in names}
    return samples, {n: out["results"][n]["score,none"] for n in names}


def _check_agreement(model, tok, specs, length, depths, samples, task_dir, harness_model):
    names = export_harness_tasks(task_dir, tok, specs, [length], depths, samples, seed=3)
    got, means = _harness(harness_model, names, task_dir)
    for spec, name in zip(specs, names):
        cells = evaluate_task(model, build_task(spec, tok), [length], depths, samples, GenerationSettings(), seed=3)
        ours = {(c.depth, r["seed"]): (r["prediction"], r["score"]) for c in cells for r in c.samples}
        theirs = {(doc["depth"], doc["seed"]): (prediction, score) for doc, prediction, score in got[name]}
        assert theirs == ours
        assert means[name] == pytest.approx(sum(c.score for c in cells) / len(cells))
    return means


def test_harness_agrees_with_ramba_on_a_random_model(model_dir, tmp_path):
    model, tok = load_model_tokenizer(model_dir)
    _check_agreement(model, tok, ["passkey", "niah_single"], 360, [1.0], 1, tmp_path, model_dir)


def test_harness_agrees_with_ramba_on_the_shipped_model(tmp_path):
    model, tok = load_model_tokenizer("tiny-ruler")
    harness_model = RambaLM(pretrained="tiny-ruler", segment_len=128)
    means = _check_agreement(model, tok, ["passkey"], 300, [0.5], 1, tmp_path, harness_model)
    assert means == {"ramba_passkey_300": 1.0}  # the shipped model finds the key at this length


def _full_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_loglikelihood_and_rolling_match_a_full_forward(model_dir, mode):
    lm = RambaLM(pretrained=str(model_dir), segment_len=16, mode=mode)
    tok = lm.ramba_tokenizer
    context, continuation = "The quick brown fox jumps over the lazy dog." * 2, " The end."
    ((logprob, greedy),) = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    ids = [tok.bos_id] + tok.encode(context + continuation)
    n_ctx = 1 + len(tok.encode(context))
    ref = _full_logprobs(lm.model, ids)
    targets = torch.tensor(ids[n_ctx:])
    rows = ref[n_ctx - 1 : -1]
    if mode == "exact":  # fast skips HSA in the context's earlier segments: close, not equal
        assert logprob == pytest.approx(float(rows.gather(1, targets[:, None]).sum()), abs=1e-3)
    assert greedy == bool((rows.argmax(-1) == targets).all())

    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (context,), 0)])
    ids = [lm.prefix_token_id] + tok.encode(context)
    ref = _full_logprobs(lm.model, ids)
    assert rolling == pytest.approx(float(ref[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum()), abs=1e-3)


def test_generate_until_is_greedy_decoding_cut_at_until(model_dir):
    lm = RambaLM(pretrained=str(model_dir), segment_len=16, batch_size=2)
    tok = lm.ramba_tokenizer
    prompt = "Once upon a time, in a land far away, "
    ids = [tok.bos_id] + tok.encode(prompt)
    expected = []
    with torch.no_grad():
        for _ in range(12):
            expected.append(int(lm.model(input_ids=torch.tensor([ids + expected])).logits[0, -1].argmax()))
    text = tok.decode(expected[: expected.index(tok.eos_id)] if tok.eos_id in expected else expected)
    assert len(text) >= 4
    stop = text[2:4]
    requests = [
        Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 12}), 0),
        Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 12}), 1),
    ]
    assert lm.generate_until(requests) == [text, text.split(stop)[0]]
    with pytest.raises(ValueError, match="unsupported generation_kwargs"):
        lm.generate_until([Instance("generate_until", {}, (prompt, {"top_p": 0.9}), 0)])


def _word_tokenizer(path):
    """A word-level `tokenizer.json` in `path`: `<s>` 0, `</s>` 1, `<unk>` 2, then the, key, is, 42, `.`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "<unk>", "the", "key", "is", "42", "."])}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


def test_hf_tokenizer_model(tmp_path):
    from eval_helpers import tiny_model

    tokenizer_file = _word_tokenizer(tmp_path)
    tiny_model(vocab_size=16).save_pretrained(tmp_path)  # tokenizer.json beside the weights is the model's
    lm = RambaLM(pretrained=str(tmp_path))
    assert lm.ramba_tokenizer.name == str(tokenizer_file)
    assert lm.tok_encode("the key is 42") == [0, 3, 4, 5, 6]  # bos first, as for the byte tokenizer
    ((logprob, _),) = lm.loglikelihood([Instance("loglikelihood", {}, ("the key is", " 42 ."), 0)])
    ref = _full_logprobs(lm.model, [0, 3, 4, 5, 6, 7])
    assert logprob == pytest.approx(float(ref[3, 6] + ref[4, 7]), abs=1e-4)


def test_export_writes_ramba_samples_and_scores_them_with_the_task_scorer(tmp_path):
    tok = ByteTokenizer()
    names = export_harness_tasks(
        tmp_path, tok, ["passkey", "variable_tracking:num_hops=2"], [360, 400], [0.0, 1.0], 2, seed=5, extra_tokens=4
    )
    assert names == [
        "ramba_passkey_360",
        "ramba_passkey_400",
        "ramba_variable_tracking_num_hops_2_360",
        "ramba_variable_tracking_num_hops_2_400",
    ]
    assert harness_task_name("passkey", 4096) == "ramba_passkey_4k"
    task = build_task("variable_tracking:num_hops=2", tok)
    docs = [json.loads(line) for line in (tmp_path / f"{names[3]}.jsonl").read_text().splitlines()]
    assert [(d["depth"], d["seed"]) for d in docs] == [(0.0, 5), (0.0, 6), (1.0, 5), (1.0, 6)]
    for doc in docs:
        sample = task.generate(400, doc["depth"], seed=doc["seed"])
        assert [tok.bos_id] + tok.encode(doc["prompt"]) == sample.input_ids[: sample.prompt_len].tolist()
        assert sample_from_doc(doc).answers == sample.answers
        for prediction in (sample.answer, " ".join(sample.answers[:1]), "nothing"):
            assert process_results(doc, [prediction]) == {"score": task.score(sample, prediction)}
    longest = max(len(task.generate(400, d["depth"], seed=d["seed"]).answer_ids) for d in docs)
    assert f"max_gen_toks: {longest + 4}" in (tmp_path / f"{names[3]}.yaml").read_text()
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    assert set(tm.all_tasks) >= {*names, "ramba_tasks", "ramba_passkey"}


def test_export_warns_when_prompts_do_not_encode_back(tmp_path, caplog):
    tok = load_tokenizer(_word_tokenizer(tmp_path))  # unknown words decode to "<unk>", which encodes otherwise
    export_harness_tasks(tmp_path / "tasks", tok, ["passkey"], [300], [0.5], 1)
    assert "1 of 1 prompts do not encode back" in caplog.text


def test_cli_export_harness(model_dir, tmp_path, capsys):
    from ramba.cli.main import main

    out = tmp_path / "tasks"
    assert (
        main(
            [
                "eval",
                "tasks",
                "--model",
                str(model_dir),
                "--tasks",
                "passkey",
                "--lengths",
                "256",
                "--depths",
                "0.5",
                "--samples",
                "2",
                "--export-harness",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "ramba_passkey_256" in printed and f"--include_path {out}" in printed
    assert len((out / "ramba_passkey_256.jsonl").read_text().splitlines()) == 2
    assert not list(tmp_path.glob("eval_results"))  # exporting evaluates nothing
