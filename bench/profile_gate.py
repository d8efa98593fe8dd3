"""Where one single-segment gate search and the exact oracle spend their time: torch.profiler tables.

    python bench/profile_gate.py [REMOVE]      # SmolLM2-135M, 32 wiki windows of 256 tokens, seed 0

Prints the setup, oracle and gate times (each after warm-up runs), then the profiler's operator tables of one gate
search (by host time and by device time) and of one oracle run (by device time).
"""
import sys

import torch
from search import synchronize, timed  # bench/search.py: the GPU's queue drained before and after
from torch.profiler import ProfilerActivity, profile

from layercut.config import DataOptions, ModelOptions, SearchOptions
from layercut.data import calibrate
from layercut.gate import exact_scorer, search_exhaustive, search_gate
from layercut.load import load_model


def report(label: str, function, *args) -> None:
    value, seconds = timed(function, *args)
    print(label, "seconds", round(seconds, 3), getattr(value, "segments", ""), flush=True)


def main() -> None:
    remove = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    handle = load_model("smollm2-135m", ModelOptions(dtype="float32"))
    windows = calibrate(handle.tokenizer, DataOptions(calib="wiki", seq_len=256, calib_windows=32, seed=0,
                                                      batch_size=16), test=False).calibration
    gate, oracle = SearchOptions(remove=remove), SearchOptions(method="exhaustive", remove=remove)
    for _ in range(2):  # warm-up: CUDA context, kernels, the first backward
        search_gate(handle, windows, remove, gate, 16, 0)
    report("scorer setup (dense pass)", exact_scorer, handle, windows, SearchOptions(), 16)
    report("oracle", search_exhaustive, handle, windows, remove, oracle, 16)
    report("gate", search_gate, handle, windows, remove, gate, 16, 0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    device_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    with profile(activities=activities) as gate_profile:
        search_gate(handle, windows, remove, gate, 16, 0)
        synchronize()
    print(gate_profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    print(gate_profile.key_averages().table(sort_by=device_key, row_limit=15, max_name_column_width=60))
    with profile(activities=activities) as oracle_profile:
        search_exhaustive(handle, windows, remove, oracle, 16)
        synchronize()
    print(oracle_profile.key_averages().table(sort_by=device_key, row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
