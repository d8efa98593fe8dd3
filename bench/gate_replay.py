"""Replay the one-segment gate offline under other stopping and pruning rules, from a recorded search benchmark.

``python bench/search.py --parts single --record ...`` keeps, per case, each gate run's trajectory (every profile's
notch after every step, its loss and the profiles still training) with the time each step ended, the exact KL of
every cut (the oracle's landscape) and every cut's KL on the windows the read-out is screened on. A profile's path
does not depend on the other profiles (Adam acts per parameter, the loss is a sum over profiles and the calibration
batches are drawn independently of how many profiles train), so stopping a run earlier, or dropping a profile
sooner, changes only what the read-out sees. This script replays the read-out the way the gate does it (round the
training profiles, add their neighbours, screen, score the best exactly, hill-climb on the exact landscape) at the
step a rule stops, and estimates the time from the recorded costs:

* a gate step costs what the recorded step cost, scaled by the profiles it trains (on a CPU the cost is about
  proportional to them; on a GPU bound by kernel launches it is not, so there the saving is an upper bound);
* a screened or exactly scored cut costs the recorded screening or oracle time per cut; the setup (the dense
  teacher) is the first step's excess over the median step.

Only rules on the run's own temperature schedule can be replayed: a run with fewer steps anneals faster and takes
another path, which needs a new run.

    python bench/gate_replay.py --from bench/results/search-cpu/recorded/search.json \
        --out bench/results/search-cpu/recorded
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

from layercut.gate import (
    SCREENED,
    candidate_key,
    distinct_profiles,
    neighbours,
    parse_key,
    readout,
    refine,
    round_widths,
    to_candidate,
)


def rounded(step: dict, profile: int, remove: int, num_layers: int):
    return to_candidate(step["starts"][profile], round_widths(step["widths"][profile], remove), num_layers)


def after_collapse(step: dict, active: list[int], remove: int, num_layers: int) -> list[int]:
    """The profiles that train on after ``step``: of those rounding to one cut, the one with the lowest loss."""
    cuts = [rounded(step, p, remove, num_layers) for p in active]
    return [active[k] for k in distinct_profiles(cuts, [step["loss"][p] for p in active])]


def run_rule(trajectory: list[dict], remove: int, num_layers: int, patience: int = 0, near: bool = False,
             last: int | None = None, prune: float = 0.0, prune_steps: int = 3, earliest: int = 0
             ) -> tuple[int, list[list[int]], list[int]]:
    """``(stop, trained, active)``: the step after which the rule stops, the profiles trained at each step up to it
    and those the read-out rounds.

    ``patience``: stop once the read-out has stayed put that many steps (``near``: each profile's rounding stays
    within one layer of where it was when the count began, since the read-out scores neighbours anyway; else the
    distinct roundings must stay exactly the same, as the gate does with --gate-patience). ``last``: stop after that step at the
    latest; ``earliest``: not before that step. ``prune``: drop a profile whose loss has been above ``prune`` times the step's lowest loss for
    ``prune_steps`` steps in a row (the profiles see the same windows in a step, so their losses compare)."""
    active = list(trajectory[0]["active"])
    trained, stable, anchor, previous, worse = [], 0, None, None, {}
    final = len(trajectory) - 1 if last is None else min(last, len(trajectory) - 1)
    for index, step in enumerate(trajectory):
        if index:  # a profile the run dropped (it rounded to the cut of one that trained on) follows that one
            before = trajectory[index - 1]
            heirs = {rounded(before, q, remove, num_layers): q for q in step["active"]}
            active = list(dict.fromkeys(p if p in step["active"] else heirs.get(rounded(before, p, remove, num_layers))
                                        for p in active))
            active = [p for p in active if p is not None]
        trained.append(list(active))
        if prune:
            best = min(step["loss"][p] for p in active)
            for p in active:
                worse[p] = worse.get(p, 0) + 1 if step["loss"][p] > prune * best else 0
            keep = [p for p in active if worse[p] < prune_steps]
            active = keep or active
        active = after_collapse(step, active, remove, num_layers)
        if near:
            where = {p: rounded(step, p, remove, num_layers) for p in active}
            if anchor is not None and all(p in anchor and where[p] and anchor[p] and
                                          abs(where[p][0][0] - anchor[p][0][0]) <= 1 for p in active):
                stable += 1
            else:
                stable, anchor = 0, where
        else:
            cuts = [c for c in (rounded(step, p, remove, num_layers) for p in active) if c is not None]
            stable = stable + 1 if cuts == previous else 0
            previous = cuts
        if (patience and stable >= patience and index >= earliest) or index == final:
            return index, trained, active
    return len(trajectory) - 1, trained, active


def read_out(step: dict, active: list[int], remove: int, num_layers: int, oracle: dict, screen: dict):
    """The gate's read-out at ``step`` on the recorded landscapes: ``(cut, exact KL, cuts screened, cuts scored)``."""
    starts = torch.tensor(step["starts"])[active]
    widths = torch.tensor(step["widths"])[active]
    found = readout(starts, widths, num_layers, remove)
    candidates = list(dict.fromkeys(found + [n for c in found for n in neighbours(c, num_layers)]))
    screened = 0
    if len(candidates) > SCREENED:
        screened = len(candidates)
        candidates = sorted(candidates, key=lambda c: screen[candidate_key(c)])[:SCREENED]
    known: dict = {}
    best, kl = refine(candidates, lambda cs: [oracle[candidate_key(c)] for c in cs], num_layers, known)
    return best, kl, screened, len(known)


RULES = {
    "recorded": {},
    "exact-stable-6 (the 30-step setting)": {"patience": 6},
    "near-stable-3": {"patience": 3, "near": True},
    "near-stable-4": {"patience": 4, "near": True},
    "near-stable-6": {"patience": 6, "near": True},
    "near-stable-4, not before step 10": {"patience": 4, "near": True, "earliest": 9},
    "exact-stable-3, not before step 10": {"patience": 3, "earliest": 9},
    "stop-after-8": {"last": 7},
    "stop-after-10 (the default since)": {"last": 9},
    "stop-after-12": {"last": 11},
    "stop-after-15": {"last": 14},
    "stop-after-20": {"last": 19},
    "prune-2x": {"patience": 6, "prune": 2.0},
    "prune-1.5x": {"patience": 6, "prune": 1.5},
    "near-stable-4, prune-2x": {"patience": 4, "near": True, "prune": 2.0},
}


def replay_case(row: dict, gate: dict, num_layers: int, rule: dict) -> dict:
    remove, trajectory = row["remove"], gate["trajectory"]
    oracle, screen = row["oracle_landscape"], row["screen_landscape"]
    if rule:
        stop, trained, active = run_rule(trajectory, remove, num_layers, **rule)
    else:  # the run as it went: every recorded step
        stop, trained = len(trajectory) - 1, [step["active"] for step in trajectory]
        active = after_collapse(trajectory[-1], trajectory[-1]["active"], remove, num_layers)
    best, kl, screened, scored = read_out(trajectory[stop], active, remove, num_layers, oracle, screen)
    ends = gate["step_ends"]
    steps = [b - a for a, b in itertools.pairwise(ends)]
    typical = statistics.median(steps) if steps else ends[0]
    setup = max(0.0, ends[0] - typical)
    per_step = [ends[0] - setup, *steps]
    step_seconds = sum(per_step[i] * len(trained[i]) / max(len(trajectory[i]["active"]), 1) for i in range(stop + 1))
    cuts = len(oracle)
    exact_cut = max(0.0, row["oracle_shared_seconds"] - setup) / cuts
    screen_cut = row["screen_seconds"] / cuts
    seconds = setup + step_seconds + screened * screen_cut + scored * exact_cut
    return {"stop": stop + 1, "segments": [list(s) for s in best], "kl": kl,
            "match": [list(s) for s in best] == row["oracle_segments"], "screened": screened, "scored": scored,
            "profile_steps": sum(len(t) for t in trained[: stop + 1]), "seconds": seconds,
            "oracle_seconds": row["oracle_shared_seconds"], "gate_seconds": gate["seconds"]}


def recorded_rows(result: dict, config: str | None = None) -> list[dict]:
    """The cases recorded with ``--record`` (and, given ``config``, with a run of that gate setting)."""
    return [row for row in result["single"] if "oracle_landscape" in row and (config is None or config in row["gates"])]


def replay(result: dict, config: str, num_layers: int) -> dict:
    rows = recorded_rows(result, config)
    return {name: [replay_case(row, row["gates"][config], num_layers, rule) for row in rows]
            for name, rule in RULES.items()}


def markdown(result: dict, found: dict, config: str, source: str) -> str:
    lines = [f"# The one-segment gate replayed under other rules ({result['model']}, {result['device']})", "",
             (f"Command: `python {' '.join(sys.argv)}`, from `{source}` (made by `{result['command']}`), gate setting "
             f"`{config}`."), "",
             ("Times are estimates from the recorded step, screening and exact-cut costs (see bench/gate_replay.py); "
             "`recorded` replays the run as it went, so its estimate can be checked against the measured gate time."),
             "", ("| rule | matches | profile-steps | gate s (est.) | oracle s | gate / oracle | per case: n/seed, steps, "
             "gate / oracle, the cut where it is not the oracle's |"), "|---|---|---|---|---|---|---|"]
    rows = recorded_rows(result, config)
    for name, cases in found.items():
        if not cases:
            continue
        gate_s = sum(c["seconds"] for c in cases)
        oracle_s = sum(c["oracle_seconds"] for c in cases)
        detail = "; ".join(f"{r['remove']}/{r['seed']} {c['stop']} {c['seconds'] / c['oracle_seconds']:.2f}x"
                           f"{'' if c['match'] else ' NO ' + str(c['segments'])}" for r, c in zip(rows, cases))
        lines.append(f"| {name} | {sum(c['match'] for c in cases)} of {len(cases)} | "
                     f"{sum(c['profile_steps'] for c in cases)} | {gate_s:.1f} | {oracle_s:.1f} | "
                     f"{gate_s / oracle_s:.2f} | {detail} |")
    measured = sum(c["gate_seconds"] for c in found.get("recorded", []))
    lines += ["", f"Measured gate time of the recorded runs: {measured:.1f} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", required=True, help="a search.json made with --record")
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default="full", help="the recorded gate setting to replay")
    parser.add_argument("--layers", type=int, default=0, help="the model's decoder layers (default: from the "
                        "oracle's landscape)")
    arguments = parser.parse_args()
    result = json.loads(Path(arguments.source).read_text())
    rows = recorded_rows(result)
    if not rows:
        raise SystemExit(f"{arguments.source} has no recorded cases: run bench/search.py with --record")
    num_layers = arguments.layers or max(e for key in rows[0]["oracle_landscape"] for _, e in parse_key(key))
    found = replay(result, arguments.config, num_layers)
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay.json").write_text(json.dumps({"source": arguments.source, "config": arguments.config,
                                                 "command": "python " + " ".join(sys.argv), "rules": RULES,
                                                 "cases": found}, indent=1) + "\n")
    text = markdown(result, found, arguments.config, arguments.source)
    (out / "replay.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
