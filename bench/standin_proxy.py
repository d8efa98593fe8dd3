"""A training-free proxy of repaired quality, scored against the repair landscape: each measured cut with its removed
block replaced by a least-squares linear stand-in, its KL to the dense model on the landscape's held-out proxy windows.

For a cut ``[s, e)`` the stand-in maps the state entering the block to the one leaving it, ``h_e ≈ h_s + h_s B``,
``B`` the least-squares fit (:func:`layercut.replacement.least_squares_map`) over ``--fit-windows`` of the heal's
calibration windows (held out from the proxy windows, as the landscape draws them); ``weighted`` divides each
token's squared error by ``‖h_e‖²`` (ReplaceMe's weights, which keep one massive activation from owning the fit).
A cut of several segments gets one stand-in per segment, each fitted on the dense model's states. The stand-in is
a proxy only, applied by hooks on the dense model (the block's layers return their input, its first layer adds
``h B``), never a checkpoint; unlike ``--heal lsq`` it needs no foldable MLP, so it scores Gemma-3 too. Without a
map (``none``) it is the cut itself, whose KL the landscape measured after 0 heal steps: the report checks that the
two agree.

The dense states at every layer boundary come from one forward pass over the fit windows; each cut then costs one
forward pass over the proxy windows, about what the exact pre-repair KL costs, and no training.

    python bench/standin_proxy.py --out bench/results/standin-proxy-cpu      # every cell of the landscape, seed 0
    python bench/standin_proxy.py --out bench/results/standin-proxy-cpu --report

Each cell's scores go to ``--out``/cells/<model>-n<n>-seed<seed>.json as they are measured (a rerun skips scored
cuts); ``--report`` writes ``results.md`` and ``standin.json``: per cell, each proxy's Spearman correlation with the
200-step repaired wiki perplexity and its pick's regret, beside the landscape's own proxies.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import time
from pathlib import Path
from statistics import fmean

import torch

from layercut import heal
from layercut.config import DataOptions, HealOptions
from layercut.data import held_out_windows, load_text
from layercut.files import write_atomically
from layercut.forward import replaced_layers
from layercut.replacement import dense_states, least_squares_map, relative_weights, weighted_moments

_spec = importlib.util.spec_from_file_location("landscape", Path(__file__).with_name("landscape.py"))
landscape = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(landscape)

logger = logging.getLogger("bench.standin_proxy")

MAPS = ("none", "lsq", "weighted")
LANDSCAPE = Path(__file__).parent / "results" / "landscape-h100"


# ----------------------------------------------------------------------------------------------- measure


def boundary_states(handle, windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The dense states at every layer boundary over ``windows``: entry ``b`` ``[tokens, H]`` (float32, CPU) is the
    input of layer ``b`` (``b = L``: the output of the last layer)."""
    wanted = {"0": (handle.layers[0], True)} | {str(i + 1): (layer, False) for i, layer in enumerate(handle.layers)}
    found: list[list[torch.Tensor]] = [[] for _ in wanted]
    for states in dense_states(handle, windows, wanted, batch_size):
        for name, state in states.items():
            found[int(name)].append(state.flatten(0, 1).float().cpu())
    return [torch.cat(parts) for parts in found]


def standin_map(states: list[torch.Tensor], start: int, end: int, kind: str) -> torch.Tensor | None:
    """``B`` ``[H, H]`` (float64) minimising Σ w‖h_s + h_s B − h_e‖² over the fit tokens (``w = 1/‖h_e‖²`` for
    ``weighted``, else 1); None for ``none``."""
    if kind == "none":
        return None
    entering, leaving = states[start], states[end]
    weights = relative_weights(leaving) if kind == "weighted" else torch.ones(entering.shape[0], dtype=torch.float64)
    gram, cross = weighted_moments(entering, leaving - entering, weights)
    return least_squares_map(gram, cross)


@contextlib.contextmanager
def standing_in(handle, maps: dict[tuple[int, int], torch.Tensor | None]):
    """The dense model with each segment ``[s, e)`` of ``maps`` cut (its layers return their input) and, where its
    map is not None, the state leaving layer s moved by the map: ``h + h B``."""
    removed = {index for start, end in maps for index in range(start, end)}
    hooks = []

    def adding(transform: torch.Tensor):
        def hook(module, args, kwargs, output):
            state = output[0] if isinstance(output, tuple) else output
            moved = state + (state.double() @ transform.to(state.device)).to(state.dtype)
            return (moved, *output[1:]) if isinstance(output, tuple) else moved
        return hook

    for (start, _), transform in maps.items():
        if transform is not None:
            hooks.append(handle.layers[start].register_forward_hook(adding(transform), with_kwargs=True))
    try:
        with replaced_layers(handle.layers, removed):
            yield
    finally:
        for hook in hooks:
            hook.remove()


def proxy_data(dense, settings, seed: int) -> dict:
    """The landscape's heal windows and held-out proxy windows with their dense top-k targets, drawn as its worker
    draws them (:meth:`landscape.Worker.data`), without the heal's teacher targets (the ``lm`` loss needs none),
    which no stand-in reads."""
    options = DataOptions(calib=settings.calib, seq_len=settings.seq_len, seed=seed, batch_size=settings.batch_size)
    windows = heal.prepare(dense, HealOptions(heal_windows=settings.heal_windows, heal_loss="lm"), options).windows
    proxy = held_out_windows(dense.tokenizer, load_text(settings.calib, "calib"), settings.seq_len,
                             settings.proxy_windows, seed + 2, windows)
    teacher = heal.teacher_targets(dense.model, proxy, HealOptions().heal_top_k, settings.batch_size)
    return {"heal_windows": windows, "proxy": proxy, "teacher": teacher}


def score_cell(worker, model: str, remove: int, seed: int, cuts: list[list], arguments, path: Path) -> dict:
    """Each cut's KL to the dense model on the proxy windows under each stand-in; written to ``path`` after every
    cut (a rerun resumes)."""
    found = json.loads(path.read_text()) if path.is_file() else {"model": Path(model).name, "remove": remove,
                                                                  "seed": seed, "fit_windows": arguments.fit_windows,
                                                                  "cuts": {}}
    todo = [c for c in cuts if landscape.cut_name(c) not in found["cuts"]]
    if not todo:
        return found
    dense, _ = worker.model(model)
    data = proxy_data(dense, worker.arguments, seed)
    started = time.perf_counter()
    states = boundary_states(dense, data["heal_windows"][:arguments.fit_windows], arguments.batch_size)
    found["states_seconds"] = time.perf_counter() - started
    for candidate in todo:
        scores = {}
        for kind in arguments.maps:
            started = time.perf_counter()
            maps = {(s, e): standin_map(states, s, e, kind) for s, e in candidate}
            with standing_in(dense, maps):
                kl = landscape.top_k_kl_of(dense.model, data["proxy"], data["teacher"], arguments.batch_size)
            scores[kind] = {"proxy_kl": kl, "seconds": time.perf_counter() - started}
        found["cuts"][landscape.cut_name(candidate)] = {"cut": [list(s) for s in candidate], **scores}
        write_atomically(path, json.dumps(found, indent=1) + "\n")
        logger.info("%s %s: %s", landscape.cell_stem(model, remove, seed), landscape.cut_name(candidate),
                    ", ".join(f"{k} {v['proxy_kl']:.4f}" for k, v in scores.items()))
    return found


# ----------------------------------------------------------------------------------------------- report


def merged(landscape_out: Path, out: Path) -> dict[tuple, list[dict]]:
    """The landscape's measured cuts per (model, n, seed), each with the stand-ins' KLs as patches named
    ``stand-in <kind>`` (so the landscape's own correlation and pick functions read them)."""
    cells = landscape.read_cuts(landscape_out)
    for path in sorted((out / "cells").glob("*.json")):
        scored = json.loads(path.read_text())
        for cell in cells.get((scored["model"], scored["remove"], scored["seed"]), []):
            entry = scored["cuts"].get(landscape.cut_name(tuple(tuple(s) for s in cell["cut"])))
            for kind, measured in (entry or {}).items():
                if kind != "cut":
                    cell["patches"][f"stand-in {kind}"] = {"proxy_kl": measured["proxy_kl"], "proxy_perplexity": math.nan}
    return cells


def report(landscape_out: Path, out: Path, steps: int = 200) -> str:
    cells = merged(landscape_out, out)
    correlations = landscape.correlations(cells, steps)
    names = ["exact KL (pre-repair)", "calib KL after 0 steps", "stand-in lsq", "stand-in weighted",
             "calib KL after 10 steps", "calib KL after 25 steps", "calib KL after 50 steps",
             f"calib KL from 10 and 50 steps, extrapolated to {steps}"]
    label = {n: (f"calib KL after {n}" if n.startswith("stand-in") else n) for n in names}
    lines = ["# A linear stand-in for the cut block as a proxy of repaired quality", "",
             ("Spearman correlation of each proxy with the cut's wiki perplexity after the 200-step endpoint heal, "
             "over every measured cut of the cell (all contiguous cuts, and the two-segment cuts the landscape "
             "healed); then the proxy's pick among them, with its regret (repaired wiki perplexity over the cell's "
             "best). Stand-in rows are this benchmark's; the others are the landscape's (bench/results/landscape-h100)."),
             "", "| proxy | " + " | ".join(f"{m} n = {n} seed {s}" for m, n, s in sorted(correlations)) + " |",
             "|---|" + "---|" * len(correlations)]
    summary = {}
    for name in names:
        row = []
        for key in sorted(correlations):
            rho = correlations[key].get(label[name])
            picks = landscape.proxy_picks(cells[key], steps).get(label[name])
            summary.setdefault("|".join(map(str, key)), {})[name] = {"spearman": rho, "pick": picks}
            row.append("—" if rho is None else f"{rho:.2f}; {picks['cut']} ×{picks['regret']:.3f}")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    agree = [(c["heal"]["steps"]["0"]["proxy_kl"], c["patches"]["stand-in none"]["proxy_kl"])
             for group in cells.values() for c in group if "stand-in none" in c["patches"] and "0" in c["heal"]["steps"]]
    if agree:
        worst = max(abs(a - b) / a for a, b in agree)
        lines += ["", (f"The stand-in `none` (the cut, by hooks on the dense model) against the landscape's KL after 0 "
                      f"steps (the cut model): {len(agree)} cuts, largest relative difference {worst:.2e}.")]
    costs = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    lines += ["", "Cost per cell (this run's machine): " + "; ".join(
        f"{c['model']} n = {c['remove']} seed {c['seed']} ({len(c['cuts'])} cuts): states "
        f"{c.get('states_seconds', math.nan):.0f} s, "
        f"{fmean([v['lsq']['seconds'] for v in c['cuts'].values() if 'lsq' in v] or [math.nan]):.1f} s per cut per map"
        for c in costs)]
    write_atomically(out / "standin.json", json.dumps(summary, indent=1) + "\n")
    text = "\n".join(lines) + "\n"
    write_atomically(out / "results.md", text)
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--landscape", default=str(LANDSCAPE), help="the landscape whose measured cuts are scored")
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--remove", default="", help="only these numbers of removed layers (default: every cell)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--fit-windows", type=int, default=64, help="heal windows the stand-in is fitted on")
    parser.add_argument("--maps", default=",".join(MAPS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--report", action="store_true")
    arguments = parser.parse_args(argv)
    arguments.maps = [m for m in arguments.maps.split(",") if m]
    out, landscape_out = Path(arguments.out), Path(arguments.landscape)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not arguments.report:
        (out / "cells").mkdir(parents=True, exist_ok=True)
        protocol = json.loads((landscape_out / "protocol.json").read_text())
        settings = landscape.parse(["--out", str(out), "--dtype", arguments.dtype, "--batch-size",
                                    str(arguments.batch_size), "--proxy-windows", str(protocol["proxy_windows"]),
                                    "--heal-windows", str(protocol["heal_windows"]), "--seq-len",
                                    str(protocol["seq_len"]), "--calib", protocol["calib"], "--no-agreement"])
        worker = landscape.Worker(settings, out)
        measured = landscape.read_cuts(landscape_out)
        for seed in [int(s) for s in arguments.seeds.split(",") if s]:
            for model in arguments.models.split(","):
                for remove in [n for n in landscape.CELLS[model] if str(n) in arguments.remove.split(",")
                               or not arguments.remove]:
                    cuts = [tuple(tuple(s) for s in c["cut"]) for c in measured.get((model, remove, seed), [])]
                    path = out / "cells" / f"{landscape.cell_stem(model, remove, seed)}.json"
                    score_cell(worker, model, remove, seed, sorted(cuts, key=lambda c: (len(c), c)), arguments, path)
                    landscape.grid.release_cached_memory()
    print(report(landscape_out, out))


if __name__ == "__main__":
    main()
