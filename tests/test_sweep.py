"""``layercut sweep``: sizes parsed and checked, one pipeline run per size sharing the dense work, and the table,
plot and JSON it writes, through the Python API and the command line on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from conftest import LAYERS, build_tiny, save_workspace
from layercut import selection
from layercut.cli import main
from layercut.config import DataOptions, EvalOptions, HealOptions, Recipe, SearchOptions
from layercut.data import calibrate
from layercut.errors import LayercutError
from layercut.layers import Handle, cut
from layercut.pipeline import parse_sizes, sweep, sweep_sizes
from layercut.record import SweepResult


def test_parse_sizes_ranges_include_both_ends_and_lists_are_sorted():
    assert parse_sizes("2:5") == [2, 3, 4, 5]
    assert parse_sizes("2:10:4") == [2, 6, 10]
    assert parse_sizes("8,2,4,2") == [2, 4, 8]
    assert parse_sizes("0.1:0.4:0.1", float) == [0.1, 0.2, 0.3, 0.4]
    assert parse_sizes("0.25,0.1", float) == [0.1, 0.25]
    for bad in ("2:", "5:2", "2:10:0", "a:b", "1:2:3:4", ","):
        with pytest.raises(LayercutError, match="--remove"):
            parse_sizes(bad)


def test_sweep_sizes_round_ratios_and_check_every_size():
    assert sweep_sizes(SearchOptions(), 6, ratio=[0.1, 0.2, 0.3]) == [1, 2]  # 0.6, 1.2, 1.8 layers
    with pytest.raises(LayercutError, match="between 1 and 5"):
        sweep_sizes(SearchOptions(), 6, remove=[2, 6])
    with pytest.raises(LayercutError, match="one of them"):
        sweep_sizes(SearchOptions(), 6, remove=[2], ratio=[0.5])
    with pytest.raises(LayercutError, match="--segment"):
        sweep_sizes(SearchOptions(segment=("1:3",)), 6, remove=[2])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_tokenizer):
    return save_workspace(tmp_path_factory.mktemp("sweep"), tiny_tokenizer)


def recipe_for(root, method: str = "exhaustive", heal: str = "none") -> Recipe:
    text = str(root / "text.txt")
    return Recipe(data=DataOptions(calib=text, ppl=text, seq_len=16, calib_windows=4, ppl_windows=4, batch_size=2),
                  search=SearchOptions(method=method, gate_steps=2),
                  heal=HealOptions(heal=heal, heal_steps=2, heal_windows=4, heal_batch=2),
                  evaluation=EvalOptions(agreement_texts=text, generation_prompts=6, prompt_tokens=4, new_tokens=6,
                                         match_tokens=3))


@pytest.mark.slow  # two sizes, each with speed measured on a shared CPU: about two minutes
def test_sweep_api_measures_each_size_as_an_independent_cut_would(workspace, tmp_path):
    recipe = recipe_for(workspace)
    result = sweep(str(workspace / "tiny"), recipe, remove=[3, 1], output=tmp_path / "out")
    assert [row.remove for row in result.rows] == [1, 3] and result.layers == LAYERS
    assert SweepResult.model_validate_json((tmp_path / "out" / "sweep.json").read_text()) == result
    assert (tmp_path / "out" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "out" / "sweep.md").read_text()
    assert "| 0 (dense) |" in table and "| 1 | [" in table and "| 3 | [" in table

    model = build_tiny("llama")  # the same weights, measured here without the sweep's shared work
    tokenizer = transformers.AutoTokenizer.from_pretrained(workspace / "tiny")
    windows = calibrate(tokenizer, recipe.data)
    for row in result.rows:
        alone = selection.search(Handle.of(model, tokenizer), windows.calibration,
                                 recipe.search.replace(remove=row.remove), 2)
        assert row.segments == alone.segments and row.kl == pytest.approx(alone.kl, rel=1e-5)
        pruned = build_tiny("llama")
        cut(Handle.of(pruned), row.segments)
        with torch.no_grad():
            dense_logits, pruned_logits = model(input_ids=windows.test).logits, pruned(input_ids=windows.test).logits
            loss = F.cross_entropy(pruned_logits[:, :-1].reshape(-1, pruned_logits.shape[-1]),
                                   windows.test[:, 1:].reshape(-1))
        assert row.perplexity_cut == pytest.approx(math.exp(loss.item()), rel=1e-5)
        assert row.perplexity == pytest.approx(row.perplexity_cut, rel=1e-5)  # heal none
        kl = F.kl_div(F.log_softmax(pruned_logits, -1), F.log_softmax(dense_logits, -1), log_target=True,
                      reduction="none").sum(-1).mean().item()
        (text, agreed), = row.agreement.texts.items()
        assert agreed.kl == pytest.approx(kl, rel=1e-4) and 0 <= agreed.top1 < 1
        assert row.agreement.generation.prompts == 6 and row.agreement.generation.new_tokens == 6
        assert row.speed.limit == pytest.approx(LAYERS / (LAYERS - row.remove))
        assert row.speed.prefill_ratio > 0 and row.speed.decode_ratio > 0
    assert result.rows[0].agreement.texts[text].kl < result.rows[1].agreement.texts[text].kl


@pytest.mark.slow
def test_sweep_cli_with_ratios_and_a_heal(workspace, tmp_path, capsys):
    text = str(workspace / "text.txt")
    out = tmp_path / "out"
    flags = ["sweep", str(workspace / "tiny"), "--ratio", "0.2:0.4:0.2", "--output", str(out), "--calib", text,
             "--ppl", text, "--seq-len", "16", "--calib-windows", "4", "--ppl-windows", "4", "--repair-screen-steps", "1",
             "--heal-steps", "2", "--heal-windows", "4", "--heal-batch", "2", "--agreement-texts", text,
             "--generation-prompts", "4", "--prompt-tokens", "4", "--new-tokens", "4", "--match-tokens", "2"]
    assert main(flags) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert [row["remove"] for row in result["rows"]] == [1, 2]  # 1.2 and 2.4 of 6 layers
    assert all(row["heal"] == "endpoints" and row["method"] == "repair" for row in result["rows"])  # the default
    assert all(row["agreement"]["texts"][text]["tokens"] == 64 for row in result["rows"])
    assert "| 2 | [" in capsys.readouterr().out
    assert main(flags) == 2  # the folder exists: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*flags, "--remove", "2"]) == 2
    assert "one of them" in capsys.readouterr().err
    assert main(["sweep", str(workspace / "tiny"), "--remove", "2-4", "--output", str(tmp_path / "other")]) == 2
    assert "START:STOP" in capsys.readouterr().err and not (tmp_path / "other").exists()
