"""The concave gate: invariants of the hooks, the notch profile, and the search against the exhaustive oracle."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from conftest import LAYERS, VOCAB, build_tiny, random_ids, window_costs
from layercut.config import SearchOptions
from layercut.forward import (
    checkpointed_layers,
    final_hidden,
    gated,
    hard_gates,
    hard_kl,
    head_kl,
    head_logits,
    head_reproduces_logits,
    kl_rows,
    outputs_of,
    token_kl,
)
from layercut.gate import (
    exhaustive,
    neighbours,
    notch_mask,
    refine,
    refine_beam,
    round_widths,
    search_exhaustive,
    search_gate,
    search_notches,
)
from layercut.layers import Handle, drop_layers, find_decoder_layers


def layers_of(model):
    return find_decoder_layers(model)[1]


def gate_search(model, windows, remove, steps=60, seed=0, **options):
    return search_gate(Handle.of(model), windows, remove, SearchOptions(method="clp", gate_steps=steps, **options),
                       seed=seed)


def oracle(model, windows, remove):
    return search_exhaustive(Handle.of(model), windows, remove, SearchOptions())


def test_gate_of_one_changes_nothing(tiny_model):
    ids = random_ids()
    with torch.no_grad():
        expected = tiny_model(ids).logits
        with gated(layers_of(tiny_model)) as set_gates:
            set_gates(torch.ones(1, LAYERS))
            actual = tiny_model(ids).logits
    torch.testing.assert_close(actual, expected)


def test_gate_of_zero_equals_dropping_the_segment(family):
    ids = random_ids()
    model = build_tiny(family)
    with torch.no_grad(), gated(layers_of(model)) as set_gates:
        set_gates(hard_gates([((2, 4),)], LAYERS))
        gated_logits = model(ids).logits
    drop_layers(model, [(2, 4)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gated_logits, atol=1e-5, rtol=1e-5)


def test_stacked_profiles_apply_per_row():
    model = build_tiny("llama")
    ids = random_ids(batch=2)
    candidates = [((0, 2),), ((3, 5),)]
    with torch.no_grad(), gated(layers_of(model)) as set_gates:
        set_gates(hard_gates(candidates, LAYERS))
        stacked = model(ids.repeat(2, 1)).logits
        for row, candidate in enumerate(candidates):
            set_gates(hard_gates([candidate], LAYERS))
            torch.testing.assert_close(stacked[2 * row : 2 * row + 2], model(ids).logits, atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_gate_and_nothing_else():
    model = build_tiny("qwen3").requires_grad_(False)
    ids = random_ids()
    starts = torch.tensor([[1.3]], requires_grad=True)
    with gated(layers_of(model)) as set_gates:
        with torch.no_grad():
            teacher = model(ids).logits
        set_gates(1 - notch_mask(starts, torch.tensor([[2.0]]), LAYERS, tau=0.5))
        loss = token_kl(teacher, model(ids).logits).mean()
        loss.backward()
    assert starts.grad is not None and starts.grad.abs().item() > 0
    assert all(p.grad is None for p in model.parameters())


class CountedCopies(torch.Tensor):
    """Gates ``[R, L]`` that count how often they (or their per-layer slices) are sent to a device; the hidden
    states computed from them (3-d) inherit the class and are not counted."""
    copies = 0

    def to(self, *args, **kwargs):
        if self.dim() <= 2 and ("device" in kwargs or (args and isinstance(args[0], (torch.device, str)))):
            CountedCopies.copies += 1
        return super().to(*args, **kwargs)


def test_gates_go_to_the_layers_device_once_per_pass_not_once_per_layer():
    # a copy between the host and a GPU waits for the GPU: one per layer would stall every gated pass
    model = build_tiny("llama").requires_grad_(False)
    starts = torch.tensor([[1.3]], requires_grad=True)
    CountedCopies.copies = 0
    with gated(layers_of(model)) as set_gates:
        for passes, first in ((1, 0), (2, 2)):  # each pass (a gate step) copies its gates once
            set_gates((1 - notch_mask(starts, torch.tensor([[2.0]]), LAYERS, tau=0.5)).as_subclass(CountedCopies),
                      first)
            model(random_ids()).logits.float().mean().backward()
            assert CountedCopies.copies == passes
    assert starts.grad is not None and starts.grad.abs().item() > 0


def test_notch_mask_is_the_indicator_at_low_temperature():
    mask = notch_mask(torch.tensor([[2.0, 6.0]]), torch.tensor([[3.0, 1.0]]), 8, tau=0.01)
    expected = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 0]], dtype=torch.float32)
    torch.testing.assert_close(mask, expected, atol=1e-6, rtol=0)
    soft = notch_mask(torch.tensor([[2.5]]), torch.tensor([[3.0]]), 8, tau=0.3)
    assert soft[0, 3] > 0.9 and soft[0, 0] < 0.01 and 0.2 < soft[0, 2] < 0.8


def test_token_kl_matches_direct_computation_and_is_zero_on_equal_inputs():
    generator = torch.Generator().manual_seed(0)
    p = torch.randn(2, 5, 11, generator=generator)
    q = torch.randn(4, 5, 11, generator=generator)
    direct = torch.stack([
        torch.nn.functional.kl_div(q[r].log_softmax(-1), p[r % 2].log_softmax(-1), log_target=True,
                                   reduction="sum") / 5
        for r in range(4)
    ])
    torch.testing.assert_close(token_kl(p, q, chunk=2), direct)
    assert token_kl(p, p).abs().max() < 1e-6


def test_round_widths_and_neighbours():
    assert round_widths([2.6, 3.4], 6) == [3, 3]
    assert sum(round_widths([0.1, 0.2, 5.7], 6)) == 6
    assert set(neighbours(((3, 6),), 10)) == {((2, 5),), ((4, 7),)}
    assert neighbours(((0, 3),), 3) == []


def test_refine_beam_reaches_a_cut_that_one_climb_misses():
    # SmolLM2-135M, 10 of 30 layers, calibration seed 1 (128 windows): the gate's four lowest two-segment read-outs
    # and their exact KL; [4, 8) + [13, 19) is two steps from the lowest and one from the third and fourth
    read = {((3, 6), (12, 19)): 1.5289, ((3, 7), (13, 19)): 1.5469, ((4, 6), (12, 20)): 1.5503,
            ((4, 7), (12, 19)): 1.5755}
    best = ((4, 8), (13, 19))
    assert best in neighbours(((3, 7), (13, 19)), 30) and best not in neighbours(((3, 6), (12, 19)), 30)
    calls = []

    def exact(candidates):
        calls.append(list(candidates))
        return [1.5014 if c == best else read.get(c, 1.6 + 0.001 * sum(s for s, _ in c)) for c in candidates]

    assert refine(read, exact, 30, dict(read))[0] == ((3, 6), (12, 19))  # one climb stops at its local optimum
    known, calls[:] = dict(read), []
    scored = refine_beam(known, exact, 30, segments=2, width=4)
    lowest = sorted((c for c in known if len(c) == 2), key=known.get)
    assert lowest[0] == best and scored == sum(map(len, calls)) == len(known) - len(read)
    assert refine_beam(known, exact, 30, segments=2, width=4) == 0  # settled: no neighbour of the four is new


@pytest.mark.parametrize(
    "costs",
    [
        # a narrow deep well (start 3) beside a wide shallow one (starts 9-13)
        [5, 5, 5, 0.2, 0.1, 0.2, 4, 4, 4, 1, 1, 1, 1, 1, 1, 1, 4, 4, 4, 4],
        # the best window at the very end
        [3, 2, 2, 2, 3, 3, 3, 2, 2, 2, 2, 3, 1, 0.5, 0.4, 0.3],
        # the best window at the very start
        [0.1, 0.2, 0.1, 2, 2, 2, 1, 1, 1, 2, 2, 2, 3, 3],
    ],
)
@pytest.mark.parametrize("remove", [2, 3, 4])
def test_search_reaches_the_exhaustive_optimum_on_synthetic_landscapes(costs, remove):
    objective, hard = window_costs(costs, interaction=0.3)
    best = exhaustive(hard, len(costs), remove)
    found = search_notches(objective, hard, len(costs), remove, SearchOptions(gate_steps=40))
    assert found.kl == pytest.approx(best.kl)  # ties allowed: several windows can share the optimum
    assert found.landscape[" ".join(f"{s}:{e}" for s, e in found.segments)] == pytest.approx(best.kl)
    assert found.evaluations < best.evaluations + 8


def test_two_notches_find_two_separate_wells():
    costs = [3, 3, 0.1, 0.1, 3, 3, 3, 3, 3, 0.1, 0.1, 3, 3, 3]
    objective, hard = window_costs(costs)
    found = search_notches(objective, hard, len(costs), 4, SearchOptions(segments=2, gate_steps=60))
    assert found.segments == [(2, 4), (9, 11)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gate_search_matches_exhaustive_on_a_tiny_model(family):
    model = build_tiny(family, layers=8)
    windows = random_ids(batch=4, length=12, seed=1)
    exact = oracle(model, windows, 2)
    found = gate_search(model, windows, 2, steps=20)
    assert found.kl == pytest.approx(exact.kl, rel=1e-5)
    assert found.segments == exact.segments
    again = gate_search(model, windows, 2, steps=20)
    assert again.segments == found.segments and again.trajectory == found.trajectory


def test_hard_kl_is_zero_for_no_cut_and_positive_for_a_cut():
    model = build_tiny("llama")
    windows = random_ids(batch=3, length=10)
    losses = hard_kl(Handle.of(model), windows, [(), ((1, 3),)], batch_size=2)
    assert abs(losses[0]) < 1e-6 and losses[1] > 0


# ------------------------------------------------------------------ memory-lean search: chunked head, checkpointing


def test_output_head_of_final_hidden_states_reproduces_the_logits(family):
    model = build_tiny(family)
    if hasattr(model.config, "final_logit_softcapping"):
        model.config.final_logit_softcapping = 0.05  # small enough that forgetting the cap would show
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(head_logits(model, final_hidden(model, ids)), model(ids).logits)
    assert head_reproduces_logits(model, ids)


def test_a_model_that_rescales_its_logits_is_scored_on_full_logits():
    model = build_tiny("llama")

    def rescale(module, args, output):
        output.logits = output.logits * 2
        return output

    model.register_forward_hook(rescale)
    assert not head_reproduces_logits(model, random_ids())


def test_chunked_head_kl_equals_full_logit_kl_in_value_and_gradient():
    model = build_tiny("gemma2").requires_grad_(False)
    model.config.final_logit_softcapping = 0.5
    ids = random_ids(batch=2)
    gates_of = [lambda s: 1 - notch_mask(s, torch.tensor([[2.0], [1.5]]), LAYERS, tau=0.5)]
    results = []
    for chunked in (False, True):
        starts = torch.tensor([[1.3], [3.1]], requires_grad=True)
        with gated(layers_of(model)) as set_gates:
            with torch.no_grad():
                teacher = outputs_of(model, ids, chunked)
            set_gates(gates_of[0](starts))
            student = outputs_of(model, ids.repeat(2, 1), chunked)
            # a budget of 3 vocabularies per chunk splits the 16 positions into 6 chunks (4 rows)
            kl = head_kl(model, teacher, student, budget=3 * 4 * VOCAB) if chunked else kl_rows(model, teacher, student, False)
            kl.sum().backward()
        results.append((kl.detach(), starts.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_checkpointed_layers_give_the_same_gate_gradient_and_recompute_each_layer(family):
    model = build_tiny(family).requires_grad_(False)
    _, layers = find_decoder_layers(model)
    ids = random_ids()
    calls = []
    for layer in layers:
        layer.register_forward_hook(lambda *args: calls.append(1))
    gradients, counts = [], []
    for checkpointing in (False, True):
        calls.clear()
        starts = torch.tensor([[1.3]], requires_grad=True)
        with gated(layers) as set_gates, (checkpointed_layers(model, layers) if checkpointing else nullcontext()):
            set_gates(1 - notch_mask(starts, torch.tensor([[2.0]]), LAYERS, tau=0.5))
            model(ids).logits.square().mean().backward()
        gradients.append(starts.grad)
        counts.append(len(calls))
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-5, atol=1e-8)
    assert counts == [LAYERS, 2 * LAYERS]  # forward, then each layer again during backward
    assert not any(module.training for module in model.modules())  # flags restored, dropout never on
    assert not any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
    # nor does the input embedding stay hooked to require grad (a later backward would run down to it)
    assert not model.get_input_embeddings()._forward_hooks
    assert not model.get_input_embeddings()(ids).requires_grad


@pytest.mark.parametrize("segments", [1, 2])
def test_search_with_checkpointing_finds_the_same_segments(segments):
    model = build_tiny("qwen2")
    windows = random_ids(batch=6, length=12, seed=3)
    plain = gate_search(model, windows, 2, steps=8, segments=segments)
    lean = gate_search(model, windows, 2, steps=8, segments=segments, gate_checkpointing=True)
    assert len(lean.segments) == segments
    assert lean.segments == plain.segments
    assert lean.kl == pytest.approx(plain.kl, rel=1e-5)
    for mine, theirs in zip(lean.trajectory, plain.trajectory):
        torch.testing.assert_close(torch.tensor(mine["starts"]), torch.tensor(theirs["starts"]), rtol=1e-4, atol=1e-5)
