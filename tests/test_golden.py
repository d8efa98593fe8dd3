"""Golden run: the demo's settings on a tiny model with a fixed seed give the recorded segments, KL, perplexities
and weights, on any CPU kernel and thread count (tolerances in tests/golden_run.py, measured by
bench/golden_matrix.py). It pins behaviour across refactors; regenerate it only for an intended change of results
(``LAYERCUT_UPDATE_GOLDEN=1 pytest tests/test_golden.py``) and say why in the commit. The perturbation test shows
it still catches a real change: a learning rate 2 % higher, the cut moved by one layer, one more healed layer."""

from __future__ import annotations

import json
import os

import pytest

import golden_run

pytestmark = pytest.mark.slow  # ten CLI runs


@pytest.fixture(scope="module")
def golden(tmp_path_factory, tiny_tokenizer):
    """The tiny model, its text, and the golden values found on this machine."""
    folder = tmp_path_factory.mktemp("golden")
    model, text = golden_run.prepare(folder, tiny_tokenizer)
    found = golden_run.prune_values(folder, model, text)
    found["search"] = golden_run.search_values(model, text)
    return folder, model, text, found


def test_demo_settings_on_a_tiny_model_reproduce_the_golden_run(golden):
    found = golden[3]
    if os.environ.get("LAYERCUT_UPDATE_GOLDEN"):
        golden_run.GOLDEN.write_text(json.dumps(found, indent=1) + "\n")
    assert golden_run.mismatches(found, golden_run.expected()) == []


PERTURBATIONS = {
    # The demo's heal learning rate is 1e-3; 2 % more is the smallest change here that a user could mean.
    "learning rate 2 % higher": (["--heal-lr", "0.00102"], "weights"),
    # The golden cut is [3, 5): the same heal one layer later.
    "cut moved by one layer": (["--segment", "4:6"], "segments"),
    # One layer more on each side of the cut is trained.
    "one more healed layer": (["--endpoint-layers", "2"], "healing.layers"),
}


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_a_real_change_of_behaviour_fails_the_golden_comparison(golden, name):
    folder, model, text, found = golden
    extra, caught_by = PERTURBATIONS[name]
    perturbed = golden_run.prune_values(folder, model, text, extra, name=name.replace(" ", "-"))
    perturbed["search"] = found["search"]  # the perturbations change the prune, not the search
    wrong = golden_run.mismatches(perturbed, golden_run.expected())
    assert any(entry.startswith(caught_by) for entry in wrong), wrong
    # Beyond what it changes by construction, the trained weights also move far past the tolerance.
    assert golden_run.deviations(perturbed, golden_run.expected())["weights"] > 10 * golden_run.TOLERANCE["weights"]
