"""The headline grid: every selection method and the peers' heals on real models at two removal rates, under one
protocol. One resumable command: each cell is a JSON file under ``--out``/cells, written when done and skipped by
a rerun, so a killed run continues where it stopped.

A cell is (model, n, seed, selection, heal). Per model and seed the dense model is measured once; per selection
the cut is searched once; every heal then starts from a fresh copy of the dense model. Measured per cell: the
layers removed, search and heal time, held-out perplexity on ``wiki`` (test part) and ``lee``, zero-shot acc and
acc_norm on the seven tasks through lm-eval (with its standard errors), retention and retention above chance.

    python bench/grid.py --out bench/results/grid                    # the full grid (GPU)
    python bench/grid.py --out bench/results/grid --report           # tables, plots and results.md from the cells
    python bench/grid.py --out runs/grid-smoke --models /tmp/tiny --rates tiny --limit 4 --tasks piqa  # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from pathlib import Path

from layercut import heal, selection
from layercut.config import DataOptions, EvalOptions, HealOptions, ModelOptions, SearchOptions
from layercut.data import calibrate, evaluation_windows, load_text
from layercut.evaluate import evaluate, perplexity
from layercut.files import write_atomically
from layercut.layers import cut
from layercut.load import load_model
from layercut.record import library_versions
from layercut.zeroshot import CHANCE, TASKS, retention

logger = logging.getLogger("bench.grid")

RATES = {"smollm2-135m": (6, 10), "gemma3-270m": (4, 6), "tiny": (2, 3)}  # about 20 % and 33 % of the layers
SELECTIONS = {"clp": {}, "clp-2": {"method": "clp", "segments": 2}, "exhaustive": {}, "tail": {},
              "block-influence": {}, "angular": {}, "cosine-block": {}, "sleb": {}, "ppl": {}, "taylor": {}}
EVERYWHERE = ("none", "endpoints")
ON_CLP_AND_TAIL = {"replaceme": {"heal": "replaceme"}, "streamline": {"heal": "streamline"},
                   "last-k": {"heal": "last-k", "last_k": 3}, "all": {"heal": "all"}}


def plan(models: list[str], rates: dict, seeds: list[int], selections=None, heals=None) -> list[tuple]:
    """Every cell of the grid, in the order it runs: (model, n, seed, selection, heal); ``selections`` and
    ``heals`` keep a part of it."""
    cells = []
    for model in models:
        for remove in rates[model if model in rates else "tiny"]:
            for seed in seeds:
                for name in SELECTIONS:
                    names = [*EVERYWHERE, *(ON_CLP_AND_TAIL if name in ("clp", "tail") else ())]
                    cells += [(model, remove, seed, name, heal_name) for heal_name in names
                              if (not selections or name in selections) and (not heals or heal_name in heals)]
    return cells


def cell_path(out: Path, *key) -> Path:
    model, remove, seed, name, heal_name = key
    return out / "cells" / f"{Path(model).name}-n{remove}-seed{seed}-{name}-{heal_name}.json"


def heal_options(name: str, arguments) -> HealOptions:
    extra = ON_CLP_AND_TAIL.get(name, {"heal": name})
    return HealOptions(heal_steps=arguments.heal_steps, heal_batch=arguments.heal_batch,
                       heal_windows=arguments.heal_windows, **extra)


def measure(handle, arguments, test_windows: dict, seed: int) -> dict:
    """Held-out perplexity on each text and zero-shot accuracy of the handle's model."""
    found = {f"perplexity_{text}": perplexity(handle.model, windows, arguments.batch_size)
             for text, windows in test_windows.items()}
    zero_shot = evaluate(handle.model, handle.tokenizer, None, EvalOptions(tasks=arguments.tasks,
                                                                         limit=arguments.limit),
                         arguments.batch_size, seed).zero_shot
    found["zero_shot"] = zero_shot.model_dump() if zero_shot else None
    return found


def run(arguments, out: Path) -> None:
    cells = plan(arguments.models, RATES, arguments.seeds, arguments.selections, arguments.heals)
    todo = [key for key in cells if not cell_path(out, *key).is_file()]
    logger.info("%d cells, %d done, %d to run", len(cells), len(cells) - len(todo), len(todo))
    for model_name in dict.fromkeys(key[0] for key in todo):
        dense = load_model(model_name, ModelOptions(dtype=arguments.dtype))
        texts = {text: evaluation_windows(dense.tokenizer, load_text(text, "test"), arguments.seq_len,
                                          arguments.ppl_windows) for text in ("wiki", "lee")}
        for seed in dict.fromkeys(key[2] for key in todo if key[0] == model_name):
            data = DataOptions(seq_len=arguments.seq_len, calib_windows=arguments.calib_windows, seed=seed,
                               batch_size=arguments.batch_size)
            windows = calibrate(dense.tokenizer, data, test=False).calibration
            dense_file = out / "cells" / f"{Path(model_name).name}-seed{seed}-dense.json"
            if not dense_file.is_file():
                write_atomically(dense_file, json.dumps(measure(dense, arguments, texts, seed)) + "\n")
            dense_measures = json.loads(dense_file.read_text())
            prepared = heal.prepare(dense, HealOptions(heal_windows=arguments.heal_windows), data)
            for remove in dict.fromkeys(key[1] for key in todo if key[0] == model_name and key[2] == seed):
                for name, setting in SELECTIONS.items():
                    keys = [key for key in todo if key[:4] == (model_name, remove, seed, name)]
                    if not keys:
                        continue
                    options = SearchOptions(remove=remove, **{"method": name, **setting})
                    started = time.perf_counter()
                    found = selection.search(dense, windows, options, arguments.batch_size, seed)
                    search_seconds = time.perf_counter() - started
                    for key in keys:
                        options_heal = heal_options(key[4], arguments)
                        healing = time.perf_counter()
                        collected = heal.before_cut(dense, found.segments, prepared, options_heal)
                        pruned = copy.deepcopy(dense)
                        removed = cut(pruned, heal.planned_cut(found.segments, options_heal))
                        report = heal.heal(pruned, removed, collected, options_heal, seed)
                        heal_seconds = time.perf_counter() - healing
                        cell = {"model": Path(model_name).name, "layers": dense.num_layers, "remove": remove,
                                "seed": seed, "selection": name, "heal": key[4],
                                "chosen": [list(s) for s in found.segments], "kl": found.kl,
                                "cut": [list(s) for s in removed.segments], "layers_after": removed.layers_after,
                                "search_seconds": search_seconds, "heal_seconds": heal_seconds,
                                "trainable_parameters": report.trainable_parameters,
                                **measure(pruned, arguments, texts, seed)}
                        if cell["zero_shot"] and dense_measures["zero_shot"]:
                            from layercut.record import ZeroShot

                            kept = retention(ZeroShot(**cell["zero_shot"]), ZeroShot(**dense_measures["zero_shot"]))
                            cell["retention"] = kept.average.model_dump()
                        write_atomically(cell_path(out, *key), json.dumps(cell, indent=1) + "\n")
                        logger.info("%s: %s", key, {k: cell[k] for k in ("cut", "perplexity_wiki")})
                        del pruned


# ----------------------------------------------------------------------------------------------- report


def average_stderr(zero_shot: dict) -> float:
    """Standard error of the average accuracy: the tasks' errors combined, as the tasks are independent."""
    errors = [task.get("acc_stderr") or 0.0 for task in zero_shot["tasks"].values()]
    return math.sqrt(sum(e * e for e in errors)) / len(errors)


def report(out: Path) -> str:
    """The tables of the grid from its cells: retention at each rate per model (best heal per method), the heals on
    the clp and tail cuts, ties within two standard errors; and the two plots."""
    cells = [json.loads(path.read_text()) for path in sorted((out / "cells").glob("*.json"))
             if not path.name.endswith("-dense.json")]
    dense = {path.name.split("-seed")[0] + "-" + path.name.split("-seed")[1].split("-")[0]: json.loads(path.read_text())
             for path in (out / "cells").glob("*-dense.json")}
    lines = ["# Headline grid", "", (f"{len(cells)} cells. Retention = pruned / dense average zero-shot accuracy "
                                     "(acc) over the tasks; ± two standard errors; a difference inside them is a tie."),
             ""]
    groups: dict[tuple, list] = {}
    for cell in cells:
        if cell.get("retention"):
            groups.setdefault((cell["model"], cell["remove"], cell["selection"], cell["heal"]), []).append(cell)
    for model in sorted({c["model"] for c in cells}):
        for remove in sorted({c["remove"] for c in cells if c["model"] == model}):
            rows = []
            for name in SELECTIONS:
                options = {heal_name: group for (m, n, s, heal_name), group in groups.items()
                           if (m, n, s) == (model, remove, name)}
                if not options:
                    continue
                heal_name, group = max(options.items(), key=lambda item: mean(c["retention"]["retention"]
                                                                             for c in item[1]))
                value = mean(c["retention"]["retention"] for c in group)
                error = mean(average_stderr(c["zero_shot"]) / c["retention"]["dense"] for c in group)
                rows.append((name, heal_name, value, error, mean(c["perplexity_wiki"] for c in group), len(group)))
            if not rows:
                continue
            best = max(rows, key=lambda row: row[2])
            lines += [f"## {model}, {remove} layers removed", "",
                      "| method | best heal | retention | ± 2 se | vs best | wiki ppl | seeds |", "|---|---|---|---|---|---|---|"]
            for name, heal_name, value, error, ppl, count in sorted(rows, key=lambda row: -row[2]):
                verdict = "best" if name == best[0] else ("tie" if best[2] - value <= 2 * max(error, best[3])
                                                          else "loses")
                lines.append(f"| {name} | {heal_name} | {value:.3f} | {2 * error:.3f} | {verdict} | {ppl:.2f} | {count} |")
            lines.append("")
    perplexities = [c for c in cells if not c.get("retention")]
    if perplexities:
        lines += ["## Held-out perplexity (cells without zero-shot)", "",
                  "| model | n | seed | selection | heal | cut | layers after | trainable | wiki | lee | heal s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in sorted(perplexities, key=lambda c: (c["model"], c["remove"], c["seed"], c["selection"], c["heal"])):
            lines.append(f"| {c['model']} | {c['remove']} | {c['seed']} | {c['selection']} | {c['heal']} | {c['cut']} | "
                         f"{c['layers_after']} | {c['trainable_parameters']:,} | {c['perplexity_wiki']:.2f} | "
                         f"{c['perplexity_lee']:.2f} | {c['heal_seconds']:.1f} |")
        lines.append("")
    lines += [f"Dense models measured: {', '.join(sorted(dense)) or 'none'}.", ""]
    text = "\n".join(lines) + "\n"
    write_atomically(out / "results.md", text)
    plots(cells, out)
    return text


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def plots(cells: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [c for c in cells if c.get("retention")]
    if not scored:
        return
    figure, axis = plt.subplots(figsize=(7, 4))
    for name in SELECTIONS:
        points = {}
        for c in scored:
            if c["selection"] == name:
                points.setdefault(c["remove"] / c["layers"], []).append(c["retention"]["retention"])
        if points:
            rates = sorted(points)
            axis.plot(rates, [max(points[r]) for r in rates], marker="o", label=name)
    axis.set_xlabel("removal rate")
    axis.set_ylabel("retention (best heal)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "retention_by_rate.png", dpi=110)
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(7, 4))
    for c in scored:
        if c["selection"] in ("clp", "tail"):
            axis.scatter(max(c["trainable_parameters"], 1), c["retention"]["retention"], s=12)
            axis.annotate(c["heal"], (max(c["trainable_parameters"], 1), c["retention"]["retention"]), fontsize=6)
    axis.set_xscale("log")
    axis.set_xlabel("trainable (or fitted) parameters")
    axis.set_ylabel("retention")
    figure.tight_layout()
    figure.savefig(out / "heals_parameters.png", dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--rates", default="", help="'tiny' to use the tiny removal counts for every model")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: the full local sets)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--ppl-windows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--heal-steps", type=int, default=200)
    parser.add_argument("--heal-batch", type=int, default=8)
    parser.add_argument("--heal-windows", type=int, default=1024)
    parser.add_argument("--selections", default="", help="comma-separated part of the selections (default: all)")
    parser.add_argument("--heals", default="", help="comma-separated part of the heals (default: all)")
    parser.add_argument("--report", action="store_true", help="only write the tables and plots from the cells")
    parser.add_argument("--readme", default="", help="a markdown file whose section between the markers "
                                                     f"{START} and {END} becomes the report")
    arguments = parser.parse_args()
    arguments.models = [m for m in arguments.models.split(",") if m]
    arguments.seeds = [int(s) for s in arguments.seeds.split(",") if s]
    arguments.selections = [s for s in arguments.selections.split(",") if s]
    arguments.heals = [s for s in arguments.heals.split(",") if s]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(arguments.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    if arguments.rates == "tiny":
        for model in arguments.models:
            RATES[model] = RATES["tiny"]
    if not arguments.report:
        run(arguments, out)
        meta = {"command": "python " + " ".join(sys.argv), "versions": library_versions(),
                "chance": CHANCE, "settings": {k: v for k, v in vars(arguments).items() if k != "out"}}
        write_atomically(out / "grid.json", json.dumps(meta, indent=1) + "\n")
    text = report(out)
    if arguments.readme:
        into_readme(Path(arguments.readme), text, out, arguments)
    print(text)


START, END = "<!-- grid results: start -->", "<!-- grid results: end -->"


def into_readme(readme: Path, text: str, out: Path, arguments) -> None:
    """Replace the README's generated section with the report (its headings one level down) and how it was made."""
    meta = json.loads((out / "grid.json").read_text())
    body = text.replace("\n## ", "\n#### ").replace("# Headline grid\n", "")
    section = (f"{START}\n_Generated by `python bench/grid.py --out {out} --report --readme {readme}` from "
               f"`{out}/cells`, made by `{meta['command']}`._\n{body}{END}")
    content = readme.read_text()
    if START not in content or END not in content:
        raise SystemExit(f"{readme} has no {START} ... {END} section")
    before, rest = content.split(START, 1)
    write_atomically(readme, before + section + rest.split(END, 1)[1])


if __name__ == "__main__":
    main()
