"""The typed record of a run: what ``layercut.json`` holds next to the weights, and what ``compare`` keeps per cell.

Every writer builds these models and every reader goes through :func:`read_record`, which also loads the files of
older layercut versions (schema 1: the same layout without ``schema_version``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from layercut.errors import LayercutError

SCHEMA_VERSION = 2
RECORD_FILE = "layercut.json"


class Model(BaseModel):
    """Base of every record part: unknown keys are an error, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid")


class SearchSummary(Model):
    """How the segments were chosen: the hard-cut KL on the calibration windows (None for given segments)."""

    kl: float | None
    seconds: float
    evaluations: int = 0


class HealReport(Model):
    """What the heal trained and how the loss moved; ``steps`` 0 means nothing was trained."""

    name: str  # the heal: none, endpoints, ...
    layers: list[int] = []
    lora_rank: int = 0
    trainable_parameters: int = 0
    learning_rate: float | None = None
    steps: int = 0
    loss: str | None = None
    first_loss: float | None = None
    last_loss: float | None = None
    seconds: float = 0.0


class PerplexityRecord(Model):
    """Perplexity on held-out windows: dense, right after the cut, and after the heal."""

    before: float
    after_cut: float
    after: float
    text: str | None = None
    windows: int | None = None
    seq_len: int | None = None
    # mean next-token NLL per test window, dense and healed, for paired comparisons (layercut.paired)
    window_nll_before: list[float] | None = None
    window_nll_after: list[float] | None = None


class TaskScore(Model):
    """One task's scores; ``correct`` (``correct_norm``) holds per item, in lm-eval's document order, 1 where acc
    (acc_norm) counted it right, for paired comparisons; ``perplexity`` is a word-prediction task's (LAMBADA)."""

    acc: float
    acc_norm: float | None = None
    items: int
    acc_stderr: float | None = None
    acc_norm_stderr: float | None = None
    perplexity: float | None = None
    correct: str | None = None
    correct_norm: str | None = None


class Average(Model):
    acc: float
    acc_norm: float


class ZeroShot(Model):
    """lm-eval zero-shot accuracy per task and on average over ``average_tasks`` (the commonsense tasks scored:
    MMLU and LAMBADA are reported apart; ``acc_norm`` falls back to ``acc`` in the average). Records without
    ``average_tasks`` averaged every task."""

    tasks: dict[str, TaskScore]
    average: Average
    average_tasks: list[str] | None = None
    lm_eval_version: str
    metric: str
    limit: int | None = None


class Retained(Model):
    pruned: float
    dense: float
    chance: float
    retention: float | None
    retention_above_chance: float | None


class Retention(Model):
    """pruned / dense accuracy, and (pruned − chance) / (dense − chance), per task and for the average."""

    metric: str
    tasks: dict[str, Retained]
    average: Retained


class ZeroShotComparison(Model):
    before: ZeroShot
    after: ZeroShot
    retention: Retention


class Speed(Model):
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    batch_size: int
    prompt_tokens: int
    new_tokens: int


class SpeedComparison(Model):
    """Dense and pruned speed, their ratios, and the ratio's limit L / (L − n)."""

    before: Speed
    after: Speed
    limit: float
    prefill_ratio: float
    decode_ratio: float


class TextAgreement(Model):
    """The pruned model against the dense one on held-out windows, every position: the mean KL(dense ‖ pruned) of
    the next-token distributions (nats) and the share of positions where their most likely token is the same."""

    kl: float
    top1: float
    tokens: int
    windows: int
    seq_len: int
    window_kl: list[float] | None = None  # per window: its mean KL over its positions (paired comparisons)
    window_top1: list[float] | None = None  # per window: its share of agreeing positions


class GenerationAgreement(Model):
    """Greedy continuations of ``new_tokens`` tokens from held-out prompts, pruned against dense: the mean length
    of the prefix that matches the dense continuation, and the share of prompts whose first ``match_tokens``
    tokens all match."""

    prompts: int
    prompt_tokens: int
    new_tokens: int
    mean_prefix: float
    match_tokens: int
    share_matching: float
    prefix: list[int] | None = None  # per prompt: the length of its matching prefix (paired comparisons)


class Agreement(Model):
    """Agreement with the dense model: per text (its test windows) and in generation."""

    texts: dict[str, TextAgreement] = {}
    generation: GenerationAgreement | None = None


class Metrics(Model):
    perplexity: PerplexityRecord | None = None
    zero_shot: ZeroShotComparison | None = None
    speed: SpeedComparison | None = None
    agreement: Agreement | None = None


class Measures(Model):
    """What one evaluation of one model found (the evaluate stage's result)."""

    perplexity: float | None = None
    window_nll: list[float] | None = None  # mean next-token NLL per test window
    zero_shot: ZeroShot | None = None
    speed: Speed | None = None
    memory_footprint_bytes: int | None = None
    peak_gpu_bytes: int | None = None


class Quantization(Model):
    """How the weights were quantized, by which library, and what it cost (sizes, memory, measures)."""

    scheme: str
    description: str
    library: str
    library_version: str | None
    loader: str
    loader_version: str | None
    size_before_bytes: int
    size_after_bytes: int
    size_ratio: float | None
    calibration_windows: list[int] | None = None
    group_size: int | None = None
    before: Measures = Measures()
    after: Measures = Measures()


class GgufParity(Model):
    """llama.cpp against transformers on the same held-out windows: perplexities, top-1 agreement, mean KL
    (transformers || llama.cpp, nats per token), and the bounds they were held to."""

    windows: int
    seq_len: int
    perplexity_transformers: float
    perplexity_llama_cpp: float
    perplexity_change: float
    top1_agreement: float
    mean_kl: float
    bounds: dict[str, float]


class GgufExport(Model):
    """One GGUF file written next to the checkpoint, by llama.cpp's converter (and quantizer), and its parity."""

    file: str
    type: str
    description: str
    size_bytes: int
    llama_cpp: str
    model_description: str  # what llama.cpp's loader made of it: architecture, type from the layer count, file type
    layer_pattern: str  # "matches", "written: ..." or "ignored: ..."
    warnings: list[str] = []
    parity: GgufParity


class RunRecord(Model):
    """``layercut.json``: the removed segments in the original model's indices, how they were chosen and healed,
    the metrics before and after, the resolved recipe, versions and seed. Fields of the pruning stay None in the
    record of a checkpoint that layercut only quantized."""

    schema_version: int = SCHEMA_VERSION
    source: str
    segments: list[tuple[int, int]] | None = None
    method: str | None = None
    heal: str | None = None
    num_layers_before: int | None = None
    num_layers_after: int | None = None
    parameters_before: int | None = None
    parameters_after: int | None = None
    search: SearchSummary | None = None
    healing: HealReport | None = None
    metrics: Metrics = Metrics()
    seed: int | None = None
    recipe: dict[str, Any] | None = None
    versions: dict[str, str] = {}
    seconds: float | None = None
    quantization: Quantization | None = None
    gguf: list[GgufExport] | None = None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


class Paired(Model):
    """A paired difference against a reference (``layercut.paired``): the estimate with its bootstrap interval at
    ``level``; ``tie`` when the interval holds 0."""

    reference: str
    estimate: float
    low: float
    high: float
    items: int
    level: float
    tie: bool


class CompareRow(Model):
    """One selection method's cell of ``layercut compare``: its cut, heal and measures; against the first method,
    the paired differences of log perplexity and of average accuracy (None where a side kept no per-item data)."""

    method: str
    segments: list[tuple[int, int]]
    kl: float | None
    search_seconds: float
    perplexity_cut: float
    perplexity: float
    heal: str
    trainable_parameters: int
    heal_seconds: float
    zero_shot: ZeroShot | None = None
    retention: Retained | None = None
    agreement: Agreement | None = None
    seconds: float = 0.0
    window_nll: list[float] | None = None
    log_perplexity_vs: Paired | None = None
    accuracy_vs: Paired | None = None


class DenseRow(Model):
    perplexity: float
    layers: int
    zero_shot: ZeroShot | None = None


class CompareResult(Model):
    """``compare.json``: the dense model and one row per method, measured under one protocol."""

    model: str
    remove: int
    dense: DenseRow
    rows: list[CompareRow]
    recipe: dict[str, Any]
    versions: dict[str, str]


def upgrade(data: dict) -> dict:
    """A parsed ``layercut.json`` of any schema, in the current schema's layout."""
    version = data.get("schema_version", 1)
    if version > SCHEMA_VERSION:
        raise LayercutError(f"layercut.json has schema {version}, newer than this layercut reads "
                            f"({SCHEMA_VERSION}); upgrade layercut")
    data = {**data, "schema_version": SCHEMA_VERSION}
    if version == 1 and isinstance(data.get("healing"), dict) and "recipe" in data["healing"]:
        healing = dict(data["healing"])  # schema 1 named the heal "recipe"
        healing["name"] = healing.pop("recipe")
        data["healing"] = healing
    return data


def read_record(folder: str | Path) -> RunRecord:
    """The :class:`RunRecord` in ``folder``/layercut.json, of this schema or an older one."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        raise LayercutError(f"{folder} has no {RECORD_FILE}; give a folder written by `layercut prune`")
    try:
        return RunRecord.model_validate(upgrade(json.loads(path.read_text(encoding="utf-8"))))
    except (ValueError, ValidationError) as error:
        raise LayercutError(f"{path} is not a layercut record ({str(error).splitlines()[0]}); it may be damaged: "
                            "write it again with `layercut prune`") from error


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that shaped a result."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("layercut", "torch", "transformers", "accelerate", "peft", "lm-eval"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


class SweepRow(Model):
    """One size of ``layercut sweep``: its cut, perplexity right after the cut and healed, and what was measured
    against the dense model (zero-shot retention, agreement, speed)."""

    remove: int
    segments: list[tuple[int, int]]
    method: str
    kl: float | None
    search_seconds: float
    perplexity_cut: float
    perplexity: float
    heal: str
    heal_seconds: float
    zero_shot: ZeroShot | None = None
    retention: Retained | None = None
    agreement: Agreement | None = None
    speed: SpeedComparison | None = None
    seconds: float = 0.0


class SweepResult(Model):
    """``sweep.json``: the dense model and one row per number of layers removed, under one protocol."""

    model: str
    layers: int
    dense: DenseRow
    rows: list[SweepRow]
    recipe: dict[str, Any]
    versions: dict[str, str]
