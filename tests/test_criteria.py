"""Criteria: each pure score on a hand-made case with a known answer, then every method end to end."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import LAYERS, VOCAB, build_tiny, random_ids
from layercut.config import SearchOptions
from layercut.criteria import (
    CRITERIA,
    angular_distance,
    best_start,
    block_angular_distance,
    block_cosine,
    block_influence,
    greedy_removal,
    layer_taylor_scores,
    lowest,
    pair_cosine,
    removal_perplexities,
    select_by_criterion,
    taylor_importance,
)
from layercut.errors import LayercutError
from layercut.evaluate import perplexity
from layercut.forward import mean_over_windows
from layercut.layers import Handle, drop_layers, find_decoder_layers, validate_segments
from layercut.selection import METHODS

# ----------------------------------------------------------------------------------------------- pure scores


def unit(angle: float) -> torch.Tensor:
    return torch.tensor([math.cos(angle), math.sin(angle)])


def test_angular_distance_of_identical_orthogonal_and_opposite_vectors():
    states = torch.stack([unit(0.0), unit(0.0), unit(math.pi / 2), unit(3 * math.pi / 2)])  # [4, D]
    distance = angular_distance(pair_cosine(states, 1))
    assert distance.tolist() == pytest.approx([0.0, 0.5, 1.0], abs=1e-6)


def test_pair_cosine_shape_and_scale_invariance():
    states = torch.randn(5, 2, 3, 8)
    assert pair_cosine(states, 2).shape == (3, 2, 3)
    scaled = states * torch.tensor([1.0, 3.0, 0.5, 7.0, 2.0]).view(-1, 1, 1, 1)
    assert torch.allclose(pair_cosine(scaled, 1), pair_cosine(states, 1), atol=1e-6)


def test_block_influence_is_zero_for_a_layer_whose_output_equals_its_input():
    states = torch.randn(5, 2, 3, 8)  # 4 layers
    states[3] = states[2]  # layer 2 returns its input
    scores = block_influence(states)
    assert scores.shape == (4,)
    assert scores[2].item() == pytest.approx(0.0, abs=1e-6)
    assert lowest(scores, 1) == [2]


def test_block_influence_of_orthogonal_update_is_one():
    states = torch.stack([unit(0.0), unit(math.pi / 2)]).view(2, 1, 1, 2)
    assert block_influence(states).tolist() == pytest.approx([1.0], abs=1e-6)


def test_best_contiguous_block_on_hand_made_angles():
    # States on the unit circle: the angular distance from l to l+2 is |θ[l+2] − θ[l]| / π.
    angles = [0.0, 0.5, 1.0, 1.05, 1.1, 2.0, 2.5]
    last = torch.stack([unit(a) for a in angles])  # [L+1=7, D]
    states = torch.randn(7, 3, 4, 2)
    states[:, :, -1] = last.unsqueeze(1)  # only the last token counts for the angular criterion
    scores = block_angular_distance(states, 2)
    expected = [(angles[l + 2] - angles[l]) / math.pi for l in range(5)]
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)
    assert best_start(scores) == 2


def test_block_cosine_averages_tokens_and_picks_the_most_similar_block():
    angles = torch.tensor([0.0, 1.0, 1.2, 1.3, 2.5])
    # Token t rotates every state by the same angle, which keeps the cosines: [L+1=5, b=1, T=2, D=2].
    tokens = [torch.stack([torch.cos(angles + t), torch.sin(angles + t)], dim=-1) for t in (0.0, 0.3)]
    states = torch.stack(tokens, dim=1).unsqueeze(1)
    scores = block_cosine(states, 2)
    expected = [math.cos(angles[l + 2] - angles[l]) for l in range(3)]
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)
    assert best_start(scores, largest=True) == 1


def test_lowest_and_best_start_break_ties_towards_the_lower_index():
    scores = torch.tensor([1.0, 0.0, 0.0, 2.0, 0.0])
    assert lowest(scores, 1) == [1]
    assert lowest(scores, 3) == [1, 2, 4]
    assert best_start(scores) == 1
    assert best_start(torch.tensor([0.0, 3.0, 3.0]), largest=True) == 1


def test_greedy_removal_on_additive_cost_picks_the_cheapest_layers_in_order():
    prices = [5.0, 1.0, 3.0, 0.5, 4.0]
    calls = []

    def cost(sets):
        calls.append(len(sets))
        return [sum(prices[i] for i in removed) for removed in sets]

    rounds = greedy_removal(cost, 5, 3)
    assert [r["removed"] for r in rounds] == [[3], [3, 1], [3, 1, 2]]
    assert rounds[0]["costs"] == {i: p for i, p in enumerate(prices)}
    assert rounds[1]["costs"][0] == 5.5
    assert calls == [5, 4, 3]


def test_greedy_removal_follows_interactions():
    # Layers 0 and 1 are each cheap alone but expensive together: round two must avoid the pair.
    def cost(sets):
        return [{0: 1.0, 1: 1.1, 2: 2.0}[r[-1]] + (10.0 if {0, 1} <= set(r) else 0.0) + len(r) for r in sets]

    assert greedy_removal(cost, 3, 2)[-1]["removed"] == [0, 2]


def test_taylor_importance_sums_absolute_products():
    weights = [torch.tensor([1.0, -2.0]), torch.tensor([[0.5]])]
    grads = [torch.tensor([3.0, 1.0]), torch.tensor([[-4.0]])]
    assert taylor_importance(weights, grads).item() == pytest.approx(3.0 + 2.0 + 2.0)


# ----------------------------------------------------------------------------------------------- on a model


@pytest.fixture(scope="module")
def windows():
    return random_ids(batch=4, length=12)


def selected(handle: Handle, windows: torch.Tensor, remove: int, method: str, batch_size: int = 4):
    """The search stage's result for ``method``: the criterion's choice, scored as every method's cut is."""
    return METHODS[method].search(handle, windows, remove, SearchOptions(method=method, remove=remove), batch_size)


def cut_kl(model, windows, segments) -> float:
    """Mean token KL(dense ‖ cut) of a copy of ``model`` with ``segments`` dropped, computed directly."""
    cut_model = copy.deepcopy(model)
    drop_layers(cut_model, segments)
    with torch.no_grad():
        dense = torch.log_softmax(model(windows).logits.double(), dim=-1)
        pruned = torch.log_softmax(cut_model(windows).logits.double(), dim=-1)
    return (dense.exp() * (dense - pruned)).sum(-1).mean().item()


@pytest.mark.parametrize("method", CRITERIA)
def test_every_method_removes_the_requested_layers(method, windows):
    model = build_tiny("llama", layers=8)
    result = selected(Handle.of(model), windows, 2, method, batch_size=2)
    assert result.method == method
    assert validate_segments(result.segments, 8) == result.segments
    assert sum(end - start for start, end in result.segments) == 2
    assert result.kl == pytest.approx(cut_kl(model, windows, result.segments), rel=1e-4)
    assert result.trajectory == []
    if method in ("angular", "cosine-block", "angular-pruneme"):
        assert len(result.segments) == 1 and set(result.landscape) == {f"{s}:{s + 2}" for s in range(7)}
    if method == "cosine-streamline":  # blocks of n + 1 = 3 layers; the n after the block's first are cut
        assert len(result.segments) == 1 and set(result.landscape) == {f"{s}:{s + 3}" for s in range(6)}
        start = max(range(6), key=lambda s: result.landscape[f"{s}:{s + 3}"])
        assert result.segments == [(start + 1, start + 3)]
    if method == "angular-pruneme":
        assert result.segments[0][0] >= 1
    if method == "tail":
        assert result.segments == [(6, 8)]
    if method in ("ppl-plus", "taylor-plus"):  # the + rule: layers 4 and 5 are the only eligible ones of 8
        assert result.segments == [(4, 6)]
    if method == "sleb-barrier":
        assert result.segments[0][0] >= 1 and result.segments[-1][1] <= 7
    if method in ("block-influence", "ppl", "taylor", "sleb", "ppl-plus", "taylor-plus", "block-influence-norm"):
        assert set(result.landscape) == {f"{i}:{i + 1}" for i in range(8)}
    assert all(not layer._forward_hooks for layer in find_decoder_layers(model)[1])


def test_released_variants_read_the_last_state_after_the_final_norm(windows):
    model = build_tiny("llama")
    with torch.no_grad():  # a trained norm scales each feature differently (a cosine ignores a common scale)
        model.model.norm.weight.uniform_(0.2, 2.0, generator=torch.Generator().manual_seed(0))
    handle = Handle.of(model)
    plain = select_by_criterion(handle, windows, 1, "block-influence")
    normed = select_by_criterion(handle, windows, 1, "block-influence-norm")
    for i in range(LAYERS - 1):  # only the last layer's score reads the final state
        assert normed.landscape[f"{i}:{i + 1}"] == pytest.approx(plain.landscape[f"{i}:{i + 1}"], rel=1e-6)
    assert normed.landscape[f"{LAYERS - 1}:{LAYERS}"] != pytest.approx(plain.landscape[f"{LAYERS - 1}:{LAYERS}"])


def sample_windows(model, count: int, length: int, seed: int) -> torch.Tensor:
    """``[count, length]`` windows sampled from ``model`` itself (no cache: tiny models only)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (count, 1), generator=generator)
    with torch.no_grad():
        for _ in range(length - 1):
            probabilities = torch.softmax(model(ids).logits[:, -1].float(), dim=-1)
            ids = torch.cat([ids, torch.multinomial(probabilities, 1, generator=generator)], dim=1)
    return ids


@pytest.fixture(scope="module")
def identity_at_3():
    """A 6-layer llama whose layer 3 returns its input exactly, and calibration windows sampled from it.

    On its own samples the dense model minimises expected cross-entropy (E_p[−log q] ≥ E_p[−log p]), so a
    perplexity criterion must find the identity layer; on uniform random ids a random model has no such
    property (cutting some layer often lowers their perplexity). ``lm_head`` is scaled up so the tiny model's
    next-token distributions are peaked enough for 16 short windows to show it.
    """
    model = build_tiny("llama", layers=6)
    layer = find_decoder_layers(model)[1][3]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.mul_(16.0)
    return model, sample_windows(model, 16, 16, seed=0)


# The + rule never removes layer 3 of 6, and LLM-Streamline measures blocks of n + 1 layers.
@pytest.mark.parametrize("method", [m for m in CRITERIA if m not in ("tail", "ppl-plus", "taylor-plus",
                                                                   "cosine-streamline")])
def test_an_exact_identity_layer_is_chosen(method, identity_at_3):
    model, windows = identity_at_3
    result = selected(Handle.of(model), windows, 1, method)
    assert result.segments == [(3, 4)]
    assert result.kl == pytest.approx(0.0, abs=1e-6)


def test_unknown_method_lists_the_valid_ones(windows):
    with pytest.raises(LayercutError, match="block-influence"):
        select_by_criterion(Handle.of(build_tiny("llama")), windows, 1, "magnitude")
    with pytest.raises(LayercutError, match="remove between 1 and 5"):
        select_by_criterion(Handle.of(build_tiny("llama")), windows, 6, "tail")


def test_hooked_states_match_hidden_states_except_the_post_norm_last_one(windows):
    model = build_tiny("llama")
    captured = []
    mean_over_windows(Handle.of(model), windows, lambda s: captured.append(s) or torch.zeros(()), batch_size=4)
    with torch.no_grad():
        reference = torch.stack(model(windows, output_hidden_states=True).hidden_states)  # [L+1, b, T, D]
    assert torch.equal(captured[0][:-1], reference[:-1])
    assert not torch.allclose(captured[0][-1], reference[-1])  # transformers normalises its last entry
    assert torch.allclose(model.model.norm(captured[0][-1]), reference[-1], atol=1e-5)


def test_removal_perplexity_equals_perplexity_of_the_dropped_model(windows):
    model = build_tiny("llama")
    found = removal_perplexities(Handle.of(model), windows, [[1, 4]], batch_size=3)
    dropped = copy.deepcopy(model)
    drop_layers(dropped, [(1, 2), (4, 5)])
    assert found[0] == pytest.approx(perplexity(dropped, windows), rel=1e-5)


def test_taylor_leaves_no_gradients_and_restores_requires_grad(windows):
    model = build_tiny("llama")
    frozen = find_decoder_layers(model)[1][0].mlp.up_proj.weight
    frozen.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    scores = layer_taylor_scores(Handle.of(model), windows, batch_size=3)
    assert scores.shape == (6,) and bool((scores > 0).all())
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_taylor_gradient_is_accumulated_over_batches(windows):
    model = build_tiny("llama")
    assert torch.allclose(layer_taylor_scores(Handle.of(model), windows, batch_size=1),
                          layer_taylor_scores(Handle.of(model), windows, batch_size=4), rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "opt", "gemma2", "phi"])
def test_hidden_state_criteria_run_on_other_families(family, windows):
    model = build_tiny(family)
    for method in ("block-influence", "angular"):
        result = select_by_criterion(Handle.of(model), windows, 2, method)
        assert sum(end - start for start, end in result.segments) == 2
