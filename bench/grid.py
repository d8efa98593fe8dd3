"""The headline grid: every selection method and the peers' heals on real models at two removal rates, under one
protocol. One resumable command: each cell is a JSON file under ``--out``/cells, written when done and skipped by
a rerun, so a killed run continues where it stopped.

A cell is (model, n, seed, selection, heal). Per model and seed the dense model is measured once; per selection
the cut is searched once; every heal then starts from a fresh copy of the dense model. A cell whose model another
cell has measured already (the same chosen layers and heal, and the same seed where the heal reads calibration
data) takes that cell's measures and names it in ``measured_in``. Measured per cell: the
layers removed, search and heal time, held-out perplexity on ``wiki`` (test part) and ``lee`` with the mean NLL of
each window, zero-shot acc and acc_norm on the seven commonsense tasks, LAMBADA-OpenAI (acc, perplexity) and MMLU
through lm-eval (with its standard errors and each item's correctness), retention and retention above chance.
Methods are compared with CLP paired over the same items and windows (``layercut.paired``); cells measured before
per-item results were kept get no verdict and say "unpaired".

    python bench/grid.py --out bench/results/grid-h200               # the full grid (GPU; resumes the committed cells)
    python bench/grid.py --out bench/results/grid-h200 --report      # tables, plots and results.md from the cells
    python bench/grid.py --out bench/results/grid-h200 --report --doc docs/results.md  # docs' full tables
    python bench/grid.py --out bench/results/grid-paired-h100 --report --readme README.md  # README's headline
    python bench/grid.py --out runs/grid-smoke --models /tmp/tiny --rates tiny --limit 4 --tasks piqa  # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from layercut import heal, paired, selection
from layercut.config import (
    REPAIR_CALIB_WINDOWS,
    DataOptions,
    EvalOptions,
    HealOptions,
    ModelOptions,
    SearchOptions,
)
from layercut.data import calibrate, evaluation_windows, load_text
from layercut.errors import LayercutError
from layercut.evaluate import agreement, dense_reference, evaluate, perplexity_of, window_nll
from layercut.files import write_atomically
from layercut.layers import cut
from layercut.load import load_model
from layercut.paired import Difference, accuracy_difference, log_perplexity_difference, task_strata
from layercut.record import Agreement, ZeroShot, library_versions
from layercut.zeroshot import APART, CHANCE, TASKS, retention

logger = logging.getLogger("bench.grid")

RATES = {"smollm2-135m": (6, 10), "gemma3-270m": (4, 6), "tiny": (2, 3)}  # about 20 % and 33 % of the layers
SELECTIONS = {"clp": {}, "clp-2": {"method": "clp", "segments": 2}, "exhaustive": {}, "tail": {},
              "block-influence": {}, "angular": {}, "cosine-block": {}, "sleb": {}, "ppl": {}, "taylor": {},
              "repair": {"segments": 2},
              # the one-segment repair selection: contiguous cuts ranked on 4 windows, 4 candidates, 1 finalist
              "repair-1": {"method": "repair", "segments": 1, "repair_candidates": 4, "repair_finalists": 1}}
EVERYWHERE = ("none", "endpoints")
ON_CLP_AND_TAIL = {"replaceme": {"heal": "replaceme"}, "streamline": {"heal": "streamline"},
                   "last-k": {"heal": "last-k", "last_k": 3}, "all": {"heal": "all"},
                   "lsq": {"heal": "lsq"}, "linearpatch": {"heal": "linearpatch"},
                   "endpoints+lsq": {"heal": "endpoints", "heal_init": "lsq"}}


def parse_rates(text: str, models: list[str]) -> dict[str, tuple[int, ...]]:
    """``--rates``: "tiny" (the tiny counts for every model) or "MODEL:N[:N],..." (those counts for those models)."""
    if text == "tiny":
        return {model: RATES["tiny"] for model in models}
    rates = {}
    for part in filter(None, text.split(",")):
        model, *counts = part.split(":")
        if not counts or not all(count.isdigit() and int(count) > 0 for count in counts):
            raise SystemExit(f"--rates {part!r}: give MODEL:N[:N] with positive layer counts, e.g. smollm2-135m:7")
        rates[model] = tuple(int(count) for count in counts)
    return rates


def plan(models: list[str], rates: dict, seeds: list[int], selections=None, heals=None) -> list[tuple]:
    """Every cell of the grid, in the order it runs: (model, n, seed, selection, heal); ``selections`` and
    ``heals`` keep a part of it. Seeds are outermost, so a run stopped early has whole seeds. The tail cut without
    a heal reads no calibration data, so it has one cell, under the first seed."""
    cells = []
    for seed in seeds:
        for model in models:
            for remove in rates[model if model in rates else "tiny"]:
                for name in SELECTIONS:
                    names = [*EVERYWHERE, *(ON_CLP_AND_TAIL if name in ("clp", "tail") else ())]
                    cells += [(model, remove, seed, name, heal_name) for heal_name in names
                              if (not selections or name in selections) and (not heals or heal_name in heals)
                              and not (name == "tail" and heal_name == "none" and seed != seeds[0])]
    return cells


def units(cells: list[tuple]) -> list[tuple]:
    """The grid's units of work, in order: one per model for the dense measures, then one per (model, n, seed,
    selection), whose cells share one search."""
    return [*(("dense", model) for model in dict.fromkeys(key[0] for key in cells)),
            *dict.fromkeys(key[:4] for key in cells)]


def cell_path(out: Path, *key) -> Path:
    model, remove, seed, name, heal_name = key
    return out / "cells" / f"{Path(model).name}-n{remove}-seed{seed}-{name}-{heal_name}.json"


def dense_path(out: Path, model: str) -> Path:
    return out / "cells" / f"{Path(model).name}-dense.json"


def claim(out: Path, unit: tuple) -> bool:
    """Take ``unit`` for this process, so that parallel workers never run it twice: a claim file made atomically,
    holding the process id; a claim whose process is gone (a killed run) is taken over."""
    path = out / "claims" / ("-".join(str(part).replace("/", "_") for part in unit) + ".claim")
    for _ in range(2):
        try:
            with open(path, "x") as handle:
                handle.write(str(os.getpid()))
            return True
        except FileExistsError:
            try:
                owner = int(path.read_text() or 0)
            except (OSError, ValueError):
                return False
            if owner == os.getpid():
                return True
            if owner and Path(f"/proc/{owner}").exists():
                return False
            path.unlink(missing_ok=True)
    return False


MEASURED = ("cut", "layers_after", "heal_seconds", "trainable_parameters", "perplexity_wiki", "perplexity_lee",
            "zero_shot")
PER_WINDOW = ("window_nll_wiki", "window_nll_lee", "agreement")  # in cells measured since per-item results were kept


def twin(out: Path, model: str, remove: int, seed: int, heal_name: str, chosen: list) -> tuple[str, dict] | None:
    """A measured cell whose model is the one this cell would measure: same model, same chosen layers and same
    heal, and, for a heal that trains or fits on calibration data, the same seed (a cut with no heal reads none).
    Selections that choose the same layers then share one heal and one evaluation. Returns its file name and
    content, or None."""
    pattern = f"{Path(model).name}-n{remove}-seed{'*' if heal_name == 'none' else seed}-*-{heal_name}.json"
    for path in sorted((out / "cells").glob(pattern)):
        cell = json.loads(path.read_text())
        if (cell.get("heal") == heal_name and cell.get("chosen") == chosen and "refused" not in cell
                and (heal_name == "none" or cell.get("seed") == seed) and all(key in cell for key in MEASURED)):
            return path.name, cell
    return None


PROTOCOL = ("tasks", "limit", "dtype", "seq_len", "calib_windows", "ppl_windows", "heal_steps", "heal_batch",
            "heal_windows", "agreement", "generation_prompts")


def check_protocol(arguments, out: Path, protocol: tuple[str, ...] = PROTOCOL, units: str = "cells") -> None:
    """Keep one protocol per ``--out``: the first run writes the options its measures depend on to
    ``protocol.json``; a later run whose options differ is refused, so no cell is measured another way."""
    wanted = json.loads(json.dumps({name: getattr(arguments, name) for name in protocol}))  # tuples read as lists
    path = out / "protocol.json"
    if not path.is_file():
        write_atomically(path, json.dumps(wanted, indent=1) + "\n")
        return
    kept = json.loads(path.read_text())
    changed = [f"--{name.replace('_', '-')} {kept.get(name)!r} there, {wanted[name]!r} here" for name in protocol
               if kept.get(name) != wanted[name]]
    if changed:
        raise SystemExit(f"{out} holds {units} measured under another protocol ({'; '.join(changed)}): pass the same "
                         "options, or choose a new --out")


def heal_options(name: str, arguments) -> HealOptions:
    extra = ON_CLP_AND_TAIL.get(name, {"heal": name})
    return HealOptions(heal_steps=arguments.heal_steps, heal_batch=arguments.heal_batch,
                       heal_windows=arguments.heal_windows, **extra)


def measure(handle, arguments, test_windows: dict, seed: int, reference=None) -> dict:
    """Held-out perplexity on each text, the agreement with the dense model (``reference``, a
    :class:`layercut.evaluate.DenseReference`; none for the dense model itself) and zero-shot accuracy of the
    handle's model. lm-eval's batch shrinks with the vocabulary, as its log-probabilities over the vocabulary
    dominate the memory."""
    found = {}
    for text, windows in test_windows.items():
        nll = window_nll(handle.model, windows, arguments.batch_size)
        found[f"perplexity_{text}"], found[f"window_nll_{text}"] = perplexity_of(nll), nll.tolist()
    if reference is not None:
        found["agreement"] = agreement(handle.model, reference, arguments.batch_size).model_dump()
    vocabulary = handle.model.get_output_embeddings().weight.shape[0]
    batch = max(1, arguments.eval_batch_size * 50_000 // max(vocabulary, 50_000))
    zero_shot = evaluate(handle.model, handle.tokenizer, None, EvalOptions(tasks=arguments.tasks,
                                                                         limit=arguments.limit),
                         batch, seed).zero_shot
    found["zero_shot"] = zero_shot.model_dump() if zero_shot else None
    return found


class Worker:
    """One process's share of the grid: it claims units in order and keeps what they share (the dense model and
    its test windows per model; the calibration windows and heal data per model and seed)."""

    def __init__(self, arguments, out: Path):
        self.arguments, self.out = arguments, out
        self.models: dict[str, tuple] = {}
        self.seeded: dict[tuple, tuple] = {}
        self.references: dict = {}

    def reference(self, name: str):
        """The dense model's outputs for the agreement measures (once per model: its final hidden states on the test
        windows, its greedy continuations of held-out prompts), or None without ``--agreement``."""
        if not self.arguments.agreement:
            return None
        if name not in self.references:
            self.references.clear()
            dense, _ = self.model(name)
            arguments = self.arguments
            texts = getattr(arguments, "texts", ("wiki", "lee"))
            self.references[name] = dense_reference(
                dense.model, dense.tokenizer, EvalOptions(agreement=True, agreement_texts=",".join(texts),
                                                          generation_prompts=arguments.generation_prompts),
                DataOptions(seq_len=arguments.seq_len, ppl_windows=arguments.ppl_windows,
                            batch_size=arguments.batch_size))
        return self.references[name]

    def model(self, name: str):
        if name not in self.models:
            self.models.clear()
            self.seeded.clear()
            dense = load_model(name, ModelOptions(dtype=self.arguments.dtype))
            texts = {Path(text).stem: evaluation_windows(dense.tokenizer, load_text(text, "test"),
                                                         self.arguments.seq_len, self.arguments.ppl_windows)
                     for text in getattr(self.arguments, "texts", ("wiki", "lee"))}
            self.models[name] = dense, texts
        return self.models[name]

    def data_options(self, seed: int, count: int) -> DataOptions:
        return DataOptions(seq_len=self.arguments.seq_len, calib_windows=count, seed=seed,
                           batch_size=self.arguments.batch_size)

    def calibration_windows(self, name: str, seed: int, count: int):
        """``count`` calibration windows of ``seed``: the grid's ``--calib-windows``, or the REPAIR_CALIB_WINDOWS
        that ``layercut prune --method repair`` draws."""
        if (name, seed, count) not in self.seeded:
            dense, _ = self.model(name)
            self.seeded[(name, seed, count)] = calibrate(dense.tokenizer, self.data_options(seed, count),
                                                         test=False).calibration
        return self.seeded[(name, seed, count)]

    def prepared(self, name: str, seed: int, options: HealOptions):
        """The heal's prepared data for a cell healed with ``options`` (:func:`layercut.heal.prepare`): the dense
        model's targets only when that heal trains on them, and once per model and seed; data with them serves
        the heals that need none."""
        if options.heal == "none":
            return None
        teacher = heal.uses_teacher(options)
        found = self.seeded.get(("heal", name, seed, True)) or self.seeded.get(("heal", name, seed, teacher))
        if found is None:
            dense, _ = self.model(name)
            found = self.seeded[("heal", name, seed, teacher)] = heal.prepare(
                dense, options, self.data_options(seed, self.arguments.calib_windows))
        return found

    def run(self, unit: tuple, todo: list[tuple]) -> None:
        if unit[0] == "dense":
            dense, texts = self.model(unit[1])
            write_atomically(dense_path(self.out, unit[1]), json.dumps(measure(dense, self.arguments, texts, 0)) + "\n")
            logger.info("%s measured", unit)
            return
        model_name, remove, seed, name = unit
        dense, texts = self.model(model_name)
        options = SearchOptions(remove=remove, **{"method": name, **SELECTIONS[name]})
        # the repair selections on the calibration windows `--method repair` draws by default
        windows = self.calibration_windows(model_name, seed, REPAIR_CALIB_WINDOWS if options.method == "repair"
                                           else self.arguments.calib_windows)
        started = time.perf_counter()
        found = selection.search(dense, windows, options, self.arguments.batch_size, seed)
        search_seconds = time.perf_counter() - started
        for key in todo:
            options_heal = heal_options(key[4], self.arguments)
            healing = time.perf_counter()
            cell = {"model": Path(model_name).name, "layers": dense.num_layers, "remove": remove,
                    "seed": seed, "selection": name, "heal": key[4],
                    "chosen": [list(s) for s in found.segments], "kl": found.kl, "search_seconds": search_seconds,
                    "search_calib_windows": windows.shape[0]}
            shared = twin(self.out, model_name, remove, seed, key[4], cell["chosen"])
            if shared is not None:
                source, measured = shared
                cell |= {field: measured[field] for field in (*MEASURED, *PER_WINDOW) if field in measured}
                cell["measured_in"] = source
                write_atomically(cell_path(self.out, *key), json.dumps(cell, indent=1) + "\n")
                logger.info("%s: same model as %s", key, source)
                continue
            try:
                collected = heal.before_cut(dense, found.segments, self.prepared(model_name, seed, options_heal),
                                            options_heal)
            except LayercutError as error:  # a heal that does not apply to this model: recorded, not measured
                write_atomically(cell_path(self.out, *key), json.dumps({**cell, "refused": str(error)}) + "\n")
                logger.info("%s: refused (%s)", key, error)
                continue
            pruned = copy.deepcopy(dense)
            removed = cut(pruned, heal.planned_cut(found.segments, options_heal))
            report = heal.heal(pruned, removed, collected, options_heal, seed)
            cell |= {"cut": [list(s) for s in removed.segments], "layers_after": removed.layers_after,
                     "heal_seconds": time.perf_counter() - healing,
                     "trainable_parameters": report.trainable_parameters,
                     **measure(pruned, self.arguments, texts, seed, self.reference(model_name))}
            write_atomically(cell_path(self.out, *key), json.dumps(cell, indent=1) + "\n")
            logger.info("%s: %s", key, {k: cell[k] for k in ("cut", "perplexity_wiki")})
            del pruned
            release_cached_memory()


def release_cached_memory() -> None:
    """Hand the GPU memory this process no longer uses back to the device: workers share one GPU, and the memory a
    worker's caching allocator kept from its last heal or evaluation (up to about 20 GB on Gemma-3) would
    otherwise stay out of the others' reach until it exits."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(arguments, out: Path) -> None:
    """Run every unit not done yet that no live process has claimed, in passes until one finds nothing to take: a
    later pass picks up what a worker that died left unfinished. A unit that fails is logged and left to the other
    workers (its claim goes when this process exits); the process then exits with status 1."""
    cells = plan(arguments.models, RATES, arguments.seeds, arguments.selections, arguments.heals)
    logger.info("%d cells, %d done", len(cells), sum(cell_path(out, *key).is_file() for key in cells))
    worker, failed = Worker(arguments, out), []
    while True:
        taken = False
        for unit in units(cells):
            if unit in failed:
                continue
            if unit[0] == "dense":
                if (not arguments.tasks and not arguments.ppl_windows) or dense_path(out, unit[1]).is_file():
                    continue
                keys = []
            else:
                keys = [key for key in cells if key[:4] == unit and not cell_path(out, *key).is_file()]
                if not keys:
                    continue
            if claim(out, unit):
                taken = True
                try:
                    worker.run(unit, keys)
                except Exception:  # the other units still run; the exit status reports it
                    logger.exception("%s failed", unit)
                    failed.append(unit)
        if not taken:
            break
    if failed:
        raise SystemExit(f"{len(failed)} unit(s) failed: {failed}")


def launch(arguments, out: Path) -> None:
    """``--workers N``: N processes of this script share the grid through claims, spread over the visible GPUs
    (those of ``CUDA_VISIBLE_DEVICES`` when it is set); each writes its log under ``--out``/logs."""
    import torch

    gpus = torch.cuda.device_count()
    argv = sys.argv[:]
    at = next(i for i, a in enumerate(argv) if a.startswith("--workers"))
    del argv[at:at + (1 if "=" in argv[at] else 2)]
    command = [sys.executable, *argv, "--as-worker"]
    (out / "logs").mkdir(exist_ok=True)
    processes = []
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d] or [str(g) for g in range(gpus)]
    for index in range(arguments.workers):
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        if gpus:
            environment["CUDA_VISIBLE_DEVICES"] = visible[index % gpus]
        with open(out / "logs" / f"worker-{index}-{os.getpid()}.log", "a") as log:
            processes.append(subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT))
    failed = [process.args for process in processes if process.wait() != 0]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(processes)} workers failed; see {out / 'logs'}")


# ----------------------------------------------------------------------------------------------- report


def average_stderr(zero_shot: dict) -> float:
    """Standard error of the average accuracy: the tasks' errors combined, as the tasks are independent."""
    errors = [task.get("acc_stderr") or 0.0 for task in zero_shot["tasks"].values()]
    return math.sqrt(sum(e * e for e in errors)) / len(errors)


def read_cells(out: Path) -> tuple[list[dict], dict[str, dict], dict[tuple, str]]:
    """The grid's measured cells, each with its retention against its model's dense measures where both have
    zero-shot scores; the dense measures per model (``{model}-dense.json``; older runs:
    ``{model}-seed{s}-dense.json``); and the refusals, the reason per (model, heal)."""
    dense = {}
    for path in sorted((out / "cells").glob("*-dense.json")):
        dense.setdefault(path.name.removesuffix("-dense.json").split("-seed")[0], json.loads(path.read_text()))
    read = [json.loads(path.read_text()) for path in sorted((out / "cells").glob("*.json"))
            if not path.name.endswith("-dense.json")]
    refused = {(cell["model"], cell["heal"]): cell["refused"] for cell in read if "refused" in cell}
    cells = [cell for cell in read if "refused" not in cell]
    for cell in cells:
        base = dense.get(cell["model"], {}).get("zero_shot")
        if cell.get("zero_shot") and base:
            kept = retention(ZeroShot(**cell["zero_shot"]), ZeroShot(**base))
            cell["retention"] = kept.average.model_dump()
            cell["retention"]["stderr"] = average_stderr(cell["zero_shot"]) / kept.average.dense
    return cells, dense, refused


def summary(group: list[dict]) -> dict:
    """Mean over a group of cells (the seeds of one method and heal) of what the tables show."""
    scored = [c for c in group if c.get("retention")]
    found = {"seeds": len(group), "wiki": mean(c["perplexity_wiki"] for c in group),
             "lee": mean(c["perplexity_lee"] for c in group), "cuts": sorted({str(c["cut"]) for c in group}),
             "trainable": group[0]["trainable_parameters"], "layers_after": group[0].get("layers_after"),
             "cells": group}
    for task, key in (("mmlu", "acc"), ("lambada_openai", "acc"), ("lambada_openai", "perplexity")):
        found[f"{task}_{key}"] = mean(((c.get("zero_shot") or {}).get("tasks", {}).get(task) or {}).get(key)
                                      for c in group)
    if scored:
        found |= {"retention": mean(c["retention"]["retention"] for c in scored),
                  "above_chance": mean(c["retention"]["retention_above_chance"] for c in scored),
                  "stderr": mean(c["retention"]["stderr"] for c in scored)}
    return found


def summaries(cells: list[dict]) -> dict[tuple, dict]:
    """The :func:`summary` of each (model, remove, selection, heal) group of cells."""
    groups: dict[tuple, list] = {}
    for cell in cells:
        groups.setdefault((cell["model"], cell["remove"], cell["selection"], cell["heal"]), []).append(cell)
    return {key: summary(group) for key, group in groups.items()}


def pairs(value: dict, reference: dict) -> list[tuple[dict, dict]]:
    """The cells of two summaries measured under the same seed, side by side. A cut without a heal is measured
    under one seed only (it reads no calibration data): that cell stands for every seed."""
    def seedless(summary_: dict) -> bool:
        return len(summary_["cells"]) == 1 and summary_["cells"][0]["heal"] == "none"

    left = {cell["seed"]: cell for cell in value["cells"]}
    right = {cell["seed"]: cell for cell in reference["cells"]}
    if seedless(value):
        left = {seed: value["cells"][0] for seed in right}
    if seedless(reference):
        right = {seed: reference["cells"][0] for seed in left}
    return [(left[seed], right[seed]) for seed in sorted(left) if seed in right]


def paired_accuracy(value: dict, reference: dict, task: str | None = None) -> Difference | None:
    """Average zero-shot accuracy of ``value`` − ``reference`` over their common seeds (mean over seeds), paired
    over the items of each task; only ``task``'s accuracy when one is named. None when a side kept no per-item
    correctness."""
    strata = []
    for left, right in pairs(value, reference):
        if not left.get("zero_shot") or not right.get("zero_shot"):
            return None
        a, b = ZeroShot(**left["zero_shot"]), ZeroShot(**right["zero_shot"])
        tasks = [task] if task is not None else (a.average_tasks or a.tasks)
        found = task_strata(a, b, [name for name in tasks if name in a.tasks and name in b.tasks])
        if found is None:
            return None
        strata += found
    return accuracy_difference(strata) if strata else None


def paired_perplexity(value: dict, reference: dict, text: str = "wiki") -> Difference | None:
    """log perplexity of ``value`` − ``reference`` on ``text``'s test windows, paired window by window over their
    common seeds (windows of all seeds pooled); None when a side kept no per-window NLLs."""
    left, right = [], []
    for a, b in pairs(value, reference):
        if a.get(f"window_nll_{text}") is None or b.get(f"window_nll_{text}") is None:
            return None
        left += a[f"window_nll_{text}"]
        right += b[f"window_nll_{text}"]
    return log_perplexity_difference(left, right) if left else None


def agreement_items(cell: dict, measure: str) -> list[float] | None:
    """One cell's per-item values of the agreement measure named as :func:`layercut.paired.agreement_items` names
    it; None when the cell kept none."""
    if not cell.get("agreement"):
        return None
    return paired.agreement_items(Agreement(**cell["agreement"])).get(measure, (None, None))[1]


def paired_items(value: dict, reference: dict, measure: str) -> Difference | None:
    """Mean of the agreement ``measure``'s per-item values of ``value`` − of ``reference``, paired item by item over
    their common seeds (the items of all seeds pooled); None when a side kept no per-item values."""
    left, right = [], []
    for a, b in pairs(value, reference):
        mine, theirs = agreement_items(a, measure), agreement_items(b, measure)
        if mine is None or theirs is None or len(mine) != len(theirs):
            return None
        left += mine
        right += theirs
    return paired.mean_difference(left, right) if left else None


AGREEMENT = (*(f"{name} ({text})" for text in ("wiki", "lee") for name in ("KL to dense", "top-1 agreement with dense")),
             "generation: matching prefix")
SEPARATING = {  # measure → its paired difference of one summary against another (None: not paired)
    "commonsense accuracy (7 tasks)": paired_accuracy,
    "LAMBADA accuracy": lambda v, r: paired_accuracy(v, r, "lambada_openai"),
    "MMLU accuracy": lambda v, r: paired_accuracy(v, r, "mmlu"),
    "wiki log perplexity": lambda v, r: paired_perplexity(v, r, "wiki"),
    "lee log perplexity": lambda v, r: paired_perplexity(v, r, "lee"),
    **{name: (lambda v, r, m=name: paired_items(v, r, m)) for name in AGREEMENT},
}
HIGHER_IS_BETTER = {"commonsense accuracy (7 tasks)": True, "LAMBADA accuracy": True, "MMLU accuracy": True,
                    "wiki log perplexity": False, "lee log perplexity": False}  # the agreement's: paired.py's


def higher_is_better(measure: str, cell: dict) -> bool:
    """Whether a higher value of ``measure`` is better: the agreement measures' direction is the one
    :func:`layercut.paired.agreement_items` gives them (read from a cell that kept them)."""
    if measure in HIGHER_IS_BETTER:
        return HIGHER_IS_BETTER[measure]
    return paired.agreement_items(Agreement(**cell["agreement"]))[measure][3]


def comparisons(table: dict[tuple, dict], cells: list[dict]) -> list[tuple[tuple, dict[str, str]]]:
    """Each (model, rate, method) whose best heal chooses another model than CLP's best heal, with its verdict
    against CLP on every measure of :data:`SEPARATING` that both kept per-item results for: "better", "worse" or
    "tie" (the paired 95 % interval holds 0)."""
    found = []
    for model, remove in sorted({(c["model"], c["remove"]) for c in cells}):
        best = best_heals(table, model, remove)
        if "clp" not in best:
            continue
        clp = best["clp"][1]
        for name, (_, value) in best.items():
            if name == "clp" or (value["cuts"] == clp["cuts"] and best[name][0] == best["clp"][0]):
                continue  # the same model: nothing to separate
            found.append(((model, remove, name), verdicts_against(value, clp)))
    return found


def verdicts_against(value: dict, reference: dict) -> dict[str, str]:
    """``value``'s verdict against ``reference`` on every measure of :data:`SEPARATING` that both kept per-item
    results for: "better", "worse" or "tie" (the paired 95 % interval holds 0)."""
    verdicts = {}
    for measure, difference_of in SEPARATING.items():
        difference = difference_of(value, reference)
        if difference is not None:
            verdicts[measure] = difference.verdict(higher_is_better(measure, reference["cells"][0]))
    return verdicts


def heal_comparisons(table: dict[tuple, dict]) -> list[tuple[tuple, dict[str, str]]]:
    """Each heal other than endpoint tuning on a cut that endpoint tuning also healed (same model, rate and
    selection), with its :func:`verdicts_against` endpoint tuning of that cut."""
    return [((model, remove, selection, heal_), verdicts_against(value, table[(model, remove, selection, "endpoints")]))
            for (model, remove, selection, heal_), value in sorted(table.items())
            if heal_ != "endpoints" and (model, remove, selection, "endpoints") in table]


def separations(found: list[tuple[tuple, dict[str, str]]]) -> dict[str, tuple[int, int]]:
    """For each measure of :data:`SEPARATING`: of the comparisons ``found`` (:func:`comparisons` or
    :func:`heal_comparisons`), how many it separates at 95 % and how many it could compare (both sides kept per-item
    results)."""
    return {measure: (sum(verdicts.get(measure, "tie") != "tie" for _, verdicts in found),
                      sum(measure in verdicts for _, verdicts in found)) for measure in SEPARATING}


def separation_lines(table: dict[tuple, dict], cells: list[dict]) -> list[str]:
    """The report's counts of what each measure separates: the methods against CLP (:func:`comparisons`) and the
    heals against endpoint tuning of the same cut (:func:`heal_comparisons`), each where any was compared."""
    methods = separation_table(
        comparisons(table, cells), "methods", ["model", "n", "method"], "the method is better than CLP",
        ("Each method's best heal against CLP's, per model and rate, where the two are different models: how "
         "many of those comparisons each measure separates at 95 % (paired interval without 0), of those it "
         "could compare (both cells kept per-item results)."))
    heals = separation_table(
        heal_comparisons(table), "heals", ["model", "n", "cut", "heal"], "the heal is better than endpoint tuning",
        ("Each heal against endpoint tuning of the same cut (the same model, rate, seed and selection): how many "
         "of those comparisons each measure separates at 95 % (paired interval without 0), of those it could "
         "compare (both cells kept per-item results)."))
    return [*methods, *heals]


def separation_table(found: list[tuple[tuple, dict[str, str]]], what: str, columns: list[str], better: str,
                     intro: str) -> list[str]:
    """One "Which measures separate ..." section: :func:`separations` of ``found`` counted per measure, then each
    comparison measure by measure (``columns`` name its key's parts); nothing when no measure compared any."""
    counted = separations(found)
    if not any(compared for _, compared in counted.values()):
        return []
    lines = [f"## Which measures separate {what}", "", intro, "",
             "| measure | separated | compared |", "|---|---|---|"]
    lines += [f"| {name} | {separated} | {compared} |" for name, (separated, compared) in counted.items()]
    measures = [name for name, (_, compared) in counted.items() if compared]
    mark = {"better": "+", "worse": "−", "tie": "="}
    lines += ["", (f"The same comparisons measure by measure: + {better}, − worse, = a tie (perplexity and KL: "
                   "lower is better)."), "",
              "| " + " | ".join([*columns, *measures]) + " |", "|" + "---|" * (len(columns) + len(measures))]
    lines += ["| " + " | ".join([*map(str, key), *(mark[verdicts[m]] if m in verdicts else "·" for m in measures)])
              + " |" for key, verdicts in found]
    return [*lines, ""]


UNPAIRED = "unpaired"  # what a comparison says, in place of a verdict, where the two cells kept no per-item results


def verdict(value: dict, reference: dict) -> str:
    """``value`` against ``reference`` on retention: "tie", "better" or "worse" with the paired 95 % interval of the
    difference in retention (accuracy difference / dense accuracy); "unpaired", and no verdict, for cells measured
    without per-item results: a verdict needs both models scored on the same items."""
    difference = paired_accuracy(value, reference)
    if difference is None:
        return UNPAIRED
    dense = value["cells"][0]["retention"]["dense"]
    return (f"{difference.verdict()} ({difference.estimate / dense:+.3f} [{difference.low / dense:+.3f}, "
            f"{difference.high / dense:+.3f}])")


def perplexity_verdict(value: dict, reference: dict, text: str = "wiki") -> str:
    """``value`` against ``reference`` on ``text`` perplexity: "lower", "higher" or "tie" with the paired 95 %
    interval of the perplexity ratio; "unpaired" for cells measured without per-window NLLs."""
    difference = paired_perplexity(value, reference, text)
    if difference is None:
        return UNPAIRED
    word = {"tie": "tie", "better": "lower", "worse": "higher"}[difference.verdict(higher_is_better=False)]
    return (f"{word} (x{math.exp(difference.estimate):.3f} [{math.exp(difference.low):.3f}, "
            f"{math.exp(difference.high):.3f}])")


def clp_verdict(clp: dict, value: dict, name: str = "clp") -> str:
    """CLP's summary (or that of the selection ``name``) against another method's: "clp wins", "clp loses" or
    "tie" (see :func:`verdict`)."""
    return verdict(clp, value).replace("better", f"{name} wins").replace("worse", f"{name} loses")


def best_heals(table: dict[tuple, dict], model: str, remove: int) -> dict[str, tuple[str, dict]]:
    """Per selection method at one model and rate, its best heal and that heal's summary: the lowest mean wiki
    perplexity among its heals that leave ``remove`` layers out (one that keeps a layer of the cut, as
    ``streamline`` does, only where no other was measured), ties broken by the higher retention. Perplexity, not
    retention: accuracy ties nearly every heal with every other, so it would choose by noise, down to no heal at
    all (bench/results/grid-heals-h200)."""
    found = {}
    for name in SELECTIONS:
        scored = [(key[3], value) for key, value in table.items() if key[:3] == (model, remove, name)
                  and "retention" in value]
        full = [(heal_, value) for heal_, value in scored
                if value["layers_after"] is None or value["cells"][0]["layers"] - value["layers_after"] >= remove]
        if scored:
            found[name] = min(full or scored, key=lambda heal_value: (
                math.inf if heal_value[1]["wiki"] is None else heal_value[1]["wiki"], -heal_value[1]["retention"]))
    return found


def headline(table: dict[tuple, dict], cells: list[dict]) -> list[str]:
    """The headline tables: one per removal rate (about 20 % and about 33 %), a row per selection method, a column
    per model, each entry the method's best heal (retention ± two standard errors, against CLP's best)."""
    shape = {c["model"]: c["layers"] for c in cells}
    models = sorted(shape)
    lines = []
    for index, label in enumerate(("about 20 %", "about 33 %")):
        if any(len(RATES.get(model, RATES["tiny"])) <= index for model in models):  # a --rates of one count
            continue
        rates = {model: RATES.get(model, RATES["tiny"])[index] for model in models}
        best = {model: best_heals(table, model, rates[model]) for model in models}
        if not any(best.values()):
            continue
        tally = []
        lines += [(f"## Headline, {label} of the layers removed: each method with its best heal (lowest wiki "
                   "perplexity)"), "",
                  "| selection | " + " | ".join(f"{m} (n = {rates[m]} of {shape[m]})" for m in models) + " |",
                  "|---|" + "---|" * len(models)]
        for name in SELECTIONS:
            entries = []
            for model in models:
                if name not in best[model]:
                    entries.append("—")
                    continue
                heal_name, value = best[model][name]
                clp = best[model].get("clp")
                against = "" if name == "clp" or clp is None else ", " + clp_verdict(clp[1], value)
                if against:
                    tally.append(against[2:])
                entries.append(f"{value['retention']:.3f} ± {2 * value['stderr']:.3f} ({heal_name}{against}; "
                               f"{value['seeds']} seed{'s' * (value['seeds'] != 1)})")
            lines.append(f"| {name} | " + " | ".join(entries) + " |")
        lines += ["", tally_text(tally), ""]
    return lines


def tally_text(verdicts: list[str]) -> str:
    """How often CLP wins, ties and loses among the paired ``verdicts``; the unpaired ones are only counted."""
    kept = [text for text in verdicts if text != UNPAIRED]
    found = {word: sum(text.startswith(word) for text in kept) for word in ("clp wins", "tie", "clp loses")}
    return (f"CLP against the other methods' best heals: {len(kept)} paired: {found['clp wins']} wins, "
            f"{found['tie']} ties, {found['clp loses']} losses; {len(verdicts) - len(kept)} unpaired, no verdict.")


def report(out: Path) -> str:
    """The tables of the grid from its cells: per model and rate, retention per selection with no heal, with
    endpoints and with its best heal, against CLP's (paired intervals; see :func:`verdict`), MMLU and LAMBADA
    apart from retention; the heals on the clp and
    tail cuts against their trainable parameters; one segment against two; and the two plots. ``cells.md`` lists
    every cell."""
    cells, dense, refused = read_cells(out)
    table = summaries(cells)
    lines = ["# Headline grid", "",
             (f"{len(cells)} cells. Retention = pruned / dense average zero-shot accuracy (acc) over the commonsense "
             "tasks (MMLU and LAMBADA apart), mean over the calibration seeds; above chance = (pruned - chance) / "
             "(dense - chance). ± is two standard errors (lm-eval's, combined over the tasks). Against clp (or "
             "endpoints): the paired difference over the same items (zero-shot) or test windows (perplexity, as a "
             "ratio), mean over the seeds both have, with its 95 % bootstrap interval; a tie when it holds 0. Cells "
             "measured without per-item results get no verdict and say \"unpaired\"."), ""]
    for model in sorted(dense):
        scores = dense[model].get("zero_shot")
        if scores:
            tasks = ", ".join(f"{task} {value['acc']:.3f}" for task, value in scores["tasks"].items())
            lines.append(f"Dense {model}: average acc {scores['average']['acc']:.4f} ({tasks}); perplexity wiki "
                         f"{dense[model]['perplexity_wiki']:.2f}, lee {dense[model]['perplexity_lee']:.2f}.")
    lines += ["", *headline(table, cells), *separation_lines(table, cells)]
    for model, remove in sorted({(c["model"], c["remove"]) for c in cells}):
        rows = {name: {key[3]: value for key, value in table.items() if key[:3] == (model, remove, name)}
                for name in SELECTIONS}
        rows = {name: heals for name, heals in rows.items() if heals}
        layers = next(c["layers"] for c in cells if c["model"] == model)
        lines += [f"## {model}, {remove} of {layers} layers removed", ""]
        best = best_heals(table, model, remove)
        if best:
            clp = best.get("clp")
            lines += [("| selection | cut(s) | no heal | endpoints | best heal | retention ± 2 se | above chance | "
                      f"vs clp | MMLU acc (chance {CHANCE['mmlu']}) | LAMBADA acc (ppl) | wiki ppl | wiki ppl vs clp | "
                      "lee ppl | seeds |"), "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for name, (heal_name, value) in sorted(best.items(), key=lambda item: -item[1][1]["retention"]):
                none, endpoints = (rows[name].get(h, {}).get("retention") for h in ("none", "endpoints"))
                against = "—" if name == "clp" or clp is None else clp_verdict(clp[1], value)
                ppl = "—" if name == "clp" or clp is None else perplexity_verdict(value, clp[1])
                lines.append(f"| {name} | {'; '.join(value['cuts'])} | {fmt(none)} | {fmt(endpoints)} | {heal_name} | "
                             f"{value['retention']:.3f} ± {2 * value['stderr']:.3f} | {fmt(value['above_chance'])} | "
                             f"{against} | {fmt(value['mmlu_acc'])} | {lambada_text(value)} | {value['wiki']:.2f} | "
                             f"{ppl} | {value['lee']:.2f} | {value['seeds']} |")
            lines.append("")
        for base in ("clp", "tail"):
            heals = rows.get(base, {})
            reference = heals.get("endpoints")
            if len(heals) < 2 or reference is None:
                continue
            lines += [(f"Heals on the {base} cut (a heal that keeps a layer of the block, as `streamline` does, "
                      "leaves more layers than the others), each against endpoint tuning of the same cut:"), "",
                      ("| heal | layers kept | trainable parameters | retention ± 2 se | above chance | "
                       "vs endpoints | wiki ppl | wiki ppl vs endpoints | lee ppl |"), "|---|---|---|---|---|---|---|---|---|"]
            for heal_name, value in sorted(heals.items(), key=lambda item: item[1]["trainable"]):
                against = ("—" if heal_name == "endpoints" or "retention" not in value
                           or "retention" not in reference else verdict(value, reference))
                ppl = "—" if heal_name == "endpoints" else perplexity_verdict(value, reference)
                lines.append(f"| {heal_name} | {value['layers_after'] or '—'} | {value['trainable']:,} | "
                             f"{fmt(value.get('retention'))} ± {fmt(2 * value['stderr'] if 'stderr' in value else None)} "
                             f"| {fmt(value.get('above_chance'))} | {against} | {value['wiki']:.2f} | {ppl} | "
                             f"{value['lee']:.2f} |")
            lines.append("")
        if rows.get("clp") and rows.get("clp-2"):
            lines += ["One segment against at most two (same heal):", "",
                      ("| heal | clp cut(s) | clp retention | clp-2 cut(s) | clp-2 retention | clp-2 vs clp | "
                      "clp ppl | clp-2 ppl |"), "|---|---|---|---|---|---|---|---|"]
            for heal_name in EVERYWHERE:
                one, two = rows["clp"].get(heal_name), rows["clp-2"].get(heal_name)
                if one and two:
                    against = verdict(two, one) if "retention" in one and "retention" in two else "—"
                    lines.append(f"| {heal_name} | {'; '.join(one['cuts'])} | {fmt(one.get('retention'))} | "
                                 f"{'; '.join(two['cuts'])} | {fmt(two.get('retention'))} | {against} | "
                                 f"{one['wiki']:.2f} | {two['wiki']:.2f} |")
            lines.append("")
    if refused:
        lines += ["Heals that refused a model (recorded, not measured):", ""]
        lines += [f"- {heal_name} on {model}: {reason}" for (model, heal_name), reason in sorted(refused.items())]
        lines.append("")
    text = "\n".join(lines) + "\n"
    write_atomically(out / "results.md", text)
    write_atomically(out / "cells.md", cell_table(cells))
    plots(table, out)
    return text


def fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def lambada_text(value: dict) -> str:
    """LAMBADA accuracy with its perplexity, or — for cells measured without it."""
    if value.get("lambada_openai_acc") is None:
        return "—"
    return f"{value['lambada_openai_acc']:.3f} ({value['lambada_openai_perplexity']:.1f})"


def cell_table(cells: list[dict]) -> str:
    """Every cell on one line: what was cut, what it cost and what it measured."""
    lines = ["# Every cell of the grid", "", ("| model | n | seed | selection | heal | cut | trainable | search s | "
             "heal s | wiki ppl | lee ppl | avg acc | avg acc_norm | retention | above chance |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in sorted(cells, key=lambda c: (c["model"], c["remove"], c["seed"], c["selection"], c["heal"])):
        zero_shot = (c.get("zero_shot") or {}).get("average", {})
        kept = c.get("retention") or {}
        lines.append(f"| {c['model']} | {c['remove']} | {c['seed']} | {c['selection']} | {c['heal']} | {c['cut']} | "
                     f"{c['trainable_parameters']:,} | {c['search_seconds']:.1f} | {c['heal_seconds']:.1f}"
                     f"{'*' if c.get('measured_in') else ''} | "
                     f"{c['perplexity_wiki']:.2f} | {c['perplexity_lee']:.2f} | {fmt(zero_shot.get('acc'))} | "
                     f"{fmt(zero_shot.get('acc_norm'))} | {fmt(kept.get('retention'))} | "
                     f"{fmt(kept.get('retention_above_chance'))} |")
    lines += ["", ("\\* the same model as an earlier cell (the same chosen layers and heal, and the same seed where "
                   "the heal reads calibration data): its heal and measures are that cell's (`measured_in` in the "
                   "cell's file).")]
    return "\n".join(lines) + "\n"


def mean(values) -> float | None:
    """The mean of the values that exist (None where a ratio had no denominator), or None."""
    values = [value for value in values if value is not None]
    return sum(values) / len(values) if values else None


def plots(table: dict[tuple, dict], out: Path) -> None:
    """One panel per model: best-heal retention (mean over seeds) against the removal rate per selection method,
    and retention against trainable parameters for the heals on the clp and tail cuts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = {key: value for key, value in table.items() if "retention" in value}
    models = sorted({key[0] for key in scored})
    if not models:
        return
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for axis, model in zip(axes[0], models):
        removes = sorted({remove for (m, remove, _, _) in scored if m == model})
        for name in SELECTIONS:
            best = {}
            for (m, remove, selection_name, _), value in scored.items():
                if (m, selection_name) == (model, name):
                    best[remove] = max(best.get(remove, -math.inf), value["retention"])
            if best:
                axis.plot(sorted(best), [best[r] for r in sorted(best)], marker="o", label=name)
        axis.set_title(model)
        axis.set_xlabel(f"layers removed ({', '.join(str(r) for r in removes)})")
        axis.set_ylabel("retention, best heal")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "retention_by_rate.png", dpi=110)
    plt.close(figure)
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for axis, model in zip(axes[0], models):
        fewest = min(remove for (m, remove, _, _) in scored if m == model)
        for (m, remove, name, heal_name), value in sorted(scored.items()):
            if m == model and name in ("clp", "tail"):
                x = max(value["trainable"], 1)
                axis.scatter(x, value["retention"], s=14, marker="o" if name == "clp" else "^",
                             color="C0" if remove == fewest else "C3")
                axis.annotate(f"{heal_name}", (x, value["retention"]), fontsize=6)
        axis.set_xscale("log")
        axis.set_title(f"{model}: heals on the clp (o) and tail (^) cuts; blue: fewer layers removed")
        axis.title.set_fontsize(8)
        axis.set_xlabel("trainable (or fitted) parameters")
        axis.set_ylabel("retention")
    figure.tight_layout()
    figure.savefig(out / "heals_parameters.png", dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--rates", default="", help="'tiny' to use the tiny removal counts for every model; or "
                        "MODEL:N[:N],... for other counts (e.g. smollm2-135m:7: a streamline heal then cuts 6 layers, "
                        "as the other heals do at n = 6)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tasks", default=",".join((*TASKS, *APART)))
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: the full local sets)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--ppl-windows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batch-size", type=int, default=32,
                        help="lm-eval's batch for a vocabulary of up to 50k tokens (smaller for larger ones)")
    parser.add_argument("--workers", type=int, default=0, help="run N worker processes spread over the GPUs")
    parser.add_argument("--as-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--heal-steps", type=int, default=200)
    parser.add_argument("--heal-batch", type=int, default=8)
    parser.add_argument("--heal-windows", type=int, default=1024)
    parser.add_argument("--agreement", action=argparse.BooleanOptionalAction, default=True,
                        help="each pruned model's agreement with the dense model (KL and top-1 on the test windows, "
                        "greedy generation from held-out prompts)")
    parser.add_argument("--generation-prompts", type=int, default=200, help="prompts of the generation agreement")
    parser.add_argument("--selections", default="", help="comma-separated part of the selections (default: all)")
    parser.add_argument("--heals", default="", help="comma-separated part of the heals (default: all)")
    parser.add_argument("--report", action="store_true", help="only write the tables and plots from the cells")
    parser.add_argument("--readme", default="", help="a markdown file whose section between the markers "
                                                     f"{START} and {END} becomes the compact headline table")
    parser.add_argument("--doc", default="", help="a markdown file whose section between the markers becomes "
                                                  "the whole report")
    arguments = parser.parse_args()
    arguments.models = [m for m in arguments.models.split(",") if m]
    arguments.seeds = [int(s) for s in arguments.seeds.split(",") if s]
    arguments.selections = [s for s in arguments.selections.split(",") if s]
    arguments.heals = [s for s in arguments.heals.split(",") if s]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(arguments.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    RATES.update(parse_rates(arguments.rates, arguments.models))
    if not arguments.report:
        (out / "claims").mkdir(exist_ok=True)
        check_protocol(arguments, out)
        if arguments.as_worker:
            return run(arguments, out)
        record_launch(out / "grid.json", {"chance": CHANCE,
                                          "settings": {k: v for k, v in vars(arguments).items() if k != "out"}})
        launch(arguments, out) if arguments.workers else run(arguments, out)
    text = report(out)
    if arguments.readme:
        into_section(Path(arguments.readme), compact_headline(out) + generated_by(out, arguments))
    if arguments.doc:
        body = text.replace("\n## ", "\n### ").replace("# Headline grid\n", "")
        into_section(Path(arguments.doc), generated_by(out, arguments) + body)
    print(text)


START, END = "<!-- grid results: start -->", "<!-- grid results: end -->"


def against(found: dict, reference: dict, name: str) -> tuple[str, str | None, float | None]:
    """``found`` (a method's best heal) against ``reference``'s, in the words of a README row named after the
    reference (``name``): its verdict on accuracy ("NAME wins", "tie", "NAME loses"; "unpaired" without per-item
    results), and where both kept per-window results the verdict on wiki perplexity and the perplexity ratio."""
    word = clp_verdict(reference, found, name).split(" (")[0]
    ratio = paired_perplexity(found, reference)
    if ratio is None:
        return word, None, None
    ppl_word = {"better": f"{name} loses", "worse": f"{name} wins", "tie": "tie"}[ratio.verdict(higher_is_better=False)]
    return word, ppl_word, math.exp(ratio.estimate)


def tally_rows(best: dict, cases: list, reference: str) -> list[str]:
    """The rows that count, per case, how often ``reference``'s best heal wins, ties or loses against every other
    method's, on accuracy and on wiki perplexity, where paired (the unpaired ones only counted); none where
    ``reference`` was not run."""
    if not any(reference in best[case] for case in cases):
        return []
    words = (f"{reference} wins", "tie", f"{reference} loses")
    counts = {measure: {case: dict.fromkeys(words, 0) for case in cases} for measure in ("accuracy", "perplexity")}
    unpaired = {case: 0 for case in cases}
    for case in cases:
        if reference not in best[case]:
            continue
        for name, found in best[case].items():
            if name == reference:
                continue
            word, ppl_word, _ = against(found[1], best[case][reference][1], reference)
            if word == UNPAIRED:
                unpaired[case] += 1
            else:
                counts["accuracy"][case][word] += 1
            if ppl_word is not None:
                counts["perplexity"][case][ppl_word] += 1
    label = "CLP" if reference == "clp" else reference
    rows = [f"| **{label} wins / ties / loses, accuracy** | "
            + " | ".join("{} / {} / {}".format(*counts["accuracy"][case].values())
                         + (f" ({unpaired[case]} unpaired)" if unpaired[case] else "") for case in cases) + " |"]
    if any(sum(found.values()) for found in counts["perplexity"].values()):
        rows.append(f"| **{label} wins / ties / loses, wiki perplexity** | " + " | ".join(
            "{} / {} / {}".format(*counts["perplexity"][case].values()) for case in cases) + " |")
    return rows


def compact_headline(out: Path, references: tuple[str, ...] = ("clp", "repair-1")) -> str:
    """One table for a README: per case (model, layers removed) a column, per selection method a row, each entry
    the method's retention with its best heal and whether CLP (one segment, its own best heal) wins, ties or loses
    against it (:func:`clp_verdict`); where both kept per-window results, also the method's wiki perplexity as a
    multiple of CLP's and CLP's verdict on it (paired over the test windows). The last rows count the verdicts, for
    CLP and for each other selection of ``references`` (the same comparisons made against it)."""
    cells, _, _ = read_cells(out)
    table = summaries(cells)
    shape = {c["model"]: c["layers"] for c in cells}
    cases = sorted({(c["model"], c["remove"]) for c in cells})
    best = {case: best_heals(table, *case) for case in cases}
    lines = ["| selection (best heal) | " + " | ".join(f"{m}, {n} of {shape[m]} cut" for m, n in cases) + " |",
             "|---|" + "---|" * len(cases)]
    for name in SELECTIONS:
        entries = []
        for case in cases:
            found, clp = best[case].get(name), best[case].get("clp")
            if found is None:
                entries.append("—")
            elif name == "clp" or clp is None:
                entries.append(f"**{found[1]['retention']:.3f} ± {2 * found[1]['stderr']:.3f}**")
            else:
                word, ppl_word, ratio = against(found[1], clp[1], "clp")
                entry = f"{found[1]['retention']:.3f} ({word})"
                if ppl_word is not None:
                    entry += f"; wiki ppl x{ratio:.2f} ({ppl_word})"
                entries.append(entry)
        lines.append(f"| {name} | " + " | ".join(entries) + " |")
    for reference in references:
        lines += tally_rows(best, cases, reference)
    return "\n".join(lines) + "\n"


def record_launch(path: Path, meta: dict) -> None:
    """Write this launch's ``meta`` to ``path`` with its command, keeping in ``commands`` every earlier launch that
    the file lists (a folder resumed by several launches names them all)."""
    command = "python " + " ".join(sys.argv)
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    commands = [c for c in earlier.get("commands", [earlier.get("command")]) if c and c != command]
    write_atomically(path, json.dumps({"command": command, "commands": [*commands, command],
                                       "versions": library_versions(), **meta}, indent=1, default=str) + "\n")


def generated_by(out: Path, arguments) -> str:
    """The line that says which command wrote a generated section, from which cells, made by which commands (every
    launch into the folder, as ``grid.json`` lists them)."""
    meta = json.loads((out / "grid.json").read_text())
    flags = "".join(f" --{name} {getattr(arguments, name)}" for name in ("readme", "doc") if getattr(arguments, name))
    commands = meta.get("commands", [meta["command"]])
    made = " and ".join(f"`{command}`" for command in commands)
    if len(commands) > 2:
        made = f"the {len(commands)} launches that `{out}/grid.json` lists, the last `{commands[-1]}`"
    return f"\n_Generated by `python bench/grid.py --out {out} --report{flags}` from `{out}/cells`, made by {made}._\n"


def into_section(path: Path, section: str) -> None:
    """Replace the text between the markers :data:`START` and :data:`END` of a markdown file with ``section``."""
    content = path.read_text()
    if START not in content or END not in content:
        raise SystemExit(f"{path} has no {START} ... {END} section")
    before, rest = content.split(START, 1)
    write_atomically(path, before + START + "\n" + section + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    main()
