"""The golden run and its comparison, shared by tests/test_golden.py and bench/golden_matrix.py.

The golden run is `make demo`'s calibration and heal settings on a tiny Llama with a fixed seed, with the concave
gate's search (`--method clp`, 4 profiles of 1 window, 20 steps): the default repair selection ranks candidates by
short heals, whose near-ties are no place for a portable record; it has its own tests (tests/test_repair.py).

Floating-point results differ between CPU kernels (ATEN_CPU_CAPABILITY default, avx2, avx512) and thread counts,
and sixty Adam steps carry those differences into the trained weights. So each recorded number is compared in a
unit that does not depend on its value being far from zero, against a tolerance set from the measured spread over
those settings (bench/golden_matrix.py, bench/results/golden-matrix/)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import build_tiny, write_text

GOLDEN = Path(__file__).parent / "golden" / "prune_demo.json"
LAYERS = 10
METHODS = ("clp", "exhaustive", "tail", "block-influence", "angular", "cosine-block", "sleb", "ppl", "taylor")
# `make demo`'s settings (seq-len 128, 8 calibration windows, 60 repair steps of 4 windows out of 96) with the gate's
# (4 gate starts of 1 window, 20 gate steps), on a tiny model instead of SmolLM2.
DEMO = ["--ratio", "0.2", "--seq-len", "128", "--calib-windows", "8", "--ppl-windows", "32", "--gate-starts", "4",
        "--gate-windows", "1", "--gate-steps", "20", "--heal-steps", "60", "--heal-batch", "4", "--heal-windows", "96"]
METHOD = ["--method", "clp"]  # the golden prune's selection (the module's docstring says why)

# Largest deviation allowed per group, in the units of `deviations`: ten times the largest deviation from the recorded
# values measured over ATEN_CPU_CAPABILITY default, avx2 and avx512, each with 1 and 2 threads, on a 2-core AMD EPYC
# (bench/golden_matrix.py, bench/results/golden-matrix/): KL 9.2e-6 relative, loss 9.7e-8, weights 3.6e-5 of their
# tensor's norm (all three under the scalar default kernels but the loss, under avx2). Perplexity never moved (0.0);
# it keeps the 1e-5 it had. A heal learning rate 2 % higher moves the weights by 2.0e-2 of their norm, the perplexity
# by 4.9e-5 and the loss by 1.7e-5: fifty times the weights' tolerance.
TOLERANCE = {"kl": 1e-4, "perplexity": 1e-5, "loss": 1e-6, "weights": 4e-4}
EXACT = ("segments", "method", "num_layers", "parameters", "search_evaluations")
EXACT_HEALING = ("layers", "trainable_parameters", "steps", "learning_rate")


def weight_summary(path: Path) -> dict[str, list[float]]:
    """Per tensor: sum, sum of squares and a projection on fixed random weights, in float64."""
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


def search_values(model: Path, text: str) -> dict:
    """Segments and hard-cut KL that ``layercut search --json`` gives for every selection method."""
    import contextlib
    import io

    from layercut.cli import main

    found = {}
    for method in METHODS:
        out = io.StringIO()
        argv = ["search", str(model), "--method", method, "--json", "--calib", text, *DEMO[:6], *DEMO[8:14]]
        with contextlib.redirect_stdout(out):
            assert main(argv) == 0
        result = json.loads(out.getvalue())
        found[method] = {"segments": result["segments"], "kl": result["kl"]}
    return found


def prepare(folder: Path, tokenizer) -> tuple[Path, str]:
    """The tiny model and the text the golden run prunes."""
    model = build_tiny("llama", layers=LAYERS)
    model.save_pretrained(folder / "tiny")
    tokenizer.save_pretrained(folder / "tiny")
    return folder / "tiny", write_text(folder, paragraphs=200)


def prune_values(folder: Path, model: Path, text: str, extra: list[str] = (), name: str = "pruned") -> dict:
    """`layercut prune` with the demo's settings (and ``extra`` arguments after them) → the golden values."""
    import contextlib
    import io

    from layercut.cli import main

    out = folder / name
    demo = DEMO[2:] if "--segment" in extra else DEMO  # a given segment replaces the demo's --ratio 0.2
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["prune", str(model), "--output", str(out), "--calib", text, "--ppl", text, *demo, *METHOD, *extra]) == 0
    return golden_values(out)


def run(folder: Path, tokenizer, with_search: bool = True) -> dict:
    """The whole golden run in ``folder``: prune, then (optionally) search with every method."""
    model, text = prepare(folder, tokenizer)
    found = prune_values(folder, model, text)
    if with_search:
        found["search"] = search_values(model, text)
    return found


def relative(found: float | None, expected: float) -> float:
    """|found − expected| / |expected|; infinite where nothing was found (a prune with a given segment has no
    search KL)."""
    return math.inf if found is None else abs(found - expected) / max(abs(expected), 1e-300)


def weight_deviation(found: list[float], expected: list[float]) -> float:
    """Deviation of one tensor's summary in units of the tensor's norm ‖w‖ (from the expected sum of squares): the
    sum and the projection (unit-variance probe) move by about ‖δ‖ when the weights move by δ, the sum of squares by
    about 2‖w‖‖δ‖·cos. A sum near zero (a random tensor) no longer makes a relative test blow up."""
    norm = math.sqrt(max(expected[1], 0.0)) or 1e-300
    return max(abs(found[0] - expected[0]) / norm, abs(found[1] - expected[1]) / norm**2,
               abs(found[2] - expected[2]) / norm)


def deviations(found: dict, expected: dict) -> dict[str, float]:
    """The largest deviation of each group of recorded numbers: relative for the KLs, perplexities and losses, in
    units of the tensor's norm for the weights (`weight_deviation`); infinite where a tensor is missing or extra."""
    kls = [relative(found["search_kl"], expected["search_kl"])]
    kls += [relative(found["search"][m]["kl"], v["kl"]) for m, v in expected.get("search", {}).items()]
    weights = [weight_deviation(found["weights"][name], values) if name in found["weights"] else math.inf
               for name, values in expected["weights"].items()]
    if set(found["weights"]) - set(expected["weights"]):
        weights.append(math.inf)
    return {
        "kl": max(kls),
        "perplexity": max(relative(f, e) for f, e in zip(found["perplexity"], expected["perplexity"], strict=True)),
        "loss": max(relative(found["healing"][k], expected["healing"][k]) for k in ("first_loss", "last_loss")),
        "weights": max(weights),
    }


def mismatches(found: dict, expected: dict) -> list[str]:
    """What differs beyond the tolerance: the names of unequal exact fields and of groups over `TOLERANCE`."""
    wrong = [key for key in EXACT if found[key] != expected[key]]
    wrong += [f"healing.{key}" for key in EXACT_HEALING if found["healing"][key] != expected["healing"][key]]
    for method, values in expected.get("search", {}).items():
        if found["search"][method]["segments"] != values["segments"]:
            wrong.append(f"search.{method}.segments")
    wrong += [f"{group} {value:.3g} > {TOLERANCE[group]:.3g}"
              for group, value in deviations(found, expected).items() if not value <= TOLERANCE[group]]
    return wrong


def expected() -> dict:
    return json.loads(GOLDEN.read_text())
