"""SmolLM2-135M with the same 6 layers cut ([13, 19), 24 layers left), healed two ways, seed 0, item by item:
the streamline heal (CLP's 7-layer block [12, 19), its first layer retrained to stand in for it: this run) against
the endpoint heal (CLP's 6-layer cut, bench/results/grid-paired-h100). Both were measured under one protocol (the
same test windows, LAMBADA and task items, generation prompts; the dense cells are identical). Writes
paired-seed0.md beside this script. Run from the repository root:

    python bench/results/grid-streamline7-h100/paired_seed0.py
"""

from __future__ import annotations

import json
from pathlib import Path

from layercut.paired import (
    accuracy_difference,
    agreement_differences,
    log_perplexity_difference,
    ratio,
    task_strata,
)
from layercut.record import Agreement, ZeroShot

HERE = Path(__file__).parent
A = HERE / "cells" / "smollm2-135m-n7-seed0-clp-streamline.json"
B = Path("bench/results/grid-paired-h100/cells/smollm2-135m-n6-seed0-clp-endpoints.json")


def main() -> None:
    a, b = json.loads(A.read_text()), json.loads(B.read_text())
    assert a["cut"] == b["cut"] and a["layers_after"] == b["layers_after"], "the two cells must cut the same layers"
    lines = ["# Streamline against endpoints on the same cut, seed 0 (paired)", "",
             (f"SmolLM2-135M, cut {a['cut']}, {a['layers_after']} layers left. A = streamline (its block "
             f"{a['chosen']}, layer {a['chosen'][0][0]} retrained), B = endpoints (bench/results/grid-paired-h100). "
             "95 % paired-bootstrap intervals; \"tie\" when the interval holds 1 (ratios) or 0 (differences)."), "",
             "| measure | A streamline | B endpoints | A against B | 95 % interval | verdict |", "|---|---|---|---|---|---|"]
    for text in ("wiki", "lee"):
        difference = log_perplexity_difference(a[f"window_nll_{text}"], b[f"window_nll_{text}"])
        value, low, high = ratio(difference)
        verdict = "tie" if low <= 1 <= high else ("A better" if high < 1 else "B better")
        lines.append(f"| {text} perplexity | {a[f'perplexity_{text}']:.2f} | {b[f'perplexity_{text}']:.2f} | "
                     f"×{value:.3f} | [{low:.3f}, {high:.3f}] | {verdict} |")
    za, zb = ZeroShot(**a["zero_shot"]), ZeroShot(**b["zero_shot"])
    for label, tasks in (("commonsense accuracy (7 tasks)", za.average_tasks), ("LAMBADA accuracy", ["lambada_openai"])):
        difference = accuracy_difference(task_strata(za, zb, tasks))
        mean_a = sum(za.tasks[t].acc for t in tasks) / len(tasks)
        mean_b = sum(zb.tasks[t].acc for t in tasks) / len(tasks)
        verdict = "tie" if difference.tie else ("A better" if difference.estimate > 0 else "B better")
        lines.append(f"| {label} | {mean_a:.3f} | {mean_b:.3f} | {difference.estimate:+.3f} | "
                     f"[{difference.low:+.3f}, {difference.high:+.3f}] | {verdict} |")
    for name, (value_a, value_b, difference, higher) in agreement_differences(
            Agreement(**a["agreement"]), Agreement(**b["agreement"])).items():
        better = difference.estimate > 0 if higher else difference.estimate < 0
        verdict = "tie" if difference.tie else ("A better" if better else "B better")
        lines.append(f"| {name} | {value_a:.4f} | {value_b:.4f} | {difference.estimate:+.4f} | "
                     f"[{difference.low:+.4f}, {difference.high:+.4f}] | {verdict} |")
    (HERE / "paired-seed0.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
