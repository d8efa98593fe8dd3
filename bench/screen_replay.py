"""Does screening the one-segment read-out on fewer windows or tokens change what the gate returns? Replayed offline.

The gate's read-out rounds its profiles to cuts, adds their neighbours, screens them on the first calibration
windows, scores the best three exactly and hill-climbs (``layercut.gate.search_notches``). This script computes, on
SmolLM2-135M, the per-token KL of every one-segment cut on the first 8 calibration windows of each seed (kept in
``--tokens``, computed once), then replays each recorded gate run's read-out (``bench/search.py --record``) with a
screen of w windows × t tokens for several (w, t), on the recorded exact landscape, and counts how often the
result is the oracle's segment.

    python bench/screen_replay.py --tokens runs/screen-tokens.json --out OUT \
        bench/results/search-h200/steep/search.json bench/results/search-h200/steep2/search.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from gate_replay import after_collapse, read_out, recorded_rows  # bench/gate_replay.py

from layercut.config import DataOptions, ModelOptions, SearchOptions
from layercut.gate import candidate_key, cuts, exact_scorer

SCREENS = [(8, 256), (4, 256), (8, 128), (2, 256), (4, 128), (2, 128), (1, 256)]  # (windows, tokens)


def token_kls(seeds, removes, windows: int = 8) -> dict[str, list[list[float]]]:
    """``"seed/n/cut" -> [windows][tokens]``: the KL(dense ‖ cut) of every one-segment cut at every position of
    the first ``windows`` calibration windows (32 wiki windows of 256 tokens, as bench/search.py draws them)."""
    from layercut.data import calibrate
    from layercut.forward import final_hidden, head_logits
    from layercut.load import load_model
    handle = load_model("smollm2-135m", ModelOptions(dtype="float32"))
    found = {}
    for seed in seeds:
        data = DataOptions(calib="wiki", seq_len=256, calib_windows=32, seed=seed, batch_size=16)
        first = calibrate(handle.tokenizer, data, test=False).calibration[:windows]
        scorer = exact_scorer(handle, first, SearchOptions(method="clp"), 16)
        teacher = scorer.teacher[0]  # [windows, T, V] dense log-probabilities
        for remove in removes:
            for cut in cuts(handle.num_layers, remove, 1):
                start = scorer.start(cut[0][0])
                removed = {i for s, e in cut for i in range(s, e)}
                with torch.no_grad(), scorer.from_boundary(start, scorer.states[0][start] if start else None, removed):
                    log_q = F.log_softmax(head_logits(handle.model, final_hidden(handle.model, first)).float(), -1)
                    found[f"{seed}/{remove}/{candidate_key(cut)}"] = (teacher.exp() * (teacher - log_q)).sum(-1).tolist()
            print(f"seed {seed} n {remove}: {len(found)} cuts", flush=True)
    return found


def screen_landscape(tokens: dict, row: dict, windows: int, length: int) -> dict[str, float]:
    """Every cut of ``row``'s landscape screened on the first ``windows`` windows' first ``length`` tokens."""
    found = {}
    for key in row["oracle_landscape"]:
        rows = tokens[f"{row['seed']}/{row['remove']}/{key}"][:windows]
        found[key] = sum(sum(values[:length]) / length for values in rows) / windows
    return found


def replay_read_out(row: dict, gate: dict, tokens: dict, windows: int, length: int, num_layers: int) -> bool:
    """Whether the recorded run's read-out (bench/gate_replay.py's), screened on ``windows`` × ``length``, returns
    the oracle's segment."""
    last = gate["trajectory"][-1]
    active = after_collapse(last, last["active"], row["remove"], num_layers)
    best, *_ = read_out(last, active, row["remove"], num_layers, row["oracle_landscape"],
                        screen_landscape(tokens, row, windows, length))
    return [list(s) for s in best] == row["oracle_segments"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", help="search.json files made with bench/search.py --record")
    parser.add_argument("--tokens", required=True, help="the per-token KLs: read if present, else computed and kept")
    parser.add_argument("--out", required=True)
    arguments = parser.parse_args()
    tokens_file = Path(arguments.tokens)
    if not tokens_file.exists():
        tokens_file.parent.mkdir(parents=True, exist_ok=True)
        tokens_file.write_text(json.dumps(token_kls((0, 1, 2), (4, 6, 8, 10))))
    tokens = json.loads(tokens_file.read_text())
    rows_out, lines = [], ["# The one-segment read-out screened on fewer windows or tokens (replayed)", "",
                           f"Command: `python {' '.join(sys.argv)}`", "",
                           "Cases whose replayed read-out returns the oracle's segment, per screen (windows/tokens).",
                           "", "| source | setting | cases | " + " | ".join(f"{w}/{t}" for w, t in SCREENS) + " |",
                           "|---|---|---|" + "---|" * len(SCREENS)]
    for source in arguments.sources:
        rows = recorded_rows(json.loads(Path(source).read_text()))
        for config in rows[0]["gates"]:
            matches = {f"{w}/{t}": sum(replay_read_out(row, row["gates"][config], tokens, w, t, 30) for row in rows)
                       for w, t in SCREENS}
            rows_out.append({"source": source, "setting": config, "cases": len(rows), "matches": matches})
            lines.append(f"| `{source}` | {config} | {len(rows)} | " + " | ".join(map(str, matches.values())) + " |")
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "screen-replay.json").write_text(json.dumps({"command": "python " + " ".join(sys.argv),
                                                        "rows": rows_out}, indent=1) + "\n")
    (out / "screen-replay.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
