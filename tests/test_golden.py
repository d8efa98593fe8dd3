"""Golden run: the demo's settings on a tiny model with a fixed seed give the recorded segments, KL, perplexities
and weights. It pins behaviour across refactors; regenerate it only for an intended change of results
(``LAYERCUT_UPDATE_GOLDEN=1 pytest tests/test_golden.py``) and say why in the commit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny, write_text
from layercut.cli import main

pytestmark = pytest.mark.slow  # ten CLI runs

METHODS = ("clp", "exhaustive", "tail", "block-influence", "angular", "cosine-block", "sleb", "ppl", "taylor")

GOLDEN = Path(__file__).parent / "golden" / "prune_demo.json"
LAYERS = 10
# `make demo`'s settings (seq-len 128, 8 calibration windows, 4 gate starts of 1 window, 20 gate steps, 60 repair
# steps of 4 windows out of 96), on a tiny model instead of SmolLM2.
DEMO = ["--ratio", "0.2", "--seq-len", "128", "--calib-windows", "8", "--ppl-windows", "32", "--gate-starts", "4",
        "--gate-windows", "1", "--gate-steps", "20", "--heal-steps", "60", "--heal-batch", "4", "--heal-windows", "96"]


def weight_summary(path: Path) -> dict[str, list[float]]:
    """Per tensor: sum, sum of squares and a projection on fixed random weights, in float64.

    Any change of the trained values (another segment, another step, another batch) moves these far beyond the
    tolerance the test allows; a float summation order does not."""
    summary = {}
    for name, tensor in sorted(load_file(path).items()):
        values = tensor.double().flatten()
        probe = torch.randn(values.numel(), generator=torch.Generator().manual_seed(values.numel()),
                            dtype=torch.float64)
        summary[name] = [values.sum().item(), values.square().sum().item(), (values * probe).sum().item()]
    return summary


def golden_values(folder: Path) -> dict:
    record = json.loads((folder / "layercut.json").read_text())
    healing = record["healing"]
    return {
        "segments": record["segments"],
        "method": record["method"],
        "num_layers": [record["num_layers_before"], record["num_layers_after"]],
        "parameters": [record["parameters_before"], record["parameters_after"]],
        "search_kl": record["search"]["kl"],
        "search_evaluations": record["search"]["evaluations"],
        "perplexity": [record["metrics"]["perplexity"][key] for key in ("before", "after_cut", "after")],
        "healing": {key: healing[key] for key in ("layers", "trainable_parameters", "steps", "first_loss",
                                                  "last_loss", "learning_rate")},
        "weights": weight_summary(folder / "model.safetensors"),
    }


def search_values(model: Path, text: str, capsys) -> dict:
    """Segments and hard-cut KL that ``layercut search --json`` gives for every selection method."""
    found = {}
    for method in METHODS:
        argv = ["search", str(model), "--method", method, "--json", "--calib", text, *DEMO[:6], *DEMO[8:14]]
        assert main(argv) == 0
        result = json.loads(capsys.readouterr().out)
        found[method] = {"segments": result["segments"], "kl": result["kl"]}
    return found


def test_demo_settings_on_a_tiny_model_reproduce_the_golden_run(tmp_path, tiny_tokenizer, capsys):
    model = build_tiny("llama", layers=LAYERS)
    model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    text = write_text(tmp_path, paragraphs=200)
    out = tmp_path / "pruned"
    assert main(["prune", str(tmp_path / "tiny"), "--output", str(out), "--calib", text, "--ppl", text, *DEMO]) == 0
    capsys.readouterr()
    found = {**golden_values(out), "search": search_values(tmp_path / "tiny", text, capsys)}
    if os.environ.get("LAYERCUT_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(found, indent=1) + "\n")
    expected = json.loads(GOLDEN.read_text())
    for method, values in expected["search"].items():
        assert found["search"][method]["segments"] == values["segments"], method
        assert found["search"][method]["kl"] == pytest.approx(values["kl"], rel=1e-5), method
    for key in ("segments", "method", "num_layers", "parameters", "search_evaluations"):
        assert found[key] == expected[key], key
    assert found["search_kl"] == pytest.approx(expected["search_kl"], rel=1e-5)
    assert found["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    for key in ("layers", "trainable_parameters", "steps", "learning_rate"):
        assert found["healing"][key] == expected["healing"][key], key
    for key in ("first_loss", "last_loss"):
        assert found["healing"][key] == pytest.approx(expected["healing"][key], rel=1e-5), key
    assert sorted(found["weights"]) == sorted(expected["weights"])
    for name, values in expected["weights"].items():
        assert found["weights"][name] == pytest.approx(values, rel=1e-5, abs=1e-6), name
