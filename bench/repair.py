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

from layercut import data
from layercut.config import HealOptions, ModelOptions
from layercut.evaluate import perplexity
from layercut.export import library_versions
from layercut.heal import heal, teacher_targets
from layercut.layers import drop_layers, num_layers
from layercut.load import load_model


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
    model, tokenizer = load_model("smollm2-135m", ModelOptions(dtype="float32"))
    total = num_layers(model)
    train = data.calibration_windows(tokenizer, data.load_text("wiki", "calib"), arguments.seq_len, 1024, 1234)
    test = data.evaluation_windows(tokenizer, data.load_text("wiki", "test"), arguments.seq_len,
                                   arguments.ppl_windows)
    teacher = teacher_targets(model, train, 64, 16)
    dense = perplexity(model, test, 16)
    runs = [("endpoints", float(lr)) for lr in arguments.endpoint_lrs.split(",")]
    runs += [("all", float(lr)) for lr in arguments.all_lrs.split(",")]
    rows = []
    for remove in (int(n) for n in arguments.removes.split(",")):
        segments = next(r["oracle_segments"] for r in search if r["remove"] == remove)
        for recipe, lr in runs:
            pruned = copy.deepcopy(model)
            drop_layers(pruned, segments)
            options = HealOptions(heal="endpoints" if recipe == "endpoints" else "last-k", last_k=total,
                                  heal_steps=arguments.steps, heal_lr=lr, heal_batch=arguments.batch)
            pruned, report = heal(pruned, train, segments, total, options, teacher)
            rows.append({"remove": remove, "segments": segments, "recipe": recipe, "lr": lr,
                         "perplexity": perplexity(pruned, test, 16), "trainable": report["trainable_parameters"],
                         "seconds": report["seconds"], "last_loss": report["last_loss"]})
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
