"""The headline grid's CLP cuts again, with the shipped one-segment gate: does it still choose the grid's cut?

The grid (``bench/grid.py``) recorded, for every model, number of layers removed and seed, the cut its ``clp``
selection chose and the one ``exhaustive`` chose. This script searches again with layercut's current default gate on
the same calibration windows (the grid's protocol: its sequence length, windows and dtype, the seed) and compares.

    python bench/grid_clp.py --grid bench/results/grid-h200 --out bench/results/grid-h200/clp-recheck
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from layercut import selection
from layercut.config import DataOptions, ModelOptions, SearchOptions
from layercut.data import calibrate
from layercut.load import load_model


def recorded_cuts(grid: Path) -> dict[tuple, dict[str, list]]:
    """``(model, remove, seed) -> {"clp": cut, "exhaustive": cut}`` from the grid's cells."""
    found: dict[tuple, dict[str, list]] = defaultdict(dict)
    for path in sorted((grid / "cells").glob("*.json")):
        cell = json.loads(path.read_text())
        if cell.get("selection") in ("clp", "exhaustive"):
            found[(cell["model"], cell["remove"], cell["seed"])][cell["selection"]] = cell["chosen"]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True, help="a grid --out folder (its cells and protocol.json)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    arguments = parser.parse_args()
    grid, out = Path(arguments.grid), Path(arguments.out)
    protocol = json.loads((grid / "protocol.json").read_text())
    rows = []
    cases = recorded_cuts(grid)
    for model_name in sorted({model for model, _, _ in cases}):
        dense = load_model(model_name, ModelOptions(dtype=protocol["dtype"]))
        for (name, remove, seed), recorded in sorted(cases.items()):
            if name != model_name:
                continue
            data = DataOptions(seq_len=protocol["seq_len"], calib_windows=protocol["calib_windows"], seed=seed,
                               batch_size=arguments.batch_size)
            windows = calibrate(dense.tokenizer, data, test=False).calibration
            started = time.perf_counter()
            found = selection.search(dense, windows, SearchOptions(remove=remove, method="clp"), arguments.batch_size,
                                     seed)
            chosen = [list(segment) for segment in found.segments]
            rows.append({"model": name, "remove": remove, "seed": seed, "chosen": chosen, "kl": found.kl,
                         "seconds": time.perf_counter() - started, "grid_clp": recorded.get("clp"),
                         "grid_exhaustive": recorded.get("exhaustive")})
            print(json.dumps(rows[-1]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "clp-recheck.json").write_text(json.dumps({"command": "python " + " ".join(sys.argv), "rows": rows},
                                                     indent=1) + "\n")
    lines = ["# The grid's CLP cuts with the shipped one-segment gate", "", f"Command: `python {' '.join(sys.argv)}`",
             "", "| model | n | seed | chosen now | grid's clp | grid's exhaustive | same as the grid's clp | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['remove']} | {r['seed']} | {r['chosen']} | {r['grid_clp']} | {r['grid_exhaustive']} | "
              f"{'yes' if r['chosen'] == r['grid_clp'] else 'NO'} | {r['seconds']:.0f} |" for r in rows]
    same = sum(r["chosen"] == r["grid_clp"] for r in rows)
    lines += ["", f"The shipped default chose the grid's CLP cut in {same} of {len(rows)} cases."]
    (out / "clp-recheck.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
