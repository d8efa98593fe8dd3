"""The repair landscape (bench/landscape.py): a CPU smoke run measures what it says, resumes, and reports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from layercut.config import ModelOptions
from layercut.data import evaluation_windows, load_text
from layercut.evaluate import perplexity
from layercut.layers import cut
from layercut.load import load_model

SPEC = importlib.util.spec_from_file_location("landscape", Path(__file__).parents[1] / "bench" / "landscape.py")
landscape = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(landscape)


def test_smoke_run_measures_every_cut_resumes_and_reports(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "landscape"
    landscape.main(["--out", str(out), "--smoke", "--grid", ""])
    files = sorted((out / "cuts").glob("*.json"))
    assert len(files) == 2
    cells = [json.loads(path.read_text()) for path in files]
    assert sorted(c["segments"] for c in cells) == [1, 2]
    for cell in cells:
        assert sorted(map(int, cell["heal"]["steps"])) == [0, 1, 2, 4]
        assert cell["heal"]["steps"]["4"]["perplexity_wiki"] != cell["heal"]["steps"]["0"]["perplexity_wiki"]
        assert all(v["proxy_kl"] >= 0 for v in cell["heal"]["steps"].values())
        final = cell["heal"]["steps"]["4"]
        assert len(final["window_nll_wiki"]) == 4
        assert final["agreement"]["texts"]["wiki"]["kl"] > 0 and final["agreement"]["texts"]["wiki"]["top1"] < 1
        assert final["agreement"]["generation"]["prompts"] == 4
    # step 0 is the plain cut: its perplexity, computed here independently, on the same test windows
    handle = load_model(str(out / "model"), ModelOptions(dtype="float32"))
    windows = evaluation_windows(handle.tokenizer, load_text("wiki", "test"), 32, 4)
    contiguous = next(c for c in cells if c["segments"] == 1)
    cut(handle, [tuple(s) for s in contiguous["cut"]])
    expected = perplexity(handle.model, windows, 4)
    assert abs(contiguous["heal"]["steps"]["0"]["perplexity_wiki"] - expected) < 1e-4 * expected
    # a patch refuses a cut with no layer before it and is measured elsewhere
    for cell in cells:
        for name, patched in cell["patches"].items():
            assert ("refused" in patched) == (cell["cut"][0][0] == 0), (name, cell["cut"])
    assert (out / "results.md").is_file() and list(out.glob("landscape-*.png"))
    stamps = {path: path.stat().st_mtime_ns for path in files}
    landscape.main(["--out", str(out), "--smoke", "--grid", ""])  # a rerun measures nothing again
    assert {path: path.stat().st_mtime_ns for path in files} == stamps


def fake_cut(cut, kl, wiki, proxy):
    steps = {"0": {"perplexity_wiki": 2 * wiki, "proxy_kl": proxy, "proxy_perplexity": proxy + 1},
             "200": {"perplexity_wiki": wiki, "proxy_kl": 0.0, "proxy_perplexity": 1.0}}
    return {"cut": cut, "segments": len(cut), "kl": kl, "heal": {"steps": steps}, "patches": {}, "layers": 4,
            "remove": 2}


def test_correlations_and_regrets_against_the_landscape():
    cells = [fake_cut([[0, 2]], 0.3, 40.0, 3.0), fake_cut([[1, 3]], 0.1, 30.0, 2.0),
             fake_cut([[2, 4]], 0.2, 20.0, 1.0), fake_cut([[0, 1], [3, 4]], 0.4, 10.0, 0.5)]
    key = ("m", 2, 0)
    rho = landscape.correlations({key: cells}, 200)[key]
    assert rho["calib KL after 0 steps"] == 1.0  # the proxy orders the cuts as the repaired perplexity does
    assert abs(rho["exact KL (pre-repair)"] + 0.4) < 1e-9  # ranks 3,1,2,4 against 4,3,2,1: 1 - 6*14/60
    assert landscape.correlations({key: cells[1:]}, 200) == {}  # a contiguous cut missing: no correlation
    found = landscape.regrets({key: cells}, {key: {"clp": [[1, 3]], "other": [[5, 7]]}}, 200)
    assert found[("m", 2, 0, "clp")]["regret"] == 3.0 and found[("m", 2, 0, "clp")]["regret_contiguous"] == 1.5
    assert found[("m", 2, 0, "other")]["regret"] is None  # its pick is not in the landscape


def test_a_cell_listed_for_fewer_two_segment_cuts_is_listed_again(tmp_path):
    out = tmp_path / "landscape"
    (out / "candidates").mkdir(parents=True)
    arguments = landscape.parse(["--out", str(out), "--models", "m", "--seeds", "0", "--two-segment", "0"])
    arguments.cells = {"m": (2,)}
    listed = {"measure": [{"cut": [[1, 3]], "kl": 0.5}], "two_segment": 0}
    landscape.write_atomically(landscape.candidates_path(out, "m", 2, 0), json.dumps(listed))
    assert landscape.units(out, arguments) == ([("cut", "m", 2, 0, ((1, 3),))], 0)
    arguments.two_segment = 3
    assert landscape.units(out, arguments) == ([("candidates", "m", 2, 0)], 1)


def test_given_cuts_are_measured_beside_those_listed(tmp_path):
    """``--cuts`` adds the cuts it names to a cell already planned (its earlier plan kept), and a rerun with them
    measures nothing again."""
    torch.set_num_threads(1)
    out = tmp_path / "landscape"
    landscape.main(["--out", str(out), "--smoke", "--grid", ""])
    listed = json.loads(next((out / "candidates").glob("*.json")).read_text())["measure"]
    planned = [tuple(tuple(s) for s in e["cut"]) for e in listed]
    new = next(c for c in [((0, 2),), ((1, 3),), ((2, 4),)] if c not in planned)
    given = json.dumps({"model:2": [[list(s) for s in new]]})
    landscape.main(["--out", str(out), "--smoke", "--grid", "", "--cuts", given])
    after = json.loads(next((out / "candidates").glob("*.json")).read_text())["measure"]
    assert [tuple(tuple(s) for s in e["cut"]) for e in after] == [new, *planned]
    files = sorted((out / "cuts").glob("*.json"))
    assert len(files) == 3 and any(landscape.cut_name(new) in path.name for path in files)
    stamps = {path: path.stat().st_mtime_ns for path in files}
    landscape.main(["--out", str(out), "--smoke", "--grid", "", "--cuts", given])
    assert {path: path.stat().st_mtime_ns for path in sorted((out / "cuts").glob("*.json"))} == stamps


def test_remove_keeps_only_the_named_cells():
    """``--remove 6`` keeps Gemma-3's n = 6 cell and drops its n = 4 one (the default keeps both)."""
    assert landscape.parse(["--out", "x", "--models", "gemma3-270m"]).cells == {"gemma3-270m": (4, 6)}
    assert landscape.parse(["--out", "x", "--models", "gemma3-270m", "--remove", "6"]).cells == {"gemma3-270m": (6,)}
