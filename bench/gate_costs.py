"""Where the one-segment gate spends its time: its phases, a step's cost against profiles, windows and tokens, the
cost of screening a cut on 8, 4 or 2 windows and of scoring it exactly, and torch.profiler tables of one gate search.

    python bench/gate_costs.py smol OUT     # SmolLM2-135M (float32), 32 wiki windows of 256 tokens, n = 6
    python bench/gate_costs.py big OUT      # a random-init Llama-3-8B shape (bf16) on GPU 0, n = 8

Writes OUT/{smol,big}.json (seconds) and OUT/{smol,big}-prof.txt (the profiler's tables of one gate search, by host
and by device time, and of one oracle run, by device time). Every timing follows two
untimed warm-up gate runs; ``first`` is the end of the first step (with the dense pass), ``readout`` the time after
the last step. ``default-fwdtimed`` times each step's forward pass alone (``fwd``), the GPU's queue drained around it.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
from pathlib import Path

import torch
from search import step_clock, synchronize, timed  # bench/search.py
from torch.profiler import ProfilerActivity, profile

import layercut.gate as gate_module
from layercut.config import DataOptions, ModelOptions, SearchOptions
from layercut.gate import cuts, exact_scorer, search_exhaustive, search_gate
from layercut.layers import Handle

BATCH = 16  # windows per pass of the exact scorer
# gate settings over the default whose step cost is compared
VARIANTS = {**{f"profiles{p}": {"gate_profiles": p} for p in (1, 3, 5)},
            **{f"windows{w}": {"gate_windows": w} for w in (1, 4)},
            "ctx64": {"gate_context": 64, "gate_positions": 32}, "pos16": {"gate_positions": 16}}


def subject(which: str) -> tuple[Handle, torch.Tensor, int]:
    """The model, its 32 calibration windows of 256 tokens and the layers to remove."""
    if which == "smol":
        from layercut.data import calibrate
        from layercut.load import load_model
        handle = load_model("smollm2-135m", ModelOptions(dtype="float32"))
        windows = calibrate(handle.tokenizer, DataOptions(calib="wiki", seq_len=256, calib_windows=32, seed=0,
                                                          batch_size=BATCH), test=False).calibration
        return handle, windows, 6
    from big_model import SHAPES, build  # bench/big_model.py
    model, _ = build("llama3-8b", 1, 100.0)
    windows = torch.randint(0, SHAPES["llama3-8b"]["vocab_size"], (32, 256), generator=torch.Generator().manual_seed(0))
    return Handle.of(model), windows, 8


def gate_run(handle: Handle, windows: torch.Tensor, remove: int, **options) -> dict:
    """One timed gate search: its total, first step, median step and read-out seconds."""
    ends, clock = step_clock()
    found, seconds = timed(search_gate, handle, windows, remove,
                           SearchOptions(method="clp", remove=remove, **options), BATCH, 0, clock)
    steps = [b - a for a, b in itertools.pairwise(ends)]
    return {"s": seconds, "first": ends[0], "median_step": statistics.median(steps) if steps else ends[0],
            "readout": seconds - ends[-1], "evals": found.evaluations, "seg": found.segments,
            "profiles": [len(t["active"]) for t in found.trajectory]}


def forward_timed(handle: Handle, windows: torch.Tensor, remove: int) -> dict:
    """A default gate run with each step's forward pass (gate.gated_kl) timed on its own."""
    forwards, plain = [], gate_module.gated_kl

    def timed_kl(*args, **kwargs):
        value, seconds = timed(plain, *args, **kwargs)
        forwards.append(seconds)
        return value

    gate_module.gated_kl = timed_kl
    try:
        return {**gate_run(handle, windows, remove), "fwd": forwards}
    finally:
        gate_module.gated_kl = plain


def profiled(function, *args):
    """torch.profiler's operator averages of one call (host, and the GPU's when there is one)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as found:
        function(*args)
        synchronize()
    return found.key_averages()


def main() -> None:
    which, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    handle, windows, remove = subject(which)
    for _ in range(2):  # warm-up: CUDA context, kernels, the first backward
        search_gate(handle, windows, remove, SearchOptions(method="clp", remove=remove), BATCH, 0)
    result = {}
    _, result["oracle_s"] = timed(search_exhaustive, handle, windows, remove,
                                  SearchOptions(method="exhaustive", remove=remove), BATCH)
    scorer, result["dense_s"] = timed(exact_scorer, handle, windows, SearchOptions(method="clp"), BATCH)
    every = cuts(handle.num_layers, remove, 1)
    for count in (8, 4, 2):
        result[f"screen_per_cut_w{count}"] = timed(scorer, every, count)[1] / len(every)
    result["exact_per_cut"] = timed(scorer, every)[1] / len(every)
    for repeat in range(2):
        result[f"default{repeat}"] = gate_run(handle, windows, remove)
    result["default-fwdtimed"] = forward_timed(handle, windows, remove)
    for name, options in VARIANTS.items():
        result[name] = gate_run(handle, windows, remove, **options)
        print(name, json.dumps(result[name]), flush=True)
    (out / f"{which}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}), flush=True)
    device_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    gate = profiled(search_gate, handle, windows, remove, SearchOptions(method="clp", remove=remove), BATCH, 0)
    oracle = profiled(search_exhaustive, handle, windows, remove, SearchOptions(method="exhaustive", remove=remove),
                      BATCH)
    tables = [gate.table(sort_by=key, row_limit=rows, max_name_column_width=70)
              for key, rows in (("self_cpu_time_total", 40), (device_key, 30), ("cpu_time_total", 40))]
    tables.append(oracle.table(sort_by=device_key, row_limit=20, max_name_column_width=70))
    (out / f"{which}-prof.txt").write_text("\n".join(tables))


if __name__ == "__main__":
    main()
