"""Segment search on a real model: the gate against the exact oracle, with one and with several segments.

Three parts, each written to ``--out``/search.json as it finishes (so a run cut short keeps what it measured):

* ``single``: for every n of ``--single-removes`` and seed, the exact single-segment oracle by the plain gated
  path (as layercut scored cuts before) and by the shared scorer (dense model once, prefix reuse, teacher kept),
  and the gate under each setting of ``--configs``: its segment, KL and time.
* ``multi``: for every n of ``--removes`` and seed, the exact optimum over cuts of at most 2 segments (the shared
  scorer; the plain path timed on a random sample of cuts and extrapolated), the gate with at most 2 and at most 3
  segments, and a greedy baseline (remove the layer whose removal adds least KL, one at a time).
* ``heal`` (``--heal-steps`` > 0): the best single segment and the best cut of at most 2 segments, each healed
  with endpoint tuning (every cut's neighbours) and, for the single segment, with as many trained layers as the
  two-segment cut trains; held-out perplexity on ``--ppl``.

    python bench/search.py --out bench/results/search-h200                     # GPU, full setting
    python bench/search.py --out runs/search-cpu --quick                        # CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import torch

from layercut import heal
from layercut.config import DataOptions, HealOptions, ModelOptions, SearchOptions
from layercut.data import calibrate
from layercut.evaluate import perplexity
from layercut.forward import hard_kl
from layercut.gate import (
    count_cuts,
    cuts,
    exact_scorer,
    exhaustive,
    gate_settings,
    parse_key,
    search_exhaustive,
    search_gate,
    temperature,
)
from layercut.layers import cut, merge_adjacent
from layercut.load import load_model
from layercut.record import library_versions

logger = logging.getLogger("bench.search")

# The one-segment setting before its default became the first 10 steps of this schedule (and then 5 steeper steps): 30
# steps at learning rate 0.2 annealed from 1 to 0.05 layers, stopped once the read-out had been stable for 6 steps,
# read-out screened on 8 windows.
# Every setting below but "default" is relative to it, so each keeps the meaning it had when its results were
# committed.
ANNEAL = {"steps": 30, "tau_start": 1.0, "tau_end": 0.05}
THIRTY_STEPS = {"gate_steps": ANNEAL["steps"], "tau_end": ANNEAL["tau_end"], "gate_patience": 6, "gate_lr": 0.2,
                "gate_screen": 8}


def first_steps(steps: int) -> dict:
    """The first ``steps`` steps of the 30-step schedule, run for real (no early stop)."""
    return {"gate_steps": steps, "tau_end": temperature(steps - 1, ANNEAL["steps"], ANNEAL["tau_start"],
                                                        ANNEAL["tau_end"]), "gate_patience": 0}


def steeper(steps: int, windows: int) -> dict:
    """first10's temperature range (1 to its last step's 0.395 layers) in ``steps`` steps of ``windows`` windows, at
    the learning rate that keeps first10's reach (10 steps × 0.2 layers)."""
    return {**first_steps(steps), "tau_end": first_steps(10)["tau_end"], "gate_lr": round(2.0 / steps, 3),
            "gate_windows": windows}


# Gate settings compared on the single-segment cases; "old" is the setting layercut used before (60 steps of 4
# windows, every position, every read-out cut scored on all windows).
CONFIGS = {
    "default": {},
    "full": {"gate_patience": 0},  # the 30-step setting without its early stop: every step recorded (gate_replay.py)
    # the first 10, 12 or 15 steps of the 30-step schedule: what bench/gate_replay.py's stop-after-N rules replay
    # (first10 was the one-segment default before the steeper 5 steps)
    **{f"first{steps}": first_steps(steps) for steps in (10, 12, 15)},
    # first10 with half the tokens per step: one window, or the first 64 tokens (32 positions) of two
    "first10-w1": {**first_steps(10), "gate_windows": 1},
    "first10-c64": {**first_steps(10), "gate_context": 64, "gate_positions": 32},
    # fewer, steeper steps: first10's last temperature reached in 4 to 8 steps, with the learning rate raised so that a
    # profile can travel as far as in first10's 10 steps of 0.2 layers; two or four windows per step (the one-segment
    # default since is 5 steps of two windows at 0.4, annealed to 0.4 layers, screened on 4 windows)
    **{f"steep{steps}-w{windows}": steeper(steps, windows) for steps in (4, 5, 6, 7, 8) for windows in (2, 4)},
    "steep6-w2-screen4": {**steeper(6, 2), "gate_screen": 4},
    "old": {"gate_steps": 60, "gate_windows": 4, "gate_context": 0, "gate_positions": 0, "gate_patience": 0,
            "gate_screen": 0},
    "s30c128": {"gate_steps": 30, "gate_windows": 2, "gate_context": 128, "gate_positions": 64, "gate_patience": 6,
                "gate_screen": 8},
    "s20c64": {"gate_steps": 20, "gate_windows": 1, "gate_context": 64, "gate_patience": 4, "gate_screen": 8},
    "s20p32": {"gate_steps": 20, "gate_windows": 1, "gate_positions": 32, "gate_patience": 4, "gate_screen": 8},
    "s12c64": {"gate_steps": 12, "gate_windows": 1, "gate_context": 64, "gate_patience": 3, "gate_screen": 4},
    "s20c32": {"gate_steps": 20, "gate_windows": 1, "gate_context": 32, "gate_patience": 4, "gate_screen": 4},
    # the 30-step setting with fewer steps and/or profiles spaced by the removed width (not half of it)
    "s20": {"gate_steps": 20},
    "wide": {"profile_spacing": 1.0},
    "s20-wide": {"gate_steps": 20, "profile_spacing": 1.0},
    # fewer steps, stopping sooner
    "s12": {"gate_steps": 12, "gate_patience": 3},
    "s12-wide": {"gate_steps": 12, "gate_patience": 3, "profile_spacing": 1.0},
    "s16-wide": {"gate_steps": 16, "gate_patience": 4, "profile_spacing": 1.0},
}


def config_options(name: str, num_layers: int, remove: int, **fixed) -> SearchOptions:
    """The SearchOptions of setting ``name``; ``profile_spacing`` (a fraction of the removed width) becomes a
    number of gate profiles."""
    config = dict(CONFIGS[name]) if name == "default" else {**THIRTY_STEPS, **CONFIGS[name]}
    spacing = config.pop("profile_spacing", None)
    if spacing:
        config["gate_profiles"] = math.ceil((num_layers - remove + 1) / max(3, round(spacing * remove)))
    return SearchOptions(method="clp", remove=remove, **fixed, **config)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(function, *args, **kwargs):
    """``(function(*args, **kwargs), seconds)``, the GPU's queue drained before and after."""
    synchronize()
    started = time.perf_counter()
    value = function(*args, **kwargs)
    synchronize()
    return value, time.perf_counter() - started


def step_clock():
    """``(ends, progress)``: a gate ``progress`` callback that appends to ``ends`` the seconds since it was made at
    the end of each gate step (the first includes the search's setup)."""
    ends, started = [], time.perf_counter()

    def progress(_) -> None:
        synchronize()
        ends.append(time.perf_counter() - started)

    return ends, progress


def plain_exhaustive(handle, windows, remove: int, batch_size: int):
    """The exact single-segment oracle the way layercut scored cuts before: gates on every layer, no sharing."""
    return exhaustive(lambda candidates: hard_kl(handle, windows, candidates, batch_size), handle.num_layers, remove)


def same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * max(1.0, abs(b))


def not_worse(a: float, b: float) -> bool:
    """``a`` is not above ``b`` beyond the tolerance of :func:`same` (a cut's KL computed on another device, e.g. a
    CPU gate against a GPU exact optimum, differs in the last digits)."""
    return a <= b or same(a, b)


def greedy(scorer, num_layers: int, remove: int) -> tuple[list, float]:
    """Remove one layer at a time, each the one whose removal (with those already removed) gives the lowest KL."""
    removed: list[int] = []
    for _ in range(remove):
        left = [i for i in range(num_layers) if i not in removed]
        trials = [tuple(merge_adjacent([(i, i + 1) for i in sorted(removed + [layer])])) for layer in left]
        losses = scorer(trials)
        removed.append(left[min(range(len(left)), key=losses.__getitem__)])
    final = tuple(merge_adjacent([(i, i + 1) for i in sorted(removed)]))
    return [list(s) for s in final], scorer([final])[0]


def single_rows(handle, arguments, result, out) -> None:
    warm = calibrate(handle.tokenizer, data_options(arguments, 0), test=False).calibration[:2]
    # warm-up, untimed: the exact scorer's and the gate's
    exact_scorer(handle, warm, SearchOptions(method="clp"), arguments.batch_size)([((0, 2),)])
    search_gate(handle, warm, 2, SearchOptions(method="clp", remove=2, gate_steps=2), arguments.batch_size)
    for seed in arguments.seeds:
        windows = calibrate(handle.tokenizer, data_options(arguments, seed), test=False).calibration
        for remove in arguments.single_removes:
            options = SearchOptions(method="exhaustive", remove=remove)
            if arguments.oracle_from:  # the oracle's segment from an earlier run; the gate must return it
                known = next(r for r in json.loads(Path(arguments.oracle_from).read_text())["single"]
                             if r["remove"] == remove and r["seed"] == seed)
                row = {"remove": remove, "seed": seed, "oracle_segments": known["oracle_segments"],
                       "oracle_kl": known["oracle_kl"],  # and its time, measured there
                       "oracle_shared_seconds": known.get("oracle_shared_seconds", float("nan")),
                       "oracle_from": arguments.oracle_from, "gates": {}}
                for name in arguments.configs:
                    found, seconds = timed(search_gate, handle, windows, remove,
                                           config_options(name, handle.num_layers, remove), arguments.batch_size, seed)
                    row["gates"][name] = {"segments": found.segments, "kl": found.kl, "seconds": seconds,
                                          "steps": len(found.trajectory), "cuts_scored": found.evaluations,
                                          "profiles_per_step": [len(t["active"]) for t in found.trajectory],
                                          "match": [list(s) for s in found.segments] == known["oracle_segments"]}
                result["single"].append(row)
                write(result, out)
                continue
            shared, shared_s = timed(search_exhaustive, handle, windows, remove, options, arguments.batch_size)
            row = {"remove": remove, "seed": seed, "oracle_segments": shared.segments, "oracle_kl": shared.kl,
                   "oracle_shared_seconds": shared_s, "gates": {}}
            if not arguments.skip_plain:
                plain, plain_s = timed(plain_exhaustive, handle, windows, remove, arguments.batch_size)
                row.update(oracle_plain_seconds=plain_s,
                           oracle_same=plain.segments == shared.segments and same(plain.kl, shared.kl))
            if arguments.record:
                row.update(recorded(handle, windows, shared, arguments.batch_size))
            for name in arguments.configs:
                gate_options = config_options(name, handle.num_layers, remove)
                stamps, clock = step_clock()
                found, seconds = timed(search_gate, handle, windows, remove, gate_options, arguments.batch_size, seed,
                                       clock)
                row["gates"][name] = {"segments": found.segments, "kl": found.kl, "seconds": seconds,
                                      "steps": len(found.trajectory), "cuts_scored": found.evaluations,
                                      "profiles_per_step": [len(t["active"]) for t in found.trajectory],
                                      "match": same(found.kl, shared.kl)}
                if arguments.record:  # what bench/gate_replay.py needs to replay other stopping rules offline
                    row["gates"][name].update(trajectory=found.trajectory, landscape=found.landscape,
                                              step_ends=stamps, options=gate_options.model_dump())
            result["single"].append(row)
            logger.info("single n=%d seed=%d: %s", remove, seed, json.dumps(row)[:400])
            write(result, out)


def recorded(handle, windows, oracle, batch_size: int) -> dict:
    """The oracle's landscape (every cut's exact KL) and the screening landscape (every cut's KL on the first
    windows the gate screens its read-out on), recorded with ``--record`` for bench/gate_replay.py."""
    screen = gate_settings(SearchOptions()).gate_screen
    scorer = exact_scorer(handle, windows, SearchOptions(method="clp"), batch_size)
    keys = list(oracle.landscape)
    started = time.perf_counter()
    values = scorer([parse_key(key) for key in keys], screen)
    return {"oracle_landscape": oracle.landscape, "screen_windows": screen,
            "screen_landscape": dict(zip(keys, values)), "screen_seconds": time.perf_counter() - started}


def choose(result: dict) -> str:
    """The cheapest setting that reached the oracle in every single-segment case (the defaults' source)."""
    rows = result["single"]
    perfect = [name for name in rows[0]["gates"] if all(row["gates"][name]["match"] for row in rows)]
    if not perfect:
        return max(rows[0]["gates"], key=lambda name: sum(row["gates"][name]["match"] for row in rows))
    return min(perfect, key=lambda name: sum(row["gates"][name]["seconds"] for row in rows))


def multi_rows(handle, arguments, result, out) -> None:
    sampler = random.Random(0)
    for seed in arguments.seeds:
        windows = calibrate(handle.tokenizer, data_options(arguments, seed), test=False).calibration
        for remove in arguments.removes:
            if any(r["remove"] == remove and r["seed"] == seed for r in result["multi"]):
                continue  # measured already (--resume)
            two = SearchOptions(method="exhaustive", remove=remove, segments=2, exhaustive_budget=1e9)
            exact, exact_s = timed(search_exhaustive, handle, windows, remove, two, arguments.batch_size)
            single = min((value, key) for key, value in exact.landscape.items() if " " not in key)
            sample = sampler.sample(cuts(handle.num_layers, remove, 2), min(arguments.plain_sample,
                                                                             count_cuts(handle.num_layers, remove, 2)))
            scorer = exact_scorer(handle, windows, two, arguments.batch_size)
            if sample:
                plain, plain_s = timed(hard_kl, handle, windows, sample, arguments.batch_size)
                shared_sample = scorer(sample)
            gate = CONFIGS[arguments.gate] if arguments.gate else {}
            gate2, gate2_s = timed(search_gate, handle, windows, remove,
                                   SearchOptions(remove=remove, segments=2, **gate), arguments.batch_size, seed)
            gate3, gate3_s = timed(search_gate, handle, windows, remove,
                                   SearchOptions(remove=remove, segments=3, **gate), arguments.batch_size, seed)
            (greedy_cut, greedy_kl), greedy_s = timed(greedy, scorer, handle.num_layers, remove)
            count = exact.evaluations
            row = {"remove": remove, "seed": seed, "cuts": count,
                   "exact_segments": exact.segments, "exact_kl": exact.kl, "exact_seconds": exact_s,
                   "plain_seconds_estimated": plain_s * count / len(sample) if sample else None,
                   "plain_vs_shared_max_abs": max(abs(a - b) for a, b in zip(plain, shared_sample)) if sample else None,
                   "gate_setting": arguments.gate_label or arguments.gate or "default",
                   "single_best": single[1], "single_best_kl": single[0],
                   "gate2_segments": gate2.segments, "gate2_kl": gate2.kl, "gate2_seconds": gate2_s,
                   "gate2_match": same(gate2.kl, exact.kl), "gate2_not_worse_than_single": not_worse(gate2.kl, single[0]),
                   "gate3_segments": gate3.segments, "gate3_kl": gate3.kl, "gate3_seconds": gate3_s,
                   "greedy_segments": greedy_cut, "greedy_kl": greedy_kl, "greedy_seconds": greedy_s}
            result["multi"].append(row)
            logger.info("multi n=%d seed=%d: %s", remove, seed, json.dumps(row)[:400])
            write(result, out)


def regate_rows(handle, arguments, result, out) -> None:
    """For every multi row already measured (``--resume``) of the ``--seeds``, the gate with at most
    ``--regate-segments`` segments under ``--gate`` (the exact optimum is the row's)."""
    name = arguments.gate_label or arguments.gate or "default"
    gate = CONFIGS.get(arguments.gate, {})
    for row in result["multi"]:
        if name in row.get("regate", {}) or row.get("gate_setting") == name or row["seed"] not in arguments.seeds:
            continue  # measured under this setting already, or not asked for
        windows = calibrate(handle.tokenizer, data_options(arguments, row["seed"]), test=False).calibration
        for segments in arguments.regate_segments:
            found, seconds = timed(search_gate, handle, windows, row["remove"],
                                   SearchOptions(remove=row["remove"], segments=segments, **gate),
                                   arguments.batch_size, row["seed"])
            row.setdefault("regate", {}).setdefault(name, {})[f"gate{segments}"] = {
                "segments": found.segments, "kl": found.kl, "seconds": seconds, "steps": len(found.trajectory),
                "match_exact_k2": same(found.kl, row["exact_kl"]) if segments == 2 else None,
                "not_worse_than_exact_k2": not_worse(found.kl, row["exact_kl"])}
        logger.info("regate %s n=%d seed=%d: %s", name, row["remove"], row["seed"], json.dumps(row["regate"][name]))
        write(result, out)


def heal_rows(handle, arguments, result, out) -> None:
    options = data_options(arguments, 0)
    test = calibrate(handle.tokenizer, options.replace(ppl=arguments.ppl, ppl_windows=arguments.ppl_windows)).test
    base = HealOptions(heal_steps=arguments.heal_steps, heal_batch=8, heal_windows=arguments.heal_windows)
    prepared = heal.prepare(handle, base, options)
    dense = perplexity(handle.model, test, arguments.batch_size)
    for row in [r for r in result["multi"] if r["seed"] == 0]:
        cases = {"single": [tuple(int(x) for x in part.split(":")) for part in row["single_best"].split()],
                 "two": [tuple(s) for s in row["exact_segments"]]}
        entry = {"remove": row["remove"], "dense": dense}
        trained = len(heal.endpoint_layers(cases["two"], handle.num_layers))
        for name, segments in cases.items():
            variants = [("endpoints", base)]
            if name == "single" and trained > 2:  # as many trained layers as the two-segment cut's endpoints
                variants.append(("equal layers", base.replace(endpoint_layers=trained // 2)))
            for label, options_used in variants:
                pruned = copy.deepcopy(handle)
                removed = cut(pruned, segments)
                report = heal.heal(pruned, removed, prepared, options_used)
                entry[f"{name} {label}"] = {"segments": [list(s) for s in removed.segments],
                                            "perplexity": perplexity(pruned.model, test, arguments.batch_size),
                                            "trained_layers": report.layers,
                                            "trainable_parameters": report.trainable_parameters}
                del pruned
        result["heal"].append(entry)
        logger.info("heal n=%d: %s", row["remove"], json.dumps(entry)[:400])
        write(result, out)


def data_options(arguments, seed: int) -> DataOptions:
    return DataOptions(calib=arguments.calib, seq_len=arguments.seq_len, calib_windows=arguments.calib_windows,
                       seed=seed, batch_size=arguments.batch_size)


def write(result: dict, out: Path) -> None:
    (out / "search.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "search.md").write_text(markdown(result))


def gate_runs(row: dict) -> dict:
    """The gate runs of a multi row by setting name: the row's own (``gate_setting``; rows measured before that
    field existed ran the ``s30c128`` setting) and every ``regate`` entry."""
    own = {"gate2": {"segments": row["gate2_segments"], "kl": row["gate2_kl"], "seconds": row["gate2_seconds"],
                     "match_exact_k2": row["gate2_match"]},
           "gate3": {"segments": row["gate3_segments"], "kl": row["gate3_kl"], "seconds": row["gate3_seconds"]}}
    return {row.get("gate_setting", "s30c128"): own, **row.get("regate", {})}


def not_run(found: dict | None) -> dict:
    """A gate run for the tables: ``found``, or dashes where that run was not made."""
    return found or {"segments": "—", "kl": float("nan"), "seconds": float("nan")}


def markdown(result: dict) -> str:
    lines = [f"# Segment search on {result['model']} ({result['device']})", "", f"Command: `{result['command']}`", "",
             (f"Calibration: {result['settings']['calib_windows']} windows x {result['settings']['seq_len']} tokens of "
             f"`{result['settings']['calib']}`; hard-cut KL in nats/token."), ""]
    if result["single"]:
        names = list(result["single"][0]["gates"])
        lines += ["## One segment: the gate against the exact oracle", "",
                  "| n | seed | oracle | KL | oracle s (plain) | oracle s (shared) | "
                  + " | ".join(f"{name}: match, s" for name in names) + " |",
                  "|---|---|---|---|---|---|" + "---|" * len(names)]
        for r in result["single"]:
            gates = " | ".join(f"{'yes' if g['match'] else 'NO ' + str(g['segments'])}, {g['seconds']:.1f}"
                               for g in r["gates"].values())
            lines.append(f"| {r['remove']} | {r['seed']} | {r['oracle_segments']} | {r['oracle_kl']:.4f} | "
                         f"{r.get('oracle_plain_seconds', float('nan')):.1f} | {r['oracle_shared_seconds']:.1f} | "
                         f"{gates} |")
        rows = result["single"]
        lines += ["", "| setting | matches | gate s total | oracle s total (shared) | gate / oracle |",
                  "|---|---|---|---|---|"]
        oracle = sum(r["oracle_shared_seconds"] for r in rows)
        for name in names:
            seconds = sum(r["gates"][name]["seconds"] for r in rows)
            lines.append(f"| {name} | {sum(r['gates'][name]['match'] for r in rows)} of {len(rows)} | {seconds:.1f} | "
                         f"{oracle:.1f} | {seconds / oracle:.2f} |")
        if all("oracle_plain_seconds" in r for r in rows):
            plain = sum(r["oracle_plain_seconds"] for r in rows)
            lines += ["", (f"Exact oracle, plain gated path {plain:.1f} s, shared scorer {oracle:.1f} s "
                          f"({plain / oracle:.2f}x), same segment and KL in "
                          f"{sum(r['oracle_same'] for r in rows)} of {len(rows)} cases.")]
        lines += ["", "Profiles trained per gate step (the population shrinks to one per cut): "
                  + "; ".join(f"n={r['remove']} seed {r['seed']}: {g.get('profiles_per_step')}"
                              for r in rows for g in list(r["gates"].values())[:1]), ""]
    if result["multi"]:
        lines += ["## At most two segments: the exact optimum, the gate and a greedy baseline", "",
                  ("| n | seed | cuts | exact (K<=2) | KL | exact s | best single | KL | gate K<=2 | KL | s | gate K<=3 | "
                   "KL | s | greedy | KL | s |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lead = result["settings"].get("gate_label") or "default"
        rows = [r for r in result["multi"] if lead in gate_runs(r)]
        for r in rows:
            two, three = gate_runs(r)[lead]["gate2"], not_run(gate_runs(r)[lead].get("gate3"))
            lines.append(
                f"| {r['remove']} | {r['seed']} | {r['cuts']} | {r['exact_segments']} | {r['exact_kl']:.4f} | "
                f"{r['exact_seconds']:.1f} | [{r['single_best']}] | {r['single_best_kl']:.4f} | "
                f"{two['segments']}{'' if two['match_exact_k2'] else ' (NOT exact)'} | {two['kl']:.4f} | "
                f"{two['seconds']:.1f} | {three['segments']} | {three['kl']:.4f} | {three['seconds']:.1f} | "
                f"{r['greedy_segments']} | {r['greedy_kl']:.4f} | {r['greedy_seconds']:.1f} |")
        twos = [gate_runs(r)[lead]["gate2"] for r in rows]
        lines += ["", (f"Gate K<=2 ({lead}) equals the exact K<=2 optimum in {sum(t['match_exact_k2'] for t in twos)} of "
                      f"{len(rows)} cases and is never worse than the best single segment in "
                      f"{sum(not_worse(t['kl'], r['single_best_kl']) for t, r in zip(twos, rows))} of {len(rows)}."), ""]
        others = [(name, r, found) for r in result["multi"] for name, found in gate_runs(r).items() if name != lead]
        if others:
            lines += ["### Other gate settings and code versions against the same exact optimum", "",
                      "| setting | n | seed | exact K<=2 | KL | gate K<=2 | KL | s | gate K<=3 | KL | s |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for name, r, found in others:
                two, three = found["gate2"], not_run(found.get("gate3"))
                lines.append(f"| {name} | {r['remove']} | {r['seed']} | {r['exact_segments']} | {r['exact_kl']:.4f} | "
                             f"{two['segments']}{'' if two['match_exact_k2'] else ' (NOT exact)'} | {two['kl']:.4f} | "
                             f"{two['seconds']:.1f} | {three['segments']} | {three['kl']:.4f} | {three['seconds']:.1f} |")
            lines.append("")
    if result["heal"]:
        lines += ["## Healed: best single segment against best cut of at most two", "",
                  "| n | dense | variant | segments | trained layers | trainable | perplexity |", "|---|---|---|---|---|---|---|"]
        for entry in result["heal"]:
            for key, value in entry.items():
                if isinstance(value, dict):
                    lines.append(f"| {entry['remove']} | {entry['dense']:.2f} | {key} | {value['segments']} | "
                                 f"{value['trained_layers']} | {value['trainable_parameters']:,} | "
                                 f"{value['perplexity']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", required=True)
    parser.add_argument("--parts", default="single,multi,heal")
    parser.add_argument("--quick", action="store_true", help="small CPU setting")
    parser.add_argument("--batch-size", type=int, default=0, help="windows per pass of the exact scorer (0: 16, 4 "
                        "with --quick)")
    parser.add_argument("--single-removes", default="4,6,8,10")
    parser.add_argument("--removes", default="6,8,10")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--configs", default=",".join(name for name in CONFIGS if name not in ("old", "default")))
    parser.add_argument("--gate", default="", help="gate setting of the multi part: a name in CONFIGS, 'chosen' (the "
                                                   "single part's choice, also read from --chosen-file), or empty for "
                                                   "layercut's defaults")
    parser.add_argument("--chosen-file", default="", help="file that keeps the single part's chosen setting")
    parser.add_argument("--resume", default="", help="a search.json whose measured parts are kept (and extended)")
    parser.add_argument("--calib", default="wiki")
    parser.add_argument("--ppl", default="wiki")
    parser.add_argument("--oracle-from", default="", help="single part: take each case's exact oracle and the time "
                        "it took from this earlier search.json instead of running it (the gate alone is timed)")
    parser.add_argument("--gate-label", default="", help="name under which the multi and regate parts record the "
                        "gate's runs (default: the --gate setting's name, or 'default'); the tables lead with it")
    parser.add_argument("--regate-segments", default="2,3", help="regate part: the gate's numbers of segments")
    parser.add_argument("--skip-plain", action="store_true", help="do not time the plain gated oracle path")
    parser.add_argument("--record", action="store_true", help="single part: also keep each gate run's trajectory "
                        "and step times, the oracle's landscape and the screening landscape (bench/gate_replay.py)")
    parser.add_argument("--plain-sample", type=int, default=100, help="cuts the plain path scores to estimate its time")
    parser.add_argument("--heal-steps", type=int, default=200)
    parser.add_argument("--heal-windows", type=int, default=1024)
    parser.add_argument("--ppl-windows", type=int, default=256)
    arguments = parser.parse_args()
    for name in ("single_removes", "removes", "seeds", "regate_segments"):
        setattr(arguments, name, [int(x) for x in getattr(arguments, name).split(",") if x])
    arguments.configs = [name for name in arguments.configs.split(",") if name]
    arguments.seq_len = 64 if arguments.quick else 256
    arguments.calib_windows = 8 if arguments.quick else 32
    arguments.batch_size = arguments.batch_size or (4 if arguments.quick else 16)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    handle = load_model(arguments.model, ModelOptions(dtype="float32"))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    result = {"model": arguments.model, "device": device, "command": "python " + " ".join(sys.argv),
              "settings": {k: v for k, v in vars(arguments).items() if k != "out"}, "configs": CONFIGS,
              "versions": library_versions(), "single": [], "multi": [], "heal": []}
    if arguments.resume:
        earlier = json.loads(Path(arguments.resume).read_text())
        result.update({part: earlier.get(part, []) for part in ("single", "multi", "heal")},
                      earlier_commands=[*earlier.get("earlier_commands", []), earlier["command"]])
    parts = arguments.parts.split(",")
    if "single" in parts:
        single_rows(handle, arguments, result, out)
        result["chosen"] = choose(result)
        write(result, out)
        if arguments.chosen_file:
            Path(arguments.chosen_file).write_text(result["chosen"])
    if arguments.gate == "chosen":
        arguments.gate = result.get("chosen") or Path(arguments.chosen_file).read_text().strip()
        result["settings"]["gate"] = arguments.gate
    if "multi" in parts:
        multi_rows(handle, arguments, result, out)
    if "regate" in parts:
        regate_rows(handle, arguments, result, out)
    if "heal" in parts and arguments.heal_steps and not result["heal"]:
        heal_rows(handle, arguments, result, out)
    write(result, out)  # also when every asked-for part was measured already
    print((out / "search.md").read_text())


if __name__ == "__main__":
    main()
