"""What the repair-aware selection adds to a prune, as a user meets it: ``--method clp`` against ``--method repair``
(the default: one segment, 128 calibration windows), on random-init model shapes (bench/timing.py's SHAPES).
``--extra`` adds flags to both methods' commands, ``--repair-extra`` to the repair method's alone (later flags win):
``--repair-extra "--segments 2"`` times the two-segment schedule, ``--repair-extra "--no-gate-checkpointing
--exact-cache-gib 4"`` the one-segment default without its lean short heals and smaller exact cache.

* COLD: per method, ``--repeats`` fresh processes of ``python -m layercut prune FOLDER --remove n --method M
  --output TMP --no-eval --no-speed`` with the default heal (200 endpoint-tuning steps), timed from launch to exit;
  from each run's ``layercut.json``, the search and heal stages' seconds.
* PROFILE: in this process, the same command line's model and calibration, each method's search again: on a GPU
  with the peak of allocated GPU memory reset before it, against the bytes of the model's weights; for the repair
  selection, its stages' seconds (before the screen, each screen, each finalist's heal) from its log lines.

The added cost of the repair selection is (its search − the default's search) / the default's heal seconds, both
cold means; the target of issue 27 is at most 1 at the 8B shape, and the search's peak memory at most 1.25× the
weights. Random weights make the chosen cut meaningless and may change how soon the gate's profiles settle, so
the cost on a trained model can differ. Writes ``repair_cost.json`` and ``README.md`` into ``--out``.

    python bench/repair_cost.py --shapes llama3-8b --out bench/results/repair-cost-h200 --models ~/tm
    python bench/repair_cost.py --shapes tiny --repeats 1 --out /tmp/rc --extra "--calib-windows 8 --heal-steps 4"
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from layercut import selection
from layercut.record import library_versions

_spec = importlib.util.spec_from_file_location("timing", Path(__file__).with_name("timing.py"))
timing = sys.modules.setdefault("timing", importlib.util.module_from_spec(_spec))  # its dataclasses look it up
_spec.loader.exec_module(timing)

# the concave gate alone, and the repair selection (on the 128 calibration windows it draws)
METHODS = ("clp", "repair")


def prune_arguments(name: str, folder: Path, method: str, output: Path, extra: list[str]) -> list[str]:
    """The ``layercut prune`` arguments timed for shape ``name`` and ``method`` (after ``python -m layercut``)."""
    return ["prune", str(folder), "--remove", str(timing.SHAPES[name].remove), "--method", method,
            "--output", str(output), "--overwrite", "--no-eval", "--no-speed", *timing.SHAPES[name].flags, *extra]


def cold_prune(arguments: list[str], output: Path) -> dict:
    """One fresh ``layercut prune`` process: seconds from launch to exit, and its record's stage seconds."""
    wall, _ = timing.fresh_process(arguments)
    record = json.loads((output / "layercut.json").read_text())
    return {"wall_s": wall, "search_s": record["search"]["seconds"], "heal_s": record["healing"]["seconds"],
            "segments": record["segments"]}


def stage_seconds(started: float, stamps: list[tuple[float, str]], ended: float) -> dict:
    """Where the repair selection's search spent its time, from the ``(perf_counter, message)`` of its
    ``layercut.repair`` log lines between ``started`` and ``ended``: the seconds before the screen (exact KL, gate,
    teacher targets), and the count and mean seconds of the screens and of the finalists' heals (each line ends one
    of them; the message's step count tells which), then the seconds after the last. Empty without a screen line."""
    marks = [index for index, (_, message) in enumerate(stamps) if "; screening " in message]
    if not marks:
        return {}
    rows = stamps[marks[0]:]
    steps = [message.rsplit("(", 1)[-1].split()[0] if message.endswith("steps)") else None for _, message in rows]
    found: dict[str, list[float]] = {}
    for (before, _), (now, _), count in zip(rows, rows[1:], steps[1:]):
        if count is not None:
            found.setdefault(count, []).append(now - before)
    kinds = sorted(found, key=int)
    stage = {"before_screen_s": rows[0][0] - started, "after_s": ended - rows[-1][0]}
    for name, count in zip(("screen", "finalist"), kinds):
        stage |= {f"{name}_steps": int(count), f"{name}s": len(found[count]),
                  f"{name}_s_each": sum(found[count]) / len(found[count])}
    return stage


def peak_stage(stamps: list[tuple[float, str]], peaks: list[int], last: int) -> tuple[int, str]:
    """The search's peak allocated bytes and the stage it fell in: ``peaks[i]`` is the peak between log line
    ``i - 1`` and line ``i`` (``stamps[i]``), ``last`` the peak after the last line; a stage is named by the log line
    that ends it."""
    found = [*zip(peaks, (message for _, message in stamps)), (last, "after the last log line")]
    return max(found, key=lambda pair: pair[0])


def search_profile(arguments: list[str]) -> dict:
    """The search alone, in this process: its stages' seconds (:func:`stage_seconds`, repair only) and, on a GPU,
    the peak allocated memory (bytes) against the weights' bytes, and the stage it fell in (:func:`peak_stage`;
    the peak is read and reset at each of the repair method's log lines, after the GPU has caught up)."""
    handle, windows, recipe = timing.prepared(arguments)
    weights = sum(p.numel() * p.element_size() for p in handle.model.parameters())
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    stamps: list[tuple[float, str]] = []
    peaks: list[int] = []

    def stamp(record: logging.LogRecord) -> None:
        if cuda:
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        stamps.append((time.perf_counter(), record.getMessage()))

    handler = logging.Handler(logging.INFO)
    handler.emit = stamp
    log = logging.getLogger("layercut.repair")
    level, started = log.level, time.perf_counter()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        selection.search(handle, windows, recipe.search, recipe.data.batch_size, recipe.data.seed)
        if cuda:
            torch.cuda.synchronize()
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    found = {"stages": stage_seconds(started, stamps, time.perf_counter())}
    if cuda:
        peak, stage = peak_stage(stamps, peaks, torch.cuda.max_memory_allocated())
        found |= {"peak_bytes": peak, "weight_bytes": weights, "peak_over_weights": peak / weights,
                  "peak_stage": stage}
    del handle, windows
    if cuda:
        torch.cuda.empty_cache()
    return found


def measure(name: str, folder: Path, extra: list[str], repeats: int, repair_extra: list[str] = ()) -> dict:
    """Cold prunes and the search's peak memory of both methods on shape ``name`` (``repair_extra``: flags for the
    repair method alone), and the repair selection's added cost over CLP's heal."""
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "pruned"
        for method in METHODS:
            arguments = prune_arguments(name, folder, method, output,
                                        [*extra, *(repair_extra if method == "repair" else ())])
            cold = [cold_prune(arguments, output) for _ in range(repeats)]
            profile = search_profile(arguments)
            rows[method] = {"command": "layercut " + shlex.join(arguments).replace(str(output), "OUT"),
                            **{key: timing.spread([c[key] for c in cold]) for key in ("wall_s", "search_s", "heal_s")},
                            "segments": [c["segments"] for c in cold], "stages": profile.pop("stages"),
                            "memory": profile or None}
            print(name, method, json.dumps({k: v for k, v in rows[method].items() if k != "command"}), flush=True)
    added = rows["repair"]["search_s"]["mean"] - rows["clp"]["search_s"]["mean"]
    return {"remove": timing.SHAPES[name].remove, "methods": rows, "added_search_s": added,
            "added_over_heal": added / rows["clp"]["heal_s"]["mean"]}


def table(results: dict) -> str:
    lines = [("| shape | n | method | cold prune, launch to exit (s) | search stage (s) | heal stage (s) | "
              "search peak / weights | cut |"), "|---|---|---|---|---|---|---|---|"]
    ratios = ["", "| shape | repair's added search (s) | over the default's heal |", "|---|---|---|"]
    for name, shape in results["shapes"].items():
        for method, row in shape["methods"].items():
            memory = row["memory"] or {}
            cells = [f"{row[key]['mean']:.2f} ± {row[key]['spread']:.2f}" for key in ("wall_s", "search_s", "heal_s")]
            lines.append(f"| {name} | {shape['remove']} | {method} | {' | '.join(cells)} | "
                         f"{format(memory['peak_over_weights'], '.2f') + '×' if memory else '—'} | "
                         f"{row['segments'][-1]} |")
        ratios.append(f"| {name} | {shape['added_search_s']:.2f} | {shape['added_over_heal']:.2f}× |")
    stages = ["", ("| shape | before the screen (s) | screens × s each | finalists × s each | after (s) | "
                   "of the search, in one warm process (s) | its peak fell before the log line |"),
              "|---|---|---|---|---|---|---|"]
    for name, shape in results["shapes"].items():
        if stage := shape["methods"]["repair"].get("stages"):
            total = (stage["before_screen_s"] + stage["after_s"] + stage.get("screens", 0) * stage.get("screen_s_each", 0)
                     + stage.get("finalists", 0) * stage.get("finalist_s_each", 0))
            each = [f"{stage[f'{k}s']} × {stage[f'{k}_s_each']:.2f} ({stage[f'{k}_steps']} steps)" if f"{k}s" in stage
                    else "—" for k in ("screen", "finalist")]
            where = (shape["methods"]["repair"]["memory"] or {}).get("peak_stage", "—")
            stages.append(f"| {name} | {stage['before_screen_s']:.2f} | {' | '.join(each)} | {stage['after_s']:.2f} | "
                          f"{total:.2f} | {where} |")
    return "\n".join(lines + ratios + (stages if len(stages) > 3 else []))


def write(results: dict, out: Path) -> None:
    (out / "repair_cost.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "README.md").write_text(
        f"# What the repair selection adds to `layercut prune`, on {results['device']}\n\n```sh\n"
        f"{results['command']}\n```\n\nCold: {results['repeats']} fresh `layercut prune` process(es) per method, "
        "timed from launch to exit, with the default heal; the search and heal stages' seconds are those of each "
        "run's `layercut.json`. Search peak: the search alone in one process, peak allocated GPU memory over the "
        "weights' bytes (— on a CPU). Mean ± half the range. Random-init weights: the cut is meaningless, only cost "
        f"is measured.\n\n{table(results)}\n\nVersions: {results['versions']}\n")


def main(argv=None) -> None:
    parser = timing.shape_parser(__doc__, "smollm2-135m,gemma3-270m,llama3-8b", "prune")
    parser.add_argument("--repair-extra", default="", help="more flags for the repair method alone")
    arguments = parser.parse_args(argv)
    out, extra = Path(arguments.out), shlex.split(arguments.extra)
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": timing.device_name(), "command": "python " + shlex.join([sys.argv[0], *(argv or sys.argv[1:])]),
               "repeats": arguments.repeats, "versions": library_versions(), "shapes": {}}
    for name in arguments.shapes.split(","):
        folder = timing.build_folder(name, Path(arguments.models))
        results["shapes"][name] = measure(name, folder, extra, arguments.repeats, shlex.split(arguments.repair_extra))
        write(results, out)


if __name__ == "__main__":
    main()
