"""The repair selection's last stage replayed on this run's logged searches with fewer finalists.

Each grid unit's log holds its search: every screened cut's KL after the 10-step screen and the finalists' KL after
50 steps ("repair: CUT, KL x before repair, y after (N steps)"), then the unit's pick. With F finalists of each
number of segments (the F lowest after the screen), the winner is the lowest KL extrapolated from 10 and 50 steps to
the 200-step heal (`repair.extrapolated`, as `--method repair` ranks them). The finalists of a smaller F are among
those of F = 4, each healed from the same weights with the same seed, so their 50-step KLs are in the log and the
replay is the search that F would run. The pick's repaired wiki perplexity (200-step endpoint heal, same seed) comes
from this grid's cells, or else the landscape (bench/results/landscape-h100). Writes replay-finalists.md beside
this script. Run from the repository root:

    python bench/results/grid-repair4-h200/replay_finalists.py
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from layercut import repair

HERE = Path(__file__).parent
LANDSCAPE = Path("bench/results/landscape-h100/cuts")
LINE = re.compile(r"repair: ([\d: ]+), KL ([\d.]+) before repair, ([\d.]+) after \((\d+) steps\)")
DONE = re.compile(r"bench\.grid: (\('[^)]*'repair', 'endpoints'\)): (\{.*\})$")


def searches() -> dict[tuple, dict]:
    """Per (model, n, seed): the 10-step and 50-step KLs by cut, the exact KL before repair of the screened cuts,
    and the pick the run made."""
    found = {}
    for log in sorted((HERE / "logs").glob("worker-*.log")):
        steps: dict[int, dict[str, float]] = {10: {}, 50: {}}
        exact: dict[str, float] = {}
        for text in log.read_text(errors="replace").splitlines():
            if match := LINE.search(text):
                steps[int(match[4])][match[1].strip()] = float(match[3])
                exact[match[1].strip()] = float(match[2])
            elif match := DONE.search(text):
                model, remove, seed, *_ = ast.literal_eval(match[1])
                found[(model, remove, seed)] = {"screen": steps[10], "finalists": steps[50], "kl": exact,
                                                "pick": ast.literal_eval(match[2])["cut"]}
                steps, exact = {10: {}, 50: {}}, {}
    return found


def as_cut(text: str) -> list[list[int]]:
    return [[int(i) for i in part.split(":")] for part in text.split()]


def as_key(text: str) -> tuple[tuple[int, int], ...]:
    """A logged cut ("6:10 15:17") as the selection's candidate key."""
    return tuple(tuple(pair) for pair in as_cut(text))


def worth(model: str, remove: int, seed: int, cut: list[list[int]]) -> float | None:
    """The cut's wiki perplexity after the 200-step endpoint heal at this seed, where a cell or the landscape has it."""
    cell = HERE / "cells" / f"{model}-n{remove}-seed{seed}-repair-endpoints.json"
    if cell.is_file() and json.loads(cell.read_text())["cut"] == cut:
        return json.loads(cell.read_text())["perplexity_wiki"]
    name = "+".join(f"{a}-{b}" for a, b in cut)
    path = LANDSCAPE / f"{model}-n{remove}-seed{seed}-{name}.json"
    return json.loads(path.read_text())["heal"]["steps"]["200"]["perplexity_wiki"] if path.is_file() else None


def replayed(search: dict, count: int) -> str:
    """The pick of the search's last stage with ``count`` finalists of each number of segments
    (:func:`repair.finalists`), ranked by KL extrapolated from 10 and 50 steps to 200."""
    screened = {as_key(cut): cut for cut in search["screen"]}
    chosen = [screened[c] for c in repair.finalists({c: search["screen"][k] for c, k in screened.items()}, count)]
    missing = [cut for cut in chosen if cut not in search["finalists"]]
    if missing:
        raise SystemExit(f"finalists {missing} have no 50-step KL in the log")
    return min(chosen, key=lambda cut: repair.extrapolated((10, search["screen"][cut]),
                                                           (50, search["finalists"][cut]), 200))


def main() -> None:
    found = searches()
    counts = (4, 3, 2, 1)
    lines = ["# The repair selection's pick with fewer finalists, replayed on this run's searches", "",
             ("Wiki perplexity after the 200-step endpoint heal of the pick (\"unmeasured\": no cell or landscape cut "
             "holds that cut at that seed). F = 4 is the shipped setting; its replay must give the run's own pick."), "",
             "| cell | seed | " + " | ".join(f"F = {f}" for f in counts) + " |", "|---|---|" + "---|" * len(counts)]
    means: dict[int, dict[tuple, list]] = {f: {} for f in counts}
    for (model, remove, seed), search in sorted(found.items()):
        row = []
        for f in counts:
            cut = as_cut(replayed(search, f))
            if f == 4:
                assert cut == search["pick"], f"{model} n{remove} seed {seed}: replay {cut} != run {search['pick']}"
            value = worth(model, remove, seed, cut)
            means[f].setdefault((model, remove), []).append(value)
            row.append(f"{cut} {'unmeasured' if value is None else f'{value:.2f}'}")
        lines.append(f"| {model} n = {remove} | {seed} | " + " | ".join(row) + " |")
    lines += ["", "Mean over the seeds:", "", "| cell | " + " | ".join(f"F = {f}" for f in counts) + " |",
              "|---|" + "---|" * len(counts)]
    for key in sorted(means[4]):
        lines.append(f"| {key[0]} n = {key[1]} | " + " | ".join(
            "—" if None in means[f][key] else f"{sum(means[f][key]) / len(means[f][key]):.2f}" for f in counts) + " |")
    (HERE / "replay-finalists.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
