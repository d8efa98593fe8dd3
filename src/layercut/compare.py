"""Run several selection methods with identical calibration data, repair and evaluation; one table, one plot.

Each finished method is saved as ``cells/METHOD.json`` in the output folder, so a rerun skips it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

from layercut.config import METHODS, Recipe, to_dict
from layercut.errors import LayercutError
from layercut.evaluate import perplexity
from layercut.export import library_versions
from layercut.heal import heal
from layercut.layers import drop_layers, find_decoder_layers
from layercut.load import load_model
from layercut.pipeline import calibration, perplexity_windows, repair_data, select_segments

logger = logging.getLogger(__name__)


def _write_json(path: Path, value) -> None:
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(staging, path)


def compare(model_name: str, recipe: Recipe, methods: list[str], output: str | Path, tasks: list[str] | None = None,
            limit: int | None = None, progress=None) -> dict:
    """Prune the same model with every method in ``methods`` and measure each the same way.

    Every method sees the same calibration windows, repair windows, teacher targets, steps and test windows.
    Returns ``{"dense": {...}, "rows": [...]}`` and writes ``compare.json``, ``compare.md`` and ``compare.png``.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LayercutError(f"unknown method(s) {unknown}; valid methods: {', '.join(METHODS)}")
    output = Path(output)
    cells = output / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(model_name, recipe.model)
    total = len(find_decoder_layers(model, recipe.model.layers_path)[1])
    windows = calibration(tokenizer, recipe)
    test_windows = perplexity_windows(tokenizer, recipe)
    heal_windows, teacher = repair_data(model, tokenizer, recipe)
    dense_file = cells / "dense.json"
    if dense_file.is_file():
        dense = json.loads(dense_file.read_text())
    else:
        dense = {"perplexity": perplexity(model, test_windows, recipe.data.batch_size), "layers": total}
        if tasks:
            from layercut.zeroshot import evaluate_zero_shot

            dense["zero_shot"] = evaluate_zero_shot(model, tokenizer, tasks, limit, recipe.data.batch_size)
        _write_json(dense_file, dense)
    rows = []
    for method in methods:
        cell = cells / f"{method}.json"
        if cell.is_file():
            logger.info("%s: already done, skipped", method)
            rows.append(json.loads(cell.read_text()))
            continue
        if progress is not None:
            progress(method)
        started = time.perf_counter()
        method_recipe = dataclasses.replace(recipe, search=dataclasses.replace(recipe.search, method=method))
        found = select_segments(model, windows, method_recipe)
        pruned = copy.deepcopy(model)
        segments = drop_layers(pruned, found.segments, recipe.model.layers_path)
        cut_ppl = perplexity(pruned, test_windows, recipe.data.batch_size)
        pruned, report = heal(pruned, heal_windows, segments, total, recipe.heal, teacher, recipe.data.seed,
                              recipe.model.layers_path)
        row = {"method": method, "segments": [list(s) for s in segments], "kl": found.kl,
               "search_seconds": found.seconds, "perplexity_cut": cut_ppl,
               "perplexity": perplexity(pruned, test_windows, recipe.data.batch_size) if report["steps"] else cut_ppl,
               "heal": recipe.heal.heal, "trainable_parameters": report["trainable_parameters"],
               "heal_seconds": report["seconds"]}
        if tasks:
            from layercut.zeroshot import evaluate_zero_shot, retention

            row["zero_shot"] = evaluate_zero_shot(pruned, tokenizer, tasks, limit, recipe.data.batch_size)
            row["retention"] = retention(row["zero_shot"], dense["zero_shot"])["average"]
        row["seconds"] = time.perf_counter() - started
        del pruned
        _write_json(cell, row)
        rows.append(row)
    result = {"model": model_name, "remove": rows[0]["segments"] and sum(e - s for s, e in rows[0]["segments"]),
              "dense": dense, "rows": rows, "recipe": to_dict(recipe), "versions": library_versions()}
    _write_json(output / "compare.json", result)
    (output / "compare.md").write_text(markdown_table(result))
    plot(result, output / "compare.png")
    return result


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(result: dict) -> str:
    """The comparison as a markdown table, dense model first."""
    zero_shot = "zero_shot" in result["dense"]
    head = "| method | segments | KL | ppl cut | ppl healed | trainable | search s | heal s |"
    rule = "|---|---|---|---|---|---|---|---|"
    if zero_shot:
        head += " avg acc | retention |"
        rule += "---|---|"
    dense = result["dense"]
    lines = [f"# {result['model']}: {result['remove']} layers removed, heal `{result['rows'][0]['heal']}`", "",
             head, rule]
    dense_row = f"| dense | - | - | - | {_fmt(dense['perplexity'], 2)} | - | - | - |"
    if zero_shot:
        dense_row += f" {_fmt(dense['zero_shot']['average']['acc'])} | 1.000 |"
    lines.append(dense_row)
    for row in result["rows"]:
        segments = " ".join(f"[{s}:{e})" for s, e in row["segments"])
        line = (f"| {row['method']} | {segments} | {_fmt(row['kl'])} | {_fmt(row['perplexity_cut'], 2)} | "
                f"{_fmt(row['perplexity'], 2)} | {row['trainable_parameters']:,} | {_fmt(row['search_seconds'], 1)} | "
                f"{_fmt(row['heal_seconds'], 1)} |")
        if zero_shot:
            line += f" {_fmt(row['zero_shot']['average']['acc'])} | {_fmt(row['retention'].get('retention'))} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Bar chart of healed (and cut) perplexity per method, with the dense model as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    figure, axis = plt.subplots(figsize=(1.2 * len(rows) + 3, 3.5))
    positions = range(len(rows))
    axis.bar([p - 0.2 for p in positions], [r["perplexity_cut"] for r in rows], 0.4, label="cut", color="tab:gray")
    axis.bar([p + 0.2 for p in positions], [r["perplexity"] for r in rows], 0.4, label="healed", color="tab:blue")
    axis.axhline(result["dense"]["perplexity"], color="k", ls="--", lw=1, label="dense")
    axis.set_xticks(list(positions), [r["method"] for r in rows], rotation=20)
    axis.set_yscale("log")
    axis.set_ylabel("perplexity")
    axis.set_title(f"{result['model']}: {result['remove']} layers removed")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
