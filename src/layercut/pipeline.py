"""The pipeline: load → calibrate → search → cut → heal → evaluate → export (→ quantize), composed from the stages."""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from layercut import heal, selection
from layercut.config import Recipe, SearchOptions, dump_recipe, to_dict
from layercut.data import Windows, calibrate
from layercut.errors import LayercutError
from layercut.evaluate import (
    DenseReference,
    agreement,
    compare_measures,
    dense_reference,
    evaluate,
    perplexity,
)
from layercut.export import export
from layercut.files import check_output, staged_folder
from layercut.gate import SearchResult
from layercut.layers import Cut, Handle, cut, text_part
from layercut.load import load_config, load_model, resolve_device
from layercut.record import (
    Agreement,
    DenseRow,
    HealReport,
    Measures,
    RunRecord,
    SearchSummary,
    SweepResult,
    SweepRow,
    library_versions,
    read_record,
)
from layercut.report import search_charts, sweep_chart, sweep_table

logger = logging.getLogger(__name__)


def announcer(progress=None):
    """``stage(name, total=None)``: log a stage and tell the CLI's ``progress(name, total)``, which may return a
    callable taking units done (a progress bar)."""

    def stage(name: str, total: int | None = None):
        logger.info("%s", name)
        return progress(name, total) if progress is not None else None

    return stage


def check_before_work(model_name: str, recipe: Recipe, output: str | Path | None = None,
                      overwrite: bool = False, cuts: bool = True):
    """Everything that can be refused before any weight is loaded (the options themselves are validated when the
    recipe is built): the output folder, the quantization scheme, and the recipe against the model's config
    (window length; with ``cuts``, the segments or removal count and the heal's teacher top-k). Returns the
    config."""
    if output is not None:
        check_output(output, overwrite, protected=[model_name] if Path(model_name).expanduser().exists() else [])
    if recipe.export.format == "gguf":
        from layercut.gguf import check_llama_cpp

        if recipe.quantization.quantize:
            raise LayercutError(f"--quantize {recipe.quantization.quantize} writes a compressed-tensors or bitsandbytes "
                                "checkpoint, which llama.cpp does not read: with --format gguf, quantize through "
                                "--gguf-type (q8_0, q4_k_m)")
        check_llama_cpp()
    if recipe.quantization.quantize:
        from layercut.quantize import check_scheme

        check_scheme(recipe.quantization.quantize, resolve_device(recipe.model.device))
    _, config = load_config(model_name, recipe.model)
    text = text_part(config)
    positions = getattr(text, "max_position_embeddings", None)
    if positions and recipe.data.seq_len > positions:
        raise LayercutError(f"--seq-len {recipe.data.seq_len} is longer than the model's {positions} positions "
                            f"(max_position_embeddings): use a smaller --seq-len (at most {positions})")
    if not cuts:
        return config
    heal = recipe.heal
    if heal.heal != "none" and heal.heal_loss == "kl" and heal.heal_top_k > text.vocab_size:
        raise LayercutError(f"--heal-top-k {heal.heal_top_k} is more than the model's vocabulary of "
                            f"{text.vocab_size} tokens; use at most {text.vocab_size}")
    selection.plan(recipe.search, text.num_hidden_layers)
    return config


def prune(model_name: str, recipe: Recipe, output: str | Path, overwrite: bool = False, progress=None) -> RunRecord:
    """Run the whole pipeline and export the pruned checkpoint to ``output``; return the record it wrote.

    ``progress(stage, total)`` is called as each stage starts, for the CLI's display; for stages of ``total``
    units it may return a callable that is called with the units done (a progress bar).
    """
    stage, started = announcer(progress), time.perf_counter()
    check_before_work(model_name, recipe, output, overwrite)
    stage("load")
    handle = load_model(model_name, recipe.model)
    stage("calibration data")
    windows = calibrate(handle.tokenizer, recipe.data)
    dense = evaluate(handle.model, handle.tokenizer, windows.test, recipe.evaluation, recipe.data.batch_size, recipe.data.seed,
                     stage("dense evaluation", windows.test.shape[0]))
    reference = dense_outputs(handle, recipe, stage, copy_head=heal.HEALS[recipe.heal.heal].tail)
    found = selection.search(handle, windows.calibration, recipe.search, recipe.data.batch_size, recipe.data.seed,
                             stage(f"search ({recipe.search.method})", selection.search_steps(recipe.search)))
    prepared = heal.before_cut(handle, found.segments, heal.prepare(handle, recipe.heal, recipe.data), recipe.heal)
    stage("cut")
    removed = cut(handle, heal.planned_cut(found.segments, recipe.heal))
    after_cut = cut_perplexity(handle, windows, recipe, stage)
    report = heal.heal(handle, removed, prepared, recipe.heal, recipe.data.seed,
                       stage(f"heal ({recipe.heal.heal})", recipe.heal.heal_steps))
    pruned = evaluate(handle.model, handle.tokenizer, windows.test, recipe.evaluation, recipe.data.batch_size, recipe.data.seed,
                      stage("pruned evaluation", windows.test.shape[0]))
    record = run_record(model_name, recipe, found, removed, report, dense, pruned, after_cut, windows, started)
    record.metrics.agreement = measure_agreement(handle, reference, recipe, stage)
    return finish(handle, record, recipe, windows, pruned, found, output, overwrite, stage)


def dense_outputs(handle: Handle, recipe: Recipe, stage, copy_head: bool = False) -> DenseReference | None:
    """What the agreement measures need from the dense model, when the recipe asks for them; call before the cut.
    ``copy_head``: keep a copy of the output head, for a heal that trains it."""
    if not recipe.evaluation.agreement:
        return None
    stage("dense outputs for the agreement")
    return dense_reference(handle.model, handle.tokenizer, recipe.evaluation, recipe.data, copy_head)


def dense_model_outputs(model_name: str, recipe: Recipe) -> DenseReference:
    """The dense outputs of the model ``model_name``, for the agreement of another (pruned) model with it; of the
    dense model only its output head stays in memory."""
    handle = load_model(model_name, recipe.model)
    return dense_reference(handle.model, handle.tokenizer, recipe.evaluation, recipe.data)


def measure_agreement(handle: Handle, reference: DenseReference | None, recipe: Recipe, stage) -> Agreement | None:
    """The pruned model's agreement with the dense outputs in ``reference`` (None without a reference)."""
    if reference is None:
        return None
    stage("agreement with the dense model")
    return agreement(handle.model, reference, recipe.data.batch_size, recipe.evaluation.generation_batch)


def cut_perplexity(handle: Handle, windows: Windows, recipe: Recipe, stage) -> float | None:
    """Perplexity right after the cut, when a heal will change it (else the pruned evaluation measures it)."""
    if recipe.heal.heal == "none":
        return None
    return perplexity(handle.model, windows.test, recipe.data.batch_size,
                      stage("perplexity after the cut", windows.test.shape[0]))


def run_record(model_name: str, recipe: Recipe, found: SearchResult, removed: Cut, report: HealReport,
               dense: Measures, pruned: Measures, after_cut: float | None, windows: Windows,
               started: float) -> RunRecord:
    """The record of a prune: what was cut, how it was chosen and healed, and the metrics before and after."""
    return RunRecord(
        source=model_name, segments=removed.segments, method=found.method, heal=recipe.heal.heal,
        num_layers_before=removed.layers_before, num_layers_after=removed.layers_after,
        parameters_before=removed.parameters_before, parameters_after=removed.parameters_after,
        search=SearchSummary(kl=None if math.isnan(found.kl) else found.kl, seconds=found.seconds,
                             evaluations=found.evaluations),
        healing=report,
        metrics=compare_measures(dense, pruned, removed.layers_before, removed.layers_after, after_cut,
                                 recipe.data.ppl, windows.test),
        seed=recipe.data.seed, recipe=to_dict(recipe), versions=library_versions(),
        seconds=time.perf_counter() - started)


def finish(handle: Handle, record: RunRecord, recipe: Recipe, windows: Windows, pruned: Measures,
           found: SearchResult, output: str | Path, overwrite: bool, stage) -> RunRecord:
    """Export the pruned checkpoint with its search charts; with a quantization scheme, export it to a scratch
    folder and quantize that into ``output``, evaluated as the pruned model was."""
    stage("export")
    scheme = recipe.quantization.quantize
    with tempfile.TemporaryDirectory() as scratch:
        charts = search_charts(found, Path(scratch))
        if not scheme:
            export(handle, record, dump_recipe(recipe), output, overwrite, charts, protected=[record.source],
                   formats=recipe.export, test_windows=windows.test)
            return record
        folder = export(handle, record, dump_recipe(recipe), Path(scratch) / "pruned", False, charts)
        device, dtype = handle.model.get_input_embeddings().weight.device, next(handle.model.parameters()).dtype
        handle.model = None
        stage(f"quantize ({scheme})")
        quantize_folder(folder, output, recipe, windows, device, dtype, overwrite, pruned)
    return read_record(output)


def quantize_folder(source: str | Path, output: str | Path, recipe: Recipe, windows: Windows, device, dtype,
                    overwrite: bool = False, source_measures: Measures | None = None, evaluate_after: bool = True
                    ) -> Path:
    """Quantize the checkpoint ``source`` with the recipe's scheme into ``output``; the quantized model (and the
    source, unless ``source_measures`` holds its results) is evaluated as a pruned model is: perplexity on the
    test windows, the recipe's zero-shot tasks and speed."""
    from layercut.quantize import SCHEMES, quantize_checkpoint

    calibrated = SCHEMES[recipe.quantization.quantize].calibrated
    return quantize_checkpoint(source, output, recipe.quantization, windows.calibration if calibrated else None,
                               overwrite, device, dtype, evaluator(recipe, windows) if evaluate_after else None,
                               source_measures)


def evaluator(recipe: Recipe, windows: Windows):
    """``evaluate(model, tokenizer) -> Measures`` as the recipe asks, for models outside a handle."""

    def evaluate_model(model, tokenizer) -> Measures:
        return evaluate(model, tokenizer, windows.test, recipe.evaluation, recipe.data.batch_size, recipe.data.seed)

    return evaluate_model


# ----------------------------------------------------------------------------------------------- sweep


def parse_sizes(text: str, kind: type = int) -> list:
    """The sizes of a sweep from ``START:STOP`` (both ends included, step 1), ``START:STOP:STEP`` or a comma list
    (``2,4,8``), as ``kind`` (int: layer counts; float: ratios), ascending and without repeats."""
    name = "--remove" if kind is int else "--ratio"
    example = "2:10, 2:10:2 or 2,4,8" if kind is int else "0.1:0.4:0.1 or 0.1,0.25"
    try:
        if ":" in text:
            parts = [kind(part) for part in text.split(":")]
            if len(parts) not in (2, 3):
                raise ValueError(text)
            start, stop, step = (*parts, kind(1))[:3] if len(parts) == 2 else parts
            if step <= 0 or stop < start:
                raise ValueError(text)
            count = math.floor((stop - start) / step + 1e-9) + 1
            values = [round(start + index * step, 10) if kind is float else start + index * step
                      for index in range(count)]
        else:
            values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LayercutError(f"{name} {text!r} is not START:STOP[:STEP] (both ends included) or a comma-separated "
                            f"list; write e.g. {example}") from None
    if not values:
        raise LayercutError(f"{name} {text!r} names no size; write e.g. {example}")
    return sorted(set(values))


def sweep_sizes(search: SearchOptions, total: int, remove: Sequence[int] = (), ratio: Sequence[float] = ()
                ) -> list[int]:
    """Numbers of layers to remove, each checked as ``--remove`` would be (ratios rounded to whole layers)."""
    if bool(remove) == bool(ratio):
        raise LayercutError("say which sizes to sweep: --remove (e.g. 2:10) or --ratio (e.g. 0.1:0.4:0.1), one of them")
    if search.segment:
        raise LayercutError("sweep chooses the segments at each size; --segment gives them: use layercut prune")
    sizes = [{"remove": n, "ratio": None} for n in remove] + [{"remove": None, "ratio": r} for r in ratio]
    counts = sorted({selection.removal_count(search.replace(**size), total) for size in sizes})
    if ratio and len(counts) < len(ratio):
        logger.info("the ratios round to %d distinct sizes of %d layers: %s", len(counts), total, counts)
    return counts


@dataclass
class Shared:
    """What every size of a sweep shares: the windows, the dense measures and outputs, the heal's data (with its
    teacher targets) and the exact scorer of the search's dense pass."""

    windows: Windows
    dense: Measures
    reference: DenseReference
    prepared: heal.HealData | None
    scorer: object | None


def sweep(model_name: str, recipe: Recipe, remove: Sequence[int] = (), ratio: Sequence[float] = (),
          output: str | Path | None = None, overwrite: bool = False, progress=None) -> SweepResult:
    """Prune ``model_name`` once per size (``remove``: layer counts, or ``ratio``: fractions) with the recipe's
    method and heal, and measure each against the dense model: perplexity after the cut and healed, the recipe's
    zero-shot tasks, the agreement with the dense model and the speed-up. The calibration windows, the dense
    measures and outputs, the heal's teacher targets and the search's dense pass are computed once. With
    ``output``, writes ``sweep.json``, ``sweep.md`` and ``sweep.png`` there (checked before any work)."""
    from layercut.gate import exact_scorer

    stage = announcer(progress)
    recipe = recipe.replace(evaluation=recipe.evaluation.replace(agreement=True, speed=True))
    config = check_before_work(model_name, recipe, cuts=False)
    sizes = sweep_sizes(recipe.search, text_part(config).num_hidden_layers, remove, ratio)
    if output is not None:
        check_output(output, overwrite, protected=[model_name] if Path(model_name).expanduser().exists() else [],
                     marker="sweep.json", kind="layercut sweep")
    check_before_work(model_name, recipe.replace(search=recipe.search.replace(remove=sizes[0], ratio=None)))
    stage("load")
    handle = load_model(model_name, recipe.model)
    windows = calibrate(handle.tokenizer, recipe.data)
    dense = evaluate(handle.model, handle.tokenizer, windows.test, recipe.evaluation, recipe.data.batch_size,
                     recipe.data.seed, stage("dense evaluation", windows.test.shape[0]))
    reference = dense_outputs(handle, recipe, stage)
    exact = recipe.search.method in selection.SEGMENTED_METHODS
    scorer = exact_scorer(handle, windows.calibration, recipe.search, recipe.data.batch_size) if exact else None
    shared = Shared(windows, dense, reference, heal.prepare(handle, recipe.heal, recipe.data), scorer)
    rows = [sweep_size(handle, recipe, count, shared, stage) for count in sizes]
    result = SweepResult(model=model_name, layers=handle.num_layers,
                         dense=DenseRow(perplexity=dense.perplexity, layers=handle.num_layers,
                                        zero_shot=dense.zero_shot),
                         rows=rows, recipe=to_dict(recipe), versions=library_versions())
    if output is not None:
        write_sweep(result, output, overwrite)
    return result


def sweep_size(handle: Handle, recipe: Recipe, remove: int, shared: Shared, stage) -> SweepRow:
    """One size of a sweep: search on the dense ``handle``, then cut, heal and measure a copy of it."""
    started, batch_size, seed = time.perf_counter(), recipe.data.batch_size, recipe.data.seed
    options = recipe.search.replace(remove=remove, ratio=None)
    found = selection.search(handle, shared.windows.calibration, options, batch_size, seed,
                             stage(f"{remove} layers: search ({options.method})", selection.search_steps(options)),
                             scorer=shared.scorer)
    collected = heal.before_cut(handle, found.segments, shared.prepared, recipe.heal)
    pruned = copy.deepcopy(handle)
    removed = cut(pruned, heal.planned_cut(found.segments, recipe.heal))
    cut_ppl = perplexity(pruned.model, shared.windows.test, batch_size)
    report = heal.heal(pruned, removed, collected, recipe.heal, seed,
                       stage(f"{remove} layers: heal ({recipe.heal.heal})", recipe.heal.heal_steps))
    stage(f"{remove} layers: evaluation")
    measured = evaluate(pruned.model, pruned.tokenizer, shared.windows.test, recipe.evaluation, batch_size, seed)
    metrics = compare_measures(shared.dense, measured, removed.layers_before, removed.layers_after, cut_ppl)
    agreed = measure_agreement(pruned, shared.reference, recipe, stage)
    return SweepRow(remove=remove, segments=removed.segments, method=found.method,
                    kl=None if math.isnan(found.kl) else found.kl, search_seconds=found.seconds,
                    perplexity_cut=cut_ppl, perplexity=measured.perplexity, heal=recipe.heal.heal,
                    heal_seconds=report.seconds, zero_shot=measured.zero_shot,
                    retention=metrics.zero_shot.retention.average if metrics.zero_shot is not None else None,
                    agreement=agreed, speed=metrics.speed, seconds=time.perf_counter() - started)


def write_sweep(result: SweepResult, output: str | Path, overwrite: bool = False) -> Path:
    """``sweep.json``, ``sweep.md`` (the table) and ``sweep.png`` (the plot) of ``result`` into the folder
    ``output``, which takes its place only once all three are written."""
    with staged_folder(output, overwrite, protected=[result.model] if Path(result.model).exists() else [],
                       marker="sweep.json") as folder:
        (folder / "sweep.json").write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
        (folder / "sweep.md").write_text(sweep_table(result), encoding="utf-8")
        sweep_chart(result, folder / "sweep.png")
    return Path(output)
