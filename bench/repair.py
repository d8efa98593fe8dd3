"""Repair at equal steps with each recipe's learning rate tuned: endpoint tuning vs tuning every remaining layer.

For each n: cut the oracle segment from ``--search-json`` (written by clp_search.py), then train with each
(recipe, learning rate) pair for the same steps and batch, and report held-out perplexity.
Writes ``repair.json`` and ``repair.md`` into ``--out``.

    python bench/repair.py --search-json bench/results/clp-h200/clp_search.json --out bench/results/repair-h200
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path

from layercut import heal
from layercut.config import DataOptions, HealOptions, ModelOptions
from layercut.data import calibrate
from layercut.evaluate import perplexity
from layercut.layers import cut
from layercut.load import load_model
from layercut.record import library_versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search-json", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--removes", default="6,10")
    parser.add_argument("--endpoint-lrs", default="1e-4,3e-4,1e-3")
    parser.add_argument("--all-lrs", default="1e-4,3e-4")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--ppl-windows", type=int, default=256)
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    search = json.loads(Path(arguments.search_json).read_text())["search"]
    handle = load_model("smollm2-135m", ModelOptions(dtype="float32"))
    total = handle.num_layers
    # heal windows are drawn with the data seed + 1: 1024 windows at seed 1234, top-64 teacher targets
    options = DataOptions(seq_len=arguments.seq_len, ppl_windows=arguments.ppl_windows, seed=1233, batch_size=16)
    test = calibrate(handle.tokenizer, options).test
    prepared = heal.prepare(handle, HealOptions(heal_windows=1024, heal_top_k=64), options)
    dense = perplexity(handle.model, test, 16)
    runs = [("endpoints", float(lr)) for lr in arguments.endpoint_lrs.split(",")]
    runs += [("all", float(lr)) for lr in arguments.all_lrs.split(",")]
    rows = []
    for remove in (int(n) for n in arguments.removes.split(",")):
        segments = next(r["oracle_segments"] for r in search if r["remove"] == remove)
        for name, lr in runs:
            pruned = copy.deepcopy(handle)
            removed = cut(pruned, segments)
            heal_options = HealOptions(heal="endpoints" if name == "endpoints" else "last-k", last_k=total,
                                       heal_steps=arguments.steps, heal_lr=lr, heal_batch=arguments.batch)
            report = heal.heal(pruned, removed, prepared, heal_options)
            rows.append({"remove": remove, "segments": segments, "recipe": name, "lr": lr,
                         "perplexity": perplexity(pruned.model, test, 16), "trainable": report.trainable_parameters,
                         "seconds": report.seconds, "last_loss": report.last_loss})
            logging.getLogger("bench").info("%s", rows[-1])
            del pruned
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python " + " ".join(sys.argv), "dense": dense, "rows": rows, "settings": vars(arguments),
              "versions": library_versions()}
    (out / "repair.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [(f"# Repair at equal steps ({arguments.steps} steps, batch {arguments.batch} x {arguments.seq_len} "
             f"tokens, KL to dense top-64) on SmolLM2-135M"), "", f"Command: `{result['command']}`", "",
             f"Dense perplexity (wiki test, {arguments.ppl_windows} windows): {dense:.2f}", "",
             "| n | segment | recipe | lr | trainable | perplexity | seconds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['remove']} | {r['segments']} | {r['recipe']} | {r['lr']:g} | {r['trainable']:,} | "
                     f"{r['perplexity']:.2f} | {r['seconds']:.1f} |")
    (out / "repair.md").write_text("\n".join(lines) + "\n")
    print((out / "repair.md").read_text())


if __name__ == "__main__":
    main()
