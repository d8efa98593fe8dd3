"""The headline grid's bookkeeping (bench/grid.py): what runs, in which units, and how parallel workers share it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from layercut.config import REPAIR_CALIB_WINDOWS

SPEC = importlib.util.spec_from_file_location("grid", Path(__file__).parents[1] / "bench" / "grid.py")
grid = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(grid)


def test_plan_runs_seeds_outermost_and_the_seedless_tail_cell_once():
    cells = grid.plan(["m"], {"m": (2, 3)}, [0, 1])
    assert [key[2] for key in cells] == sorted(key[2] for key in cells)
    assert ("m", 2, 0, "tail", "none") in cells and ("m", 2, 1, "tail", "none") not in cells
    assert ("m", 2, 1, "tail", "endpoints") in cells and ("m", 3, 1, "clp", "streamline") in cells
    assert not any(key[3] == "angular" and key[4] == "replaceme" for key in cells)
    per_seed = len([key for key in cells if key[2] == 0])
    assert per_seed == 2 * (12 * 2 + 2 * 7)  # 12 selections × (none, endpoints); clp and tail × 7 more heals


def test_rates_name_other_counts_per_model_and_refuse_a_malformed_one():
    assert grid.parse_rates("tiny", ["a", "b"]) == {"a": (2, 3), "b": (2, 3)}
    assert grid.parse_rates("smollm2-135m:7,m:2:5", ["x"]) == {"smollm2-135m": (7,), "m": (2, 5)}
    assert grid.parse_rates("", ["x"]) == {}
    assert [key[1] for key in grid.plan(["m"], {"m": (7,)}, [0], ["clp"], ["streamline"])] == [7]
    for bad in ("smollm2-135m", "m:0", "m:seven"):
        with pytest.raises(SystemExit, match="MODEL:N"):
            grid.parse_rates(bad, ["m"])


def test_a_rate_of_one_count_reports_only_its_headline(tmp_path, monkeypatch):
    cells = tmp_path / "cells"
    cells.mkdir()
    write_dense_cell(cells)
    cell = {"model": "m", "layers": 6, "remove": 3, "seed": 0, "selection": "clp", "heal": "streamline",
            "chosen": [[1, 4]], "kl": 1.0, "cut": [[2, 4]], "layers_after": 4, "search_seconds": 1.0,
            "heal_seconds": 1.0, "trainable_parameters": 10, "perplexity_wiki": 20.0, "perplexity_lee": 30.0,
            "zero_shot": zero_shot(0.7)}
    (cells / "m-n3-seed0-clp-streamline.json").write_text(json.dumps(cell))
    ends = {**cell, "heal": "endpoints", "cut": [[1, 4]], "layers_after": 3, "trainable_parameters": 20}
    (cells / "m-n3-seed0-clp-endpoints.json").write_text(json.dumps(ends))
    (cells / "m-n3-seed0-clp-none.json").write_text(json.dumps({**ends, "heal": "none", "trainable_parameters": 0}))
    monkeypatch.setitem(grid.RATES, "m", (3,))
    text = grid.report(tmp_path)
    assert "about 33 %" not in text and "## m, 3 of 6 layers removed" in text
    assert "| clp | 0.875 ± 0.025 (endpoints; 1 seed) |" in text
    assert "| streamline | 4 | 10 | 0.875 ± 0.025 |" in text and "| endpoints | 3 | 20 |" in text  # the heal table names the layers each heal keeps


def test_units_put_dense_first_and_group_cells_sharing_a_search():
    cells = grid.plan(["a", "b"], {"a": (2,), "b": (3,)}, [0], selections=["clp", "tail"])
    found = grid.units(cells)
    assert found[:2] == [("dense", "a"), ("dense", "b")]
    assert found[2:] == [("a", 2, 0, "clp"), ("a", 2, 0, "tail"), ("b", 3, 0, "clp"), ("b", 3, 0, "tail")]


def test_a_claim_is_taken_once_and_a_dead_process_claim_is_taken_over(tmp_path):
    (tmp_path / "claims").mkdir()
    unit = ("m", 2, 0, "clp")
    assert grid.claim(tmp_path, unit) and grid.claim(tmp_path, unit)  # this process holds it
    path = next((tmp_path / "claims").iterdir())
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        path.write_text(str(other.pid))
        assert not grid.claim(tmp_path, unit)  # a live process holds it
    finally:
        other.kill()
        other.wait()
    assert grid.claim(tmp_path, unit)  # its process is gone: taken over
    assert path.read_text() == str(__import__("os").getpid())


def zero_shot(acc):
    """A cell's zero-shot entry: PIQA alone, 100 items at accuracy ``acc``."""
    tasks = {"piqa": {"acc": acc, "acc_norm": None, "items": 100, "acc_stderr": 0.01, "acc_norm_stderr": None}}
    return {"tasks": tasks, "average": {"acc": acc, "acc_norm": acc}, "lm_eval_version": "0", "metric": "acc",
            "limit": 100}


def write_dense_cell(cells):
    (cells / "m-dense.json").write_text(json.dumps({"perplexity_wiki": 10.0, "perplexity_lee": 12.0,
                                                    "zero_shot": zero_shot(0.8)}))


def write_cell(cells, selection, heal_name, accuracy=0.7, seed=0, cut_=([2, 4],), **fields):
    """One cell of model m (6 layers, 2 removed) under ``cells``: ``selection``'s cut ``cut_`` healed with
    ``heal_name``, its zero-shot entry at ``accuracy``; ``fields`` set or override the rest."""
    cell = {"model": "m", "layers": 6, "remove": 2, "seed": seed, "selection": selection, "heal": heal_name,
            "chosen": list(cut_), "kl": 1.0, "cut": list(cut_), "layers_after": 4, "search_seconds": 1.0,
            "heal_seconds": 1.0, "trainable_parameters": 10, "perplexity_wiki": 20.0, "perplexity_lee": 30.0,
            "zero_shot": zero_shot(accuracy), **fields}
    (cells / f"m-n2-seed{seed}-{selection}-{heal_name}.json").write_text(json.dumps(cell))


def test_report_computes_retention_against_the_dense_model_and_lists_refusals(tmp_path):
    cells = tmp_path / "cells"
    cells.mkdir()

    write_dense_cell(cells)
    for name, acc in (("clp", 0.7), ("tail", 0.6)):
        write_cell(cells, name, "endpoints", acc)
    (cells / "m-n2-seed0-clp-replaceme.json").write_text(json.dumps({"model": "m", "heal": "replaceme",
                                                                     "refused": "cannot fold"}))
    text = grid.report(tmp_path)
    detail = text.split("## m, 2 of 6 layers removed")[1].splitlines()
    clp_row = next(line for line in detail if line.startswith("| clp |"))
    tail_row = next(line for line in detail if line.startswith("| tail |"))
    assert "0.875 ± 0.025" in clp_row  # 0.7 / 0.8, two standard errors 2 * 0.01 / 0.8
    assert "0.750" in tail_row and "| unpaired |" in tail_row  # no per-item results: no verdict, however far apart
    assert "replaceme on m: cannot fold" in text
    headline = text.split("## Headline, about 20 % of the layers removed")[1].split("\n## ")[0]
    assert "| selection | m (n = 2 of 6) |" in headline  # no model at the second rate: no second table
    assert "| clp | 0.875 ± 0.025 (endpoints; 1 seed) |" in headline
    assert "(endpoints, unpaired; 1 seed)" in headline  # cells without per-item results say so
    assert "0 paired: 0 wins, 0 ties, 0 losses; 1 unpaired, no verdict." in headline
    assert tail_row.count("| unpaired |") == 2  # accuracy, and wiki perplexity: no per-window NLLs
    assert "about 33 %" not in text
    assert (tmp_path / "cells.md").read_text().count("| m | 2 | 0 |") == 2


@pytest.mark.parametrize("value, reference", [(0.90, 0.88), (0.95, 0.50), (0.30, 0.88)])
def test_cells_without_per_item_results_get_no_verdict_however_far_apart(value, reference):
    cells = [{"seed": 0, "heal": "endpoints", "retention": {"dense": 0.8}}]
    found = grid.verdict({"retention": value, "stderr": 0.02, "cells": cells},
                         {"retention": reference, "stderr": 0.01, "cells": cells})
    assert found == "unpaired"


def test_the_report_compares_with_clp_item_by_item_where_cells_kept_the_items(tmp_path):
    """Two seeds; tail gets 40 more of 200 piqa items right than clp under each seed, and its windows have a
    lower NLL; angular is clp's model (the same items right, the same windows): an exact tie. On clp's cut the
    lsq heal gets 20 fewer items right than endpoint tuning, and its windows a higher NLL."""
    cells = tmp_path / "cells"
    cells.mkdir()
    rng = np.random.default_rng(0)
    clp_bits = rng.random(200) < 0.5

    def zero_shot(bits):
        acc = float(np.mean(bits))
        tasks = {"piqa": {"acc": acc, "acc_norm": None, "items": 200, "acc_stderr": 0.035, "correct":
                          "".join("1" if bit else "0" for bit in bits)},
                 "mmlu": {"acc": 0.3, "items": 10, "acc_stderr": 0.1, "correct": "1110000000"}}
        return {"tasks": tasks, "average": {"acc": acc, "acc_norm": acc}, "average_tasks": ["piqa"],
                "lm_eval_version": "0", "metric": "acc", "limit": 200}

    (cells / "m-dense.json").write_text(json.dumps({"perplexity_wiki": 10.0, "perplexity_lee": 12.0,
                                                    "zero_shot": zero_shot(np.ones(200, bool))}))
    nll = rng.random(16) + 3.0
    tail_bits = clp_bits.copy()
    tail_bits[np.flatnonzero(~clp_bits)[:40]] = True
    lsq_bits = clp_bits.copy()
    lsq_bits[np.flatnonzero(clp_bits)[:20]] = False
    for seed in (0, 1):
        for name, bits, windows, heal_name in (("clp", clp_bits, nll, "endpoints"), ("tail", tail_bits, nll - 0.2, "endpoints"),
                                               ("angular", clp_bits, nll, "endpoints"), ("clp", lsq_bits, nll + 0.5, "lsq")):
            write_cell(cells, name, heal_name, seed=seed, perplexity_wiki=float(np.exp(windows.mean())),
                       window_nll_wiki=windows.tolist(), zero_shot=zero_shot(bits))
    text = grid.report(tmp_path)
    detail = text.split("## m, 2 of 6 layers removed")[1].splitlines()
    lsq_row = next(line for line in detail if line.startswith("| lsq |"))  # the heals on clp's cut, paired
    assert "| worse (-0.100 [" in lsq_row and f"| higher (x{np.exp(0.5):.3f} [" in lsq_row
    tail_row = next(line for line in detail if line.startswith("| tail |"))
    angular_row = next(line for line in detail if line.startswith("| angular |"))
    assert "| clp loses (-0.200 [" in tail_row  # 40 of 200 items: 0.2 of the dense accuracy 1.0
    assert f"| lower (x{np.exp(-0.2):.3f} [" in tail_row  # wiki perplexity, paired over the windows
    assert "| tie (+0.000 [+0.000, +0.000]) |" in angular_row and "| tie (x1.000 [1.000, 1.000]) |" in angular_row
    assert "| 0.300 |" in tail_row  # MMLU in its own column, not in retention
    assert "2 paired: 0 wins, 1 ties, 1 losses; 0 unpaired" in text


def test_a_worker_runs_the_other_units_when_one_fails_and_takes_over_a_dead_workers_unit(tmp_path, monkeypatch):
    (tmp_path / "cells").mkdir()
    (tmp_path / "claims").mkdir()
    arguments = type("Arguments", (), {"models": ["m"], "seeds": [0], "selections": ["clp", "tail"], "heals": ["none"],
                                       "tasks": "", "ppl_windows": 0})()
    monkeypatch.setitem(grid.RATES, "m", (2,))
    ran = []

    class Worker:
        def __init__(self, arguments, out):
            pass

        def run(self, unit, keys):
            ran.append(unit)
            if unit[3] == "clp":
                raise RuntimeError("out of memory")
            for key in keys:
                grid.cell_path(tmp_path, *key).write_text("{}")

    monkeypatch.setattr(grid, "Worker", Worker)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "claims" / "m-2-0-tail.claim").write_text(str(dead.pid))  # left by a worker that died
    with pytest.raises(SystemExit, match="1 unit"):
        grid.run(arguments, tmp_path)
    assert ran == [("m", 2, 0, "clp"), ("m", 2, 0, "tail")]  # each once; the failed one is not retried here
    assert grid.cell_path(tmp_path, "m", 2, 0, "tail", "none").is_file()


def test_a_cell_shares_the_measures_of_a_cell_with_the_same_model(tmp_path):
    (tmp_path / "cells").mkdir()
    measured = {field: 1.0 for field in grid.MEASURED}

    def write(seed, name, heal_name, chosen, **extra):
        cell = {"model": "m", "remove": 2, "seed": seed, "selection": name, "heal": heal_name, "chosen": chosen,
                **measured, **extra}
        (tmp_path / "cells" / f"m-n2-seed{seed}-{name}-{heal_name}.json").write_text(json.dumps(cell))

    write(0, "angular", "none", [[2, 4]])
    write(0, "angular", "endpoints", [[2, 4]])
    write(0, "clp", "replaceme", [[2, 4]], refused="cannot fold")
    # no heal: any seed; a heal that reads calibration data: the same seed only; other layers: never
    assert grid.twin(tmp_path, "m", 2, 1, "none", [[2, 4]])[0] == "m-n2-seed0-angular-none.json"
    assert grid.twin(tmp_path, "m", 2, 0, "endpoints", [[2, 4]])[0] == "m-n2-seed0-angular-endpoints.json"
    assert grid.twin(tmp_path, "m", 2, 1, "endpoints", [[2, 4]]) is None
    assert grid.twin(tmp_path, "m", 2, 0, "none", [[3, 5]]) is None
    assert grid.twin(tmp_path, "m", 3, 0, "none", [[2, 4]]) is None
    assert grid.twin(tmp_path, "m", 2, 0, "replaceme", [[2, 4]]) is None  # a refusal is not a measure


def test_a_run_under_another_protocol_is_refused(tmp_path):
    arguments = SimpleNamespace(**{name: None for name in grid.PROTOCOL})
    arguments.limit, arguments.tasks = 500, "piqa"
    grid.check_protocol(arguments, tmp_path)  # the first run sets it
    grid.check_protocol(arguments, tmp_path)  # the same options run on
    arguments.limit = None
    with pytest.raises(SystemExit, match="--limit 500 there, None here"):
        grid.check_protocol(arguments, tmp_path)


def test_the_compact_headline_counts_where_clp_wins_ties_and_loses(tmp_path):
    cells = tmp_path / "cells"
    cells.mkdir()

    write_dense_cell(cells)
    for name, heal_name, acc in (("clp", "none", 0.6), ("clp", "endpoints", 0.7), ("tail", "endpoints", 0.6),
                                 ("sleb", "endpoints", 0.71), ("ppl", "endpoints", 0.8)):
        write_cell(cells, name, heal_name, acc)
    lines = grid.compact_headline(tmp_path).splitlines()
    assert lines[0] == "| selection (best heal) | m, 2 of 6 cut |"
    rows = {line.split(" | ")[0].strip("| *"): line for line in lines[2:]}
    assert rows["clp"] == "| clp | **0.875 ± 0.025** |"  # its best heal (endpoints), not its first
    # cells without per-item results: marked unpaired, with no verdict, and not counted as wins, ties or losses
    assert rows["tail"] == "| tail | 0.750 (unpaired) |"
    assert rows["sleb"] == "| sleb | 0.887 (unpaired) |"
    assert rows["ppl"] == "| ppl | 1.000 (unpaired) |" and rows["angular"] == "| angular | — |"
    assert rows["CLP wins / ties / loses, accuracy"] == ("| **CLP wins / ties / loses, accuracy** | 0 / 0 / 0 "
                                                         "(3 unpaired) |")
    assert not any("perplexity" in line for line in lines)  # no per-window results: no perplexity verdicts


def test_the_compact_headline_pairs_wiki_perplexity_window_by_window(tmp_path):
    """tail's windows are all 0.3 nats worse than CLP's (x1.35), ppl's the same as CLP's plus noise around 0, and
    repair-1's (the default) 0.1 nats better than CLP's: the same comparisons are also counted against
    repair-1."""
    cells = tmp_path / "cells"
    cells.mkdir()
    write_dense_cell(cells)
    rng = np.random.default_rng(2)
    nll = rng.random(32) + 3.0
    shifts = {"clp": np.zeros(32), "tail": np.full(32, 0.3), "ppl": rng.normal(0, 0.01, 32),
              "repair-1": np.full(32, -0.1)}
    for name, cut_ in (("clp", [[2, 4]]), ("tail", [[4, 6]]), ("ppl", [[1, 3]]), ("repair-1", [[0, 1], [3, 4]])):
        windows = nll + shifts[name]
        write_cell(cells, name, "endpoints", cut_=cut_, perplexity_wiki=float(np.exp(windows.mean())),
                   window_nll_wiki=windows.tolist())
    rows = {line.split(" | ")[0].strip("| *"): line for line in grid.compact_headline(tmp_path).splitlines()[2:]}
    assert rows["tail"].endswith(f"; wiki ppl x{np.exp(0.3):.2f} (clp wins) |")
    assert rows["ppl"].endswith("; wiki ppl x1.00 (tie) |")
    assert rows["repair-1"].endswith(f"; wiki ppl x{np.exp(-0.1):.2f} (clp loses) |")
    assert rows["CLP wins / ties / loses, wiki perplexity"] == ("| **CLP wins / ties / loses, wiki perplexity** | "
                                                                "1 / 1 / 1 |")
    assert rows["repair-1 wins / ties / loses, wiki perplexity"] == ("| **repair-1 wins / ties / loses, wiki "
                                                                   "perplexity** | 3 / 0 / 0 |")
    assert rows["repair-1 wins / ties / loses, accuracy"].endswith("| 0 / 0 / 0 (3 unpaired) |")


def test_a_methods_best_heal_is_its_lowest_wiki_perplexity_at_the_full_cut_not_its_highest_accuracy(tmp_path):
    """No heal has the highest accuracy and 5 times the perplexity; streamline the lowest perplexity with one more
    layer kept; endpoint tuning is the best heal that removes both layers."""
    cells = tmp_path / "cells"
    cells.mkdir()
    write_dense_cell(cells)
    for heal_name, acc, wiki, after in (("none", 0.75, 100.0, 4), ("endpoints", 0.7, 20.0, 4),
                                        ("streamline", 0.72, 15.0, 5), ("all", 0.7, 25.0, 4)):
        write_cell(cells, "clp", heal_name, acc, layers_after=after, perplexity_wiki=wiki)
    table = grid.summaries(grid.read_cells(tmp_path)[0])
    assert grid.best_heals(table, "m", 2)["clp"][0] == "endpoints"
    del table[("m", 2, "clp", "endpoints")], table[("m", 2, "clp", "all")], table[("m", 2, "clp", "none")]
    assert grid.best_heals(table, "m", 2)["clp"][0] == "streamline"  # the only heal measured


def test_a_section_between_the_markers_is_replaced_and_nothing_else(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"before\n{grid.START}\nold\n{grid.END}\nafter\n")
    grid.into_section(page, "new\n")
    assert page.read_text() == f"before\n{grid.START}\nnew\n{grid.END}\nafter\n"
    page.write_text("no markers\n")
    with pytest.raises(SystemExit, match="has no"):
        grid.into_section(page, "new\n")
    assert page.read_text() == "no markers\n"


def test_the_report_counts_the_comparisons_each_measure_separates(tmp_path):
    """tail chooses other layers than clp and is worse on wiki perplexity and KL to dense, equal in generation;
    angular chooses clp's layers (the same model: not counted); lee has no per-window results (not compared)."""
    cells = tmp_path / "cells"
    cells.mkdir()
    write_dense_cell(cells)
    rng = np.random.default_rng(1)
    nll, kl = rng.random(16) + 3.0, rng.random(16) * 0.1 + 0.2
    prefix = rng.integers(0, 64, 20).tolist()
    for name, cut_, shift in (("clp", [[2, 4]], 0.0), ("tail", [[4, 6]], 0.3), ("angular", [[2, 4]], 0.0)):
        agreement = {"texts": {"wiki": {"kl": float((kl + shift).mean()), "top1": 0.5, "tokens": 256, "windows": 16,
                                        "seq_len": 16, "window_kl": (kl + shift).tolist(), "window_top1": [0.5] * 16}},
                     "generation": {"prompts": 20, "prompt_tokens": 8, "new_tokens": 64, "mean_prefix": 1.0,
                                    "match_tokens": 16, "share_matching": 0.0, "prefix": prefix}}
        write_cell(cells, name, "endpoints", cut_=cut_, perplexity_wiki=float(np.exp((nll + shift).mean())),
                   window_nll_wiki=(nll + shift).tolist(), agreement=agreement)
    text = grid.report(tmp_path)
    table = text.split("## Which measures separate methods")[1].split("\n## ")[0]
    assert "| wiki log perplexity | 1 | 1 |" in table and "| KL to dense (wiki) | 1 | 1 |" in table
    assert "| generation: matching prefix | 0 | 1 |" in table and "| top-1 agreement with dense (wiki) | 0 | 1 |" in table
    assert "| lee log perplexity | 0 | 0 |" in table and "| KL to dense (lee) | 0 | 0 |" in table
    rows = [[part.strip() for part in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith(("| model |", "| m |"))]
    by_measure = dict(zip(rows[0], rows[1], strict=True))  # one comparison: tail (angular is CLP's own model)
    assert len(rows) == 2 and by_measure["method"] == "tail"
    # worse means higher perplexity and KL (lower is better there) and a tie on the unchanged generation
    assert by_measure["wiki log perplexity"] == "−" and by_measure["KL to dense (wiki)"] == "−"
    assert by_measure["generation: matching prefix"] == "=" and "lee log perplexity" not in by_measure


def test_the_report_counts_what_separates_each_heal_from_endpoint_tuning_of_the_same_cut(tmp_path):
    """On clp's cut, no heal is 0.5 nats worse than endpoint tuning on every wiki window and lsq equal to it up to
    noise; tail has no endpoint-tuned cell, so its heal is not compared."""
    cells = tmp_path / "cells"
    cells.mkdir()
    write_dense_cell(cells)
    rng = np.random.default_rng(3)
    nll = rng.random(16) + 3.0
    for name, heal_name, shift in (("clp", "endpoints", np.zeros(16)), ("clp", "none", np.full(16, 0.5)),
                                   ("clp", "lsq", rng.normal(0, 0.01, 16)), ("tail", "none", np.full(16, 0.9))):
        write_cell(cells, name, heal_name, perplexity_wiki=float(np.exp((nll + shift).mean())),
                   window_nll_wiki=(nll + shift).tolist())
    found = dict(grid.heal_comparisons(grid.summaries(grid.read_cells(tmp_path)[0])))
    assert set(found) == {("m", 2, "clp", "none"), ("m", 2, "clp", "lsq")}
    assert found[("m", 2, "clp", "none")]["wiki log perplexity"] == "worse"
    assert found[("m", 2, "clp", "lsq")]["wiki log perplexity"] == "tie"
    assert "lee log perplexity" not in found[("m", 2, "clp", "none")]  # no per-window lee results: not compared
    table = grid.report(tmp_path).split("## Which measures separate heals")[1].split("\n## ")[0]
    assert "| wiki log perplexity | 1 | 2 |" in table and "| lee log perplexity | 0 | 0 |" in table
    assert "| m | 2 | clp | none | − |" in table and "| m | 2 | clp | lsq | = |" in table


def test_a_tiny_grid_runs_end_to_end_with_the_agreement(tmp_path, monkeypatch):
    import torch

    from layercut.data import load_text

    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("landscape", Path(__file__).parents[1] / "bench" / "landscape.py")
    landscape = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(landscape)
    model = landscape.smoke_model(tmp_path / "model", load_text("wiki", "calib"))
    out = tmp_path / "grid"
    monkeypatch.setattr(sys, "argv", ["grid.py", "--out", str(out), "--models", model, "--rates", "tiny",
                                      "--seeds", "0", "--selections", "clp,tail,repair,repair-1",
                                      "--heals", "lsq,endpoints",
                                      "--tasks", "", "--dtype", "float32", "--seq-len", "16", "--calib-windows", "4",
                                      "--ppl-windows", "4", "--batch-size", "4", "--heal-steps", "2",
                                      "--heal-batch", "2", "--heal-windows", "8", "--generation-prompts", "4"])
    grid.main()
    found = [json.loads(path.read_text()) for path in sorted((out / "cells").glob("*-endpoints.json"))]
    assert len(found) == 8  # clp, tail, repair and repair-1 at n = 2 and 3
    # the repair selections search on the windows `layercut prune --method repair` draws; the others on the grid's
    assert {c["selection"]: c["search_calib_windows"] for c in found} == {
        "clp": 4, "tail": 4, "repair": REPAIR_CALIB_WINDOWS, "repair-1": REPAIR_CALIB_WINDOWS}
    assert all(len(c["chosen"]) == 1 for c in found if c["selection"] == "repair-1")
    for cell in found:
        texts = cell["agreement"]["texts"]
        assert set(texts) == {"wiki", "lee"} and len(texts["wiki"]["window_kl"]) == 4
        assert texts["wiki"]["kl"] > 0 and len(cell["agreement"]["generation"]["prefix"]) == 4
    # a training-free patch fits on the heal's windows; the heals share them, and the dense targets only train
    patched = [json.loads(path.read_text()) for path in sorted((out / "cells").glob("*-lsq.json"))]
    assert len(patched) == 4
    for cell in patched:  # refused only where no layer precedes the cut to fold the patch into
        assert ("refused" in cell) == (cell["chosen"][0][0] == 0) and cell.get("perplexity_wiki", 1) > 0
    assert "## model, 3 of 6 layers removed" in (out / "results.md").read_text()
    # a second launch into the same folder (here with nothing left to do) is listed beside the first
    first = "python " + " ".join(sys.argv)
    monkeypatch.setattr(sys, "argv", [*sys.argv[:sys.argv.index("--selections")], "--selections", "clp",
                                      *sys.argv[sys.argv.index("--heals"):]])
    grid.main()
    second = "python " + " ".join(sys.argv)
    assert json.loads((out / "grid.json").read_text())["commands"] == [first, second]
    assert grid.generated_by(out, SimpleNamespace(readme="", doc="")).endswith(f"made by `{first}` and `{second}`._\n")


def test_generated_line_names_many_launches_by_their_list(tmp_path):
    commands = [f"python bench/grid.py --out x --workers {n}" for n in (3, 4, 1)]
    (tmp_path / "grid.json").write_text(json.dumps({"command": commands[-1], "commands": commands}))
    line = grid.generated_by(tmp_path, SimpleNamespace(readme="README.md", doc=""))
    assert f"made by the 3 launches that `{tmp_path}/grid.json` lists, the last `{commands[-1]}`._" in line
    assert "--readme README.md" in line and commands[0] not in line
