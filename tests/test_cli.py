"""The command line end to end on a tiny saved model: prune, search, eval, and every bad input's error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import transformers

from conftest import LAYERS, build_tiny, reference_perplexity, write_text
from layercut.cli import main


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_tokenizer):
    """A saved tiny Llama with a tokenizer, and a local text file for calibration and perplexity."""
    root = tmp_path_factory.mktemp("cli")
    model = build_tiny("llama")
    model.save_pretrained(root / "tiny")
    tiny_tokenizer.save_pretrained(root / "tiny")
    write_text(root)
    return root


def common(root) -> list[str]:
    return ["--calib", str(root / "text.txt"), "--ppl", str(root / "text.txt"), "--seq-len", "16",
            "--calib-windows", "4", "--ppl-windows", "4"]


@pytest.mark.slow  # a second interpreter
def test_prune_given_segment_exports_a_checkpoint_that_loads_without_layercut(workspace, tmp_path, capsys):
    out = tmp_path / "pruned"
    code = main(["prune", str(workspace / "tiny"), "--segment", "1:3", "--output", str(out), "--heal", "none",
                 *common(workspace)])
    assert code == 0
    record = json.loads((out / "layercut.json").read_text())
    assert record["segments"] == [[1, 3]] and record["search"]["kl"] is None  # a given segment: no search
    assert record["num_layers_before"] == LAYERS and record["num_layers_after"] == LAYERS - 2
    assert record["parameters_after"] < record["parameters_before"]
    ppl = record["metrics"]["perplexity"]
    text = str(workspace / "text.txt")
    assert ppl["before"] == pytest.approx(reference_perplexity(workspace / "tiny", text, 16, 4), rel=1e-5)
    assert ppl["after"] == pytest.approx(reference_perplexity(out, text, 16, 4), rel=1e-5)
    assert ppl["after_cut"] == ppl["after"]  # no heal
    assert {"config.json", "model.safetensors", "recipe.yaml", "README.md", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    assert "[1:3)" in (out / "README.md").read_text()
    check = (
        "import sys, transformers, torch\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        "assert m.config.num_hidden_layers == 4\n"
        "m(torch.tensor([[1, 2, 3]]))\n"
        "assert not any(name.startswith('layercut') for name in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", check], check=True, cwd=workspace)
    assert "perplexity (" in capsys.readouterr().out


def test_prune_prints_an_aligned_summary_table(workspace, tmp_path, capsys):
    assert main(["prune", str(workspace / "tiny"), "--segment", "1:3", "--output", str(tmp_path / "pruned"),
                 "--heal", "none", *common(workspace)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert any("| removed segments " in line and "[1:3)" in line for line in lines)
    assert len(lines) >= 8 and all(line.endswith("|") for line in lines)
    borders = {tuple(i for i, char in enumerate(line) if char == "|") for line in lines}
    assert len(borders) == 1 and len(next(iter(borders))) == 3, lines  # every row has the same three borders


def test_prune_with_gate_search_and_endpoint_healing(workspace, tmp_path):
    out = tmp_path / "healed"
    code = main(["prune", str(workspace / "tiny"), "--remove", "2", "--output", str(out), "--method", "clp",
                 "--gate-steps", "4", "--heal-steps", "2", "--heal-batch", "2", "--heal-windows", "4",
                 "--heal-top-k", "8", *common(workspace)])
    assert code == 0
    record = json.loads((out / "layercut.json").read_text())
    assert record["method"] == "clp" and record["healing"]["trainable_parameters"] > 0
    assert (out / "gate_trajectory.png").is_file() and (out / "kl_landscape.png").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == LAYERS - 2


def test_prune_with_the_repair_method_a_patch_and_a_heal_from_a_patch(workspace, tmp_path):
    # two candidates and the tail (one and the tail for lsq), which a patch can fold into on this model
    runs = {"init": ["--segments", "2", "--repair-screen-steps", "2", "--repair-steps", "2", "--repair-candidates",
                     "2", "--heal-init", "linearpatch", "--heal-steps", "2"],
            "lsq": ["--method", "repair", "--repair-proxy", "lsq", "--repair-candidates", "1", "--heal", "lsq"]}
    for name, flags in runs.items():
        out = tmp_path / name
        code = main(["prune", str(workspace / "tiny"), "--remove", "2", "--output", str(out), "--heal-batch", "2",
                     "--heal-windows", "4", "--heal-top-k", "8", *flags, *common(workspace)])
        assert code == 0
        record = json.loads((out / "layercut.json").read_text())
        assert record["method"] == "repair" and record["search"]["evaluations"] > 5  # 5 cuts scored, then the repairs
        assert record["healing"]["name"] == ("endpoints" if name == "init" else "lsq")
        assert transformers.AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == LAYERS - 2
    recipe = (tmp_path / "init" / "recipe.yaml").read_text()
    assert "heal_init: linearpatch" in recipe and "segments: 2" in recipe and "search.repair_finalists: 3" in recipe


def test_search_json_for_gate_and_exhaustive(workspace, capsys):
    results = {}
    for method, extra in (("clp", []), ("exhaustive", []), ("lean", ["--gate-checkpointing"])):
        assert main(["search", str(workspace / "tiny"), "--remove", "2", "--method", method.replace("lean", "clp"),
                     "--gate-steps", "6", "--json", *extra, *common(workspace)[:6]]) == 0
        results[method] = json.loads(capsys.readouterr().out)
    for result in results.values():
        assert {"method", "segments", "kl", "seconds"} <= set(result)
        (start, end), = result["segments"]
        assert end - start == 2
    assert results["clp"]["kl"] == pytest.approx(results["exhaustive"]["kl"], rel=1e-5)
    assert results["lean"]["segments"] == results["clp"]["segments"]


def test_eval_json_perplexity(workspace, capsys):
    assert main(["eval", str(workspace / "tiny"), "--json", *common(workspace)[2:]]) == 0
    expected = reference_perplexity(workspace / "tiny", str(workspace / "text.txt"), 16, 4)
    assert json.loads(capsys.readouterr().out)["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_recipe_file_sets_options_and_flags_override_it(workspace):
    from layercut.cli import build_parser
    from layercut.config import load_recipe, recipe_from_arguments

    recipe_file = workspace / "recipe.yaml"
    recipe_file.write_text("search:\n  remove: 3\n  method: exhaustive\nheal:\n  heal_steps: 7\n")
    assert load_recipe(recipe_file).search.remove == 3
    arguments = build_parser().parse_args(["prune", "m", "--output", "o", "--remove", "2"])
    recipe = recipe_from_arguments(arguments, str(recipe_file))
    assert (recipe.search.remove, recipe.search.method, recipe.heal.heal_steps) == (2, "exhaustive", 7)


def test_the_repair_method_draws_more_calibration_windows_unless_given(workspace):
    from layercut.cli import build_parser
    from layercut.config import (
        REPAIR_CALIB_WINDOWS,
        DataOptions,
        Recipe,
        SearchOptions,
        recipe_from_arguments,
    )

    def windows(*flags):
        arguments = build_parser().parse_args(["prune", "m", "--output", "o", "--remove", "2", *flags])
        return recipe_from_arguments(arguments, None).data.calib_windows

    default = DataOptions().calib_windows
    assert REPAIR_CALIB_WINDOWS > default
    assert windows() == REPAIR_CALIB_WINDOWS == windows("--method", "repair")  # the default method
    assert windows("--method", "clp") == default
    assert windows("--method", "repair", "--calib-windows", str(default)) == default  # given: kept
    assert windows("--method", "exhaustive", "--calib-windows", "7") == 7
    # the value stays a default: the same recipe with another method draws that method's
    recipe = Recipe(search=SearchOptions(remove=2, method="repair"))
    assert recipe.data.calib_windows == REPAIR_CALIB_WINDOWS
    assert recipe.replace(search=SearchOptions(remove=2, method="clp")).data.calib_windows == default


def test_the_repair_method_extrapolates_to_the_heals_steps_unless_told(workspace):
    from layercut.cli import build_parser
    from layercut.config import HEAL_STEPS, HealOptions, Recipe, SearchOptions, recipe_from_arguments

    def horizon(*flags):
        arguments = build_parser().parse_args(["prune", "m", "--output", "o", "--remove", "2", "--method", "repair",
                                               *flags])
        return recipe_from_arguments(arguments, None).search.repair_horizon

    assert horizon() == HEAL_STEPS and horizon("--heal-steps", "500") == 500
    assert horizon("--heal-steps", "500", "--repair-horizon", "300") == 300  # given: kept
    recipe = Recipe(search=SearchOptions(remove=2, method="repair"), heal=HealOptions(heal_steps=80))
    assert recipe.search.repair_horizon == 80
    assert recipe.replace(heal=HealOptions()).search.repair_horizon == HEAL_STEPS  # still a default


@pytest.fixture(scope="module")
def encoder_only(workspace):
    path = workspace / "bert"
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, architectures=["BertForMaskedLM"])
    transformers.BertForMaskedLM(config).save_pretrained(path)
    return path


BAD = [
    (["prune", "{root}/missing", "--segment", "1:2"], "does not exist"),
    (["prune", "{bert}", "--segment", "1:2"], "not a decoder-only"),
    (["prune", "{tiny}", "--segment", "4:9"], "out of range"),
    (["prune", "{tiny}", "--segment", "3:3"], "END is exclusive"),
    (["prune", "{tiny}", "--segment", "1:3", "--segment", "2:4"], "overlap"),
    (["prune", "{tiny}", "--segment", "0:6"], "leaves none"),
    (["prune", "{tiny}", "--remove", "6"], "cannot remove 6"),
    (["prune", "{tiny}", "--segment", "1:2", "--seq-len", "5000"], "smaller --seq-len"),
    (["prune", "{tiny}", "--segment", "1:2", "--recipe", "{root}/bad_recipe.yaml"], "unknown option 'remov'"),
    (["prune", "{tiny}", "--segment", "1:2", "--output", "{root}/tiny"], "already exists"),
    (["search", "{tiny}", "--remove", "2", "--calib", "nowhere-corpus"], "nowhere-corpus"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[message for _, message in BAD])
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(workspace, encoder_only, capsys, argv, message):
    (workspace / "bad_recipe.yaml").write_text("search:\n  remov: 3\n")
    values = {"root": workspace, "tiny": workspace / "tiny", "bert": encoder_only}
    argv = [part.format(**values) for part in argv]
    if argv[0] == "prune" and "--output" not in argv:
        argv += ["--output", str(workspace / "never")]
    before = sorted(p.name for p in workspace.iterdir())
    if "--calib" not in argv:
        argv += ["--calib", str(workspace / "text.txt"), "--ppl", str(workspace / "text.txt")]
    if "--seq-len" not in argv:
        argv += ["--seq-len", "16"]
    code = main(argv)
    assert code == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in workspace.iterdir()) == before


@pytest.mark.slow
def test_console_script_exit_code(workspace):
    result = subprocess.run([sys.executable, "-m", "layercut", "search", str(workspace / "missing"), "--remove", "1"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "layercut: error:" in result.stderr


@pytest.mark.slow
def test_compare_runs_every_method_and_resumes(workspace, tmp_path, capsys):
    out = tmp_path / "compare"
    argv = ["compare", str(workspace / "tiny"), "--remove", "2", "--methods", "clp,exhaustive,angular,sleb,tail",
            "--output", str(out), "--gate-steps", "3", "--heal-steps", "1", "--heal-batch", "2", "--heal-windows", "4",
            "--heal-top-k", "8", *common(workspace)]
    assert main(argv) == 0
    result = json.loads((out / "compare.json").read_text())
    assert [row["method"] for row in result["rows"]] == ["clp", "exhaustive", "angular", "sleb", "tail"]
    assert all(sum(e - s for s, e in row["segments"]) == 2 for row in result["rows"])
    assert result["rows"][0]["kl"] == pytest.approx(result["rows"][1]["kl"], rel=1e-5)
    assert result["rows"][4]["segments"] == [[LAYERS - 2, LAYERS]]
    assert (out / "compare.png").is_file() and "| sleb |" in (out / "compare.md").read_text()
    assert "log ppl vs clp" in (out / "compare.md").read_text()
    for row in result["rows"][1:]:  # paired over the test windows against the first method
        assert row["log_perplexity_vs"]["reference"] == "clp" and row["log_perplexity_vs"]["items"] == 4
        if row["segments"] == result["rows"][0]["segments"]:  # the same cut and heal: the same model
            assert row["log_perplexity_vs"]["low"] == row["log_perplexity_vs"]["high"] == 0.0
    stamp = (out / "cells" / "clp.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0  # a rerun skips finished cells
    assert (out / "cells" / "clp.json").stat().st_mtime_ns == stamp


def test_search_json_for_every_baseline(workspace, capsys):
    from layercut.criteria import CRITERIA

    for method in CRITERIA:
        code = main(["search", str(workspace / "tiny"), "--remove", "2", "--method", method, "--json",
                     *common(workspace)[:6]])
        if method.endswith("-plus"):  # the + rule keeps the first four and last two of the six layers
            assert code == 2 and "the + rule leaves 0 eligible layers of 6" in capsys.readouterr().err
            continue
        assert code == 0
        result = json.loads(capsys.readouterr().out)
        assert result["method"] == method and sum(e - s for s, e in result["segments"]) == 2


@pytest.mark.slow
def test_prune_with_eval_records_zero_shot_and_speed_and_report_compares(workspace, tmp_path, capsys):
    from layercut.zeroshot import evaluate_zero_shot

    out = tmp_path / "evaluated"
    code = main(["prune", str(workspace / "tiny"), "--segment", "2:4", "--heal", "none", "--output", str(out),
                 "--tasks", "piqa", "--limit", "3", "--speed", *common(workspace)])
    assert code == 0
    metrics = json.loads((out / "layercut.json").read_text())["metrics"]
    zero_shot = metrics["zero_shot"]
    assert zero_shot["before"]["tasks"]["piqa"]["items"] == 3
    for side, folder in (("before", workspace / "tiny"), ("after", out)):  # each side, evaluated on its own
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        expected = evaluate_zero_shot(model, tokenizer, ["piqa"], limit=3, batch_size=4).tasks["piqa"].acc
        assert zero_shot[side]["tasks"]["piqa"]["acc"] == pytest.approx(expected)
    average = zero_shot["retention"]["average"]
    if zero_shot["before"]["average"]["acc"] > 0:
        assert average["retention"] == pytest.approx(zero_shot["after"]["average"]["acc"]
                                                     / zero_shot["before"]["average"]["acc"])
    speed = metrics["speed"]
    assert speed["limit"] == pytest.approx(LAYERS / (LAYERS - 2))
    assert speed["decode_ratio"] == pytest.approx(speed["after"]["decode_tokens_per_s"]
                                                  / speed["before"]["decode_tokens_per_s"])
    assert (speed["after"]["prompt_tokens"], speed["after"]["new_tokens"]) == (256, 64)
    assert "piqa acc" in (out / "README.md").read_text()
    other = tmp_path / "plain-cut"
    assert main(["prune", str(workspace / "tiny"), "--segment", "1:3", "--output", str(other), "--heal", "none",
                 *common(workspace)]) == 0
    capsys.readouterr()
    chart = tmp_path / "report.png"
    assert main(["report", str(out), str(other), "--chart", str(chart)]) == 0
    table = capsys.readouterr().out
    assert "| evaluated |" in table and "| plain-cut |" in table and chart.is_file()
    # per-item results are kept, so the two runs are compared window by window (same source, same test windows)
    assert len(zero_shot["after"]["tasks"]["piqa"]["correct"]) == 3
    assert len(metrics["perplexity"]["window_nll_after"]) == metrics["perplexity"]["windows"]
    assert "plain-cut against evaluated (paired" in table
    assert "| log perplexity (" in table and "perplexity ratio" in table
    assert main(["report", str(out), "--chart", str(chart)]) == 2  # never overwrites without --overwrite
    assert main(["report", str(workspace), "--chart", str(tmp_path / "other.png")]) == 2  # not an export


def test_eval_speed_json(workspace, capsys):
    assert main(["eval", str(workspace / "tiny"), "--speed", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "perplexity" not in result  # only speed was asked for
    assert {key: result["speed"][key] for key in ("batch_size", "prompt_tokens", "new_tokens")} == {
        "batch_size": 1, "prompt_tokens": 256, "new_tokens": 64}
