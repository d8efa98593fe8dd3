"""The pipeline: load → calibrate → search → cut → heal → evaluate → export, composed from the stage functions."""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path

from layercut import data, plots
from layercut.config import Recipe, SearchOptions, dump_recipe, to_dict
from layercut.errors import LayercutError
from layercut.evaluate import perplexity, throughput
from layercut.export import check_output, export_checkpoint, library_versions
from layercut.gate import SearchResult, search_segments
from layercut.heal import heal, teacher_targets
from layercut.layers import drop_layers, find_decoder_layers, parse_segment, validate_segments
from layercut.load import load_model, model_device, resolve_device

logger = logging.getLogger(__name__)


def removal_count(options: SearchOptions, total: int) -> int:
    """Layers to remove from ``--remove`` or ``--ratio`` (rounded to whole layers)."""
    if options.remove is not None and options.ratio is not None:
        raise LayercutError("give either --remove N or --ratio R, not both")
    if options.remove is not None:
        count = options.remove
    elif options.ratio is not None:
        if not 0 < options.ratio < 1:
            raise LayercutError(f"--ratio {options.ratio} must be between 0 and 1 (a fraction of the layers)")
        count = round(options.ratio * total)
    else:
        raise LayercutError("say how much to remove: --remove N, --ratio R or --segment START:END")
    if not 0 < count < total:
        raise LayercutError(f"cannot remove {count} of {total} layers; choose between 1 and {total - 1}")
    if count < options.segments:
        raise LayercutError(f"cannot split {count} removed layers into {options.segments} segments")
    return count


def calibration(tokenizer, recipe: Recipe):
    """The calibration windows ``[calib_windows, seq_len]`` of the recipe."""
    text = data.load_text(recipe.data.calib, "calib")
    return data.calibration_windows(tokenizer, text, recipe.data.seq_len, recipe.data.calib_windows, recipe.data.seed)


def perplexity_windows(tokenizer, recipe: Recipe):
    """The perplexity windows of the recipe's test text (``ppl_windows`` of them; 0 = all)."""
    text = data.load_text(recipe.data.ppl, "test")
    return data.evaluation_windows(tokenizer, text, recipe.data.seq_len, recipe.data.ppl_windows or None)


def planned_removal(model, recipe: Recipe) -> list[tuple[int, int]] | int:
    """The validated segments the recipe names, or else the number of layers to remove; checked before work."""
    options, total = recipe.search, len(find_decoder_layers(model, recipe.model.layers_path)[1])
    if options.segment:
        return validate_segments([parse_segment(text) for text in options.segment], total)
    if options.method == "exhaustive" and options.segments > 1:
        raise LayercutError("--method exhaustive searches one segment; use --method clp for --segments > 1")
    return removal_count(options, total)


def repair_data(model, tokenizer, recipe: Recipe):
    """``(windows, teacher)`` for the repair: training windows from the calibration text (seed + 1, so they differ
    from the search windows) and, for the kl loss, the dense model's top-k targets. ``(None, None)`` without repair.
    """
    if recipe.heal.heal == "none":
        return None, None
    text = data.load_text(recipe.data.calib, "calib")
    windows = data.calibration_windows(tokenizer, text, recipe.data.seq_len, recipe.heal.heal_windows,
                                       recipe.data.seed + 1)
    teacher = None
    if recipe.heal.heal_loss == "kl":
        teacher = teacher_targets(model, windows, recipe.heal.heal_top_k, recipe.data.batch_size)
    return windows, teacher


def gate_steps(recipe: Recipe) -> int | None:
    """Steps the gate search will take (for a progress bar), or None when no gate runs."""
    return recipe.search.gate_steps if recipe.search.method == "clp" and not recipe.search.segment else None


def select_segments(model, windows, recipe: Recipe, progress=None) -> SearchResult:
    """The segments to cut: given ones, or found by the recipe's method on the calibration windows.

    ``progress`` (optional) is called with 1 after each gate step.
    """
    options, plan = recipe.search, planned_removal(model, recipe)
    if isinstance(plan, list):
        return SearchResult("given", plan, float("nan"), 0.0)
    if options.method in ("clp", "exhaustive"):
        return search_segments(
            model, windows, plan, options.method, options.segments, options.gate_starts, options.gate_steps,
            options.gate_lr, options.tau_start, options.tau_end, options.gate_windows, recipe.data.batch_size,
            recipe.data.seed, recipe.model.layers_path, progress, options.gate_checkpointing,
        )
    from layercut.criteria import select_by_criterion

    return select_by_criterion(model, windows, plan, options.method, recipe.data.batch_size, recipe.model.layers_path)


def task_list(recipe: Recipe) -> list[str]:
    """The zero-shot tasks the recipe asks for (``--eval`` alone: the seven standard ones)."""
    tasks = [task.strip() for task in recipe.evaluation.tasks.split(",") if task.strip()]
    if not tasks and recipe.evaluation.eval:
        from layercut.zeroshot import TASKS

        tasks = list(TASKS)
    return tasks


def measure(model, tokenizer, recipe: Recipe) -> dict:
    """Zero-shot accuracy and speed as the recipe's evaluation options ask (empty when they ask for nothing)."""
    found = {}
    tasks = task_list(recipe)
    if tasks:
        from layercut.zeroshot import evaluate_zero_shot

        found["zero_shot"] = evaluate_zero_shot(model, tokenizer, tasks, recipe.evaluation.limit,
                                                recipe.data.batch_size, recipe.data.seed)
    if recipe.evaluation.speed or recipe.evaluation.eval:
        found["speed"] = throughput(model)
    return found


def compare_measures(before: dict, after: dict, layers_before: int, layers_after: int) -> dict:
    """Dense vs pruned zero-shot retention and speed-up, next to the speed-up limit L / (L − n)."""
    metrics = {}
    if "zero_shot" in before:
        from layercut.zeroshot import retention

        metrics["zero_shot"] = {"before": before["zero_shot"], "after": after["zero_shot"],
                                "retention": retention(after["zero_shot"], before["zero_shot"])}
    if "speed" in before:
        metrics["speed"] = {"before": before["speed"], "after": after["speed"],
                            "limit": layers_before / layers_after,
                            **{f"{kind}_ratio": after["speed"][f"{kind}_tokens_per_s"]
                               / before["speed"][f"{kind}_tokens_per_s"] for kind in ("prefill", "decode")}}
    return metrics


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def prune(model_name: str, recipe: Recipe, output: str | Path, overwrite: bool = False, progress=None) -> dict:
    """Run the whole pipeline and export the pruned checkpoint to ``output``; return the record it wrote.

    ``progress(stage, total)`` is called as each stage starts, for the CLI's display; for stages of ``total``
    units it may return a callable that is called with the units done (a progress bar).
    """
    def stage(name: str, total: int | None = None):
        logger.info("%s", name)
        return progress(name, total) if progress is not None else None

    check_output(output, overwrite)
    scheme = recipe.quantization.quantize
    if scheme:
        from layercut.quantize import check_scheme

        check_scheme(scheme, resolve_device(recipe.model.device))  # an impossible scheme fails before any work
    started = time.perf_counter()
    stage("load")
    model, tokenizer = load_model(model_name, recipe.model)
    total = len(find_decoder_layers(model, recipe.model.layers_path)[1])
    parameters_before = count_parameters(model)
    planned_removal(model, recipe)
    stage("calibration data")
    windows = calibration(tokenizer, recipe)
    test_windows = perplexity_windows(tokenizer, recipe)
    dense_ppl = perplexity(model, test_windows, recipe.data.batch_size,
                           stage("dense perplexity", test_windows.shape[0]))
    if task_list(recipe) or recipe.evaluation.speed:
        stage("dense evaluation")
    dense_measures = measure(model, tokenizer, recipe)
    found = select_segments(model, windows, recipe, stage(f"search ({recipe.search.method})", gate_steps(recipe)))
    if recipe.heal.heal != "none":
        stage("repair data")
    heal_windows, teacher = repair_data(model, tokenizer, recipe)
    stage("cut")
    segments = drop_layers(model, found.segments, recipe.model.layers_path)
    cut_ppl = perplexity(model, test_windows, recipe.data.batch_size,
                         stage("perplexity after the cut", test_windows.shape[0]))
    model, heal_report = heal(model, heal_windows, segments, total, recipe.heal, teacher, recipe.data.seed,
                              recipe.model.layers_path, stage(f"heal ({recipe.heal.heal})", recipe.heal.heal_steps))
    healed_ppl = cut_ppl
    if heal_report["steps"]:
        healed_ppl = perplexity(model, test_windows, recipe.data.batch_size,
                                stage("perplexity after the repair", test_windows.shape[0]))
    if dense_measures:
        stage("pruned evaluation")
    layers_after = total - sum(end - start for start, end in segments)
    measures = compare_measures(dense_measures, measure(model, tokenizer, recipe), total, layers_after)
    record = {
        "source": model_name,
        "segments": [list(segment) for segment in segments],
        "method": found.method,
        "heal": recipe.heal.heal,
        "num_layers_before": total,
        "num_layers_after": layers_after,
        "parameters_before": parameters_before,
        "parameters_after": count_parameters(model),
        "search": {"kl": None if math.isnan(found.kl) else found.kl, "seconds": found.seconds,
                   "evaluations": found.evaluations},
        "healing": heal_report,
        "metrics": {"perplexity": {"before": dense_ppl, "after_cut": cut_ppl, "after": healed_ppl,
                                   "text": recipe.data.ppl, "windows": int(test_windows.shape[0]),
                                   "seq_len": recipe.data.seq_len}, **measures},
        "seed": recipe.data.seed,
        "recipe": to_dict(recipe),
        "versions": library_versions(),
        "seconds": None,
    }
    stage("export")
    with tempfile.TemporaryDirectory() as scratch:
        extra = plots.search_plots(found, Path(scratch))
        record["seconds"] = time.perf_counter() - started
        if not scheme:
            export_checkpoint(model, tokenizer, output, record, dump_recipe(recipe), overwrite, extra)
            return record
        pruned = export_checkpoint(model, tokenizer, Path(scratch) / "pruned", record, dump_recipe(recipe), False, extra)
        device, dtype = model_device(model), next(model.parameters()).dtype
        del model
        stage(f"quantize ({scheme})")
        known = {"perplexity": healed_ppl, **{key: value["after"] for key, value in measures.items()}}
        written = quantize_pruned(pruned, output, recipe, windows, test_windows, device, dtype, known, overwrite)
    return json.loads((written / "layercut.json").read_text())


def quantize_pruned(pruned: Path, output: str | Path, recipe: Recipe, windows, test_windows, device, dtype,
                    pruned_metrics: dict, overwrite: bool = False) -> Path:
    """Quantize the exported checkpoint ``pruned`` with the recipe's scheme into ``output``; the quantized model
    is evaluated as the pruned one was (``pruned_metrics``: perplexity on ``test_windows``, the recipe's
    zero-shot tasks and speed)."""
    from layercut.quantize import SCHEMES, quantize_checkpoint

    scheme = recipe.quantization.quantize
    return quantize_checkpoint(pruned, scheme, output, windows if SCHEMES[scheme].calibrated else None, overwrite,
                               device, dtype, evaluation(recipe, test_windows), pruned_metrics,
                               recipe.quantization.group_size)


def evaluation(recipe: Recipe, test_windows):
    """``evaluate(model, tokenizer) -> dict``: perplexity on ``test_windows`` plus what :func:`measure` records."""

    def evaluate(model, tokenizer) -> dict:
        return {"perplexity": perplexity(model, test_windows, recipe.data.batch_size),
                **measure(model, tokenizer, recipe)}

    return evaluate
