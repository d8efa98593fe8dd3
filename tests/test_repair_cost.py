"""bench/repair_cost.py: the command lines it times are ones `layercut prune` accepts, and the repair selection's
added cost is its search over the default's, divided by the default's heal."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from layercut import cli, config

BENCH = Path(__file__).parents[1] / "bench"


def load():
    spec = importlib.util.spec_from_file_location("repair_cost", BENCH / "repair_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_timed_command_lines_parse_as_prune_with_each_method(tmp_path):
    repair_cost = load()
    for method, segments in (("clp", 1), ("repair", 1)):
        arguments = repair_cost.prune_arguments("tiny", tmp_path / "model", method, tmp_path / "out",
                                                ["--heal-steps", "4"])
        parsed = cli.build_parser().parse_args(arguments)
        recipe = config.recipe_from_arguments(parsed, parsed.recipe)
        assert (parsed.command, recipe.search.method, recipe.search.segments) == ("prune", method, segments)
        assert recipe.search.remove == 2 and recipe.heal.heal == "endpoints" and recipe.heal.heal_steps == 4
        assert not recipe.evaluation.eval and not recipe.evaluation.speed and parsed.overwrite


def test_the_added_cost_is_the_extra_search_over_the_default_heal(tmp_path, monkeypatch):
    repair_cost = load()
    stages = {"clp": (2.0, 10.0), "repair": (7.0, 10.5)}  # search, heal seconds of each cold prune

    seen = []

    def fake_prune(arguments, output):
        seen.append(arguments)
        search, heal = stages[arguments[arguments.index("--method") + 1]]
        return {"wall_s": search + heal + 5.0, "search_s": search, "heal_s": heal, "segments": [[6, 8]]}

    monkeypatch.setattr(repair_cost, "cold_prune", fake_prune)
    monkeypatch.setattr(repair_cost, "search_profile", lambda arguments: {
        "stages": {"before_screen_s": 1.0, "after_s": 0.5, "screen_steps": 10, "screens": 4, "screen_s_each": 0.25,
                   "finalist_steps": 50, "finalists": 2, "finalist_s_each": 1.5},
        "peak_bytes": 110, "weight_bytes": 100, "peak_over_weights": 1.1, "peak_stage": "repair: 2:4, 0.3 after"})
    monkeypatch.setattr(repair_cost.timing, "build_folder", lambda name, root: tmp_path / name)
    monkeypatch.setattr(sys, "argv", ["bench/repair_cost.py"])
    repair_cost.main(["--shapes", "tiny", "--repeats", "2", "--out", str(tmp_path / "out"),
                      "--repair-extra=--gate-checkpointing"])
    # the repair method's flags reach its command lines alone
    assert [("--gate-checkpointing" in a, a[a.index("--method") + 1]) for a in seen] == [
        (False, "clp"), (False, "clp"), (True, "repair"), (True, "repair")]
    found = json.loads((tmp_path / "out" / "repair_cost.json").read_text())["shapes"]["tiny"]
    assert found["added_search_s"] == 5.0 and found["added_over_heal"] == 0.5
    assert found["methods"]["repair"]["search_s"] == {"mean": 7.0, "spread": 0.0, "values": [7.0, 7.0]}
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "| tiny | 2 | repair | 22.50 ± 0.00 | 7.00 ± 0.00 | 10.50 ± 0.00 | 1.10× | [[6, 8]] |" in readme
    assert "| tiny | 5.00 | 0.50× |" in readme
    assert "| tiny | 1.00 | 4 × 0.25 (10 steps) | 2 × 1.50 (50 steps) | 0.50 | 5.50 | repair: 2:4, 0.3 after |" in readme


def test_the_stages_are_timed_from_the_log_lines_that_end_them():
    repair_cost = load()
    stamps = [(10.0, "repair: exact KL of 9 cuts; screening 3 of them"), (10.5, ("repair: 0:2, KL 1.0 before repair, "
              "0.5 after (10 steps)")), (11.5, "repair: 1:3, 0.4 after (10 steps)"), (12.0, ("repair: 2:4, 0.3 after "
              "(10 steps)")), (14.0, "repair: 2:4, 0.2 after (50 steps)")]
    stage = repair_cost.stage_seconds(4.0, stamps, 14.5)
    assert stage["before_screen_s"] == 6.0 and stage["after_s"] == 0.5
    assert (stage["screen_steps"], stage["screens"], stage["finalist_steps"], stage["finalists"]) == (10, 3, 50, 1)
    assert abs(stage["screen_s_each"] - 2.0 / 3) < 1e-12 and stage["finalist_s_each"] == 2.0
    assert repair_cost.stage_seconds(0.0, [(1.0, "repair: something else")], 2.0) == {}


def test_the_peak_is_placed_in_the_stage_whose_log_line_ends_it():
    repair_cost = load()
    stamps = [(1.0, "repair: exact KL of 9 cuts; screening 3 of them"), (2.0, "repair: 0:2, 0.5 after (10 steps)"),
              (3.0, "repair: 1:3, 0.4 after (10 steps)")]
    assert repair_cost.peak_stage(stamps, [50, 90, 70], 60) == (90, "repair: 0:2, 0.5 after (10 steps)")
    assert repair_cost.peak_stage(stamps, [50, 90, 70], 95) == (95, "after the last log line")
    assert repair_cost.peak_stage([], [], 40) == (40, "after the last log line")  # clp: no repair lines
