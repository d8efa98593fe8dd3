"""The pipeline: load → calibrate → search → cut → heal → evaluate → export (→ quantize), composed from the stages."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path

from layercut import heal, selection
from layercut.config import Recipe, dump_recipe, to_dict
from layercut.data import Windows, calibrate
from layercut.errors import LayercutError
from layercut.evaluate import DenseReference, agreement, compare_measures, dense_reference, evaluate, perplexity
from layercut.export import export
from layercut.files import check_output
from layercut.gate import SearchResult
from layercut.layers import Cut, Handle, cut, text_part
from layercut.load import load_config, load_model, resolve_device
from layercut.record import Agreement, HealReport, Measures, RunRecord, SearchSummary, library_versions, read_record
from layercut.report import search_charts

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
                             stage(f"search ({recipe.search.method})", selection.gate_steps(recipe.search)))
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
            export(handle, record, dump_recipe(recipe), output, overwrite, charts, protected=[record.source])
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

