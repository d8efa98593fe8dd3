"""bench/gate_replay.py: replaying a recorded gate run under a stopping rule gives what a run with that rule gives."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_tiny, random_ids
from layercut.config import SearchOptions
from layercut.gate import search_exhaustive, search_gate
from layercut.layers import Handle


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


search, replay = load("search"), load("gate_replay")


TWENTY_STEPS = {"gate_steps": 20, "tau_end": 0.05}  # a whole schedule, annealed from 1 to 0.05 layers


@pytest.fixture(scope="module")
def recorded():
    """A tiny model, its calibration windows, one case recorded as bench/search.py --record keeps it (the oracle's
    and the screening landscapes) and a full 20-step gate run on it with its step times."""
    handle = Handle.of(build_tiny("llama", layers=10))
    windows = random_ids(batch=12, length=16, seed=2)
    oracle = search_exhaustive(handle, windows, 3, SearchOptions(method="exhaustive"))
    row = {"remove": 3, "seed": 0, "oracle_segments": [list(s) for s in oracle.segments],
           "oracle_shared_seconds": 1.0, **search.recorded(handle, windows, oracle, 4)}
    ends, clock = search.step_clock()
    options = SearchOptions(method="clp", remove=3, gate_patience=0, **TWENTY_STEPS)
    full = search_gate(handle, windows, 3, options, seed=0, progress=clock)
    gate = {"trajectory": full.trajectory, "step_ends": ends, "seconds": ends[-1]}
    return handle, windows, row, full, gate


def test_a_replayed_stopping_rule_stops_and_reads_out_like_a_run_with_that_rule(recorded):
    handle, windows, row, full, gate = recorded
    assert len(full.trajectory) == len(gate["step_ends"]) == 20

    as_run = replay.replay_case(row, gate, 10, {})
    assert as_run["segments"] == [list(s) for s in full.segments] and as_run["stop"] == 20

    stops = []
    for patience in (2, 3):
        options = SearchOptions(method="clp", remove=3, gate_patience=patience, **TWENTY_STEPS)
        stopped = search_gate(handle, windows, 3, options, seed=0)
        replayed = replay.replay_case(row, gate, 10, {"patience": patience})
        assert replayed["stop"] == len(stopped.trajectory)
        assert replayed["segments"] == [list(s) for s in stopped.segments]
        assert replayed["scored"] == stopped.evaluations
        stops.append(replayed["stop"])
    assert min(stops) < 20  # the rules did stop early


def test_a_shorter_run_on_the_same_schedule_follows_the_first_steps_of_the_full_run(recorded):
    """What the replay's stop-after-N rules stand for: N steps whose last temperature is the full run's at step N."""
    handle, windows, row, full, gate = recorded
    first = search_gate(handle, windows, 3, SearchOptions(method="clp", remove=3, gate_steps=8, gate_patience=0,
                                                          tau_end=0.05 ** (7 / 19)), seed=0)
    torch.testing.assert_close(torch.tensor([step["starts"] for step in first.trajectory]),
                               torch.tensor([step["starts"] for step in full.trajectory[:8]]), rtol=1e-5, atol=1e-6)
    replayed = replay.replay_case(row, gate, 10, {"last": 7})
    assert replayed["stop"] == 8 and replayed["segments"] == [list(s) for s in first.segments]
