"""Benchmark the CLP gate against the exhaustive oracle, and endpoint repair against all-layer repair.

For each number of removed layers n and calibration seed: the gate's segment and hard-cut KL next to the oracle's,
with their wall times. For each n (first seed): held-out perplexity with no repair, endpoint tuning, and all-layer
tuning at equal steps. Writes ``clp_search.json``, ``clp_search.md`` and PNG plots into ``--out``.

    python bench/clp_search.py --out bench/results/clp-h200            # full setting (GPU)
    python bench/clp_search.py --out runs/clp-cpu --quick              # small setting (CPU)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

from layercut import heal, selection
from layercut.config import DataOptions, HealOptions, ModelOptions, SearchOptions
from layercut.data import calibrate
from layercut.evaluate import perplexity
from layercut.layers import cut
from layercut.load import load_model
from layercut.record import library_versions
from layercut.report import profile_track

logger = logging.getLogger("bench")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def data_options(arguments, seed: int = 0) -> DataOptions:
    return DataOptions(calib=arguments.calib, ppl=arguments.ppl, seq_len=arguments.seq_len,
                       calib_windows=arguments.calib_windows, ppl_windows=arguments.ppl_windows, seed=seed,
                       batch_size=arguments.batch_size)


def search_rows(handle, arguments) -> list[dict]:
    rows = []
    for seed in arguments.seeds:
        windows = calibrate(handle.tokenizer, data_options(arguments, seed), test=False).calibration
        for remove in arguments.removes:
            exact = SearchOptions(method="exhaustive", remove=remove)
            clp = SearchOptions(method="clp", remove=remove, gate_steps=arguments.gate_steps,
                                gate_profiles=arguments.gate_profiles, gate_windows=arguments.gate_windows,
                                gate_lr=arguments.gate_lr, tau_start=arguments.tau_start, tau_end=arguments.tau_end)
            synchronize()
            oracle = selection.search(handle, windows, exact, arguments.batch_size, seed)
            synchronize()
            gate = selection.search(handle, windows, clp, arguments.batch_size, seed)
            synchronize()
            rows.append({
                "remove": remove, "seed": seed,
                "gate_segments": gate.segments, "gate_kl": gate.kl, "gate_seconds": gate.seconds,
                "gate_evaluations": gate.evaluations, "gate_profiles": len(gate.trajectory[0]["starts"]),
                "oracle_segments": oracle.segments, "oracle_kl": oracle.kl, "oracle_seconds": oracle.seconds,
                "oracle_evaluations": oracle.evaluations,
                "match": abs(gate.kl - oracle.kl) <= 1e-6 * max(1.0, oracle.kl),
                "landscape": oracle.landscape, "trajectory": gate.trajectory,
            })
            logger.info("n=%d seed=%d gate %s %.4f (%.1fs) oracle %s %.4f (%.1fs)", remove, seed, gate.segments,
                        gate.kl, gate.seconds, oracle.segments, oracle.kl, oracle.seconds)
    return rows


def repair_rows(handle, arguments, search: list[dict]) -> list[dict]:
    # heal windows are drawn with the data seed + 1: 1234, as before
    options = data_options(arguments, seed=1233)
    test = calibrate(handle.tokenizer, options).test
    base = HealOptions(heal="endpoints", heal_steps=arguments.heal_steps, heal_lr=arguments.heal_lr,
                       heal_batch=arguments.heal_batch, heal_windows=arguments.heal_windows, heal_top_k=arguments.top_k)
    prepared = heal.prepare(handle, base, options)
    dense = perplexity(handle.model, test, arguments.batch_size)
    total = handle.num_layers
    rows = []
    for remove in arguments.removes:
        segments = next(r["oracle_segments"] for r in search if r["remove"] == remove)
        row = {"remove": remove, "segments": segments, "dense": dense}
        # "all": every remaining layer, full weights: the endpoint heal's upper reference
        for name, heal_options in (("none", base.replace(heal="none")), ("endpoints", base),
                                   ("all", base.replace(heal="last-k", last_k=total))):
            pruned = copy.deepcopy(handle)
            removed = cut(pruned, segments)
            synchronize()
            report = heal.heal(pruned, removed, prepared, heal_options)
            synchronize()
            row[name] = perplexity(pruned.model, test, arguments.batch_size)
            row[f"{name}_trainable"] = report.trainable_parameters
            row[f"{name}_seconds"] = report.seconds
            del pruned
        rows.append(row)
        logger.info("repair n=%d: %s", remove, {k: v for k, v in row.items() if isinstance(v, float)})
    return rows


def write_markdown(result: dict, path: Path) -> None:
    lines = [f"# CLP search and repair: {result['model']}", "", f"Command: `{result['command']}`", "",
             (f"Device: {result['device']}; calibration: {result['settings']['calib_windows']} windows x "
             f"{result['settings']['seq_len']} tokens of `{result['settings']['calib']}`"), "",
             "## Search: gate vs exhaustive oracle (hard-cut KL, nats/token)", "",
             "| n | seed | gate segment | gate KL | oracle segment | oracle KL | match | gate s | oracle s | gate cuts scored |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["search"]:
        lines.append(f"| {r['remove']} | {r['seed']} | {r['gate_segments']} | {r['gate_kl']:.4f} | "
                     f"{r['oracle_segments']} | {r['oracle_kl']:.4f} | {'yes' if r['match'] else 'NO'} | "
                     f"{r['gate_seconds']:.1f} | {r['oracle_seconds']:.1f} | {r['gate_evaluations']} |")
    matches = sum(r["match"] for r in result["search"])
    lines += ["", f"Gate reaches the oracle in {matches} of {len(result['search'])} cases.", ""]
    if result["repair"]:
        s = result["settings"]
        lines += [(f"## Repair at equal steps ({s['heal_steps']} steps, lr {s['heal_lr']}, batch {s['heal_batch']} x "
                  f"{s['seq_len']} tokens, KL to dense top-{s['top_k']}); held-out perplexity on `{s['ppl']}`"), "",
                  "| n | segment | dense | no repair | endpoints | all layers | endpoint params | all-layer params |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["repair"]:
            lines.append(f"| {r['remove']} | {r['segments']} | {r['dense']:.2f} | {r['none']:.2f} | "
                         f"{r['endpoints']:.2f} | {r['all']:.2f} | {r['endpoints_trainable']:,} | "
                         f"{r['all_trainable']:,} |")
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    removes = sorted({r["remove"] for r in result["search"]})
    figure, axes = plt.subplots(1, len(removes), figsize=(4 * len(removes), 3.2), squeeze=False)
    for axis, remove in zip(axes[0], removes):
        for r in (r for r in result["search"] if r["remove"] == remove):
            starts = sorted(int(k.split(":")[0]) for k in r["landscape"])
            axis.plot(starts, [r["landscape"][f"{s}:{s + remove}"] for s in starts], marker=".", lw=1,
                      label=f"seed {r['seed']}")
            axis.plot([r["gate_segments"][0][0]], [r["gate_kl"]], "rx", ms=9)
        axis.set_yscale("log")
        axis.set_title(f"n = {remove} (x: gate pick)")
        axis.set_xlabel("segment start")
    axes[0][0].set_ylabel("hard-cut KL")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / "clp_landscapes.png", dpi=110)
    plt.close(figure)
    r = result["search"][-1]
    figure, axis = plt.subplots(figsize=(6, 3.2))
    steps = [t["step"] for t in r["trajectory"]]
    for profile in range(len(r["trajectory"][0]["starts"])):
        axis.plot(steps, profile_track(r["trajectory"], profile), lw=1)
    axis.axhline(r["oracle_segments"][0][0], color="k", ls="--", lw=1, label="oracle start")
    axis.set_xlabel("step")
    axis.set_ylabel("notch start")
    axis.set_title(f"gate trajectories, n = {r['remove']}, seed {r['seed']}")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / "clp_trajectory.png", dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="small CPU setting")
    parser.add_argument("--removes", default="4,6,8,10")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--calib", default="wiki")
    parser.add_argument("--ppl", default="wiki")
    parser.add_argument("--gate-profiles", "--gate-starts", type=int, default=0)
    parser.add_argument("--gate-steps", type=int, default=60)
    parser.add_argument("--gate-windows", type=int, default=4)
    parser.add_argument("--gate-lr", type=float, default=0.2)
    parser.add_argument("--tau-start", type=float, default=1.0)
    parser.add_argument("--tau-end", type=float, default=0.05)
    parser.add_argument("--no-repair", action="store_true")
    arguments = parser.parse_args()
    full = not arguments.quick
    arguments.removes = [int(x) for x in arguments.removes.split(",")]
    arguments.seeds = [int(x) for x in arguments.seeds.split(",")]
    arguments.seq_len = 256 if full else 64
    arguments.calib_windows = 64 if full else 8
    arguments.batch_size = 16 if full else 4
    arguments.ppl_windows = 256 if full else 16
    arguments.heal_steps = 200 if full else 10
    arguments.heal_lr = 1e-4
    arguments.heal_batch = 8 if full else 2
    arguments.heal_windows = 1024 if full else 32
    arguments.top_k = 64
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    handle = load_model(arguments.model, ModelOptions(dtype="float32"))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    started = time.perf_counter()
    search = search_rows(handle, arguments)
    repair = [] if arguments.no_repair else repair_rows(handle, arguments, search)
    settings = {k: v for k, v in vars(arguments).items() if k not in ("out",)}
    result = {"model": arguments.model, "device": device, "command": "python " + " ".join(__import__("sys").argv),
              "settings": settings, "search": search, "repair": repair, "versions": library_versions(),
              "seconds": time.perf_counter() - started}
    (out / "clp_search.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, out / "clp_search.md")
    plot(result, out)
    print((out / "clp_search.md").read_text())


if __name__ == "__main__":
    main()
