"""Which cut the repair-aware selection picks in the headline cells, and what that pick is worth after the full heal.

For each (model, n, seed): the calibration windows ``--method repair`` draws (128; ``--calib-windows`` sets
others), the selection run as ``layercut prune --method repair`` runs it (``--config`` sets its options as JSON:
segments, repair_candidates, repair_steps, repair_proxy), its pick and search time recorded with every candidate's
exact and repaired KL. The pick's worth is looked up, not recomputed: its held-out wiki perplexity after the grid
protocol's 200-step endpoints heal, same seed, from the landscape (bench/results/landscape-h100) or from any grid
cell that healed the same cut (bench/results/grid-h200); "unmeasured" when neither holds it. The same cut, heal and seed is the same computation,
so the looked-up value is the pick's value on the machine that measured it.

    python bench/repair_pick.py --out ~/res/repair-pick --seeds 0        # on the GPU: bench/device/remote.sh picks
    python bench/repair_pick.py --out bench/results/repair-pick-h100 --lookup   # here, once more cells are measured
    python bench/repair_pick.py --out DIR --cells gemma3-270m:6 --score '[[[7,13]],[[12,18]]]'  # given cuts only

``--score`` skips the search: the given cuts are scored by the selection's own proxy on the same windows, as it
scores its finalists (KL after the screen's steps, after the finalists' steps, and extrapolated to the full heal),
each with its worth looked up; the file says which is lowest. ``--replay DIRS`` runs the selection's last stage
again on the searches and ``--score`` files recorded there (``replay.md``, ``replay.json`` in ``--out``).

On the CPU it is too slow to be useful at these sizes: the two-segment gate (60 steps at full context) had not
finished on SmolLM2 n = 10 after 15 minutes on 2 cores, and each candidate's 25-step short heal costs minutes more.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from layercut import repair, selection
from layercut.config import REPAIR_CALIB_WINDOWS, DataOptions, ModelOptions, SearchOptions
from layercut.data import calibrate
from layercut.files import write_atomically
from layercut.load import load_model
from layercut.record import library_versions

RESULTS = Path(__file__).parent / "results"
logger = logging.getLogger("bench.repair_pick")


def measured_values(landscape: Path, grid: Path) -> dict[tuple, dict]:
    """(model, n, seed, cut as JSON) → {"wiki": …, "source": …} for every endpoints-healed cut on record."""
    found = {}
    for path in sorted((grid / "cells").glob("*-endpoints.json")):
        cell = json.loads(path.read_text())
        if "perplexity_wiki" in cell and "chosen" in cell:
            key = (cell["model"], cell["remove"], cell["seed"], json.dumps(cell["chosen"]))
            found[key] = {"wiki": cell["perplexity_wiki"], "source": f"grid {path.name}"}
    for path in sorted((landscape / "cuts").glob("*.json")):
        cell = json.loads(path.read_text())
        value = cell["heal"]["steps"].get("200", {}).get("perplexity_wiki")
        if value is not None:
            key = (cell["model"], cell["remove"], cell["seed"], json.dumps(cell["cut"]))
            found[key] = {"wiki": value, "source": f"landscape {path.name}"}
    return found


def prepared(model: str, remove: int, seed: int, config: dict, arguments) -> tuple:
    """The model, the grid's calibration windows for ``seed`` and the repair selection's options of ``config``."""
    handle = load_model(model, ModelOptions(dtype="float32"))
    data = DataOptions(seq_len=arguments.seq_len, calib_windows=arguments.calib_windows, seed=seed,
                       batch_size=arguments.batch_size)
    windows = calibrate(handle.tokenizer, data, test=False).calibration
    return handle, windows, SearchOptions(remove=remove, method="repair", **config)


def pick(model: str, remove: int, seed: int, config: dict, arguments, known: dict) -> dict:
    handle, windows, options = prepared(model, remove, seed, config, arguments)
    started = time.perf_counter()
    found = selection.search(handle, windows, options, arguments.batch_size, seed)
    chosen = [list(s) for s in found.segments]
    return {"model": Path(model).name, "remove": remove, "seed": seed, "config": config, "chosen": chosen,
            "kl": found.kl, "seconds": time.perf_counter() - started, "candidates": found.trajectory,
            "worth": known.get((Path(model).name, remove, seed, json.dumps(chosen)))}


def score(model: str, remove: int, seed: int, config: dict, cuts: list, arguments, known: dict) -> dict:
    """``--score``: the given ``cuts`` scored by the repair selection's own proxy (the options of ``config``) on the
    same windows as :func:`pick`, without its search, each as if it were a finalist: its held-out KL after the
    screen's steps and after the finalists' (``repair.repaired_kls``), and the two extrapolated to the horizon
    (``repair.extrapolated``), the value the selection ranks finalists by; each with its worth looked up."""
    candidates = [tuple(tuple(segment) for segment in cut) for cut in cuts]
    wrong = [cut for cut in candidates if sum(end - start for start, end in cut) != remove]
    if wrong:
        raise SystemExit(f"--score: {wrong} do not remove {remove} layers")
    handle, windows, options = prepared(model, remove, seed, config, arguments)
    started = time.perf_counter()
    data = repair.repair_data(handle, windows, arguments.batch_size)
    screened = repair.repaired_kls(handle, data, candidates, options, arguments.batch_size, seed,
                                   steps=options.repair_screen_steps)
    scores = repair.repaired_kls(handle, data, candidates, options, arguments.batch_size, seed)
    rows = [{"cut": [list(s) for s in cut], "screened_kl": screened[cut], "repaired_kl": value,
             "extrapolated_kl": repair.extrapolated((options.repair_screen_steps, screened[cut]),
                                                    (options.repair_steps, value), options.repair_horizon),
             "worth": known.get((Path(model).name, remove, seed, json.dumps([list(s) for s in cut])))}
            for cut, value in scores.items()]
    best = min(rows, key=lambda row: row["extrapolated_kl"])
    return {"model": Path(model).name, "remove": remove, "seed": seed, "config": config, "scored": rows,
            "lowest": best["cut"], "seconds": time.perf_counter() - started}


def recorded_finalist(model: str, remove: int, seed: int, cut: str, steps: int,
                      sources: list[Path]) -> dict | None:
    """The repaired KL after ``steps`` (the finalists' steps) of ``cut`` from a ``--score`` file of the same cell
    and seed on 128 windows among ``sources``, and which file and machine measured it; None when none holds it."""
    for path in sorted(p for source in sources for p in source.glob(f"{model}-n{remove}-seed{seed}-scored-*.json")):
        result = json.loads(path.read_text())
        scored_steps = SearchOptions(remove=remove, method="repair", **result["config"]).repair_steps
        if scored_steps != steps or "calib128" not in path.name:
            continue
        for row in result["scored"]:
            if " ".join(f"{a}:{b}" for a, b in row["cut"]) == cut:
                return {"repaired_kl": row["repaired_kl"], "source": f"{path.parent.name}/{path.name}",
                        "torch": result["versions"]["torch"]}
    return None


def replay(sources: list[Path], known: dict) -> list[dict]:
    """``--replay``: the selection's last stage run again on recorded measurements, for each recorded pick among
    ``sources`` (a search's candidates with their screened KL, and the repaired KL of the finalists it healed): the
    finalists the selection heals now (``repair.finalists``: the best ``repair_finalists`` of each number of
    segments) and the winner by KL extrapolated to the horizon (``repair.extrapolated``), the recorded search's
    options throughout. A finalist the recorded search did
    not heal takes its repaired KL from a ``--score`` file of the same cell and seed (the same windows, seed and
    steps: the same computation, on the machine named). A cell where one is missing is reported incomplete."""
    rows = []
    for path in sorted(p for source in sources for p in source.glob("*-calib128.json") if "-scored-" not in p.name):
        result = json.loads(path.read_text())
        model, remove, seed = result["model"], result["remove"], result["seed"]
        options = SearchOptions(remove=remove, method="repair", **result["config"])
        screened = {row["cut"]: row["screened_kl"] for row in result["candidates"]}
        keys = {tuple(tuple(int(i) for i in part.split(":")) for part in cut.split()): cut for cut in screened}
        chosen = repair.finalists({c: screened[k] for c, k in keys.items()}, options.repair_finalists)
        finals, missing = [], []
        for candidate in chosen:
            cut = keys[candidate]
            row = next(r for r in result["candidates"] if r["cut"] == cut)
            found = ({"repaired_kl": row["repaired_kl"], "source": path.name, "torch": result["versions"]["torch"]}
                     if row["repaired_kl"] is not None
                     else recorded_finalist(model, remove, seed, cut, options.repair_steps, sources))
            if found is None:
                missing.append(cut)
                continue
            ahead = repair.extrapolated((options.repair_screen_steps, screened[cut]),
                                        (options.repair_steps, found["repaired_kl"]), options.repair_horizon)
            finals.append({"cut": cut, "screened_kl": screened[cut], **found, "extrapolated_kl": ahead})
        pick = min(finals, key=lambda row: row["extrapolated_kl"]) if finals else None
        as_list = (lambda cut: json.dumps([[int(i) for i in part.split(":")] for part in cut.split()]))
        rows.append({"model": model, "remove": remove, "seed": seed, "recorded": path.name,
                     "recorded_pick": result["chosen"],
                     "recorded_worth": known.get((model, remove, seed, json.dumps(result["chosen"]))),
                     "finalists": finals,
                     "missing": missing, "pick": pick and pick["cut"],
                     "worth": pick and known.get((model, remove, seed, as_list(pick["cut"])))})
    return rows


def replay_table(rows: list[dict]) -> str:
    lines = ["| cell | seed | recorded pick → wiki | replayed pick → wiki | finalists (screened → 50 steps → at 200) |",
             "|---|---|---|---|---|"]
    for row in rows:
        def worth(value):
            return f"{value['wiki']:.2f}" if value else "not healed"
        recorded = " + ".join(f"[{a}, {b})" for a, b in row["recorded_pick"])
        picked = (" + ".join(f"[{c.replace(':', ', ')})" for c in row["pick"].split()) if row["pick"] else "—")
        finals = "; ".join(f"{r['cut']} {r['screened_kl']:.4f} → {r['repaired_kl']:.4f} → {r['extrapolated_kl']:.4f}"
                           + ("" if r["source"] == row["recorded"] else f" ({r['torch']})") for r in row["finalists"])
        if row["missing"]:
            finals += f"; not measured: {', '.join(row['missing'])}"
        lines.append(f"| {row['model']} n = {row['remove']} | {row['seed']} | {recorded} → "
                     f"{worth(row['recorded_worth'])} | {picked} → {worth(row['worth'])}"
                     f"{' (incomplete)' if row['missing'] else ''} | {finals} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--cells", default="smollm2-135m:6,smollm2-135m:10,gemma3-270m:4,gemma3-270m:6")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--config", default='{"segments": 2}', help="the repair selection's options, as JSON")
    parser.add_argument("--lookup", action="store_true", help="only look up again what the recorded picks are worth")
    parser.add_argument("--score", default="", help="instead of the search, score these cuts (a JSON list of cuts, "
                        "each a list of [start, end)) with the selection's proxy, in every cell of --cells")
    parser.add_argument("--replay", default="", help="instead of searching, replay the selection's last stage on "
                        "the recorded picks and --score files in these folders (comma-separated) into --out")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-windows", type=int, default=REPAIR_CALIB_WINDOWS,
                        help="calibration windows (default: those layercut prune --method repair draws)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--landscape", default=str(RESULTS / "landscape-h100"))
    parser.add_argument("--grid", default=str(RESULTS / "grid-h200"))
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(0)
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads(arguments.config)
    label = "-".join(f"{k}{v}" for k, v in sorted(config.items())) or "default"
    label += f"-calib{arguments.calib_windows}" * (arguments.calib_windows != 32)
    known = measured_values(Path(arguments.landscape), Path(arguments.grid))
    if arguments.replay:
        rows = replay([Path(p) for p in arguments.replay.split(",")], known)
        command = "python " + " ".join(sys.argv)
        write_atomically(out / "replay.json", json.dumps({"rows": rows, "command": command}, indent=1) + "\n")
        write_atomically(out / "replay.md", f"    {command}\n\n" + replay_table(rows))
        print(replay_table(rows))
        return
    if arguments.lookup:
        for path in sorted(out.glob("*.json")):
            result = json.loads(path.read_text())
            key = (result["model"], result["remove"], result["seed"], json.dumps(result["chosen"]))
            write_atomically(path, json.dumps({**result, "worth": known.get(key)}, indent=1) + "\n")
            logger.info("%s: %s worth %s", path.stem, result["chosen"], known.get(key))
        return
    for cell in arguments.cells.split(","):
        model, remove = cell.split(":")
        for seed in map(int, arguments.seeds.split(",")):
            path = out / f"{Path(model).name}-n{remove}-seed{seed}-{'scored-' * bool(arguments.score)}{label}.json"
            if path.is_file():
                continue
            if arguments.score:
                result = score(model, int(remove), seed, config, json.loads(arguments.score), arguments, known)
            else:
                result = pick(model, int(remove), seed, config, arguments, known)
            result |= {"command": "python " + " ".join(sys.argv), "versions": library_versions()}
            write_atomically(path, json.dumps(result, indent=1) + "\n")
            if arguments.score:
                logger.info("%s: lowest extrapolated KL %s, of %s", path.stem, result["lowest"], result["scored"])
            else:
                logger.info("%s: picked %s in %.0f s, worth %s", path.stem, result["chosen"], result["seconds"],
                            result["worth"])


if __name__ == "__main__":
    main()
