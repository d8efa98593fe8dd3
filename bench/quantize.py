"""What quantizing a pruned SmolLM2-135M costs: weight size, memory, perplexity and zero-shot accuracy per scheme,
on the CPU.

Takes a checkpoint written by ``layercut prune`` (``--pruned``), or cuts ``--segment`` from the dense model
without repair, quantizes it with each scheme through ``layercut.quantize.quantize_checkpoint``, then loads every
checkpoint in a fresh process through the same path as ``layercut eval`` (``load_model``, ``perplexity``,
``evaluate_zero_shot``) and records its parameter bytes in memory and the process's peak resident memory.
Writes ``quantize.json`` and ``quantize.md`` into ``--out``; checkpoints go to ``--work``.

    layercut prune smollm2-135m --segment 13:19 --output runs/q/pruned --seq-len 256 --calib-windows 32 \
        --ppl-windows 32 --heal-steps 100 --heal-batch 4 --heal-windows 128
    python bench/quantize.py --pruned runs/q/pruned --tasks piqa,hellaswag,winogrande,arc_easy --limit 200 \
        --out bench/results/quantize-cpu --work runs/quantize-bench
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

from layercut.config import DataOptions, EvalOptions, ModelOptions, QuantizeOptions
from layercut.data import calibrate
from layercut.evaluate import evaluate
from layercut.layers import cut, parse_segment
from layercut.load import load_model
from layercut.quantize import SCHEMES, package_version, quantize_checkpoint, weights_size
from layercut.record import library_versions

logger = logging.getLogger("bench.quantize")


def evaluate_folder(folder: str, seq_len: int, windows: int, tasks: str, limit: int) -> dict:
    """Perplexity (and zero-shot accuracy when ``tasks``) of the checkpoint in ``folder``; peak RSS in MiB."""
    handle = load_model(folder, ModelOptions(dtype="float32"))
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    test = calibrate(handle.tokenizer, DataOptions(seq_len=seq_len, ppl_windows=windows)).test
    started = time.perf_counter()
    measured = evaluate(handle.model, handle.tokenizer, test, EvalOptions())
    result = {"perplexity": measured.perplexity, "eval_seconds": time.perf_counter() - started,
              "memory_footprint_mib": handle.model.get_memory_footprint() / 2**20, "peak_rss_after_load_mib": loaded_rss}
    if tasks:
        zero_shot = evaluate(handle.model, handle.tokenizer, None, EvalOptions(tasks=tasks, limit=limit), 8).zero_shot
        result["zero_shot"] = zero_shot.model_dump()
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def measure_in_child(folder: Path, arguments) -> dict:
    """Run :func:`evaluate_folder` in a fresh interpreter so that peak memory belongs to that model alone."""
    command = [sys.executable, __file__, "--evaluate", str(folder), "--seq-len", str(arguments.seq_len),
               "--ppl-windows", str(arguments.ppl_windows), "--tasks", arguments.tasks, "--limit", str(arguments.limit)]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode:
        return {"error": finished.stderr.strip().splitlines()[-1]}
    return json.loads(finished.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict]) -> str:
    lines = [("| model | weights on disk MiB | parameters in memory MiB | perplexity | vs pruned | zero-shot avg acc "
             "| peak RSS MiB | quantize s |"), "|---|---|---|---|---|---|---|---|"]
    pruned = next(row["perplexity"] for row in rows if row["name"] == "pruned")
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | {row.get('size_mib', 0):.1f} | | error: {row['error']} | | | | |")
            continue
        average = row.get("zero_shot", {}).get("average", {}).get("acc")
        lines.append(f"| {row['name']} | {row['size_mib']:.1f} | {row['memory_footprint_mib']:.1f} | {row['perplexity']:.2f} | "
                     f"{100 * (row['perplexity'] / pruned - 1):+.1f} % | {'-' if average is None else f'{average:.3f}'} | "
                     f"{row['peak_rss_mib']:.0f} | {row.get('quantize_seconds', 0):.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/quantize-cpu")
    parser.add_argument("--work", default="runs/quantize-bench")
    parser.add_argument("--pruned", help="a checkpoint written by layercut prune (default: cut --segment, no repair)")
    parser.add_argument("--segment", default="13:19", help="half-open segment to cut (CLP's 20 %% cut)")
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--ppl-windows", type=int, default=32)
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=0, help="4-bit group size (0: layercut's default)")
    parser.add_argument("--tasks", default="", help="comma-separated zero-shot tasks (empty: none)")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--evaluate", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.evaluate:
        print(json.dumps(evaluate_folder(arguments.evaluate, arguments.seq_len, arguments.ppl_windows,
                                         arguments.tasks, arguments.limit)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work, out = Path(arguments.work), Path(arguments.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    handle = load_model("smollm2-135m", ModelOptions(dtype="float32"))
    dense_dir, pruned_dir = work / "dense", Path(arguments.pruned or work / "pruned")
    handle.model.save_pretrained(dense_dir)
    handle.tokenizer.save_pretrained(dense_dir)
    if not arguments.pruned:
        cut(handle, [parse_segment(arguments.segment)])
        handle.model.save_pretrained(pruned_dir)
        handle.tokenizer.save_pretrained(pruned_dir)
    options = DataOptions(seq_len=arguments.seq_len, calib_windows=arguments.calib_windows)
    calibration = calibrate(handle.tokenizer, options, test=False).calibration
    del handle
    rows = []
    for name, folder in (("dense", dense_dir), ("pruned", pruned_dir)):
        rows.append({"name": name, "size_mib": weights_size(folder) / 2**20, **measure_in_child(folder, arguments)})
        logger.info("%s", rows[-1])
    for scheme in arguments.schemes.split(","):
        folder = work / scheme
        started = time.perf_counter()
        try:
            quantize_checkpoint(pruned_dir, folder, QuantizeOptions(quantize=scheme, group_size=arguments.group_size),
                                calibration if SCHEMES[scheme].calibrated else None, overwrite=True)
        except Exception as error:  # a bench records a failing library and goes on to the next scheme
            rows.append({"name": f"pruned + {scheme}", "error": f"{type(error).__name__}: {error}"[:300]})
            logger.exception("%s failed", scheme)
            continue
        seconds = time.perf_counter() - started
        rows.append({"name": f"pruned + {scheme}", "scheme": scheme, "library": SCHEMES[scheme].library,
                     "library_version": package_version(SCHEMES[scheme].library), "quantize_seconds": seconds,
                     "size_mib": weights_size(folder) / 2**20, **measure_in_child(folder, arguments)})
        logger.info("%s", rows[-1])
    pruned_record = pruned_dir / "layercut.json"
    result = {"command": "python " + " ".join(sys.argv),
              "pruned": json.loads(pruned_record.read_text()) if pruned_record.is_file() else None,
              "segment": arguments.segment, "seq_len": arguments.seq_len, "ppl_windows": arguments.ppl_windows,
              "calib_windows": arguments.calib_windows, "group_size": arguments.group_size, "tasks": arguments.tasks, "limit": arguments.limit,
              "rows": rows, "versions": {**library_versions(),
                                         **{p: package_version(p) for p in ("llmcompressor", "compressed-tensors",
                                                                             "bitsandbytes")}}}
    (out / "quantize.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "quantize.md").write_text(f"Command: `{result['command']}`\n\n" + markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
