"""Zero-shot scoring with the output head at every position (lm-eval's HFLM) or only where a continuation lies
(layercut's, ``zeroshot._continuation_lm``): the same items scored the same way, timed as a user meets them.

Each run is a fresh process (this script with ``--one``), timed from launch to exit: imports, loading the model,
the tasks' offline copies and the scoring. The two variants run in turn (every, continuation, every, …) so that a
drift in the machine's speed hits both. Each run also reports the scoring call's own seconds, its peak resident
memory, and every item's correctness, so the report can say whether the two variants scored every item the same.
Writes ``zeroshot_head.json`` and ``README.md`` (the table) into ``--out``, with the command.

    python bench/zeroshot_head.py --models gemma3-270m,smollm2-135m --limit 100 --repeats 2 \\
        --out bench/results/zeroshot-head-cpu
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("every", "continuation")
TASKS = "piqa,arc_easy,hellaswag,lambada_openai"


def one(variant: str, model: str, tasks: str, limit: int, batch_size: int, dtype: str) -> dict:
    """One evaluation in this process, with lm-eval's own HFLM (``every``) or layercut's (``continuation``)."""
    from layercut import zeroshot
    from layercut.config import ModelOptions
    from layercut.load import load_model

    if variant == "every":
        from lm_eval.models.huggingface import HFLM
        zeroshot._continuation_lm = lambda: HFLM
    handle = load_model(model, ModelOptions(dtype=dtype))
    started = time.perf_counter()
    scores = zeroshot.evaluate_zero_shot(handle.model, handle.tokenizer, tasks.split(","), limit=limit,
                                         batch_size=batch_size)
    seconds = time.perf_counter() - started
    return {"variant": variant, "scoring_seconds": seconds,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "tasks": {name: {"acc": task.acc, "acc_norm": task.acc_norm, "correct": task.correct,
                             "correct_norm": task.correct_norm, "perplexity": task.perplexity} for name, task in scores.tasks.items()}}


def run(variant: str, model: str, arguments, scratch: Path) -> dict:
    """``one`` in a fresh process, timed from launch to exit."""
    result = scratch / f"{variant}.json"
    command = [sys.executable, __file__, "--one", variant, "--models", model,
               "--tasks", arguments.tasks, "--limit", str(arguments.limit), "--batch-size", str(arguments.batch_size),
               "--dtype", arguments.dtype, "--result", str(result)]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text()) | {"launch_to_exit_seconds": time.perf_counter() - started}


def summary(runs: list[dict]) -> dict:
    """Median, min and max of each timing over ``runs``, and whether every run scored every item as the first."""
    figures = {}
    for key in ("launch_to_exit_seconds", "scoring_seconds", "peak_rss_gb"):
        values = [r[key] for r in runs]
        figures[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return figures


def same_scores(first: dict, second: dict) -> dict:
    """Per task: whether every item's correctness (acc and acc_norm) is the same, and the largest difference in a metric."""
    out = {}
    for name, task in first["tasks"].items():
        other = second["tasks"][name]
        metrics = [m for m in ("acc", "acc_norm", "perplexity") if task[m] is not None]
        out[name] = {"same_items": all(task[k] == other[k] for k in ("correct", "correct_norm")),
                     "largest_metric_difference": max(abs(task[m] - other[m]) for m in metrics)}
    return out


def spread(figure: dict, digits: int) -> str:
    return f"{figure['median']:.{digits}f} ({figure['min']:.{digits}f} – {figure['max']:.{digits}f})"


def report(results: dict, out: Path) -> None:
    lines = ["# Zero-shot scoring: the output head at every position, or only where a continuation lies", "",
             (f"Made by `{results['command']}` ({results['machine']}). Each run is a fresh process timed from "
              f"launch to exit; tasks {results['tasks']}, the first {results['limit']} items of each, batch "
              f"{results['batch_size']}, {results['dtype']}. Median (min – max) over {results['repeats']} runs of "
              "each, run in turn."), "",
             "| model | head | launch to exit, s | scoring call, s | peak memory, GB | every item scored the same |",
             "|---|---|---|---|---|---|"]
    for model, entry in results["models"].items():
        for variant in VARIANTS:
            figures = entry["summary"][variant]
            same = "—" if variant == "every" else (
                "yes" if all(t["same_items"] for t in entry["agreement"].values()) else
                "no: " + ", ".join(n for n, t in entry["agreement"].items() if not t["same_items"]))
            lines.append(f"| {model} | {variant} | {spread(figures['launch_to_exit_seconds'], 1)} | "
                         f"{spread(figures['scoring_seconds'], 1)} | {spread(figures['peak_rss_gb'], 2)} | {same} |")
        ratio = entry["launch_to_exit_ratio"]
        lines.append(f"| {model} | continuation / every, paired | {ratio['median']:.3f} ({ratio['min']:.3f} – "
                     f"{ratio['max']:.3f}) | | | largest metric difference "
                     f"{max(t['largest_metric_difference'] for t in entry['agreement'].values()):.2g} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gemma3-270m,smollm2-135m")
    parser.add_argument("--tasks", default=TASKS)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.one:
        arguments.result.write_text(json.dumps(one(arguments.one, arguments.models, arguments.tasks, arguments.limit,
                                                   arguments.batch_size, arguments.dtype)))
        return
    if arguments.out is None:
        parser.error("--out is required")
    import platform

    import torch

    arguments.out.mkdir(parents=True, exist_ok=True)
    scratch = arguments.out / "runs"
    scratch.mkdir(exist_ok=True)
    results = {"command": "python bench/zeroshot_head.py " + shlex.join(sys.argv[1:]), "tasks": arguments.tasks,
               "limit": arguments.limit, "batch_size": arguments.batch_size, "dtype": arguments.dtype,
               "repeats": arguments.repeats,
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
               "models": {}}
    for model in arguments.models.split(","):
        runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
        for repeat in range(arguments.repeats):
            for variant in VARIANTS:
                runs[variant].append(run(variant, model, arguments, scratch))
                print(model, variant, repeat, f"{runs[variant][-1]['launch_to_exit_seconds']:.1f} s", flush=True)
        ratios = [c["launch_to_exit_seconds"] / e["launch_to_exit_seconds"]
                  for c, e in zip(runs["continuation"], runs["every"])]
        results["models"][model] = {
            "summary": {variant: summary(runs[variant]) for variant in VARIANTS},
            "launch_to_exit_ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "agreement": same_scores(runs["every"][0], runs["continuation"][0]),
            "runs": {variant: [{k: v for k, v in r.items() if k != "tasks"} for r in runs[variant]]
                     for variant in VARIANTS},
            "scores": {variant: runs[variant][0]["tasks"] for variant in VARIANTS}}
        (arguments.out / "zeroshot_head.json").write_text(json.dumps(results, indent=1) + "\n")
        report(results, arguments.out)
    for path in scratch.iterdir():
        path.unlink()
    scratch.rmdir()


if __name__ == "__main__":
    main()
