"""Gemma-3-270M, 6 of 18, seed 1: the repair selection's pick with 3 finalists (this run's cell, [5, 11)) against
its pick with 4 (bench/results/grid-repair4-h200, [6, 10) + [15, 17)), item by item: the same 256 wiki and 256 lee
test windows, the first 500 LAMBADA items, the same 200 generation prompts. Writes paired-seed1.md beside this
script. Run from the repository root:

    python bench/results/grid-repair5-h100/paired_seed1.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from layercut import paired

HERE = Path(__file__).parent
NAME = "gemma3-270m-n6-seed1-repair-endpoints.json"


def main() -> None:
    a = json.loads((HERE / "cells" / NAME).read_text())
    b = json.loads((HERE.parent / "grid-repair4-h200" / "cells" / NAME).read_text())
    lines = [f"# {a['cut']} (3 finalists) against {b['cut']} (4 finalists): Gemma-3-270M, 6 of 18, seed 1", "",
             ("A − B with its 95 % paired-bootstrap interval (perplexity: the ratio A / B); a tie when it holds 0 "
             "(ratio 1)."), "", "| measure | A | B | A − B [95 %] | verdict |", "|---|---|---|---|---|"]

    def row(name, value_a, value_b, difference, higher_is_better, as_ratio=False):
        low, high = difference.low, difference.high
        if as_ratio:
            text = "×{:.3f} [{:.3f}, {:.3f}]".format(*paired.ratio(difference))
        else:
            text = f"{difference.estimate:+.4f} [{low:+.4f}, {high:+.4f}]"
        better = (low > 0) == higher_is_better
        verdict = "tie" if low <= 0 <= high else ("A better" if better else "A worse")
        lines.append(f"| {name} | {value_a:.4f} | {value_b:.4f} | {text} | {verdict} |")

    for text in ("wiki", "lee"):
        row(f"{text} perplexity", a[f"perplexity_{text}"], b[f"perplexity_{text}"],
            paired.log_perplexity_difference(a[f"window_nll_{text}"], b[f"window_nll_{text}"]), False, True)
    task_a, task_b = a["zero_shot"]["tasks"]["lambada_openai"], b["zero_shot"]["tasks"]["lambada_openai"]
    row("LAMBADA acc", task_a["acc"], task_b["acc"], paired.accuracy_difference(
        [(paired.unpack(task_a["correct"]), paired.unpack(task_b["correct"]))]), True)
    for text in ("wiki", "lee"):
        ta, tb = a["agreement"]["texts"][text], b["agreement"]["texts"][text]
        row(f"KL to dense ({text})", ta["kl"], tb["kl"], paired.mean_difference(ta["window_kl"], tb["window_kl"]), False)
        row(f"top-1 agreement ({text})", ta["top1"], tb["top1"],
            paired.mean_difference(ta["window_top1"], tb["window_top1"]), True)
    ga, gb = a["agreement"]["generation"], b["agreement"]["generation"]
    row("generation: matching prefix", ga["mean_prefix"], gb["mean_prefix"],
        paired.mean_difference(ga["prefix"], gb["prefix"]), True)
    assert all(math.isfinite(x) for x in (a["perplexity_wiki"], b["perplexity_wiki"]))
    (HERE / "paired-seed1.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
