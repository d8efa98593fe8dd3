"""Segment search with several segments: exact enumeration against brute force, at most K segments, shared exact
scoring against the plain gated path, and the exhaustive budget."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from conftest import LAYERS, build_tiny, random_ids, window_costs
from layercut.config import SearchOptions
from layercut.errors import LayercutError
from layercut.forward import ExactKL, gated, hard_kl, kl_rows, outputs_of
from layercut.gate import (
    cost_model,
    count_cuts,
    cuts,
    distinct_profiles,
    exhaustive,
    gate_settings,
    gated_kl,
    neighbours,
    notch_mask,
    search_exhaustive,
    search_gate,
    search_notches,
    settled_layers,
)
from layercut.layers import Handle, drop_layers, merge_adjacent


def direct_kl(model, windows, segments) -> float:
    """KL(dense ‖ cut) of a copy of ``model`` with ``segments`` dropped, in float64: no hooks, no sharing."""
    cut_model = copy.deepcopy(model)
    drop_layers(cut_model, list(segments))
    with torch.no_grad():
        dense = torch.log_softmax(model(windows).logits.double(), dim=-1)
        pruned = torch.log_softmax(cut_model(windows).logits.double(), dim=-1)
    return (dense.exp() * (dense - pruned)).sum(-1).mean().item()


def test_cuts_are_every_way_to_remove_n_layers_in_at_most_k_segments():
    for layers, remove, segments in ((8, 3, 1), (8, 3, 2), (9, 4, 3), (20, 5, 2)):
        brute = set()
        for chosen in itertools.combinations(range(layers), remove):
            blocks = merge_adjacent([(i, i + 1) for i in chosen])
            if len(blocks) <= segments:
                brute.add(tuple(blocks))
        found = cuts(layers, remove, segments)
        assert len(found) == len(set(found)) == count_cuts(layers, remove, segments)
        assert set(found) == brute


def test_exhaustive_with_two_segments_equals_brute_force_on_a_tiny_model():
    model = build_tiny("qwen2", layers=7)
    windows = random_ids(batch=3, length=10, seed=5)
    found = search_exhaustive(Handle.of(model), windows, 3, SearchOptions(method="exhaustive", segments=2))
    brute = {}
    for chosen in itertools.combinations(range(7), 3):
        blocks = tuple(merge_adjacent([(i, i + 1) for i in chosen]))
        if len(blocks) <= 2:
            brute[blocks] = direct_kl(model, windows, blocks)
    best = min(brute, key=brute.get)
    assert found.evaluations == len(brute)
    assert tuple(found.segments) == best
    assert found.kl == pytest.approx(brute[best], rel=1e-4, abs=1e-7)


def test_the_cost_model_splits_a_fixed_cost_per_cut_from_a_cost_per_layer():
    assert cost_model([10, 0], [12.0, 2.0]) == pytest.approx((2.0, 1.0))  # the head: 2 s a cut, 1 s a layer
    assert cost_model([10, 0], [1.0, 3.0]) == pytest.approx((1.0, 0.0))  # timing noise: never a negative cost
    assert cost_model([4], [2.0]) == pytest.approx((0.0, 0.5))  # one probe: all on the layers


def test_exhaustive_refuses_a_search_over_its_budget_with_both_figures():
    model = build_tiny("llama", layers=8)
    options = SearchOptions(method="exhaustive", segments=3, exhaustive_budget=1e-6)
    with pytest.raises(LayercutError, match=r"would score 56 cuts .* an estimated .* s here, over "
                                            r"--exhaustive-budget"):
        search_exhaustive(Handle.of(model), random_ids(batch=2, length=8), 3, options)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "opt", "phi"])
@pytest.mark.parametrize("budget", [4 * 2**30, 20_000, 0], ids=["everything kept", "some boundaries", "nothing kept"])
def test_shared_exact_scoring_equals_the_gated_path_and_dropping(family, budget):
    model = build_tiny(family, layers=8)
    handle = Handle.of(model)
    windows = random_ids(batch=5, length=12, seed=1)
    candidates = [((0, 2),), ((3, 5),), ((6, 8),), ((1, 2), (4, 6)), ((2, 3),)]
    scorer = ExactKL(handle, windows, pass_windows=2, memory_budget=budget)
    shared = scorer(candidates)
    gated = hard_kl(handle, windows, candidates, batch_size=2)
    direct = [direct_kl(model, windows, candidate) for candidate in candidates]
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(direct, dtype=torch.float32), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(gated), rtol=1e-3, atol=1e-6)
    assert scorer.evaluated == len(candidates)
    assert all(not layer._forward_hooks and "forward" not in layer.__dict__ for layer in handle.layers)


def test_segments_vanish_and_merge_in_the_neighbourhood():
    around = neighbours(((2, 3), (5, 7)), 10)
    assert ((4, 7),) in around and ((5, 8),) in around  # the one-layer segment gave its layer away: it vanished
    assert ((2, 3), (4, 6)) in around
    touching = neighbours(((2, 4), (5, 7)), 10)
    assert ((2, 7),) not in touching  # a shift that would touch leaves a gap of one layer...
    assert ((3, 7),) in touching  # ...and touching segments merge into one


def test_where_one_segment_is_best_two_segments_return_one():
    costs = [3, 3, 3, 3, 1, 1, 1, 1, 3, 3, 3, 3, 3, 1.2, 3, 3]
    objective, exact = window_costs(costs, interaction=-0.5)
    single = exhaustive(exact, len(costs), 4)
    both = exhaustive(exact, len(costs), 4, segments=2)
    assert single.segments == both.segments == [(4, 8)]  # the landscape's own optimum is one segment
    known = dict(zip(cuts(len(costs), 4, 1), exact(cuts(len(costs), 4, 1))))
    found = search_notches(objective, exact, len(costs), 4, SearchOptions(segments=2, gate_steps=40), known=known)
    assert found.segments == [(4, 8)]


def test_the_gate_with_two_segments_is_never_worse_than_the_best_single_segment():
    model = build_tiny("llama", layers=10)
    windows = random_ids(batch=4, length=12, seed=2)
    handle = Handle.of(model)
    single = search_exhaustive(handle, windows, 3, SearchOptions(method="exhaustive"))
    two = {}
    for seed in range(3):
        two[seed] = search_gate(handle, windows, 3, SearchOptions(segments=2, gate_steps=6), seed=seed)
        assert len(two[seed].segments) <= 2
        assert two[seed].kl <= single.kl + 1e-9
        assert " ".join(f"{s}:{e}" for s, e in single.segments) in two[seed].landscape  # the exact optimum was scored
    three = search_gate(handle, windows, 3, SearchOptions(segments=3, gate_steps=6), seed=0)
    assert len(three.segments) <= 3 and three.kl <= two[0].kl + 1e-9  # never worse than its own two-segment search


def test_the_gate_settings_by_segments_fill_only_the_options_left_unset():
    """One segment: 5 steps at learning rate 0.4 annealed to 0.4 layers, read-out screened on 4 windows; several:
    60 steps at 0.2 annealed to 0.05. An option the user gives is kept whatever the number of segments."""
    one = gate_settings(SearchOptions(remove=3))
    assert (one.gate_steps, one.gate_lr, one.tau_end, one.gate_screen) == (5, 0.4, 0.4, 4)
    several = gate_settings(SearchOptions(remove=3, segments=2))
    assert (several.gate_steps, several.gate_lr, several.tau_end, several.gate_screen) == (60, 0.2, 0.05, 0)
    given = gate_settings(SearchOptions(remove=3, gate_lr=0.1, gate_steps=7, gate_screen=0))
    assert (given.gate_steps, given.gate_lr, given.tau_end, given.gate_screen) == (7, 0.1, 0.4, 0)
    run = search_gate(Handle.of(build_tiny("llama", layers=8)), random_ids(batch=6, length=12, seed=4), 2,
                      SearchOptions(method="clp", remove=2, gate_profiles=2), seed=0)
    assert [step["tau"] for step in run.trajectory] == pytest.approx([1.0 * 0.4 ** (k / 4) for k in range(5)])


def test_sampled_positions_and_early_stopping_keep_the_gate_deterministic():
    model = build_tiny("llama", layers=LAYERS)
    windows = random_ids(batch=6, length=16, seed=3)
    options = SearchOptions(method="clp", gate_steps=30, gate_positions=4, gate_patience=3)
    first = search_gate(Handle.of(model), windows, 2, options, seed=1)
    again = search_gate(Handle.of(model), windows, 2, options, seed=1)
    assert first.trajectory == again.trajectory and first.segments == again.segments
    assert len(first.trajectory) < 30  # the read-out settled before the last step
    exact = search_exhaustive(Handle.of(model), windows, 2, SearchOptions(method="exhaustive"))
    assert first.kl == pytest.approx(exact.kl, rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("budget", [4 * 2**30, 20_000], ids=["every boundary", "some boundaries"])
def test_gate_prefix_reuse_gives_the_plain_gated_kl_and_gradient(family, budget):
    model = build_tiny(family, layers=8)
    model.requires_grad_(False)
    handle = Handle.of(model)
    windows = random_ids(batch=5, length=12, seed=4)
    scorer = ExactKL(handle, windows, pass_windows=2, memory_budget=budget)
    picks, length = torch.tensor([4, 1]), 9
    starts = torch.tensor([[4.2], [5.0]], requires_grad=True)

    def profile():
        return 1 - notch_mask(starts, torch.full((2, 1), 2.0), 8, 0.25)

    assert settled_layers(profile()) == 2  # every gate below layer 2 is 1 to within 1e-3

    def plain():
        batch, gates = windows[picks, :length], profile()
        with gated(handle.layers) as set_gates:
            with torch.no_grad():
                teacher = outputs_of(model, batch, True)
            set_gates(gates)
            kl = kl_rows(model, teacher, outputs_of(model, batch.repeat(2, 1), True), True)
            return kl, torch.autograd.grad(kl.sum(), starts)[0]

    def shared():
        with gated(handle.layers) as set_gates:
            kl = gated_kl(scorer, set_gates, profile(), picks, length)
            return kl, torch.autograd.grad(kl.sum(), starts)[0]

    (kl, grad), (kl_plain, grad_plain) = shared(), plain()
    torch.testing.assert_close(kl, kl_plain, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad, grad_plain, rtol=1e-3, atol=1e-5)
    assert grad.abs().min() > 0
    assert all(not layer._forward_hooks and "forward" not in layer.__dict__ for layer in handle.layers)


def test_settled_layers_counts_the_leading_layers_every_profile_keeps():
    gates = torch.ones(3, 6)
    assert settled_layers(gates) == 6
    gates[1, 4] = 0.5
    gates[2, 3] = 1 - 1e-4  # within the tolerance
    assert settled_layers(gates) == 4
    gates[0, 0] = 0.9
    assert settled_layers(gates) == 0


def test_profiles_that_round_to_one_cut_keep_only_the_best():
    rounded = [((2, 4),), ((5, 7),), ((2, 4),), None, ((5, 7),), ((9, 11),)]
    losses = [0.5, 0.9, 0.4, 0.1, 0.8, 1.0]
    assert distinct_profiles(rounded, losses) == [2, 3, 4, 5]


def test_the_gate_population_shrinks_to_one_profile_per_cut():
    costs = [3, 3, 0.2, 0.1, 0.2, 3, 3, 3, 3, 3, 3, 3]
    objective, exact = window_costs(costs, interaction=0.3)
    found = search_notches(objective, exact, len(costs), 3, SearchOptions(gate_steps=40, gate_profiles=6))
    assert found.segments == [(2, 5)]
    assert len(found.trajectory[0]["active"]) == 6
    assert len(found.trajectory[-1]["active"]) < 6
    for row in found.trajectory:  # only training profiles have a loss
        assert [r for r, loss in enumerate(row["loss"]) if loss is not None] == row["active"]


def test_screening_scores_the_first_windows_with_the_shared_scorer():
    model = build_tiny("llama", layers=8)
    handle = Handle.of(model)
    windows = random_ids(batch=5, length=12, seed=5)
    candidates = [((1, 3),), ((4, 6),)]
    scorer = ExactKL(handle, windows, pass_windows=2)
    torch.testing.assert_close(torch.tensor(scorer(candidates, 3)), torch.tensor(hard_kl(handle, windows[:3], candidates)),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cut_reports_one_kl_whichever_method_chose_it(dtype):
    """clp, exhaustive and the baselines report a cut's KL through one function: the exhaustive landscape's value
    for the cut each method chose, to the last bit (in bfloat16 too, where passes of other sizes round
    differently)."""
    from layercut.gate import candidate_key, cut_kl
    from layercut.selection import search

    handle = Handle.of(build_tiny("llama", layers=8).to(dtype))
    windows = random_ids(batch=20, length=12, seed=3)
    found = {method: search(handle, windows, SearchOptions(method=method, remove=3), batch_size=2)
             for method in ("exhaustive", "clp", "tail", "angular")}
    landscape = found["exhaustive"].landscape
    assert len(landscape) == count_cuts(8, 3, 1)
    for method, result in found.items():
        assert result.kl == landscape[candidate_key(tuple(result.segments))], method
        assert result.kl == cut_kl(handle, windows, result.segments, SearchOptions(), batch_size=2), method
    assert found["tail"].segments == [(5, 8)]
