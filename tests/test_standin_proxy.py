"""bench/standin_proxy.py: the least-squares stand-in of a cut block, applied by hooks, and its report."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import torch

from layercut.config import ModelOptions
from layercut.data import load_text
from layercut.layers import Handle, cut
from layercut.load import load_model

SPEC = importlib.util.spec_from_file_location("standin_proxy", Path(__file__).parents[1] / "bench" / "standin_proxy.py")
standin = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(standin)


def test_the_stand_in_recovers_a_map_that_is_exactly_linear():
    generator = torch.Generator().manual_seed(0)
    entering = torch.randn(500, 8, generator=generator)
    transform = 0.3 * torch.randn(8, 8, generator=generator)
    states = [entering, None, entering + entering @ transform]
    for kind in ("lsq", "weighted"):
        fitted = standin.standin_map(states, 0, 2, kind)
        assert torch.allclose(fitted, transform.double(), atol=1e-6)
    assert standin.standin_map(states, 0, 2, "none") is None


def tiny(tmp_path) -> Handle:
    folder = standin.landscape.smoke_model(tmp_path / "model", load_text("wiki", "calib"))
    return load_model(folder, ModelOptions(dtype="float32"))


def test_hooks_cut_the_block_as_a_hard_cut_does_and_apply_the_map(tmp_path):
    handle = tiny(tmp_path)
    windows = torch.randint(0, 200, (3, 12), generator=torch.Generator().manual_seed(1))
    pruned = copy.deepcopy(handle)
    cut(pruned, [(2, 4)])
    with torch.no_grad(), standin.standing_in(handle, {(2, 4): None}):
        hooked = handle.model(input_ids=windows).logits
    with torch.no_grad():
        assert torch.allclose(hooked, pruned.model(input_ids=windows).logits, atol=1e-5)
    dense = standin.boundary_states(handle, windows, 2)
    transform = standin.standin_map(dense, 2, 4, "lsq")
    with standin.standing_in(handle, {(2, 4): transform}):
        moved = standin.boundary_states(handle, windows, 2)
    assert torch.allclose(moved[2], dense[2])  # what enters the block is the dense model's
    assert torch.allclose(moved[4], (dense[2].double() + dense[2].double() @ transform).float(), atol=1e-4)
    assert not torch.allclose(moved[4], dense[4], atol=1e-3)  # the stand-in is not the block itself
    with torch.no_grad():  # the hooks are gone afterwards: the dense model again
        assert torch.allclose(standin.boundary_states(handle, windows, 2)[6], dense[6])


def landscape_cut(folder: Path, start: int, repaired: float, kl_before: float) -> None:
    cell = {"model": "m", "layers": 4, "remove": 2, "seed": 0, "cut": [[start, start + 2]], "segments": 1,
            "kl": kl_before, "patches": {},
            "heal": {"steps": {"0": {"proxy_kl": kl_before, "proxy_perplexity": 10 * kl_before}, "200": {"perplexity_wiki": repaired}}}}
    (folder / f"m-n2-seed0-{start}-{start + 2}.json").write_text(json.dumps(cell))


def test_the_report_ranks_cuts_by_the_stand_in_and_checks_the_plain_cut_against_the_landscape(tmp_path):
    cuts = tmp_path / "landscape" / "cuts"
    cuts.mkdir(parents=True)
    for start, repaired, kl in ((0, 30.0, 1.0), (1, 20.0, 3.0), (2, 40.0, 2.0)):
        landscape_cut(cuts, start, repaired, kl)
    out = tmp_path / "standin"
    (out / "cells").mkdir(parents=True)
    scored = {"model": "m", "remove": 2, "seed": 0, "fit_windows": 4, "states_seconds": 1.0, "cuts": {
        f"{s}-{s + 2}": {"cut": [[s, s + 2]], "none": {"proxy_kl": kl, "seconds": 0.1},
                         "lsq": {"proxy_kl": lsq, "seconds": 0.1}}
        for s, kl, lsq in ((0, 1.0, 0.5), (1, 3.0, 0.2), (2, 2.0, 0.9))}}
    (out / "cells" / "m-n2-seed0.json").write_text(json.dumps(scored))
    text = standin.report(tmp_path / "landscape", out)
    lsq_row = next(line for line in text.splitlines() if line.startswith("| stand-in lsq |"))
    assert "1.00; [[1, 3]] ×1.000" in lsq_row  # the stand-in ranks the cuts as the repair does
    exact_row = next(line for line in text.splitlines() if line.startswith("| exact KL (pre-repair) |"))
    assert "0.50; [[0, 2]] ×1.500" in exact_row
    assert "3 cuts, largest relative difference 0.00e+00" in text
    summary = json.loads((out / "standin.json").read_text())
    assert summary["m|2|0"]["stand-in lsq"]["pick"]["cut"] == [[1, 3]]
