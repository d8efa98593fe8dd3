"""bench/repair_pick.py on a tiny model: it records the repair selection's pick and prices it from the results on
record (none here, then a landscape file that holds it)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from layercut.data import load_text

BENCH = Path(__file__).parents[1] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_run(tmp_path: Path) -> tuple:
    """The script, its --out and its arguments for one cell (n = 2) of a tiny model, with 2-step short heals and 3
    finalists (one segment keeps 1 by default, which no longer heal scores)."""
    torch.set_num_threads(1)
    model = load("landscape").smoke_model(tmp_path / "model", load_text("wiki", "calib"))
    out = tmp_path / "picks"
    config = '{"segments": 1, "repair_finalists": 3, "repair_screen_steps": 1, "repair_steps": 2}'
    return load("repair_pick"), out, ["--out", str(out), "--cells", f"{model}:2", "--seeds", "0", "--seq-len", "16",
                                      "--calib-windows", "8", "--batch-size", "4", "--config", config,
                                      "--landscape", str(tmp_path / "landscape"), "--grid", str(tmp_path / "grid")]


def test_the_pick_is_recorded_and_priced_from_a_landscape_that_holds_it(tmp_path):
    picks, out, arguments = tiny_run(tmp_path)
    picks.main(arguments)
    [path] = out.glob("*.json")
    result = json.loads(path.read_text())
    assert result["worth"] is None and len(result["chosen"]) == 1
    assert result["config"] == {"segments": 1, "repair_finalists": 3, "repair_screen_steps": 1, "repair_steps": 2}
    listed = [row["cut"] for row in result["candidates"]]
    assert "4:6" in listed and result["chosen"] in [[[int(i) for i in cut.split(":")]] for cut in listed]
    cut = {"model": "model", "remove": 2, "seed": 0, "cut": result["chosen"],
           "heal": {"steps": {"200": {"perplexity_wiki": 12.5}}}}
    (tmp_path / "landscape" / "cuts").mkdir(parents=True)
    (tmp_path / "landscape" / "cuts" / "one.json").write_text(json.dumps(cut))
    picks.main([*arguments, "--lookup"])
    assert json.loads(path.read_text())["worth"]["wiki"] == 12.5


def test_given_cuts_are_scored_as_the_selection_scores_its_candidates(tmp_path):
    picks, out, arguments = tiny_run(tmp_path)
    picks.main(arguments)
    [picked] = [json.loads(path.read_text()) for path in out.glob("*.json")]
    names = ("screened_kl", "repaired_kl", "extrapolated_kl")
    selection = {row["cut"]: [row[n] for n in names] for row in picked["candidates"] if row["repaired_kl"] is not None}
    cuts = [[[int(i) for i in cut.split(":")]] for cut in selection]
    picks.main([*arguments, "--score", json.dumps(cuts)])
    [scored] = [json.loads(path.read_text()) for path in out.glob("*-scored-*.json")]
    found = {f"{row['cut'][0][0]}:{row['cut'][0][1]}": [row[n] for n in names] for row in scored["scored"]}
    assert found.keys() == selection.keys()
    for cut, values in selection.items():  # the finalists: the same windows, seed and steps, the same scores
        assert found[cut] == pytest.approx(values, rel=1e-6)
        assert values[2] != values[1]  # extrapolated beyond the finalists' steps
    assert scored["lowest"] == picked["chosen"]
    with pytest.raises(SystemExit, match="do not remove 2 layers"):
        picks.main([*arguments, "--out", str(tmp_path / "wrong"), "--score", "[[[0, 3]]]"])
    assert not list((tmp_path / "wrong").glob("*.json"))


def test_the_replay_reranks_recorded_finalists_and_fills_them_from_scored_files(tmp_path):
    """A recorded search whose two-segment finalists crowded out a contiguous cut: the replay heals the best of
    each number of segments, takes the missing one's repaired KL from a --score file of the same cell and seed,
    and picks by KL extrapolated to 200 steps; a finalist measured nowhere marks the cell incomplete."""
    picks = load("repair_pick")
    rows = [{"cut": "1:2 4:5", "screened_kl": 1.5, "repaired_kl": 1.2},
            {"cut": "2:4", "screened_kl": 1.8, "repaired_kl": 1.3},
            {"cut": "1:3", "screened_kl": 1.9, "repaired_kl": None},
            {"cut": "3:5", "screened_kl": 2.5, "repaired_kl": None}]
    versions = {"torch": "2.x"}
    recorded = {"model": "m", "remove": 2, "seed": 0, "config": {"segments": 2}, "chosen": [[1, 2], [4, 5]],
                "worth": None, "candidates": rows, "versions": versions}
    (tmp_path / "m-n2-seed0-segments2-calib128.json").write_text(json.dumps(recorded))
    scored = {"config": {}, "versions": versions, "scored": [{"cut": [[1, 3]], "repaired_kl": 1.25}]}
    (tmp_path / "m-n2-seed0-scored-default-calib128.json").write_text(json.dumps(scored))
    known = {("m", 2, 0, json.dumps([[1, 3]])): {"wiki": 9.0, "source": "landscape"}}
    [row] = picks.replay([tmp_path], known)
    assert row["missing"] == ["3:5"] and row["pick"] == "1:3" and row["worth"]["wiki"] == 9.0
    ahead = {r["cut"]: r["extrapolated_kl"] for r in row["finalists"]}
    assert ahead["1:3"] == pytest.approx(picks.repair.extrapolated((10, 1.9), (50, 1.25), 200))
    assert ahead["1:2 4:5"] > ahead["1:3"]  # the two-segment cut led at 50 steps (1.2 against 1.25)
    assert "(incomplete)" in picks.replay_table([row])
