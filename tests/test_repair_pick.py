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
    """The script, its --out and its arguments for one cell (n = 2) of a tiny model, with 2-step short heals."""
    torch.set_num_threads(1)
    model = load("landscape").smoke_model(tmp_path / "model", load_text("wiki", "calib"))
    out = tmp_path / "picks"
    return load("repair_pick"), out, ["--out", str(out), "--cells", f"{model}:2", "--seeds", "0", "--seq-len", "16",
                                      "--calib-windows", "8", "--batch-size", "4", "--config", '{"repair_screen_steps": 1, "repair_steps": 2}',
                                      "--landscape", str(tmp_path / "landscape"), "--grid", str(tmp_path / "grid")]


def test_the_pick_is_recorded_and_priced_from_a_landscape_that_holds_it(tmp_path):
    picks, out, arguments = tiny_run(tmp_path)
    picks.main(arguments)
    [path] = out.glob("*.json")
    result = json.loads(path.read_text())
    assert result["worth"] is None and len(result["chosen"]) == 1 and result["config"] == {"repair_screen_steps": 1, "repair_steps": 2}
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
