"""Cheaper settings of the repair selection, replayed on this run's logged searches, against what each would cost at
the 8B shape.

A setting is (``--segments`` S, ``--repair-candidates`` K, ``--repair-finalists`` F). Its screen is the K cuts of
lowest exact KL of each number of segments up to S (every contiguous cut and the 4 best two-segment ones when K is
unset; `repair.candidate_cuts`), with the tail; its finalists the F best of each number after the screen
(`repair.finalists`); the winner the lowest KL extrapolated to the 200-step heal. Every screen and finalist heal
starts from the same weights with the same seed, so a setting whose screened cuts and finalists are all in the log
replays exactly (replay_finalists.py parses the log); a setting that needs a heal the run did not make is left out.
A lone finalist (one segment, F = 1) wins without its longer heal, as the selection now does. A setting with W ranks
the contiguous cuts on the first W calibration windows and scores only its candidates on all of them (with one
segment and K set, as the selection now does): its order comes from rank_windows.py's rank-windows.json.
The pick's wiki perplexity after the 200-step heal comes from this grid's cells or the landscape, as in
replay_finalists.py.

The cost is modelled at the 8B shape (25 contiguous cuts of 8 layers) from one timed search on an H100
(bench/results/repair-cost-finalists3-h100): the seconds before the first two-segment gate step (the exact scorer's
dense states and the 25 contiguous cuts), the two-segment search after it, the mean seconds of a 10-step screen and
of a 50-step finalist, less the default search, over the default's heal; with W, the contiguous cuts' share is
taken as W / 128 of their pass on every window plus that pass's share per candidate scored on all. Writes
replay-budget.md beside this script:

    python bench/results/grid-repair4-h200/replay_budget.py
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from datetime import datetime
from pathlib import Path

from layercut import repair

HERE = Path(__file__).parent
COST = HERE.parent / "repair-cost-finalists3-h100"


def _script(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules.setdefault(name, importlib.util.module_from_spec(spec))  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


replay = _script("replay_finalists", HERE / "replay_finalists.py")
repair_cost = _script("repair_cost", Path(__file__).parents[2] / "repair_cost.py")

# (S, K, F) or (S, K, F, W): with W, the contiguous cuts ranked on the first W calibration windows (rank_windows.py)
SETTINGS = [(2, None, 3), (2, None, 2), (2, 2, 2), (1, None, 3), (1, None, 2), (1, None, 1), (1, 8, 2), (1, 6, 2),
            (1, 4, 2), (1, 4, 1), (1, 4, 1, 4)]
CONTIGUOUS_8B, TWO_SEGMENT_SCREENS, CALIBRATION_WINDOWS = 25, 4, 128
RANKED = HERE / "rank-windows.json"


def stage_seconds() -> dict[str, float]:
    """From the timestamped 8B search (profile-8b.log): the 25 contiguous cuts (the gate's exhaustive search for one
    segment fewer, from its "exhaustive:" line to its first step), the rest of the two-segment search up to the
    screen, and the mean screen and finalist seconds; the default's search and heal from repair_cost.json. That run
    predates the change that stopped the selection scoring the contiguous cuts a second time before the gate (from
    its first line to "exhaustive:"); the model leaves that second scoring out."""
    stamps = []
    for line in (COST / "profile-8b.log").read_text().splitlines():
        try:
            stamps.append((datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp(), line[24:]))
        except ValueError:
            continue
    exhaustive = next(t for t, text in stamps if "exhaustive: " in text)
    gate = next(t for t, text in stamps if "gate step 0 " in text)
    screen = next(t for t, text in stamps if "; screening " in text)
    timed = repair_cost.stage_seconds(stamps[0][0], stamps, stamps[-1][0])
    clp = json.loads((COST / "repair_cost.json").read_text())["shapes"]["llama3-8b"]["methods"]["clp"]
    return {"twice": exhaustive - stamps[0][0], "one": gate - exhaustive, "two": screen - gate,
            "screen": timed["screen_s_each"], "finalist": timed["finalist_s_each"],
            "default_search": clp["search_s"]["mean"], "heal": clp["heal_s"]["mean"]}


def cost_8b(setting: tuple, stage: dict[str, float], twice: bool = False) -> float:
    """The setting's added search at the 8B shape over the default's heal (a model: see the module's text);
    ``twice``: with the contiguous cuts scored a second time, as the timed run did."""
    segments, top, count, *ranked = setting
    one = CONTIGUOUS_8B if top is None else min(top, CONTIGUOUS_8B) + 1  # with K set the tail is screened besides
    two = 0 if segments == 1 else (TWO_SEGMENT_SCREENS if top is None else min(top, TWO_SEGMENT_SCREENS))
    finalists = count + (min(count, two) if two else 0)
    scoring = stage["one"]  # every contiguous cut on every window, or (W) all on W windows and the screened on all
    if ranked:
        scoring *= ranked[0] / CALIBRATION_WINDOWS + one / CONTIGUOUS_8B
    seconds = (scoring + (stage["two"] + (stage["twice"] if twice else 0.0) if segments > 1 else 0.0)
               + (one + two) * stage["screen"] + (finalists if finalists > 1 else 0) * stage["finalist"])
    return (seconds - stage["default_search"]) / stage["heal"]


def pick(search: dict, remove: int, layers: int, setting: tuple) -> str | None:
    """The setting's pick on a logged search, or None when it needs a heal the run did not make."""
    segments, top, count, *ranked = setting
    kl = {replay.as_key(cut): value for cut, value in search["kl"].items() if cut.count(":") <= segments}
    if ranked:  # the lowest on the first W windows: their KL there stands in for the order
        rows = json.loads(RANKED.read_text()) if RANKED.is_file() else {}
        few = rows.get(search["model"], {}).get(str(remove), {}).get(str(search["seed"]), {}).get("few", {})
        if str(ranked[0]) not in few:  # not ranked by rank_windows.py
            return None
        kl = {replay.as_key(cut): value for cut, value in few[str(ranked[0])]["kl"].items()}
    chosen = repair.candidate_cuts(kl, layers, remove, top)
    if any(c not in kl for c in chosen):
        return None
    text = {replay.as_key(cut): cut for cut in search["kl"]}
    screened = {c: search["screen"][text[c]] for c in chosen}
    final = [text[c] for c in repair.finalists(screened, count)]
    if len(final) == 1:  # a lone finalist wins without its longer heal
        return final[0]
    if any(cut not in search["finalists"] for cut in final):
        return None
    return min(final, key=lambda cut: repair.extrapolated((10, search["screen"][cut]), (50, search["finalists"][cut]),
                                                          200))


def name(setting: tuple) -> str:
    segments, top, count, *ranked = setting
    where = f" ranked on {ranked[0]} windows" if ranked else ""
    return f"S = {segments}, K = {'all' if top is None else top}{where}, F = {count}"


def main() -> None:
    found, stage = replay.searches(), stage_seconds()
    for (model, _, seed), search in found.items():
        search.update(model=model, seed=seed)
    layers = {"gemma3-270m": 18, "smollm2-135m": 30}
    cells = sorted({(model, remove) for model, remove, _ in found})
    lines = ["# Cheaper settings of the repair selection, replayed, against their cost at 8B", "",
             ("S: `--segments`, K: `--repair-candidates` (all: every contiguous cut and the 4 best two-segment cuts), "
             "F: `--repair-finalists`; ranked on W windows: the contiguous cuts ordered by their KL on the first W "
             "calibration windows, only the candidates scored on all 128 (rank-windows.md). A lone finalist is not "
             "healed again. The shipped setting is S = 2, K = all, F = 3. Per cell, the mean over seeds "
             "0, 1, 2 of the pick's wiki perplexity after the 200-step endpoint heal (— where a pick was not healed "
             "at some seed, or the setting needs a screen the run did not make). Cost: the added search at the 8B "
             f"shape over the default's heal, modelled from {COST.name} (the 25 contiguous cuts {stage['one']:.1f} s, "
             f"the rest of the two-segment search {stage['two']:.1f} s, a screen {stage['screen']:.2f} s, a finalist "
             f"{stage['finalist']:.2f} s; default search {stage['default_search']:.2f} s, heal {stage['heal']:.2f} s). "
             f"The timed run also scored the contiguous cuts a second time ({stage['twice']:.1f} s), which the "
             f"selection no longer does: with it, the shipped setting models at {cost_8b(SETTINGS[0], stage, True):.1f}"
             "× (measured cold: 14.6×)."),
             "", "| setting | cost at 8B | " + " | ".join(f"{m} n = {n}" for m, n in cells) + " |",
             "|---|---|" + "---|" * len(cells)]
    for setting in SETTINGS:
        row = []
        for model, remove in cells:
            values = []
            for seed in (0, 1, 2):
                cut = pick(found[(model, remove, seed)], remove, layers[model], setting)
                values.append(None if cut is None else replay.worth(model, remove, seed, replay.as_cut(cut)))
            row.append("—" if None in values else f"{statistics.fmean(values):.2f}")
        lines.append(f"| {name(setting)} | {cost_8b(setting, stage):.1f}× | " + " | ".join(row) + " |")
    (HERE / "replay-budget.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
