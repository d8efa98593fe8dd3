"""Gemma-3-270M, 6 of 18, seed 1: the repair selection's pick with 3 finalists (this run's cell, [5, 11)) against
its pick with 4 (bench/results/grid-repair4-h200, [6, 10) + [15, 17)), item by item: the same 256 wiki and 256 lee
test windows, the first 500 LAMBADA items, the same 200 generation prompts. Writes paired-seed1.md beside this
script. Run from the repository root:

    python bench/results/grid-repair5-h100/paired_seed1.py
"""

from __future__ import annotations

import json
from pathlib import Path

from layercut import paired
from layercut.record import Agreement, ZeroShot

HERE = Path(__file__).parent
NAME = "gemma3-270m-n6-seed1-repair-endpoints.json"


def main() -> None:
    a = json.loads((HERE / "cells" / NAME).read_text())
    b = json.loads((HERE.parent / "grid-repair4-h200" / "cells" / NAME).read_text())
    lines = [f"# {a['cut']} (3 finalists) against {b['cut']} (4 finalists): Gemma-3-270M, 6 of 18, seed 1", "",
             ("A − B with its 95 % paired-bootstrap interval (perplexity: the ratio A / B); a tie when it holds 0 "
              "(ratio 1)."), "", "| measure | A | B | A − B [95 %] | verdict |", "|---|---|---|---|---|"]

    def row(name, value_a, value_b, difference, higher_is_better, as_ratio=False):
        text = ("×{:.3f} [{:.3f}, {:.3f}]".format(*paired.ratio(difference)) if as_ratio
                else f"{difference.estimate:+.4f} [{difference.low:+.4f}, {difference.high:+.4f}]")
        verdict = difference.verdict(higher_is_better)
        lines.append(f"| {name} | {value_a:.4f} | {value_b:.4f} | {text} | "
                     f"{verdict if verdict == 'tie' else 'A ' + verdict} |")

    for text in ("wiki", "lee"):
        row(f"{text} perplexity", a[f"perplexity_{text}"], b[f"perplexity_{text}"],
            paired.log_perplexity_difference(a[f"window_nll_{text}"], b[f"window_nll_{text}"]), False, True)
    za, zb = ZeroShot(**a["zero_shot"]), ZeroShot(**b["zero_shot"])
    row("LAMBADA acc", za.tasks["lambada_openai"].acc, zb.tasks["lambada_openai"].acc,
        paired.accuracy_difference(paired.task_strata(za, zb, ["lambada_openai"])), True)
    for name, (value_a, value_b, difference, higher) in paired.agreement_differences(
            Agreement(**a["agreement"]), Agreement(**b["agreement"])).items():
        row(name, value_a, value_b, difference, higher)
    (HERE / "paired-seed1.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
