"""The repair landscape: every cut of a cell healed, the ground truth for choosing a cut by what survives the repair.

For each (model, n, seed): every contiguous cut of n layers, plus the ``--two-segment`` best two-segment cuts by
exact KL among those the gate's two-segment search reads out. For each cut: the exact hard-cut KL before repair (the grid's calibration windows), held-out wiki and lee
perplexity after 0, 10, 25, 50 and 200 steps of the default heal (``endpoints``, the grid's protocol), recorded
inside one 200-step run (the heal's learning rate is constant and its batches come from its own generator, so the
first k steps of the 200-step run are a k-step heal), and after each training-free linear patch (lsq, linearpatch,
replaceme). At the same points, proxies measured on held-out calibration windows (``--proxy-windows`` windows of
the calibration text that share no 16-token run with the heal's windows; never test text): KL to the dense model
(top-64) and perplexity. ``--inits`` adds 200-step heals that start from a patch (``--heal-init``), measured alike.

One resumable command: each finished (cell, seed, cut) is a JSON file under ``--out``/cuts; a rerun skips what
exists; ``--workers N`` runs N processes that claim units not yet done (as bench/grid.py). ``--report`` writes
``results.md``, ``landscape.json`` and one PNG per cell: each proxy's Spearman correlation with the 200-step wiki
perplexity, and each selection method's regret (its pick's 200-step wiki perplexity over the landscape's best) for
the cuts the methods picked in ``--grid`` (bench/results/grid-h200).

GPU, one 80 GB H100, after the grid's setup calls of bench/device/README.md (1 to 8, without ``search``), one
``run`` call each (the workers run in the background while later calls keep the machine held):

    WORKERS=5 bash bench/device/remote.sh landscape 0
    # = python3 bench/landscape.py --out ~/res/landscape --dtype float32 --batch-size 8 --workers 5
    bash bench/device/remote.sh status 400          # repeat while it runs; the landscape's cuts: ~/res/landscape/cuts
    bash bench/device/remote.sh collect 0           # landscape.tgz: unpack its landscape/ as bench/results/landscape-h100
    python bench/landscape.py --out bench/results/landscape-h100 --report      # tables and plots from the cuts

Measured cost (bench/results/landscape-h100, one H100, 6 workers): with ``--patches= --no-agreement`` about 60 s
per SmolLM2 cut per worker (about 10 s of the GPU per cut); with the patches and the agreement about 5 minutes per
cut per worker, each patch's fit taking about as long as the 200-step heal. GPU memory stayed under 34 GB with 6
workers on SmolLM2. Gemma-3's cost is not measured yet. Seeds run outermost, so a run stopped early holds whole
seeds; ``landscape`` copies cuts committed under bench/results/landscape-h100 back in, and a later session
continues from them (with the same options: the protocol is checked).

CPU smoke (a tiny random model, 2 cuts, a few steps; tests/test_landscape.py runs it):

    python bench/landscape.py --out runs/landscape-smoke --smoke
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import math
import time
from pathlib import Path

import torch

from layercut import heal, repair
from layercut.config import DataOptions, HealOptions, SearchOptions
from layercut.data import calibrate, held_out_windows, load_text
from layercut.errors import LayercutError
from layercut.evaluate import agreement, perplexity, perplexity_of, window_nll
from layercut.files import write_atomically
from layercut.gate import candidate_key, checked, cuts, exact_scorer, parse_key, search_gate
from layercut.layers import cut

_spec = importlib.util.spec_from_file_location("grid", Path(__file__).with_name("grid.py"))
grid = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grid)

logger = logging.getLogger("bench.landscape")

CELLS = {"smollm2-135m": (6, 10), "gemma3-270m": (4, 6)}
CHECKPOINTS = (0, 10, 25, 50, 200)
PROTOCOL = ("dtype", "seq_len", "calib_windows", "ppl_windows", "heal_steps", "heal_batch", "heal_windows",
            "proxy_windows", "checkpoints", "patches", "inits", "calib", "texts", "test_at_checkpoints",
            "agreement", "generation_prompts")


# ----------------------------------------------------------------------------------------------- plan


def cut_name(candidate) -> str:
    """``((4, 8), (13, 19)) -> "4-8+13-19"``: a cut in a file name."""
    return "+".join(f"{s}-{e}" for s, e in candidate)


def cell_stem(model: str, remove: int, seed: int) -> str:
    return f"{Path(model).name}-n{remove}-seed{seed}"


def candidates_path(out: Path, model: str, remove: int, seed: int) -> Path:
    return out / "candidates" / f"{cell_stem(model, remove, seed)}.json"


def cut_path(out: Path, model: str, remove: int, seed: int, candidate) -> Path:
    return out / "cuts" / f"{cell_stem(model, remove, seed)}-{cut_name(candidate)}.json"


def given_cuts(arguments, model: str, remove: int) -> list[tuple] | None:
    """The cuts ``--cuts`` names for the cell (None: it names none, and the cell measures what the options say)."""
    given = arguments.cuts.get(f"{Path(model).name}:{remove}")
    return None if given is None else [tuple(tuple(s) for s in cut) for cut in given]


def units(out: Path, arguments) -> tuple[list[tuple], int]:
    """The units not done yet, in order: per (model, n, seed) first its candidates (the cuts and their exact KL),
    then one unit per cut once the candidates are written; and how many cells still wait for their candidates."""
    found, waiting = [], 0
    for seed in arguments.seeds:
        for model in arguments.models:
            for remove in arguments.cells[model]:
                path = candidates_path(out, model, remove, seed)
                if not path.is_file():
                    found.append(("candidates", model, remove, seed))
                    waiting += 1
                    continue
                listed = json.loads(path.read_text())
                known = [tuple(tuple(s) for s in entry["cut"]) for entry in listed["measure"]]
                given = given_cuts(arguments, model, remove)
                if (listed.get("two_segment", 0) < arguments.two_segment and given is None  # fewer two-segment cuts
                        or given is not None and not set(given) <= set(known)):  # --cuts names cuts not listed
                    found.append(("candidates", model, remove, seed))
                    waiting += 1
                    continue
                for candidate in known if given is None else given:
                    if not cut_path(out, model, remove, seed, candidate).is_file():
                        found.append(("cut", model, remove, seed, candidate))
    return found, waiting


# ----------------------------------------------------------------------------------------------- measure


def top_k_kl_of(model, windows: torch.Tensor, teacher, batch_size: int) -> float:
    """Mean token KL(dense top-k ‖ model) over ``windows`` ``[N, T]`` against the dense ``teacher`` targets."""
    device = next(model.parameters()).device
    total = 0.0
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            rows = slice(start, start + batch.shape[0])
            total += float(heal.top_k_kl(logits, teacher.log_probs[rows].to(device),
                                         teacher.indices[rows].to(device))) * batch.shape[0]
    return total / windows.shape[0]


class Worker(grid.Worker):
    """One process's share: the dense model and its test windows per model (as the grid's worker keeps them); per
    (model, seed) the calibration windows, the heal's windows with their teacher targets, and the held-out proxy
    windows with theirs."""

    def data(self, name: str, seed: int) -> dict:
        if (name, seed) not in self.seeded:
            dense, _ = self.model(name)
            arguments = self.arguments
            options = DataOptions(calib=arguments.calib, seq_len=arguments.seq_len,
                                  calib_windows=arguments.calib_windows, seed=seed, batch_size=arguments.batch_size)
            calibration = calibrate(dense.tokenizer, options, test=False).calibration
            prepared = heal.prepare(dense, HealOptions(heal_windows=arguments.heal_windows), options)
            proxy = held_out_windows(dense.tokenizer, load_text(arguments.calib, "calib"), arguments.seq_len,
                                     arguments.proxy_windows, seed + 2, prepared.windows)
            teacher = heal.teacher_targets(dense.model, proxy, HealOptions().heal_top_k, arguments.batch_size)
            self.seeded[(name, seed)] = {"options": options, "calibration": calibration, "prepared": prepared,
                                         "proxy": proxy, "teacher": teacher, "reference": self.reference(name)}
        return self.seeded[(name, seed)]

    def candidates(self, model_name: str, remove: int, seed: int) -> None:
        """Exact KL of every contiguous cut and of the two-segment cuts the gate's search reads out (scoring every
        two-segment cut took over 5 minutes per cell on a shared H100); keeps the best ``--two-segment`` of those."""
        dense, _ = self.model(model_name)
        data = self.data(model_name, seed)
        started = time.perf_counter()
        options = SearchOptions(remove=remove)
        scorer = exact_scorer(dense, data["calibration"], options, self.arguments.batch_size)
        every = cuts(dense.num_layers, remove, 1)
        scored = dict(zip(every, checked(scorer)(every)))
        if self.arguments.two_segment:  # the two-segment cuts the gate reads out exactly (as --method repair)
            found = search_gate(dense, data["calibration"], remove, options.replace(segments=2),
                                self.arguments.batch_size, seed, scorer=scorer)
            scored |= {parse_key(key): kl for key, kl in found.landscape.items()}
        scored = sorted(scored.items(), key=lambda pair: pair[1])
        one = sorted((c, kl) for c, kl in scored if len(c) == 1)
        two = [(c, kl) for c, kl in scored if len(c) == 2]
        if self.arguments.limit_cuts:
            one = sorted(one, key=lambda pair: pair[1])[:self.arguments.limit_cuts]
        measure = [*one, *two[:self.arguments.two_segment]]
        given = given_cuts(self.arguments, model_name, remove)
        path = candidates_path(self.out, model_name, remove, seed)
        if given is not None:  # --cuts: these, scored exactly like the rest, beside any listed before
            before = json.loads(path.read_text())["measure"] if path.is_file() else []
            measure = list(zip(given, checked(scorer)(given)))
            measure += [(c, e["kl"]) for e in before if (c := tuple(tuple(s) for s in e["cut"])) not in given]
        result = {"model": Path(model_name).name, "layers": dense.num_layers, "remove": remove, "seed": seed,
                  "two_segment": self.arguments.two_segment,
                  "measure": [{"cut": [list(s) for s in c], "kl": kl} for c, kl in measure],
                  "two_segment_cuts": len(two), "kl_seconds": time.perf_counter() - started,
                  "two_segment_kl": {candidate_key(c): kl for c, kl in two}}
        write_atomically(path, json.dumps(result) + "\n")
        logger.info("%s: %d cuts to measure (%d two-segment cuts scored)", cell_stem(model_name, remove, seed),
                    len(measure), len(two))

    def measures(self, handle, texts: dict, data: dict, final: bool = True) -> dict:
        """The proxies on the held-out calibration windows; with ``final``, also the held-out test measures: each
        text's perplexity and per-window mean NLL (for paired comparisons between cuts), and the agreement with the
        dense model (per-token KL and top-1 on the test windows, greedy generation from held-out prompts)."""
        batch = self.arguments.batch_size
        found = {"proxy_kl": top_k_kl_of(handle.model, data["proxy"], data["teacher"], batch),
                 "proxy_perplexity": perplexity(handle.model, data["proxy"], batch, finite=False)}
        if final:
            for text, windows in texts.items():
                nll = window_nll(handle.model, windows, batch)
                found[f"perplexity_{text}"] = perplexity_of(nll, finite=False)
                found[f"window_nll_{text}"] = [round(float(v), 6) for v in nll]
            if self.arguments.agreement:
                found["agreement"] = agreement(handle.model, data["reference"], batch).model_dump()
        return found

    def healed(self, dense, texts: dict, data: dict, segments: list, init: str, seed: int) -> dict:
        """A ``--heal-steps`` endpoints heal of the cut (from the patch ``init``, or none), measured at each
        checkpoint of the run."""
        arguments = self.arguments
        options = HealOptions(heal="endpoints", heal_steps=arguments.heal_steps, heal_batch=arguments.heal_batch,
                              heal_windows=arguments.heal_windows, heal_init=init)
        try:
            collected = heal.before_cut(dense, segments, data["prepared"], options)
        except LayercutError as error:  # a patch that does not fold into this model
            return {"refused": str(error)}
        pruned = copy.deepcopy(dense)
        removed = cut(pruned, segments)
        steps, found = [0], {}
        if init == "none":
            found["0"] = self.measures(pruned, texts, data, final=self.arguments.test_at_checkpoints)

        def progress(done: int) -> None:
            steps[0] += done
            if steps[0] in arguments.checkpoints and steps[0] != arguments.heal_steps:
                found[str(steps[0])] = self.measures(pruned, texts, data, final=self.arguments.test_at_checkpoints)

        started = time.perf_counter()
        try:
            report = heal.heal(pruned, removed, collected, options, seed, progress)
        except LayercutError as error:  # a heal that diverged: recorded, not measured further
            return {"failed": str(error), "steps": found}
        seconds = time.perf_counter() - started
        found[str(arguments.heal_steps)] = self.measures(pruned, texts, data)
        return {"steps": found, "heal_seconds": seconds, "last_loss": report.last_loss}

    def patched(self, dense, texts: dict, data: dict, segments: list, name: str) -> dict:
        """The training-free patch ``name`` folded into the cut model, measured; or why it refused."""
        options = HealOptions(heal=name, heal_windows=self.arguments.heal_windows)
        try:
            collected = heal.before_cut(dense, segments, data["prepared"], options)
        except LayercutError as error:
            return {"refused": str(error)}
        pruned = copy.deepcopy(dense)
        removed = cut(pruned, segments)
        started = time.perf_counter()
        heal.heal(pruned, removed, collected, options)
        return {**self.measures(pruned, texts, data), "seconds": time.perf_counter() - started}

    def measure_cut(self, model_name: str, remove: int, seed: int, candidate) -> None:
        dense, texts = self.model(model_name)
        data = self.data(model_name, seed)
        listed = json.loads(candidates_path(self.out, model_name, remove, seed).read_text())
        kl = next(e["kl"] for e in listed["measure"] if tuple(tuple(s) for s in e["cut"]) == candidate)
        segments = [tuple(s) for s in candidate]
        cell = {"model": Path(model_name).name, "layers": dense.num_layers, "remove": remove, "seed": seed,
                "cut": [list(s) for s in candidate], "segments": len(candidate), "kl": kl,
                "heal": self.healed(dense, texts, data, segments, "none", seed),
                "patches": {name: self.patched(dense, texts, data, segments, name)
                            for name in self.arguments.patches},
                "inits": {init: self.healed(dense, texts, data, segments, init, seed)
                          for init in self.arguments.inits if init != "none"}}
        write_atomically(cut_path(self.out, model_name, remove, seed, candidate), json.dumps(cell, indent=1) + "\n")
        last = cell["heal"]["steps"].get(str(self.arguments.heal_steps), {})
        logger.info("%s %s: kl %.4f, wiki after heal %s", cell_stem(model_name, remove, seed), cut_name(candidate),
                    kl, last.get("perplexity_wiki"))

    def run(self, unit: tuple) -> None:
        if unit[0] == "candidates":
            self.candidates(*unit[1:])
        else:
            self.measure_cut(*unit[1:])
        grid.release_cached_memory()


def run(arguments, out: Path) -> None:
    """Claim and run units until none is left; a worker that finds only cells whose candidates another live
    worker is still scoring waits for them. A unit that fails is logged and left; the process then exits with 1."""
    worker, failed = Worker(arguments, out), []
    while True:
        todo, waiting = units(out, arguments)
        todo = [unit for unit in todo if unit not in failed]
        taken = False
        for unit in todo:
            if grid.claim(out, unit[:4] + ((cut_name(unit[4]),) if unit[0] == "cut" else ())):
                taken = True
                try:
                    worker.run(unit)
                except Exception:  # the other units still run; the exit status reports it
                    logger.exception("%s failed", unit)
                    failed.append(unit)
                break  # candidates written by this or another worker open new units: list them again
        if not taken:
            if not todo or waiting == 0 or all(unit in failed for unit in todo):
                break
            time.sleep(5)
    if failed:
        raise SystemExit(f"{len(failed)} unit(s) failed: {failed}")


def check_protocol(arguments, out: Path) -> None:
    """One protocol per ``--out``, as bench/grid.py keeps it: a later run whose options differ is refused."""
    grid.check_protocol(arguments, out, PROTOCOL, "cuts")


# ----------------------------------------------------------------------------------------------- report


def read_cuts(out: Path) -> dict[tuple, list[dict]]:
    """The measured cuts per (model, n, seed)."""
    found: dict[tuple, list[dict]] = {}
    for path in sorted((out / "cuts").glob("*.json")):
        cell = json.loads(path.read_text())
        found.setdefault((cell["model"], cell["remove"], cell["seed"]), []).append(cell)
    return found


def repaired(cell: dict, steps: int) -> float | None:
    """The cut's held-out wiki perplexity after the full heal, or None when the heal failed."""
    return cell["heal"]["steps"].get(str(steps), {}).get("perplexity_wiki")


def proxies(cell: dict, steps: int) -> dict[str, float]:
    """Every proxy of one cut, by name: the exact KL, and the held-out calibration KL and perplexity after each
    checkpoint before the last and after each patch; test-text perplexity at those checkpoints too (a reference:
    selection must not read test text)."""
    found = {"exact KL (pre-repair)": cell["kl"]}
    for step, measured in cell["heal"]["steps"].items():
        if int(step) == steps:
            continue
        found[f"calib KL after {step} steps"] = measured["proxy_kl"]
        found[f"calib ppl after {step} steps"] = measured["proxy_perplexity"]
        if "perplexity_wiki" in measured:
            found[f"(test) wiki ppl after {step} steps"] = measured["perplexity_wiki"]
    measured = cell["heal"]["steps"]
    if "10" in measured and "50" in measured and steps > 50:  # what --method repair ranks its finalists by
        found[f"calib KL from 10 and 50 steps, extrapolated to {steps}"] = repair.extrapolated(
            (10, measured["10"]["proxy_kl"]), (50, measured["50"]["proxy_kl"]), steps)
    for name, measured in cell["patches"].items():
        if "refused" not in measured:
            found[f"calib KL after {name}"] = measured["proxy_kl"]
            found[f"calib ppl after {name}"] = measured["proxy_perplexity"]
    return found


def complete(cells: list[dict]) -> bool:
    """Whether every contiguous cut of the cell is among the measured ``cells`` (of one seed)."""
    return bool(cells) and sum(c["segments"] == 1 for c in cells) == cells[0]["layers"] - cells[0]["remove"] + 1


def correlations(landscape: dict[tuple, list[dict]], steps: int) -> dict[tuple, dict[str, float]]:
    """Spearman's rank correlation of each proxy with the cut's repaired wiki perplexity, per (model, n, seed)
    whose contiguous cuts are all measured (:func:`complete`)."""
    from scipy.stats import spearmanr

    found = {}
    for key, cells in landscape.items():
        if not complete(cells):
            continue
        rows = [(proxies(c, steps), repaired(c, steps)) for c in cells if repaired(c, steps) is not None]
        names = sorted({name for row, _ in rows for name in row})
        found[key] = {}
        for name in names:
            pairs = [(row[name], target) for row, target in rows if name in row and math.isfinite(row[name])]
            if len(pairs) >= 3:
                found[key][name] = float(spearmanr(*zip(*pairs)).statistic)
    return found


def grid_picks(grid_out: Path) -> dict[tuple, dict[str, list]]:
    """The cut each selection method picked in the grid, per (model, n, seed): from its endpoints cells."""
    found: dict[tuple, dict[str, list]] = {}
    for path in sorted((grid_out / "cells").glob("*-endpoints.json")):
        cell = json.loads(path.read_text())
        if "chosen" in cell:
            found.setdefault((cell["model"], cell["remove"], cell["seed"]), {})[cell["selection"]] = cell["chosen"]
    return found


def regrets(landscape: dict[tuple, list[dict]], picks: dict[tuple, dict[str, list]], steps: int) -> dict:
    """Per (model, n, seed) and method: its pick, its pick's repaired wiki perplexity in the landscape and its
    regret against the landscape's best cut, and against the best contiguous cut; None where the pick is not in
    the landscape (a two-segment cut outside the measured ones)."""
    found = {}
    for key, cells in landscape.items():
        values = {str(c["cut"]): repaired(c, steps) for c in cells if repaired(c, steps) is not None}
        if not values:
            continue
        best = min(values.values())
        contiguous = min((repaired(c, steps) for c in cells if c["segments"] == 1
                          and repaired(c, steps) is not None), default=None)
        for method, chosen in picks.get(key, {}).items():
            value = values.get(str(chosen))
            found[(*key, method)] = {"cut": chosen, "wiki": value, "regret": value / best if value else None,
                                     "regret_contiguous": value / contiguous if value and contiguous else None}
    return found


def proxy_picks(cells: list[dict], steps: int) -> dict[str, dict]:
    """For each proxy that reads no test text: the cut it ranks first among the measured ones, that cut's repaired
    wiki perplexity and its regret against the best measured cut."""
    measured = [c for c in cells if repaired(c, steps) is not None]
    best = min(repaired(c, steps) for c in measured)
    found = {}
    for name in sorted({n for c in measured for n in proxies(c, steps) if not n.startswith("(test)")}):
        scored = [(proxies(c, steps)[name], c) for c in measured if math.isfinite(proxies(c, steps).get(name, math.nan))]
        if scored:
            chosen = min(scored, key=lambda pair: pair[0])[1]
            found[name] = {"cut": chosen["cut"], "wiki": repaired(chosen, steps),
                           "regret": repaired(chosen, steps) / best}
    return found


def kl_rank_of_best(cells: list[dict], steps: int) -> int:
    """The place (1 = lowest) of the best repaired cut in the exact pre-repair KL order of the measured cuts."""
    measured = [c for c in cells if repaired(c, steps) is not None]
    best = min(measured, key=lambda c: repaired(c, steps))
    return 1 + sum(c["kl"] < best["kl"] for c in measured)


def paired_against(cells: list[dict], picks: dict[str, list], reference: str, steps: int) -> dict[str, dict]:
    """Each method's pick against ``reference``'s pick, paired window by window over the test windows (wiki, then
    lee): the perplexity ratio and its 95 % paired-bootstrap interval; methods whose pick was not measured are left
    out."""
    from layercut.paired import log_perplexity_difference, ratio

    final = {str(c["cut"]): c["heal"]["steps"].get(str(steps), {}) for c in cells}
    base = final.get(str(picks.get(reference)))
    found = {}
    for method, chosen in sorted(picks.items()):
        mine = final.get(str(chosen))
        if method == reference or not base or not mine or "window_nll_wiki" not in mine:
            continue
        if chosen == picks[reference]:
            found[method] = "same cut"
            continue
        found[method] = {}
        for text in ("wiki", "lee"):
            difference = log_perplexity_difference(mine[f"window_nll_{text}"], base[f"window_nll_{text}"])
            value, low, high = ratio(difference)
            found[method][text] = {"ratio": value, "low": low, "high": high,
                                   "verdict": difference.verdict(higher_is_better=False)}
    return found


def plot_cell(path: Path, model: str, remove: int, cells_by_seed: dict[int, list[dict]], picks: dict, steps: int
              ) -> None:
    """Repaired wiki perplexity of every cut (one line per seed; contiguous cuts by start, then the two-segment
    cuts), each method's pick marked per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted({str(c["cut"]): (c["segments"], c["cut"]) for cs in cells_by_seed.values() for c in cs}.items(),
                   key=lambda item: item[1])
    position = {name: index for index, (name, _) in enumerate(order)}
    figure, axis = plt.subplots(figsize=(max(8, 0.3 * len(order)), 4.5))
    markers = "ov^sDP*Xh<>pd"
    methods = sorted({m for seed in cells_by_seed for m in picks.get((model, remove, seed), {})})
    for seed, cells in sorted(cells_by_seed.items()):
        points = sorted((position[str(c["cut"])], repaired(c, steps)) for c in cells if repaired(c, steps))
        axis.plot([x for x, _ in points], [y for _, y in points], color=f"C{seed}", alpha=0.6, lw=1,
                  label=f"seed {seed}")
        values = dict(points)
        for index, method in enumerate(methods):
            chosen = picks.get((model, remove, seed), {}).get(method)
            x = position.get(str(chosen))
            if x is not None and x in values:
                axis.scatter([x], [values[x]], marker=markers[index % len(markers)], s=40, facecolors="none",
                             edgecolors=f"C{(index + 3) % 10}", label=method if seed == min(cells_by_seed) else None)
    axis.set_xticks(range(len(order)))
    axis.set_xticklabels([name.replace("], [", "]+[") for name, _ in order], rotation=90, fontsize=6)
    axis.set_yscale("log")
    axis.set_ylabel(f"wiki perplexity after {steps} heal steps")
    axis.set_title(f"{model}, n = {remove}: the repaired landscape; markers: each method's pick (grid)")
    axis.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(out: Path, grid_out: Path | None, steps: int) -> str:
    landscape = read_cuts(out)
    picks = grid_picks(grid_out) if grid_out and (grid_out / "cells").is_dir() else {}
    rho = correlations(landscape, steps)
    regret = regrets(landscape, picks, steps)
    lines = ["# The repair landscape", "", (f"{sum(map(len, landscape.values()))} cuts measured. Target: held-out "
             f"wiki perplexity after the {steps}-step endpoints heal. Proxies are measured on calibration windows "
             "held out from the heal's windows; rows marked (test) read test text and are a reference only."), ""]
    cells = sorted({key[:2] for key in landscape})
    for model, remove in cells:
        seeds = sorted(key[2] for key in landscape if key[:2] == (model, remove))
        lines += [f"## {model}, n = {remove} (seeds {', '.join(map(str, seeds))})", "",
                  "Spearman correlation with the repaired wiki perplexity (mean over seeds; min):", "",
                  "| proxy | mean rho | min rho |", "|---|---|---|"]
        names = sorted({name for seed in seeds for name in rho.get((model, remove, seed), {})})
        for name in names:
            values = [rho[(model, remove, seed)][name] for seed in seeds if name in rho.get((model, remove, seed), {})]
            lines.append(f"| {name} | {sum(values) / len(values):.3f} | {min(values):.3f} |")
        lines += ["", "| seed | best cut | its wiki | best contiguous | its wiki |", "|---|---|---|---|---|"]
        for seed in seeds:
            measured = [c for c in landscape[(model, remove, seed)] if repaired(c, steps) is not None]
            if not measured:
                continue
            best = min(measured, key=lambda c: repaired(c, steps))
            contiguous = min((c for c in measured if c["segments"] == 1), key=lambda c: repaired(c, steps),
                             default=best)
            some = "" if complete(measured) else f" (of {len(measured)} measured cuts)"
            lines.append(f"| {seed}{some} | {best['cut']} | {repaired(best, steps):.2f} | {contiguous['cut']} | "
                         f"{repaired(contiguous, steps):.2f} |")
        partial = [seed for seed in seeds if not complete(landscape[(model, remove, seed)])]
        seeds = [seed for seed in seeds if seed not in partial]
        if partial:
            lines += ["", (f"Seed(s) {', '.join(map(str, partial))}: only some cuts measured (`--cuts`), so they are "
                           "left out of the correlations and of the tables below.")]
        lines += ["", ("Selecting by one proxy among the measured cuts (the lowest wins), per seed: the pick's repaired "
                  "wiki perplexity and its regret; and where the repaired best stands in the exact-KL order:"), "",
                  "| seed | proxy | pick | wiki | regret |", "|---|---|---|---|---|"]
        for seed in seeds:
            for name, value in proxy_picks(landscape[(model, remove, seed)], steps).items():
                lines.append(f"| {seed} | {name} | {value['cut']} | {value['wiki']:.2f} | {value['regret']:.3f} |")
        lines += [""] + [f"- seed {seed}: the best repaired cut is number "
                         f"{kl_rank_of_best(landscape[(model, remove, seed)], steps)} by exact KL" for seed in seeds]
        for seed in seeds:
            paired = paired_against(landscape[(model, remove, seed)], picks.get((model, remove, seed), {}), "clp",
                                    steps)
            if paired:
                lines += ["", (f"Seed {seed}, each method's pick against clp's, same heal, paired over the test windows "
                          "(perplexity ratio, 95 % interval; tie when it holds 1):"), "",
                          "| method | wiki | lee |", "|---|---|---|"]
                lines += [f"| {method} | " + " | ".join(
                    "same cut" if v == "same cut" else
                    f"{v[t]['ratio']:.4f} [{v[t]['low']:.4f}, {v[t]['high']:.4f}] {v[t]['verdict']}"
                    for t in ("wiki", "lee")) + " |" for method, v in paired.items()]
        rows = sorted((key[3], key[2], value) for key, value in regret.items() if key[:2] == (model, remove))
        if rows:
            lines += ["", ("Regret of each method's grid pick (its repaired wiki perplexity / the landscape's best; / "
                      "the best contiguous cut):"), "", "| method | seed | pick | wiki | regret | regret vs contiguous |",
                      "|---|---|---|---|---|---|"]
            for method, seed, value in rows:
                lines.append(f"| {method} | {seed} | {value['cut']} | {fmt(value['wiki'])} | {fmt(value['regret'])} "
                             f"| {fmt(value['regret_contiguous'])} |")
        lines.append("")
        by_seed = {seed: landscape[(model, remove, seed)] for seed in seeds}
        plot_cell(out / f"landscape-{model}-n{remove}.png", model, remove, by_seed, picks, steps)
    refusals = sorted({(c["model"], name, v["refused"]) for cs in landscape.values() for c in cs
                       for name, v in c["patches"].items() if "refused" in v})
    if refusals:
        lines += ["Patches that refused a model (recorded, not measured):", ""]
        lines += [f"- {name} on {model}: {reason}" for model, name, reason in refusals]
    text = "\n".join(lines) + "\n"
    write_atomically(out / "results.md", text)
    summary = {"correlations": {"-".join(map(str, k)): v for k, v in rho.items()},
               "regrets": {"-".join(map(str, k)): v for k, v in regret.items()},
               "proxy_picks": {"-".join(map(str, k)): proxy_picks(v, steps) for k, v in landscape.items()},
               "kl_rank_of_best": {"-".join(map(str, k)): kl_rank_of_best(v, steps) for k, v in landscape.items()},
               "paired_against_clp": {"-".join(map(str, k)): paired_against(v, picks.get(k, {}), "clp", steps)
                                      for k, v in landscape.items()}}
    write_atomically(out / "landscape.json", json.dumps(summary, indent=1) + "\n")
    return text


def fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}"


# ----------------------------------------------------------------------------------------------- smoke


def smoke_model(folder: Path, text: str) -> str:
    """A tiny random Llama (hidden 32, 6 layers) with a word-level tokenizer trained on ``text``, saved to
    ``folder``; returns its path."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if (folder / "config.json").is_file():
        return str(folder)
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([text[:200_000]], trainers.WordLevelTrainer(
        vocab_size=256, special_tokens=["<|endoftext|>", "[UNK]"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>", unk_token="[UNK]")
    config = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, eos_token_id=0, pad_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return str(folder)


def smoke(arguments, out: Path) -> None:
    """A CPU-sized run: a tiny random model, n = 2, 2 cuts (the best contiguous by KL and the best two-segment
    cut), one seed, checkpoints at 1, 2 and 4 steps, few windows."""
    arguments.models = [smoke_model(out / "model", load_text(arguments.calib, "calib"))]
    arguments.cells = {arguments.models[0]: (2,)}
    arguments.seeds = [0]
    arguments.two_segment, arguments.limit_cuts = 1, 1
    arguments.heal_steps, arguments.checkpoints = 4, [0, 1, 2, 4]
    arguments.seq_len, arguments.calib_windows, arguments.ppl_windows = 32, 4, 4
    arguments.generation_prompts, arguments.test_at_checkpoints = 4, True
    arguments.heal_windows, arguments.proxy_windows, arguments.batch_size, arguments.heal_batch = 16, 4, 4, 2


# ----------------------------------------------------------------------------------------------- main


def json_or_file(value: str):
    """``value`` parsed as JSON, or the JSON file it names."""
    return json.loads(Path(value).read_text() if Path(value).is_file() else value)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default=",".join(CELLS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--remove", default="", help="only cells with these numbers of layers removed, e.g. 6 "
                        "(default: each model's headline cells)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--calib", default="wiki", help="calibration text (the heal's and the proxies')")
    parser.add_argument("--texts", default="wiki,lee", help="held-out test texts for perplexity")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-windows", type=int, default=32, help="windows of the exact KL (the grid's)")
    parser.add_argument("--ppl-windows", type=int, default=256)
    parser.add_argument("--proxy-windows", type=int, default=32,
                        help="held-out calibration windows for the proxies (no 16-token run shared with the heal's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--heal-steps", type=int, default=200)
    parser.add_argument("--heal-batch", type=int, default=8)
    parser.add_argument("--heal-windows", type=int, default=1024)
    parser.add_argument("--checkpoints", default=",".join(map(str, CHECKPOINTS)),
                        help="heal steps at which the cut is measured, inside one run of --heal-steps")
    parser.add_argument("--two-segment", type=int, default=10, help="best two-segment cuts by exact KL (of those the gate reads out) to measure")
    parser.add_argument("--limit-cuts", type=int, default=0, help="only the best contiguous cuts by KL (0: all)")
    parser.add_argument("--cuts", type=json_or_file, default={},
                        help='only these cuts in the cells named, at every seed: JSON text or a JSON file, '
                        '{"gemma3-270m:6": [[[5, 11]], [[4, 10]]], …} (a cell not named: as the other options say)')
    parser.add_argument("--test-at-checkpoints", action="store_true",
                        help="also measure the test texts at every checkpoint (default: proxies only before the last)")
    parser.add_argument("--agreement", action=argparse.BooleanOptionalAction, default=True,
                        help="after the last checkpoint and each patch, the agreement with the dense model")
    parser.add_argument("--generation-prompts", type=int, default=200, help="prompts of the generation agreement")
    parser.add_argument("--patches", default=",".join(heal.PATCHES))
    parser.add_argument("--inits", default="none", help="also heal from these patches (e.g. none,lsq,linearpatch)")
    parser.add_argument("--workers", type=int, default=0, help="run N worker processes spread over the GPUs")
    parser.add_argument("--as-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="a tiny random model on the CPU, 2 cuts, few steps")
    parser.add_argument("--report", action="store_true", help="only write the tables and plots from the cuts")
    parser.add_argument("--grid", default=str(Path(__file__).parent / "results" / "grid-h200"),
                        help="the grid whose methods' picks the report scores")
    arguments = parser.parse_args(argv)
    arguments.models = [m for m in arguments.models.split(",") if m]
    only = {int(n) for n in arguments.remove.split(",") if n}
    arguments.cells = {m: tuple(n for n in CELLS.get(m, (2,)) if not only or n in only) for m in arguments.models}
    arguments.seeds = [int(s) for s in arguments.seeds.split(",") if s]
    arguments.texts = [t for t in arguments.texts.split(",") if t]
    arguments.checkpoints = [int(s) for s in arguments.checkpoints.split(",") if s]
    arguments.patches = [p for p in arguments.patches.split(",") if p]
    arguments.inits = [p for p in arguments.inits.split(",") if p]
    return arguments


def main(argv=None) -> None:
    arguments = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(arguments.out)
    for folder in ("candidates", "cuts", "claims"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    if arguments.smoke:
        smoke(arguments, out)
    if not arguments.report:
        check_protocol(arguments, out)
        if arguments.as_worker:
            return run(arguments, out)
        grid.record_launch(out / "landscape-run.json",
                           {"settings": {k: v for k, v in vars(arguments).items() if k not in ("out", "cells")}})
        grid.launch(arguments, out) if arguments.workers else run(arguments, out)
    print(report(out, Path(arguments.grid) if arguments.grid else None, arguments.heal_steps))


if __name__ == "__main__":
    main()
