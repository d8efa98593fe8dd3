"""Run several selection methods with identical calibration data, heal and evaluation; one table, one chart.

Each finished method is saved as ``cells/METHOD.json`` in the output folder, so a rerun skips it. The folder's
``fingerprint.json`` names the model, data and recipe its cells were made with; a rerun with another fingerprint
is refused (or, with ``overwrite``, starts again), so cells of different runs never mix.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from layercut import heal, selection
from layercut.config import METHODS, EvalOptions, Recipe, to_dict
from layercut.data import Windows, calibrate
from layercut.errors import LayercutError
from layercut.evaluate import (
    DenseReference,
    agreement,
    dense_reference,
    evaluate,
    perplexity_of,
    task_list,
    window_nll,
)
from layercut.files import absolute, check_writable, staged_file, write_atomically
from layercut.layers import Handle, cut
from layercut.load import load_model, resolve_model
from layercut.paired import against
from layercut.pipeline import check_before_work
from layercut.record import CompareResult, CompareRow, DenseRow, library_versions
from layercut.report import compare_chart, compare_table

logger = logging.getLogger(__name__)


FINGERPRINT = "fingerprint.json"
PLACEMENT = ("device", "device_map", "max_memory", "offload_folder")  # where the model runs, not what it computes


def check_methods(methods: list[str]) -> list[str]:
    """The methods, checked: at least one, each known, none twice."""
    if not methods:
        raise LayercutError(f"--methods names no method; give a comma-separated list of {', '.join(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LayercutError(f"unknown method(s) {unknown}; valid methods: {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise LayercutError(f"--methods names a method twice: {','.join(methods)}")
    return methods


def fingerprint(source: str, windows, recipe: Recipe) -> dict:
    """What a comparison's cells depend on: the model (its source and config), the token windows, and the recipe
    except the method and the model's placement. Each part as a short sha256."""
    def digest(value) -> str:
        return hashlib.sha256(value if isinstance(value, bytes) else json.dumps(value, sort_keys=True).encode()
                              ).hexdigest()[:16]

    config = Path(source) / "config.json"
    settings = to_dict(recipe)
    settings["search"].pop("method")
    for key in PLACEMENT:
        settings["model"].pop(key)
    return {"model": digest([source, config.read_text() if config.is_file() else None]),
            "data": digest(windows.calibration.numpy().tobytes() + windows.test.numpy().tobytes()),
            "recipe": digest(settings)}


def pair_with_first(rows: list[CompareRow], seed: int = 0) -> None:
    """Fill each later row's paired differences against the first row: log perplexity over the test windows and
    average accuracy over the items (see :mod:`layercut.paired`); None where a side kept no per-item data."""
    first = rows[0]
    for row in rows[1:]:
        ppl, accuracy = against(row.zero_shot, row.window_nll, first.zero_shot, first.window_nll, seed)
        row.log_perplexity_vs = ppl.stored(first.method) if ppl else None
        row.accuracy_vs = accuracy.stored(first.method) if accuracy else None


def compare(model_name: str, recipe: Recipe, methods: list[str], output: str | Path, overwrite: bool = False,
            progress=None) -> CompareResult:
    """Prune the same model with every method in ``methods`` and measure each the same way.

    Every method sees the same calibration windows, heal windows, teacher targets, steps and test windows, and
    the zero-shot tasks of ``recipe.evaluation`` (no speed), and with ``agreement`` is measured against the same
    dense outputs. Writes ``compare.json``, ``compare.md`` and ``compare.png``. Everything is checked before
    anything is written; a folder holding cells of another fingerprint is refused unless ``overwrite``.
    """
    output = check_compare(model_name, recipe, methods, output)
    handle = load_model(model_name, recipe.model)
    windows = calibrate(handle.tokenizer, recipe.data)
    cells = start_cells(output, fingerprint(resolve_model(model_name), windows, recipe), overwrite)
    prepared = heal.prepare(handle, recipe.heal, recipe.data)
    zero_shot = EvalOptions(tasks=",".join(task_list(recipe.evaluation)), limit=recipe.evaluation.limit)
    dense = dense_row(handle, windows, cells / "dense.json", zero_shot, recipe.data.batch_size, recipe.data.seed)
    rows, reference = [], None
    for method in methods:
        cell = cells / f"{method}.json"
        if cell.is_file():
            logger.info("%s: already done, skipped", method)
            rows.append(CompareRow.model_validate_json(cell.read_text()))
            continue
        if progress is not None:
            progress(method)
        if reference is None and recipe.evaluation.agreement:  # once, and only when a cell is still to be made
            reference = dense_reference(handle.model, handle.tokenizer, recipe.evaluation, recipe.data)
        row = compare_row(handle, windows, recipe, method, prepared, dense, zero_shot, reference)
        write_atomically(cell, row.model_dump_json(indent=2) + "\n")
        rows.append(row)
    pair_with_first(rows, recipe.data.seed)
    result = CompareResult(model=model_name, remove=sum(e - s for s, e in rows[0].segments), dense=dense, rows=rows,
                           recipe=to_dict(recipe), versions=library_versions())
    write_atomically(output / "compare.json", result.model_dump_json(indent=2) + "\n")
    write_atomically(output / "compare.md", compare_table(result))
    with staged_file(output / "compare.png") as chart:
        compare_chart(result, chart)
    return result


def check_compare(model_name: str, recipe: Recipe, methods: list[str], output: str | Path) -> Path:
    """The absolute ``output`` folder, once the methods, the recipe and the folder are checked; nothing written."""
    check_methods(methods)
    if recipe.search.segment:
        raise LayercutError("compare chooses the segments with each method; --segment gives them: use layercut prune "
                            "to cut given segments")
    check_before_work(model_name, recipe)
    output = absolute(output)
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / FINGERPRINT).is_file())):
        raise LayercutError(f"{output} exists and is not a layercut compare folder (no {FINGERPRINT}); choose another "
                            "--output")
    check_writable(output)
    return output


def start_cells(output: Path, found: dict, overwrite: bool) -> Path:
    """The ``cells`` folder of ``output`` for the fingerprint ``found``: the earlier cells are kept when they were
    made with the same fingerprint, removed with ``overwrite``, refused otherwise."""
    if (output / FINGERPRINT).is_file():
        earlier = json.loads((output / FINGERPRINT).read_text())
        changed = [part for part in found if earlier.get(part) != found[part]]
        if changed and not overwrite:
            raise LayercutError(f"{output} holds a comparison made with another {' and '.join(changed)}; choose "
                                "another --output, or pass --overwrite to replace its cells")
        if changed:
            shutil.rmtree(output / "cells", ignore_errors=True)
    cells = output / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    write_atomically(output / FINGERPRINT, json.dumps(found, indent=2) + "\n")
    return cells


def dense_row(handle: Handle, windows: Windows, dense_file: Path, zero_shot: EvalOptions, batch_size: int,
              seed: int) -> DenseRow:
    """The dense model's perplexity and zero-shot accuracy, read from ``dense_file`` or measured and written there."""
    if dense_file.is_file():
        return DenseRow.model_validate_json(dense_file.read_text())
    measured = evaluate(handle.model, handle.tokenizer, windows.test, zero_shot, batch_size, seed)
    dense = DenseRow(perplexity=measured.perplexity, layers=handle.num_layers, zero_shot=measured.zero_shot)
    write_atomically(dense_file, dense.model_dump_json(indent=2) + "\n")
    return dense


def compare_row(handle: Handle, windows: Windows, recipe: Recipe, method: str, prepared: heal.HealData | None,
                dense: DenseRow, zero_shot: EvalOptions, reference: DenseReference | None = None) -> CompareRow:
    """Search with ``method``, cut a copy of the dense model, heal and measure it (with ``reference``, also its
    agreement with those dense outputs); the dense ``handle`` is kept."""
    batch_size, seed = recipe.data.batch_size, recipe.data.seed
    started = time.perf_counter()
    options = recipe.search.replace(method=method)
    found = selection.search(handle, windows.calibration, options, batch_size, seed)
    collected = heal.before_cut(handle, found.segments, prepared, recipe.heal)
    pruned = copy.deepcopy(handle)
    removed = cut(pruned, heal.planned_cut(found.segments, recipe.heal))
    cut_nll = window_nll(pruned.model, windows.test, batch_size)
    cut_ppl = perplexity_of(cut_nll)
    report = heal.heal(pruned, removed, collected, recipe.heal, seed)
    healed = report.name != "none"
    measured = evaluate(pruned.model, pruned.tokenizer, windows.test if healed else None, zero_shot,
                        batch_size, seed)
    row = CompareRow(method=method, segments=removed.segments, kl=found.kl, search_seconds=found.seconds,
                     perplexity_cut=cut_ppl, perplexity=measured.perplexity if healed else cut_ppl,
                     heal=recipe.heal.heal, trainable_parameters=report.trainable_parameters,
                     heal_seconds=report.seconds, zero_shot=measured.zero_shot,
                     window_nll=measured.window_nll if healed else cut_nll.tolist())
    if measured.zero_shot is not None:
        from layercut.zeroshot import retention

        row.retention = retention(measured.zero_shot, dense.zero_shot).average
    if reference is not None:
        row.agreement = agreement(pruned.model, reference, batch_size, recipe.evaluation.generation_batch)
    row.seconds = time.perf_counter() - started
    return row
