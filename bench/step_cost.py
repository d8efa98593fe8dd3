"""The unit costs behind the search's time: the shared scorer's dense pass, one exact cut on all calibration
windows and on the read-out's screening windows, and one gate step (forward and backward) for a number of profiles.
Writes step_cost.json and step_cost.md under --out.

    python bench/step_cost.py --model gemma3-270m --out runs/step-cost --remove 4 --profiles 5,3,1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from search import timed  # bench/search.py: the GPU's queue drained before and after

from layercut.config import DataOptions, ModelOptions, SearchOptions
from layercut.data import calibrate
from layercut.forward import gated
from layercut.gate import exact_scorer, gated_kl, initial_starts, notch_mask
from layercut.load import load_model
from layercut.record import library_versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", required=True)
    parser.add_argument("--remove", type=int, default=4)
    parser.add_argument("--start", type=int, default=-1, help="first removed layer of the timed cut (-1: the middle)")
    parser.add_argument("--profiles", default="5,3,1")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--screen", type=int, default=8)
    arguments = parser.parse_args()
    torch.manual_seed(0)
    handle = load_model(arguments.model, ModelOptions(dtype="float32"))
    windows = calibrate(handle.tokenizer, DataOptions(seq_len=arguments.seq_len, calib_windows=arguments.windows,
                                                      seed=0), test=False).calibration
    options = SearchOptions(remove=arguments.remove)
    start = arguments.start if arguments.start >= 0 else (handle.num_layers - arguments.remove) // 2
    cut = ((start, start + arguments.remove),)
    scorer, dense_s = timed(exact_scorer, handle, windows, options, 16)
    scorer([cut], 1)  # warm-up, untimed
    measures = {"dense pass s": dense_s, "teacher log-probabilities kept": scorer.log_probs,
                f"one cut {list(cut)} on {arguments.windows} windows s": timed(scorer, [cut])[1],
                f"one cut on {arguments.screen} windows s": timed(scorer, [cut], arguments.screen)[1]}
    handle.model.requires_grad_(False)
    with gated(handle.layers) as set_gates:
        for profiles in [int(p) for p in arguments.profiles.split(",") if p]:
            starts = initial_starts(handle.num_layers, arguments.remove, profiles, 1).requires_grad_(True)
            gates = 1 - notch_mask(starts, torch.full((profiles, 1), float(arguments.remove)), handle.num_layers, 0.5)
            picks, at = torch.tensor([0, 1]), torch.randperm(128)[:64].sort().values
            kl, forward_s = timed(gated_kl, scorer, set_gates, gates, picks, 128, at)
            _, backward_s = timed(torch.autograd.backward, kl.sum())
            measures[f"gate step, {profiles} profiles x 2 windows x 128 tokens, KL on 64 positions: forward s"] = forward_s
            measures[f"gate step, {profiles} profiles: backward s"] = backward_s
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    result = {"model": arguments.model, "device": device, "command": "python " + " ".join(sys.argv),
              "versions": library_versions(), "measures": measures}
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_cost.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Unit costs of the search on {arguments.model} ({device})", "", f"Command: `{result['command']}`", "",
             "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in measures.items()]
    (out / "step_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
