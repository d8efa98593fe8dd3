"""Does ranking the contiguous cuts on a few calibration windows keep the repair selection's candidates?

With one segment and ``--repair-candidates K``, ``--method repair`` ranks every contiguous cut by its KL on the
first ``--gate-screen`` calibration windows (4 by default) and scores only the K lowest and the tail on all 128
(`repair.scored_cuts`). This script recomputes, on the CPU, each logged search's contiguous cuts on the first 1, 2,
4 and 8 of its 128 calibration windows (the grid's seeded windows, `--method repair`'s count) and compares their K
lowest with the K lowest on all 128 (the KLs the run logged). It also scores the tail cut on all 128 windows here,
once per model, to check that the windows are the run's. Writes rank-windows.json (after each search; a rerun skips those done) and
rank-windows.md beside this script; run from the repository root. With every count and the check, Gemma-3 took
about 6 minutes a search on 2 CPU cores (its output head), 15 for the first; that run was stopped by a time limit
after 7 of the 12 searches, before it wrote its JSON (its table rows are in rank-windows-run1.log). The committed
JSON was then made by

    python bench/results/grid-repair4-h200/rank_windows.py --models smollm2-135m --windows 4
    python bench/results/grid-repair4-h200/rank_windows.py --models gemma3-270m --windows 4 --no-check
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

from layercut.config import REPAIR_CALIB_WINDOWS, DataOptions, ModelOptions, SearchOptions
from layercut.data import calibrate
from layercut.gate import candidate_key, cuts, exact_scorer
from layercut.load import load_model

HERE = Path(__file__).parent
WINDOWS, TOP = (1, 2, 4, 8), 4
spec = importlib.util.spec_from_file_location("replay_finalists", HERE / "replay_finalists.py")
replay = sys.modules.setdefault("replay_finalists", importlib.util.module_from_spec(spec))
spec.loader.exec_module(replay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gemma3-270m,smollm2-135m")
    parser.add_argument("--windows", default=",".join(map(str, WINDOWS)), help="comma-separated counts")
    parser.add_argument("--no-check", action="store_true", help="skip the tail cut's KL on all windows")
    arguments = parser.parse_args()
    counts = tuple(int(count) for count in arguments.windows.split(","))
    torch.set_grad_enabled(False)
    found = replay.searches()
    out = HERE / "rank-windows.json"
    results = json.loads(out.read_text()) if out.is_file() else {}  # resumed: searches done are skipped
    checked: set[str] = set()
    for name in arguments.models.split(","):
        handle = load_model(name, ModelOptions(dtype="float32"))
        for remove, seed in sorted((n, s) for model, n, s in found if model == name):
            if str(seed) in results.get(name, {}).get(str(remove), {}):
                continue
            logged = {replay.as_key(c): v for c, v in found[(name, remove, seed)]["kl"].items() if c.count(":") == 1}
            windows = calibrate(handle.tokenizer, DataOptions(seq_len=256, calib_windows=REPAIR_CALIB_WINDOWS,
                                                               seed=seed, batch_size=16), test=False).calibration
            every = cuts(handle.num_layers, remove, 1)
            scorer = exact_scorer(handle, windows[:max(counts)], SearchOptions(), 16)
            few = {count: dict(zip(every, scorer(every, count))) for count in counts}
            tail = ((handle.num_layers - remove, handle.num_layers),)
            first = name not in checked and not arguments.no_check
            checked.add(name)
            check = exact_scorer(handle, windows, SearchOptions(), 16)([tail])[0] if first else None
            best = sorted(every, key=logged.__getitem__)[:TOP]
            row = {"logged_top": [candidate_key(c) for c in best], "tail_kl_here": check,
                   "tail_kl_logged": logged[tail],
                   "few": {count: {"top": [candidate_key(c) for c in sorted(every, key=kl.__getitem__)[:TOP]],
                                   "kl": {candidate_key(c): v for c, v in kl.items()}} for count, kl in few.items()}}
            results.setdefault(name, {}).setdefault(str(remove), {})[str(seed)] = row
            out.write_text(json.dumps(results, indent=1) + "\n")
            print(name, remove, seed, "done", flush=True)
    lines = []
    for name, by_remove in sorted(results.items()):
        for remove, by_seed in sorted(by_remove.items(), key=lambda item: int(item[0])):
            for seed, row in sorted(by_seed.items()):
                same = " · ".join(f"{count}: {'same' if set(few['top']) == set(row['logged_top']) else 'differs'}"
                                  for count, few in row["few"].items())
                check = (f"{row['tail_kl_here']:.5f} / {row['tail_kl_logged']:.5f}"
                         if row["tail_kl_here"] is not None else "—")
                lines.append(f"| {name} | {remove} | {seed} | {', '.join(row['logged_top'])} | {same} | {check} |")
    (HERE / "rank-windows.md").write_text("\n".join([
        "# The contiguous cuts ranked on a few calibration windows", "",
        (f"Per logged search: the {TOP} contiguous cuts of lowest KL on all {REPAIR_CALIB_WINDOWS} calibration windows "
         f"(as the run logged them), and whether the {TOP} lowest on the first k windows are the same set; the tail "
         "cut's KL on all windows here (CPU, float32) against the run's (H200), once per model and run, to show the "
         "windows are the run's. Made by `python bench/results/grid-repair4-h200/rank_windows.py` (see its text "
         "for the runs)."), "",
        f"| model | n | seed | {TOP} lowest on all windows | same {TOP} on the first k windows | tail KL here / logged |",
        "|---|---|---|---|---|---|", *lines]) + "\n")


if __name__ == "__main__":
    main()
