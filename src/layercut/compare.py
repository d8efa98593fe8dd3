"""Run several selection methods with identical calibration data, heal and evaluation; one table, one chart.

Each finished method is saved as ``cells/METHOD.json`` in the output folder, so a rerun skips it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path

from layercut import heal, selection
from layercut.config import METHODS, EvalOptions, Recipe, to_dict
from layercut.data import calibrate
from layercut.errors import LayercutError
from layercut.evaluate import evaluate, perplexity, task_list
from layercut.files import write_atomically
from layercut.layers import cut
from layercut.load import load_model
from layercut.record import CompareResult, CompareRow, DenseRow, library_versions
from layercut.report import compare_chart, compare_table

logger = logging.getLogger(__name__)


def compare(model_name: str, recipe: Recipe, methods: list[str], output: str | Path, progress=None) -> CompareResult:
    """Prune the same model with every method in ``methods`` and measure each the same way.

    Every method sees the same calibration windows, heal windows, teacher targets, steps and test windows, and
    the zero-shot tasks of ``recipe.evaluation`` (no speed). Writes ``compare.json``, ``compare.md`` and
    ``compare.png``.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LayercutError(f"unknown method(s) {unknown}; valid methods: {', '.join(METHODS)}")
    output = Path(output)
    cells = output / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    handle = load_model(model_name, recipe.model)
    windows = calibrate(handle.tokenizer, recipe.data)
    prepared = heal.prepare(handle, recipe.heal, recipe.data)
    zero_shot = EvalOptions(tasks=",".join(task_list(recipe.evaluation)), limit=recipe.evaluation.limit)
    batch_size, seed = recipe.data.batch_size, recipe.data.seed
    dense_file = cells / "dense.json"
    if dense_file.is_file():
        dense = DenseRow.model_validate_json(dense_file.read_text())
    else:
        measured = evaluate(handle.model, handle.tokenizer, windows.test, zero_shot, batch_size, seed)
        dense = DenseRow(perplexity=measured.perplexity, layers=handle.num_layers, zero_shot=measured.zero_shot)
        write_atomically(dense_file, dense.model_dump_json(indent=2) + "\n")
    rows = []
    for method in methods:
        cell = cells / f"{method}.json"
        if cell.is_file():
            logger.info("%s: already done, skipped", method)
            rows.append(CompareRow.model_validate_json(cell.read_text()))
            continue
        if progress is not None:
            progress(method)
        started = time.perf_counter()
        options = dataclasses.replace(recipe.search, method=method)
        found = selection.search(handle, windows.calibration, options, batch_size, seed)
        pruned = copy.deepcopy(handle)
        removed = cut(pruned, found.segments)
        cut_ppl = perplexity(pruned.model, windows.test, batch_size)
        report = heal.heal(pruned, removed, prepared, recipe.heal, seed)
        measured = evaluate(pruned.model, pruned.tokenizer, windows.test if report.steps else None, zero_shot,
                            batch_size, seed)
        row = CompareRow(method=method, segments=removed.segments, kl=found.kl, search_seconds=found.seconds,
                         perplexity_cut=cut_ppl, perplexity=measured.perplexity if report.steps else cut_ppl,
                         heal=recipe.heal.heal, trainable_parameters=report.trainable_parameters,
                         heal_seconds=report.seconds, zero_shot=measured.zero_shot)
        if measured.zero_shot is not None:
            from layercut.zeroshot import retention

            row.retention = retention(measured.zero_shot, dense.zero_shot).average
        row.seconds = time.perf_counter() - started
        del pruned
        write_atomically(cell, row.model_dump_json(indent=2) + "\n")
        rows.append(row)
    result = CompareResult(model=model_name, remove=sum(e - s for s, e in rows[0].segments), dense=dense, rows=rows,
                           recipe=to_dict(recipe), versions=library_versions())
    write_atomically(output / "compare.json", result.model_dump_json(indent=2) + "\n")
    write_atomically(output / "compare.md", compare_table(result))
    compare_chart(result, output / "compare.png")
    return result
